//! Guest memory served by a page server over userfaultfd (the VMM side of
//! the handover in docs/uffd.md).
//!
//! The VMM maps guest memory anonymously, registers it with a userfaultfd
//! (kernel-mode faults included, since KVM touches guest memory from the
//! kernel; `UFFD_EVENT_REMOVE` so that pages the guest frees are zero
//! afterwards), connects to the page server's Unix socket and sends one
//! frame: a 4-byte little-endian length, then JSON
//! `{"version":1,"regions":[{base_host_virt_addr,size,offset,page_size}]}`,
//! with the userfaultfd as `SCM_RIGHTS` on it. The server answers with a
//! frame `{"ok":true}` or `{"ok":false,"error":...}`. The socket stays open
//! for the VM's life: closing it tells the server the VM is gone.

use std::io::{IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::json;
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

const PROTOCOL_VERSION: u32 = 1;
const PAGE_SIZE: u64 = 4096;
const MAX_ANSWER: u32 = 1 << 20;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Memory whose pages a page server places: keep it (and its connection)
/// for the VM's life.
pub struct ServedMemory {
    pub memory: GuestMemoryMmap,
    pub(crate) _uffd: Uffd,
    pub(crate) _socket: UnixStream,
}

fn failed(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |why| Error::Memory(format!("userfaultfd restore: cannot {what}: {why}"))
}

/// Maps `memory_mb` of guest memory and hands it to the page server
/// listening on `socket`.
pub fn serve_memory(memory_mb: u32, socket: &Path) -> Result<ServedMemory> {
    let size = usize::try_from(memory_mb).unwrap_or(usize::MAX) << 20;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| failed("map guest memory")(e.to_string()))?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(|e| {
            failed("create a userfaultfd (root or CAP_SYS_PTRACE needed)")(e.to_string())
        })?;
    let mut regions = Vec::new();
    for region in memory.iter() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| failed("find guest memory")(e.to_string()))?;
        uffd.register(host.cast(), region.len() as usize)
            .map_err(|e| failed("register guest memory")(e.to_string()))?;
        regions.push(json!({
            "base_host_virt_addr": host as u64,
            "size": region.len(),
            "offset": region.start_addr().0,
            "page_size": PAGE_SIZE,
        }));
    }
    let stream = UnixStream::connect(socket)
        .map_err(|e| failed(&format!("connect to {}", socket.display()))(e.to_string()))?;
    let body = json!({ "version": PROTOCOL_VERSION, "regions": regions }).to_string();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    let fds = [uffd.as_raw_fd()];
    let mut sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&frame)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| failed("send the handover")(e.to_string()))?;
    while sent < frame.len() {
        sent += sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&frame[sent..])],
            &[],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| failed("send the handover")(e.to_string()))?;
    }
    read_answer(&stream)?;
    Ok(ServedMemory {
        memory,
        _uffd: uffd,
        _socket: stream,
    })
}

fn read_answer(stream: &UnixStream) -> Result<()> {
    let read = |e: std::io::Error| failed("read the page server's answer")(e.to_string());
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(read)?;
    let mut reader = stream;
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).map_err(read)?;
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_ANSWER {
        return Err(failed("read the page server's answer")(format!(
            "a frame of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body).map_err(read)?;
    stream.set_read_timeout(None).map_err(read)?;
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| failed("read the page server's answer")(e.to_string()))?;
    if answer["ok"] == true {
        Ok(())
    } else {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        Err(Error::Memory(format!(
            "the page server refused the memory: {why}"
        )))
    }
}
