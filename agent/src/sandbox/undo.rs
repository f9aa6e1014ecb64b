//! The undo list of one step: each resource a step acquires (a network, a
//! VM, a folder, a file) pushes how to give it back. If the step fails, the
//! list runs backwards; if it succeeds, the step commits and nothing runs.
//!
//! This is the in-process half of every step's journal. The other half is
//! the LMDB record, written before the step starts (its intent) and after it
//! ends (its commit): when the agent dies mid-step there is no list left to
//! run, and recovery works from the record instead ([`super::recovery`]).

use lmdb_schema::SandboxId;

use super::error::SandboxError;

type Step<'a> = Box<dyn FnOnce() -> Result<(), SandboxError> + 'a>;

/// What to give back if the step fails, newest last.
pub(super) struct Undo<'a> {
    sandbox: SandboxId,
    steps: Vec<(&'static str, Step<'a>)>,
}

impl<'a> Undo<'a> {
    pub(super) fn new(sandbox: &SandboxId) -> Undo<'a> {
        Undo {
            sandbox: sandbox.clone(),
            steps: Vec::new(),
        }
    }

    /// Adds how to give back what was just acquired; `what` names it in
    /// the log.
    pub(super) fn push(
        &mut self,
        what: &'static str,
        undo: impl FnOnce() -> Result<(), SandboxError> + 'a,
    ) {
        self.steps.push((what, Box::new(undo)));
    }

    /// The step succeeded: keep everything.
    pub(super) fn commit(mut self) {
        self.steps.clear();
    }

    /// The step failed: gives everything back, newest first. Every undo is
    /// tried; failures are logged, and what they leave behind is found by
    /// the clean-up at the next start.
    pub(super) fn unwind(mut self) {
        self.run();
    }

    fn run(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            if let Err(e) = undo() {
                tracing::error!(sandbox = %self.sandbox, error = %e, "cannot {what}");
            }
        }
    }
}

impl Drop for Undo<'_> {
    /// A step that returns early without committing (an error passed up
    /// with `?`, a panic) gives back what it took, too.
    fn drop(&mut self) {
        self.run();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn id() -> SandboxId {
        SandboxId::parse("sb-undo000000000000000").expect("id")
    }

    #[test]
    fn a_failed_step_gives_back_everything_newest_first_even_past_a_failure() {
        let done = RefCell::new(Vec::new());
        let mut undo = Undo::new(&id());
        undo.push("remove the folder", || {
            done.borrow_mut().push("folder");
            Ok(())
        });
        undo.push("remove the network", || {
            done.borrow_mut().push("network");
            Err(SandboxError::Internal("still busy".into()))
        });
        undo.push("stop the VM", || {
            done.borrow_mut().push("vm");
            Ok(())
        });
        undo.unwind();
        assert_eq!(*done.borrow(), ["vm", "network", "folder"]);
    }

    #[test]
    fn a_committed_step_keeps_everything() {
        let done = RefCell::new(0);
        let mut undo = Undo::new(&id());
        undo.push("stop the VM", || {
            *done.borrow_mut() += 1;
            Ok(())
        });
        undo.commit();
        assert_eq!(*done.borrow(), 0);
    }

    #[test]
    fn an_early_return_without_commit_gives_back_too() {
        let done = RefCell::new(0);
        let step = || -> Result<(), SandboxError> {
            let mut undo = Undo::new(&id());
            undo.push("stop the VM", || {
                *done.borrow_mut() += 1;
                Ok(())
            });
            Err(SandboxError::Internal("boot failed".into()))?;
            undo.commit();
            Ok(())
        };
        assert!(step().is_err());
        assert_eq!(*done.borrow(), 1);
    }
}
