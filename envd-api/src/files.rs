//! The entries that `GET /fs/stat` and `GET /fs/list` report.

use serde::{Deserialize, Serialize};

/// What kind of file an entry is (`type` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// One file, directory or link (the answer of `/fs/stat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits in octal, e.g. "0644" (with setuid/setgid/sticky).
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// `None` for a uid without a name.
    pub owner: Option<String>,
    /// `None` for a gid without a name.
    pub group: Option<String>,
    /// RFC 3339 UTC, e.g. "2024-05-01T12:00:00.000Z".
    pub modified: String,
    /// The link's content, for symlinks.
    pub symlink_target: Option<String>,
}

/// The answer of `/fs/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<EntryInfo>,
    /// True when the entry limit was reached and entries were left out.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_with_type_and_nulls_in_todays_order() {
        let wire = r#"{"name":"app.py","path":"/home/user/app.py","type":"file","size":1234,"mode":"0644","uid":1000,"gid":1000,"owner":"user","group":null,"modified":"2024-05-01T12:00:00.000Z","symlink_target":null}"#;
        let entry: EntryInfo = serde_json::from_str(wire).expect("parse");
        assert_eq!(entry.kind, EntryKind::File);
        assert_eq!(entry.group, None);
        assert_eq!(serde_json::to_string(&entry).expect("encode"), wire);
        let listing = Listing {
            entries: vec![entry],
            truncated: false,
        };
        let text = serde_json::to_string(&listing).expect("encode");
        assert_eq!(text, format!(r#"{{"entries":[{wire}],"truncated":false}}"#));
        assert_eq!(serde_json::from_str::<Listing>(&text).ok(), Some(listing));
    }

    #[test]
    fn entry_kinds_are_lowercase_words() {
        for (kind, word) in [
            (EntryKind::File, "\"file\""),
            (EntryKind::Dir, "\"dir\""),
            (EntryKind::Symlink, "\"symlink\""),
            (EntryKind::Other, "\"other\""),
        ] {
            assert_eq!(serde_json::to_string(&kind).expect("encode"), word);
        }
    }
}
