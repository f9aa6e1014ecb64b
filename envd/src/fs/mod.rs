//! File-system API: file contents, metadata, directory operations and
//! watches, each run with the permissions of the acting user.

pub mod api;
mod files;
mod identity;
mod meta;
mod ops;
mod paths;
mod watch;
