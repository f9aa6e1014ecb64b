//! HTTP handlers for `/files` and `/fs/*`. Each operation runs with the file
//! permissions of the requested user (`user`, default: the default user), so
//! access checks and the owner of anything created are that user's.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;
use wrenn_http::stream::NdjsonStream;
use wrenn_http::{ApiError, Exchange, Reply};

use super::files;
use super::identity::FsIdentity;
use super::meta;
use super::ops::{self, Created};
use super::paths::{self, display};
use super::watch::Watcher;
use crate::settings::SharedSettings;
use crate::users::{self, Account};

/// The acting user and the `path` query parameter.
fn query_target(settings: &SharedSettings, ex: &Exchange) -> Result<(Account, PathBuf), ApiError> {
    let default_user = settings.read().default_user.clone();
    let account = users::lookup_or_default(ex.query().text("user")?, &default_user)?;
    let raw = ex.query().path("path").ok_or_else(|| {
        ApiError::invalid_argument(
            "query parameter 'path' is required, e.g. ?path=/home/user/file.txt",
        )
    })?;
    let path = paths::absolute(&raw, &account.home, "path")?;
    Ok((account, path))
}

/// `GET /files?path=`: the file's bytes, streamed from disk.
pub fn download(settings: &SharedSettings, ex: &Exchange) -> Result<Reply, ApiError> {
    let (account, path) = query_target(settings, ex)?;
    let _identity = FsIdentity::assume(&account)?;
    files::open_for_download(&path)
}

/// `PUT|POST /files?path=`: the raw body replaces the file atomically.
pub fn upload(settings: &SharedSettings, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let (account, path) = query_target(settings, ex)?;
    let _identity = FsIdentity::assume(&account)?;
    let expected = ex.body_length();
    let mut body = ex.body()?;
    let done = files::upload(&path, &mut body, expected)?;
    tracing::info!(path = %done.path.display(), size = done.size, user = %account.name, "file written");
    Ok(Reply::Json(
        201,
        json!({"path": display(&done.path), "size": done.size}),
    ))
}

/// `DELETE /files?path=`
pub fn delete(settings: &SharedSettings, ex: &Exchange) -> Result<Reply, ApiError> {
    let (account, path) = query_target(settings, ex)?;
    let _identity = FsIdentity::assume(&account)?;
    files::remove(&path)?;
    tracing::info!(path = %path.display(), user = %account.name, "path deleted");
    Ok(Reply::NoContent)
}

/// `GET /fs/stat?path=`
pub fn stat(settings: &SharedSettings, ex: &Exchange) -> Result<Reply, ApiError> {
    let (account, path) = query_target(settings, ex)?;
    let _identity = FsIdentity::assume(&account)?;
    let info = meta::stat(&path)?;
    Ok(Reply::Json(200, json!(info)))
}

/// `GET /fs/list?path=&depth=`
pub fn list(settings: &SharedSettings, ex: &Exchange) -> Result<Reply, ApiError> {
    let (account, path) = query_target(settings, ex)?;
    let depth = ex.query().number("depth", 1)?;
    if depth == 0 {
        return Err(ApiError::invalid_argument(
            "depth must be at least 1 (1 = direct children)",
        ));
    }
    let _identity = FsIdentity::assume(&account)?;
    let listing = meta::list(&path, depth)?;
    Ok(Reply::Json(200, json!(listing)))
}

#[derive(Deserialize)]
struct MkdirRequest {
    path: PathBuf,
    user: Option<String>,
}

/// `POST /fs/mkdir` `{"path","user"}`: 201 created, 200 already there.
pub fn mkdir(settings: &SharedSettings, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let request: MkdirRequest = ex.json()?;
    let account = body_account(settings, request.user.as_deref())?;
    let path = paths::absolute(&request.path, &account.home, "path")?;
    let _identity = FsIdentity::assume(&account)?;
    let created = ops::make_dirs(&path)?;
    let status = if created == Created::New { 201 } else { 200 };
    Ok(Reply::Json(
        status,
        json!({"path": display(&path), "created": created == Created::New}),
    ))
}

#[derive(Deserialize)]
struct MoveRequest {
    from: PathBuf,
    to: PathBuf,
    user: Option<String>,
}

/// `POST /fs/move` `{"from","to","user"}`
pub fn move_path(settings: &SharedSettings, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let request: MoveRequest = ex.json()?;
    let account = body_account(settings, request.user.as_deref())?;
    let from = paths::absolute(&request.from, &account.home, "from")?;
    let to = paths::absolute(&request.to, &account.home, "to")?;
    let _identity = FsIdentity::assume(&account)?;
    ops::move_path(&from, &to)?;
    tracing::info!(from = %from.display(), to = %to.display(), user = %account.name, "path moved");
    Ok(Reply::Json(
        200,
        json!({"from": display(&from), "to": display(&to)}),
    ))
}

fn body_account(settings: &SharedSettings, user: Option<&str>) -> Result<Account, ApiError> {
    let default_user = settings.read().default_user.clone();
    users::lookup_or_default(user, &default_user)
}

/// `GET /fs/watch?path=&recursive=`: NDJSON stream of changes.
pub fn watch(settings: &SharedSettings, ex: &mut Exchange) -> Result<Reply, ApiError> {
    let (account, path) = query_target(settings, ex)?;
    let recursive = ex.query().flag("recursive", false)?;
    let _identity = FsIdentity::assume(&account)?;
    let watcher = Watcher::open(&path, recursive)?;
    let request = ex.take_request()?;
    stream_watch(watcher, request, &path);
    Ok(Reply::Streamed)
}

fn stream_watch(watcher: Watcher, request: wrenn_http::Request, path: &Path) {
    let result = NdjsonStream::open(request).and_then(|mut stream| {
        watcher.run(&mut stream)?;
        stream.finish()
    });
    match result {
        Ok(()) => tracing::info!(path = %path.display(), "watch ended: the directory is gone"),
        Err(err) => {
            tracing::debug!(path = %path.display(), error = %err, "watch ended: client went away")
        }
    }
}
