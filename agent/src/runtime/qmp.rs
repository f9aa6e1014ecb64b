//! A client for QEMU's machine protocol (QMP) over a Unix socket.
//!
//! QMP is one JSON object per line: a greeting, then `qmp_capabilities`, then
//! commands, each answered by `return` or `error`; asynchronous `event`
//! messages may come in between and are skipped here. This is all the agent
//! needs, so it is written out rather than pulled in as a generated binding.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::RuntimeError;

/// How long one QMP command may take before the VM is considered stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket` and leaves capabilities negotiation mode.
    pub fn connect(socket: &Path) -> Result<Qmp, RuntimeError> {
        let err = |e: std::io::Error| RuntimeError::Qmp(format!("{}: {e}", socket.display()));
        let stream = UnixStream::connect(socket).map_err(err)?;
        stream
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .map_err(err)?;
        stream
            .set_write_timeout(Some(COMMAND_TIMEOUT))
            .map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(RuntimeError::Qmp(format!(
                "unexpected greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (or none when null); returns its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, RuntimeError> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| RuntimeError::Qmp(format!("sending {command}: {e}")))?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(RuntimeError::Qmp(format!(
                    "{command}: {}",
                    error["desc"].as_str().unwrap_or("unknown error")
                )));
            }
            // An asynchronous event: not the answer we wait for.
        }
    }

    /// The VM's run state, such as `running`, `paused` or `shutdown`.
    pub fn status(&mut self) -> Result<String, RuntimeError> {
        let status = self.execute("query-status", Value::Null)?;
        Ok(status["status"].as_str().unwrap_or("unknown").to_owned())
    }

    fn read_message(&mut self) -> Result<Value, RuntimeError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|e| RuntimeError::Qmp(format!("reading: {e}")))?;
        if read == 0 {
            return Err(RuntimeError::Qmp("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| RuntimeError::Qmp(format!("bad message {line:?}: {e}")))
    }
}
