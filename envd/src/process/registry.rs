//! The table of processes started through the API: lookup by pid or tag,
//! listing, tag reservations, and retention of finished processes (the last
//! `MAX_FINISHED`, within `MAX_FINISHED_BYTES` of buffered output).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use wrenn_http::ApiError;

use super::output::Output;

/// Finished processes kept for listing and replay.
pub const MAX_FINISHED: usize = 256;
/// Output bytes kept across all finished processes.
pub const MAX_FINISHED_BYTES: usize = 64 << 20;

/// Where client writes to a process's stdin go.
#[derive(Debug)]
pub enum Input {
    /// The process was started with `stdin: false` (its stdin is /dev/null).
    Disabled,
    /// The write end of the stdin pipe (non-blocking).
    Pipe(OwnedFd),
    /// The PTY master (non-blocking), shared with the output reader.
    Pty(Arc<OwnedFd>),
    /// Closed by the client, or the process finished.
    Closed,
}

/// One process started through the API.
#[derive(Debug)]
pub struct Process {
    pub id: u64,
    pub pid: u32,
    pub tag: Option<String>,
    pub cmd: String,
    pub args: Vec<String>,
    pub pty: bool,
    pub started_at: SystemTime,
    pub output: Output,
    pub input: Mutex<Input>,
}

impl Process {
    pub fn input(&self) -> MutexGuard<'_, Input> {
        self.input.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Table {
    processes: BTreeMap<u64, Arc<Process>>,
    by_pid: HashMap<u32, u64>,
    by_tag: HashMap<String, u64>,
    reserved_tags: HashSet<String>,
    finished: VecDeque<u64>,
}

/// All processes, running and recently finished.
#[derive(Default)]
pub struct Registry {
    table: Mutex<Table>,
    next_id: AtomicU64,
}

/// Holds a tag between the check and the insert, so two concurrent starts
/// cannot both take it. Released on drop.
pub struct TagReservation<'a> {
    registry: &'a Registry,
    tag: String,
}

impl Drop for TagReservation<'_> {
    fn drop(&mut self) {
        self.registry.lock().reserved_tags.remove(&self.tag);
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Claims `tag` for a new process; 409 if a running process has it.
    pub fn reserve_tag(&self, tag: &str) -> Result<TagReservation<'_>, ApiError> {
        let mut table = self.lock();
        let running = table
            .by_tag
            .get(tag)
            .and_then(|id| table.processes.get(id))
            .is_some_and(|p| !p.output.is_complete());
        if running || table.reserved_tags.contains(tag) {
            return Err(ApiError::conflict(format!(
                "tag '{tag}' is used by a running process; pick another tag or stop that process"
            )));
        }
        table.reserved_tags.insert(tag.to_owned());
        Ok(TagReservation {
            registry: self,
            tag: tag.to_owned(),
        })
    }

    /// Adds a started process; its pid and tag now select it.
    pub fn insert(&self, process: Arc<Process>) {
        let mut table = self.lock();
        if let Some(old) = table.by_pid.insert(process.pid, process.id) {
            // The kernel reused the pid of a finished process.
            forget(&mut table, old);
        }
        if let Some(tag) = &process.tag {
            table.by_tag.insert(tag.clone(), process.id);
        }
        table.processes.insert(process.id, process);
    }

    /// Finds a process by pid (all digits) or tag; 404 if unknown.
    pub fn find(&self, selector: &str) -> Result<Arc<Process>, ApiError> {
        let table = self.lock();
        let id = match selector.parse::<u32>() {
            Ok(pid) => table.by_pid.get(&pid),
            Err(_) => table.by_tag.get(selector),
        };
        id.and_then(|id| table.processes.get(id))
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no process with pid or tag '{}'; GET /processes lists the known ones",
                    selector.escape_debug()
                ))
            })
    }

    /// All known processes, oldest first.
    pub fn list(&self) -> Vec<Arc<Process>> {
        self.lock().processes.values().cloned().collect()
    }

    /// Records that a process finished and evicts the oldest finished ones
    /// beyond the retention limits.
    pub fn finished(&self, id: u64) {
        let mut table = self.lock();
        if !table.processes.contains_key(&id) {
            return; // already replaced by a process that reused its pid
        }
        table.finished.push_back(id);
        loop {
            let bytes: usize = table
                .finished
                .iter()
                .filter_map(|id| table.processes.get(id))
                .map(|p| p.output.retained_bytes())
                .sum();
            if table.finished.len() <= MAX_FINISHED && bytes <= MAX_FINISHED_BYTES {
                break;
            }
            match table.finished.pop_front() {
                Some(oldest) => forget(&mut table, oldest),
                None => break,
            }
        }
    }
}

/// Removes a process and the indexes that still point at it.
fn forget(table: &mut Table, id: u64) {
    let Some(process) = table.processes.remove(&id) else {
        return;
    };
    if table.by_pid.get(&process.pid) == Some(&id) {
        table.by_pid.remove(&process.pid);
    }
    if let Some(tag) = &process.tag {
        if table.by_tag.get(tag) == Some(&id) {
            table.by_tag.remove(tag);
        }
    }
    table.finished.retain(|f| *f != id);
}
