//! The JSON events of process streams (`start`, output, `truncated`,
//! `keepalive`, `end`): the types are `envd_api`'s; this module builds them
//! from the output buffer and keeps UTF-8 sequences whole across reads.

pub use envd_api::{Event, OutputData};

use super::output::{Chunk, ExitInfo, StreamKind};

/// The output event of one chunk, its bytes encoded for JSON.
pub fn output(chunk: &Chunk) -> Event {
    let data = OutputData::encode(&chunk.data);
    match chunk.kind {
        StreamKind::Stdout => Event::Stdout(data),
        StreamKind::Stderr => Event::Stderr(data),
        StreamKind::Pty => Event::Pty(data),
    }
}

/// The `end` event of a process that exited.
pub fn end(exit: &ExitInfo) -> Event {
    Event::End {
        exit_code: exit.code,
        signal: exit.signal.map(signal_name),
        error: exit.error.clone(),
    }
}

/// "SIGKILL" for 9; "SIG<n>" for numbers without a name (real-time signals).
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("SIG{signal}"))
}

/// Length of the prefix of `data` that does not end inside a UTF-8 sequence.
/// Invalid bytes are not held back: such chunks are sent as base64 anyway.
pub fn complete_utf8_prefix(data: &[u8]) -> usize {
    match std::str::from_utf8(data) {
        Ok(_) => data.len(),
        Err(err) if err.error_len().is_none() => err.valid_up_to(),
        Err(_) => data.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_type_tags() {
        let start = serde_json::to_value(Event::Start {
            pid: 7,
            tag: Some("web".into()),
        })
        .unwrap_or_default();
        assert_eq!(start["type"], "start");
        assert_eq!(start["tag"], "web");
        let out =
            serde_json::to_value(Event::Stdout(OutputData::encode(b"hi"))).unwrap_or_default();
        assert_eq!(out["type"], "stdout");
        assert_eq!(out["data"], "hi");
        assert_eq!(out["encoding"], "utf8");
        let keep = serde_json::to_value(Event::Keepalive).unwrap_or_default();
        assert_eq!(keep, serde_json::json!({"type": "keepalive"}));
    }

    #[test]
    fn invalid_utf8_is_base64() {
        let data = OutputData::encode(&[0xff, 0xfe]);
        assert_eq!(data.encoding, envd_api::Encoding::Base64);
        assert_eq!(data.data, "//4=");
    }

    #[test]
    fn incomplete_trailing_sequence_is_held_back() {
        let euro = "€".as_bytes();
        assert_eq!(complete_utf8_prefix(b"abc"), 3);
        assert_eq!(complete_utf8_prefix(&[b'a', euro[0], euro[1]]), 1);
        assert_eq!(complete_utf8_prefix(&[0xff, b'a']), 2);
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(40), "SIG40");
    }
}
