//! Files: streamed upload/download (200 MiB by sha256), stat, list, mkdir,
//! move, delete, permissions as another user, and path validation.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{q, Envd, Resp, Scratch};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random bytes, hashed as they are produced.
struct Pattern {
    remaining: u64,
    state: u64,
    hash: Sha256,
}

impl Pattern {
    fn new(len: u64) -> Self {
        Pattern {
            remaining: len,
            state: 0x9E37_79B9_7F4A_7C15,
            hash: Sha256::new(),
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.remaining as usize) & !7;
        let n = if n == 0 {
            buf.len().min(self.remaining as usize)
        } else {
            n
        };
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
        self.hash.update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn sha256_of(mut reader: impl Read) -> (Vec<u8>, u64) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).expect("read download");
        if n == 0 {
            return (hash.finalize().to_vec(), total);
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

#[test]
fn upload_and_download_of_200_mib_round_trip_by_sha256() {
    const SIZE: u64 = 200 << 20;
    let envd = Envd::start();
    let dir = Scratch::new("big");
    let path = dir.path("nested/dir/big.bin");
    let mut pattern = Pattern::new(SIZE);
    let upload = Resp::from(
        envd.request("PUT", &format!("/files?path={}", q(&path)))
            .set("Content-Length", &SIZE.to_string())
            .send(&mut pattern),
    );
    assert_eq!(upload.status, 201, "{}", upload.text());
    assert_eq!(upload.json()["size"], SIZE);
    let sent_hash = pattern.hash.finalize().to_vec();

    let download = envd
        .request("GET", &format!("/files?path={}", q(&path)))
        .call()
        .expect("download");
    assert_eq!(download.content_type(), "application/octet-stream");
    assert_eq!(
        download.header("Content-Length"),
        Some(SIZE.to_string().as_str())
    );
    let (got_hash, got_len) = sha256_of(download.into_reader());
    assert_eq!(got_len, SIZE);
    assert_eq!(
        got_hash, sent_hash,
        "downloaded bytes differ from uploaded ones"
    );
    let peak = envd.peak_rss();
    assert!(
        peak < 50 << 20,
        "envd peaked at {} MiB: the transfer was buffered",
        peak >> 20
    );
}

#[test]
fn chunked_upload_without_content_length_works() {
    let envd = Envd::start();
    let dir = Scratch::new("chunked");
    let path = dir.path("c.bin");
    let mut pattern = Pattern::new(3 << 20);
    let upload = Resp::from(
        envd.request("POST", &format!("/files?path={}", q(&path)))
            .send(&mut pattern),
    );
    assert_eq!(upload.status, 201, "{}", upload.text());
    let on_disk = std::fs::read(&path).expect("uploaded file");
    assert_eq!(
        Sha256::digest(&on_disk).to_vec(),
        pattern.hash.finalize().to_vec()
    );
}

#[test]
fn upload_replaces_a_file_and_keeps_its_mode() {
    let envd = Envd::start();
    let dir = Scratch::new("replace");
    let path = dir.path("script.sh");
    std::fs::write(&path, b"old").expect("seed");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let resp = Resp::from(
        envd.request("PUT", &format!("/files?path={}", q(&path)))
            .send_bytes(b"new"),
    );
    assert_eq!(resp.status, 201);
    assert_eq!(std::fs::read(&path).ok(), Some(b"new".to_vec()));
    let mode = std::fs::metadata(&path)
        .map(|m| m.mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o750);
}

#[test]
fn download_errors_missing_404_directory_400_relative_400() {
    let envd = Envd::start();
    let dir = Scratch::new("dlerr");
    envd.get(&format!("/files?path={}", q(&dir.path("missing"))))
        .assert_error(404, "not_found");
    envd.get(&format!("/files?path={}", q(&dir.path(""))))
        .assert_error(400, "invalid_argument");
    envd.get("/files?path=relative/file")
        .assert_error(400, "invalid_argument");
    envd.get("/files").assert_error(400, "invalid_argument");
    envd.get("/fs/stat?path=rel")
        .assert_error(400, "invalid_argument");
    Resp::from(envd.request("PUT", "/files?path=rel").send_bytes(b"x"))
        .assert_error(400, "invalid_argument");
    Resp::from(
        envd.request("PUT", &format!("/files?path={}", q(&dir.path(""))))
            .send_bytes(b"x"),
    )
    .assert_error(400, "invalid_argument");
}

#[test]
fn permission_errors_are_403_for_the_acting_user() {
    let envd = Envd::start();
    let dir = Scratch::new("perm");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = dir.path("secret");
    std::fs::write(&secret, b"x").expect("seed");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    envd.get(&format!("/files?path={}&user=nobody", q(&secret)))
        .assert_error(403, "permission_denied");
    assert_eq!(
        envd.get(&format!("/files?path={}", q(&secret))).status,
        200,
        "root may read it"
    );

    let private = dir.path("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let target = format!("{private}/f");
    Resp::from(
        envd.request("PUT", &format!("/files?path={}&user=nobody", q(&target)))
            .send_bytes(b"x"),
    )
    .assert_error(403, "permission_denied");
    envd.post(
        "/fs/mkdir",
        json!({"path": format!("{private}/sub"), "user": "nobody"}),
    )
    .assert_error(403, "permission_denied");
    envd.delete(&format!("/files?path={}&user=nobody", q(&secret)))
        .assert_error(403, "permission_denied");
}

#[test]
fn files_created_for_a_user_are_owned_by_that_user() {
    let envd = Envd::start();
    let dir = Scratch::new("owner");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let path = dir.path("made/by/nobody.txt");
    let resp = Resp::from(
        envd.request("PUT", &format!("/files?path={}&user=nobody", q(&path)))
            .send_bytes(b"hi"),
    );
    assert_eq!(resp.status, 201, "{}", resp.text());
    for p in [dir.path("made"), dir.path("made/by"), path.clone()] {
        let meta = std::fs::metadata(&p).expect("created");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{p}");
    }
    let stat = envd.get(&format!("/fs/stat?path={}", q(&path))).json();
    assert_eq!(stat["owner"], "nobody");
}

#[test]
fn stat_describes_files_directories_and_symlinks() {
    let envd = Envd::start();
    let dir = Scratch::new("stat");
    let file = dir.path("f.txt");
    std::fs::write(&file, b"hello").expect("seed");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::symlink("f.txt", dir.path("link")).expect("symlink");

    let f = envd.get(&format!("/fs/stat?path={}", q(&file))).json();
    assert_eq!(f["name"], "f.txt");
    assert_eq!(f["path"], file);
    assert_eq!(f["type"], "file");
    assert_eq!(f["size"], 5);
    assert_eq!(f["mode"], "0640");
    assert_eq!(f["uid"], 0);
    assert_eq!(f["owner"], "root");
    assert!(f["modified"]
        .as_str()
        .is_some_and(|m| m.len() == 24 && m.ends_with('Z')));
    assert_eq!(f["symlink_target"], serde_json::Value::Null);

    let link = envd
        .get(&format!("/fs/stat?path={}", q(&dir.path("link"))))
        .json();
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["symlink_target"], "f.txt");
    let d = envd
        .get(&format!("/fs/stat?path={}", q(&dir.path(""))))
        .json();
    assert_eq!(d["type"], "dir");
    envd.get(&format!("/fs/stat?path={}", q(&dir.path("nope"))))
        .assert_error(404, "not_found");
    let home = envd.get("/fs/stat?path=~").json();
    assert_eq!(home["path"], "/root");
}

#[test]
fn list_recurses_to_the_requested_depth_without_following_symlinks() {
    let envd = Envd::start();
    let dir = Scratch::new("list");
    std::fs::create_dir_all(dir.0.join("a/b/c")).expect("mkdir");
    std::fs::write(dir.0.join("top.txt"), b"1").expect("write");
    std::fs::write(dir.0.join("a/b/deep.txt"), b"2").expect("write");
    std::os::unix::fs::symlink(&dir.0, dir.0.join("loop")).expect("symlink");

    let names = |depth: u32| -> Vec<String> {
        let listing = envd
            .get(&format!("/fs/list?path={}&depth={depth}", q(&dir.path(""))))
            .json();
        assert_eq!(listing["truncated"], false);
        let mut paths: Vec<String> = listing["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                e["path"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches(&dir.path(""))
                    .to_owned()
            })
            .collect();
        paths.sort();
        paths
    };
    assert_eq!(names(1), ["a", "loop", "top.txt"]);
    assert_eq!(names(2), ["a", "a/b", "loop", "top.txt"]);
    assert_eq!(
        names(3),
        ["a", "a/b", "a/b/c", "a/b/deep.txt", "loop", "top.txt"]
    );
    assert_eq!(
        names(100),
        names(3),
        "depth is capped and symlinks are not followed"
    );
    envd.get(&format!("/fs/list?path={}&depth=0", q(&dir.path(""))))
        .assert_error(400, "invalid_argument");
    envd.get(&format!("/fs/list?path={}", q(&dir.path("top.txt"))))
        .assert_error(400, "invalid_argument");
    envd.get(&format!("/fs/list?path={}", q(&dir.path("missing"))))
        .assert_error(404, "not_found");
}

#[test]
fn mkdir_creates_parents_and_reports_existing_and_conflicts() {
    let envd = Envd::start();
    let dir = Scratch::new("mkdir");
    let deep = dir.path("x/y/z");
    let created = envd.post("/fs/mkdir", json!({"path": deep}));
    assert_eq!(created.status, 201);
    assert_eq!(created.json()["created"], true);
    assert!(std::path::Path::new(&deep).is_dir());
    let again = envd.post("/fs/mkdir", json!({"path": deep}));
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["created"], false);
    std::fs::write(dir.path("file"), b"x").expect("write");
    envd.post("/fs/mkdir", json!({"path": dir.path("file/sub")}))
        .assert_error(409, "conflict");
    envd.post("/fs/mkdir", json!({"path": "rel/dir"}))
        .assert_error(400, "invalid_argument");
}

#[test]
fn move_renames_and_reports_missing_sources_and_conflicts() {
    let envd = Envd::start();
    let dir = Scratch::new("move");
    std::fs::write(dir.path("a.txt"), b"A").expect("write");
    let moved = envd.post(
        "/fs/move",
        json!({"from": dir.path("a.txt"), "to": dir.path("b.txt")}),
    );
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert!(!dir.0.join("a.txt").exists());
    assert_eq!(std::fs::read(dir.0.join("b.txt")).ok(), Some(b"A".to_vec()));
    envd.post(
        "/fs/move",
        json!({"from": dir.path("a.txt"), "to": dir.path("c.txt")}),
    )
    .assert_error(404, "not_found");
    envd.post(
        "/fs/move",
        json!({"from": dir.path("b.txt"), "to": dir.path("no/such/dir/c.txt")}),
    )
    .assert_error(404, "not_found");
    std::fs::create_dir_all(dir.0.join("full/inner")).expect("mkdir");
    std::fs::create_dir(dir.0.join("src")).expect("mkdir");
    envd.post(
        "/fs/move",
        json!({"from": dir.path("src"), "to": dir.path("full")}),
    )
    .assert_error(409, "conflict");
}

#[test]
fn move_across_file_systems_copies_and_deletes() {
    let envd = Envd::start();
    if !std::path::Path::new("/dev/shm").is_dir() {
        return;
    }
    let dir = Scratch::new("xdev");
    std::fs::create_dir_all(dir.0.join("tree/sub")).expect("mkdir");
    std::fs::write(dir.0.join("tree/sub/f"), b"data").expect("write");
    let to = format!("/dev/shm/envd-it-{}-xdev", std::process::id());
    let _ = std::fs::remove_dir_all(&to);
    let moved = envd.post("/fs/move", json!({"from": dir.path("tree"), "to": to}));
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert!(!dir.0.join("tree").exists());
    assert_eq!(
        std::fs::read(format!("{to}/sub/f")).ok(),
        Some(b"data".to_vec())
    );
    let _ = std::fs::remove_dir_all(&to);
}

#[test]
fn delete_removes_files_symlinks_and_trees() {
    let envd = Envd::start();
    let dir = Scratch::new("delete");
    std::fs::create_dir_all(dir.0.join("tree/a/b")).expect("mkdir");
    std::fs::write(dir.0.join("tree/a/b/f"), b"x").expect("write");
    std::fs::write(dir.0.join("file"), b"x").expect("write");
    std::os::unix::fs::symlink(dir.0.join("file"), dir.0.join("link")).expect("symlink");

    assert_eq!(
        envd.delete(&format!("/files?path={}", q(&dir.path("link"))))
            .status,
        204
    );
    assert!(dir.0.join("file").exists(), "a symlink's target is kept");
    assert_eq!(
        envd.delete(&format!("/files?path={}", q(&dir.path("file"))))
            .status,
        204
    );
    assert_eq!(
        envd.delete(&format!("/files?path={}", q(&dir.path("tree"))))
            .status,
        204
    );
    assert!(!dir.0.join("tree").exists());
    envd.delete(&format!("/files?path={}", q(&dir.path("tree"))))
        .assert_error(404, "not_found");
    envd.delete("/files?path=/")
        .assert_error(400, "invalid_argument");
}
