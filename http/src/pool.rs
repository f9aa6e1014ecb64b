//! Threads for the relay's connections, kept a while after their task ends
//! and reused: a thread started for every connection would cost each new
//! connection a thread start, about a millisecond on a loaded machine.
//!
//! A task never waits for a thread: it goes to an idle thread that was
//! claimed for it, or to a thread started for it. There is no cap here;
//! every connection holds its threads for as long as it is open, as
//! tiny_http's own connection threads do.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

/// An idle thread ends after this long without a task.
const IDLE: Duration = Duration::from_secs(30);

type Task = Box<dyn FnOnce() + Send>;

/// Reusable threads of one name and stack size.
pub(crate) struct Pool {
    name: String,
    stack: usize,
    /// Threads waiting for a task and not yet claimed by one.
    idle: Arc<AtomicUsize>,
    tasks: Sender<Task>,
    queue: Arc<Mutex<Receiver<Task>>>,
}

impl Pool {
    pub(crate) fn new(name: String, stack: usize) -> Self {
        let (tasks, queue) = channel();
        Self {
            name,
            stack,
            idle: Arc::new(AtomicUsize::new(0)),
            tasks,
            queue: Arc::new(Mutex::new(queue)),
        }
    }

    /// Runs `task` on an idle thread, or on a new one.
    pub(crate) fn run(&self, task: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let task: Task = Box::new(task);
        if claim(&self.idle) {
            // A claimed thread is waiting on the queue, so it takes a task.
            return self
                .tasks
                .send(task)
                .map_err(|_| io::Error::other("the thread pool is gone"));
        }
        let (idle, queue) = (Arc::clone(&self.idle), Arc::clone(&self.queue));
        thread::Builder::new()
            .name(self.name.clone())
            .stack_size(self.stack)
            .spawn(move || work(task, &idle, &queue))
            .map(drop)
    }
}

/// Takes one idle thread for a task, if there is one.
fn claim(idle: &AtomicUsize) -> bool {
    idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

fn work(first: Task, idle: &AtomicUsize, queue: &Mutex<Receiver<Task>>) {
    first();
    loop {
        idle.fetch_add(1, Ordering::AcqRel);
        loop {
            let next = queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv_timeout(IDLE);
            match next {
                Ok(task) => {
                    task();
                    break;
                }
                // Leave only if no task was counted on this thread.
                Err(RecvTimeoutError::Timeout) if claim(idle) => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_reused_and_no_task_waits_for_a_busy_one() {
        let pool = Pool::new("test-pool".into(), 64 << 10);
        let (done, finished) = channel();
        let first = done.clone();
        pool.run(move || first.send(thread::current().id()).unwrap())
            .unwrap();
        let a = finished.recv().unwrap();
        // Let the thread count itself idle.
        while pool.idle.load(Ordering::Acquire) == 0 {
            thread::yield_now();
        }
        let second = done.clone();
        pool.run(move || second.send(thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(finished.recv().unwrap(), a, "the idle thread is reused");
        // A task that blocks does not hold up the next one.
        let (release, blocked) = channel::<()>();
        pool.run(move || blocked.recv().unwrap_or(())).unwrap();
        let third = done.clone();
        pool.run(move || third.send(thread::current().id()).unwrap())
            .unwrap();
        finished.recv_timeout(Duration::from_secs(10)).unwrap();
        release.send(()).unwrap();
    }
}
