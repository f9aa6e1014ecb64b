//! Processes on the wire: the body of `POST /processes`, its background
//! answer, and the NDJSON events of a process stream (`start`, output,
//! `truncated`, `keepalive`, `end`) with the encoding of output bytes.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The body of `POST /processes`. envd checks it (program, user, cwd, tag)
/// before anything runs; see `docs/envd-api.md` for each field's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// The program: searched in PATH unless it contains `/`.
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra variables; they override the `/init` defaults.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run in a terminal of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// `true`: stdin is a pipe written through `/processes/{sel}/stdin`.
    #[serde(default)]
    pub stdin: bool,
    /// `true`: answer `201` with [`Started`] at once instead of streaming.
    #[serde(default)]
    pub background: bool,
}

impl StartRequest {
    /// A request to run `cmd` with `args`, every other field at its default.
    pub fn command<S: AsRef<str>>(cmd: &str, args: &[S]) -> StartRequest {
        StartRequest {
            cmd: cmd.to_owned(),
            args: args.iter().map(|a| a.as_ref().to_owned()).collect(),
            ..StartRequest::default()
        }
    }
}

/// Terminal size in character cells (also the body and answer of
/// `POST /processes/{sel}/resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// The answer of a background start (`201`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    pub tag: Option<String>,
}

/// One NDJSON line of a process stream, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Always first, also when re-attaching.
    Start {
        pid: u32,
        tag: Option<String>,
    },
    Stdout(OutputData),
    Stderr(OutputData),
    /// Output of a process in a terminal (stdout and stderr together).
    Pty(OutputData),
    /// The buffer dropped output this client had not seen.
    Truncated {
        dropped_bytes: u64,
    },
    /// Sent after a quiet period, so dead clients are noticed; ignore it.
    Keepalive,
    /// Always last.
    End {
        /// `None` when a signal killed the process.
        exit_code: Option<i32>,
        /// The signal's name, such as "SIGKILL".
        signal: Option<String>,
        /// Why the exit status is unknown, if it is.
        error: Option<String>,
    },
    /// An event type this version does not know (from a newer envd).
    /// Clients skip it; envd never sends it.
    #[serde(other)]
    Unknown,
}

/// How the `data` of an output event is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `data` is the text itself.
    #[default]
    Utf8,
    /// `data` is base64 of the raw bytes.
    Base64,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Utf8 => "utf8",
            Encoding::Base64 => "base64",
        }
    }
}

/// Output bytes: UTF-8 text as is, anything else as base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputData {
    pub data: String,
    pub encoding: Encoding,
}

impl OutputData {
    /// Encodes `bytes`: as text when they are valid UTF-8, else as base64.
    pub fn encode(bytes: &[u8]) -> OutputData {
        match std::str::from_utf8(bytes) {
            Ok(text) => OutputData {
                data: text.to_owned(),
                encoding: Encoding::Utf8,
            },
            Err(_) => OutputData {
                data: BASE64.encode(bytes),
                encoding: Encoding::Base64,
            },
        }
    }

    /// The exact bytes the process wrote.
    pub fn bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        match self.encoding {
            Encoding::Utf8 => Ok(self.data.as_bytes().to_vec()),
            Encoding::Base64 => BASE64.decode(&self.data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each event as envd writes it today, byte for byte.
    fn wire_events() -> Vec<(Event, &'static str)> {
        vec![
            (
                Event::Start {
                    pid: 4242,
                    tag: None,
                },
                r#"{"type":"start","pid":4242,"tag":null}"#,
            ),
            (
                Event::Start {
                    pid: 7,
                    tag: Some("web".into()),
                },
                r#"{"type":"start","pid":7,"tag":"web"}"#,
            ),
            (
                Event::Stdout(OutputData::encode(b"hi\n")),
                r#"{"type":"stdout","data":"hi\n","encoding":"utf8"}"#,
            ),
            (
                Event::Stderr(OutputData::encode(&[0xff, 0xfe])),
                r#"{"type":"stderr","data":"//4=","encoding":"base64"}"#,
            ),
            (
                Event::Pty(OutputData::encode(b"$ ")),
                r#"{"type":"pty","data":"$ ","encoding":"utf8"}"#,
            ),
            (
                Event::Truncated { dropped_bytes: 10 },
                r#"{"type":"truncated","dropped_bytes":10}"#,
            ),
            (Event::Keepalive, r#"{"type":"keepalive"}"#),
            (
                Event::End {
                    exit_code: Some(0),
                    signal: None,
                    error: None,
                },
                r#"{"type":"end","exit_code":0,"signal":null,"error":null}"#,
            ),
            (
                Event::End {
                    exit_code: None,
                    signal: Some("SIGKILL".into()),
                    error: None,
                },
                r#"{"type":"end","exit_code":null,"signal":"SIGKILL","error":null}"#,
            ),
        ]
    }

    #[test]
    fn events_round_trip_byte_for_byte() {
        for (event, wire) in wire_events() {
            assert_eq!(serde_json::to_string(&event).expect("encode"), wire);
            let back: Event = serde_json::from_str(wire).expect("parse");
            assert_eq!(back, event, "{wire}");
        }
    }

    #[test]
    fn unknown_event_types_parse_as_unknown() {
        let event: Event = serde_json::from_str(r#"{"type":"future","x":1}"#).expect("parse");
        assert_eq!(event, Event::Unknown);
    }

    #[test]
    fn end_without_error_field_reads_as_none() {
        let event: Event =
            serde_json::from_str(r#"{"type":"end","exit_code":3,"signal":null}"#).expect("parse");
        assert_eq!(
            event,
            Event::End {
                exit_code: Some(3),
                signal: None,
                error: None
            }
        );
    }

    #[test]
    fn output_bytes_survive_either_encoding() {
        for bytes in [&b"plain text"[..], &[0xff, 0x00, 0xfe][..], "€".as_bytes()] {
            assert_eq!(OutputData::encode(bytes).bytes().expect("decode"), bytes);
        }
        assert_eq!(OutputData::encode(&[0xff]).encoding, Encoding::Base64);
    }

    #[test]
    fn start_request_round_trips_and_defaults_missing_fields() {
        let request = StartRequest {
            env: BTreeMap::from([("DEBUG".into(), "1".into())]),
            cwd: Some("/root".into()),
            pty: Some(PtySize { cols: 80, rows: 24 }),
            tag: Some("my-job".into()),
            stdin: true,
            ..StartRequest::command("python3", &["-c", "print('hi')"])
        };
        let wire = r#"{"cmd":"python3","args":["-c","print('hi')"],"env":{"DEBUG":"1"},"cwd":"/root","pty":{"cols":80,"rows":24},"tag":"my-job","stdin":true,"background":false}"#;
        assert_eq!(serde_json::to_string(&request).expect("encode"), wire);
        assert_eq!(
            serde_json::from_str::<StartRequest>(wire).ok(),
            Some(request)
        );
        let minimal: StartRequest = serde_json::from_str(r#"{"cmd":"ls"}"#).expect("parse");
        assert_eq!(minimal, StartRequest::command::<&str>("ls", &[]));
        let nulls: StartRequest =
            serde_json::from_str(r#"{"cmd":"ls","pty":null,"user":null}"#).expect("nulls");
        assert_eq!(nulls.pty, None);
    }

    #[test]
    fn background_answer_has_pid_and_tag() {
        let started = Started {
            pid: 1234,
            tag: Some("my-job".into()),
        };
        let wire = r#"{"pid":1234,"tag":"my-job"}"#;
        assert_eq!(serde_json::to_string(&started).expect("encode"), wire);
        assert_eq!(serde_json::from_str::<Started>(wire).ok(), Some(started));
    }
}
