//! What to do, after the agent starts, with a sandbox that a previous agent
//! process left behind: [`plan`] decides from the record and what is
//! observed on the host; [`super::Manager::reconcile`] carries the plan out.
//!
//! The decision is a pure function so that every combination of recorded
//! status, VM, files and slot is covered by a table test that needs no root,
//! no VM and no LMDB. The kill -9 end-to-end tests prove the executor.
//!
//! Not here: the steps themselves (finishing a pause, tearing down), which
//! are the lifecycle's and run the same code as the API's operations.

use lmdb_schema::{SandboxRecord, SandboxStatus};

use crate::runtime::VmState;

/// What was found on the host for one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The VM the record names: `None` when the record names none.
    pub vm: Option<VmState>,
    /// The saved VM state (`vmstate`) is in the sandbox folder.
    pub state_file: bool,
    /// The guest memory file is in the sandbox folder.
    pub memory_file: bool,
}

/// The step that puts one sandbox right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The record and the host agree: nothing to do.
    Keep,
    /// A running sandbox whose VM still runs: carry on with it.
    Reattach,
    /// A create got as far as a running VM: wait for its envd and mark it
    /// running; if that fails, roll it back.
    FinishCreate,
    /// A create or destroy was cut short: remove everything it holds and
    /// the record, logging `event`.
    RollBack { event: &'static str },
    /// A pause was cut short: finish it. `vm` is whether the VM is still
    /// there to save (else its state was saved already).
    FinishPause { vm: bool },
    /// A resume got as far as a running VM: wait for envd and mark it
    /// running; if that fails, go back to paused.
    FinishResume,
    /// A resume was cut short before the VM ran: stop what it started and
    /// mark the sandbox paused again. The snapshot is untouched.
    BackToPaused,
    /// Paused, but the memory file that the layers now hold is still in the
    /// folder: delete it.
    DropMemoryFile,
    /// The sandbox cannot go on: stop what is left of it and mark it
    /// failed with `reason`. The record stays until it is destroyed.
    Fail { reason: &'static str },
}

impl Recovery {
    /// One line for the log, saying what is being done.
    pub fn describe(self) -> &'static str {
        match self {
            Recovery::Keep => "nothing to recover",
            Recovery::Reattach => "re-attached to running VM",
            Recovery::FinishCreate => "finishing a create interrupted by a restart",
            Recovery::RollBack { .. } => "rolling back an interrupted step",
            Recovery::FinishPause { vm: true } => "finishing a pause interrupted by a restart",
            Recovery::FinishPause { vm: false } => {
                "VM state was saved before the restart; finishing the pause"
            }
            Recovery::FinishResume => "finishing a resume interrupted by a restart",
            Recovery::BackToPaused => "a resume was interrupted; back to paused",
            Recovery::DropMemoryFile => "removing a memory file the layers already hold",
            Recovery::Fail { .. } => "the sandbox cannot go on; marking it failed",
        }
    }
}

/// Decides what to do with `record`, given what was `observed`.
pub fn plan(record: &SandboxRecord, observed: Observed) -> Recovery {
    use SandboxStatus as S;
    let vm = observed.vm;
    let vm_runs = vm == Some(VmState::Running);
    let vm_exists = matches!(vm, Some(VmState::Running | VmState::Paused));
    let slot = record.slot.is_some();
    match record.status {
        S::Creating if vm_runs && slot => Recovery::FinishCreate,
        S::Creating => Recovery::RollBack {
            event: "rolled_back",
        },
        S::Destroying => Recovery::RollBack {
            event: "rolled_back",
        },
        S::Pausing if vm_exists => Recovery::FinishPause { vm: true },
        S::Pausing if observed.state_file => Recovery::FinishPause { vm: false },
        S::Pausing => Recovery::Fail {
            reason: "the VM stopped during a pause, before its state was saved",
        },
        S::Resuming if vm_runs && slot => Recovery::FinishResume,
        S::Resuming => Recovery::BackToPaused,
        S::Running if vm_runs && slot => Recovery::Reattach,
        S::Running if vm_runs => Recovery::Fail {
            reason: "the VM runs but the record names no network slot to reach it by",
        },
        S::Running => Recovery::Fail {
            reason: "the VM stopped while the agent was not running",
        },
        S::Paused if record.memory_header.is_some() && observed.memory_file => {
            Recovery::DropMemoryFile
        }
        S::Paused | S::Destroyed | S::Error => Recovery::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmdb_schema::{SandboxId, SlotId, TemplateName, TimeoutAction};

    const STATUSES: [SandboxStatus; 8] = [
        SandboxStatus::Creating,
        SandboxStatus::Running,
        SandboxStatus::Pausing,
        SandboxStatus::Paused,
        SandboxStatus::Resuming,
        SandboxStatus::Destroying,
        SandboxStatus::Destroyed,
        SandboxStatus::Error,
    ];
    const VMS: [Option<VmState>; 4] = [
        None,
        Some(VmState::Running),
        Some(VmState::Paused),
        Some(VmState::Gone),
    ];

    fn record(status: SandboxStatus, slot: bool, memory_header: bool) -> SandboxRecord {
        SandboxRecord {
            id: SandboxId::parse("sb-test0000000000000000").expect("id"),
            status,
            template: TemplateName::parse("base").expect("name"),
            vcpus: 1,
            memory_mb: 512,
            metadata: Default::default(),
            env: Default::default(),
            internet: false,
            created_at_ms: 0,
            expires_at_ms: None,
            timeout_action: TimeoutAction::Kill,
            slot: slot.then_some(SlotId(3)),
            runtime: lmdb_schema::RuntimeKind::Qemu,
            vmm: None,
            envd_token: None,
            error: None,
            updated_at_ms: 0,
            memory_header: memory_header.then_some(lmdb_schema::HeaderId([7; 32])),
            vm_state_version: None,
            idle_timeout_s: None,
            last_active_ms: 0,
            owner: None,
        }
    }

    /// What `plan` must answer, written out case by case (the spec), for
    /// one combination.
    fn expected(
        status: SandboxStatus,
        vm: Option<VmState>,
        slot: bool,
        state_file: bool,
        memory_header: bool,
        memory_file: bool,
    ) -> Recovery {
        use SandboxStatus as S;
        use VmState::{Gone, Paused, Running};
        let rolled_back = Recovery::RollBack {
            event: "rolled_back",
        };
        match (status, vm) {
            (S::Creating, Some(Running)) if slot => Recovery::FinishCreate,
            (S::Creating, _) | (S::Destroying, _) => rolled_back,
            (S::Pausing, Some(Running | Paused)) => Recovery::FinishPause { vm: true },
            (S::Pausing, None | Some(Gone)) if state_file => Recovery::FinishPause { vm: false },
            (S::Pausing, None | Some(Gone)) => Recovery::Fail {
                reason: "the VM stopped during a pause, before its state was saved",
            },
            (S::Resuming, Some(Running)) if slot => Recovery::FinishResume,
            (S::Resuming, _) => Recovery::BackToPaused,
            (S::Running, Some(Running)) if slot => Recovery::Reattach,
            (S::Running, Some(Running)) => Recovery::Fail {
                reason: "the VM runs but the record names no network slot to reach it by",
            },
            (S::Running, None | Some(Paused | Gone)) => Recovery::Fail {
                reason: "the VM stopped while the agent was not running",
            },
            (S::Paused, _) if memory_header && memory_file => Recovery::DropMemoryFile,
            (S::Paused | S::Destroyed | S::Error, _) => Recovery::Keep,
        }
    }

    #[test]
    fn every_combination_of_status_vm_files_and_slot_gets_its_step() {
        let mut cases = 0;
        for status in STATUSES {
            for vm in VMS {
                for slot in [false, true] {
                    for state_file in [false, true] {
                        for memory_header in [false, true] {
                            for memory_file in [false, true] {
                                let observed = Observed {
                                    vm,
                                    state_file,
                                    memory_file,
                                };
                                let got = plan(&record(status, slot, memory_header), observed);
                                let want = expected(
                                    status,
                                    vm,
                                    slot,
                                    state_file,
                                    memory_header,
                                    memory_file,
                                );
                                assert_eq!(
                                    got, want,
                                    "status {status:?}, vm {vm:?}, slot {slot}, state file \
                                     {state_file}, memory header {memory_header}, memory file \
                                     {memory_file}"
                                );
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 8 * 4 * 2 * 2 * 2 * 2);
    }

    #[test]
    fn a_step_in_flight_never_stays_in_flight() {
        // Whatever is found, a transitional status is finished, rolled back
        // or failed: none is kept as it is.
        for status in STATUSES.into_iter().filter(|s| s.is_transitional()) {
            for vm in VMS {
                for (slot, state_file, memory_file) in [
                    (false, false, false),
                    (true, true, true),
                    (true, false, true),
                ] {
                    let observed = Observed {
                        vm,
                        state_file,
                        memory_file,
                    };
                    let step = plan(&record(status, slot, true), observed);
                    assert!(
                        !matches!(step, Recovery::Keep | Recovery::Reattach),
                        "{status:?} with {observed:?} was left as it is"
                    );
                }
            }
        }
    }

    #[test]
    fn a_settled_sandbox_is_never_torn_down() {
        // Paused, destroyed and failed sandboxes keep their record and
        // files, whatever else is found.
        for status in [
            SandboxStatus::Paused,
            SandboxStatus::Destroyed,
            SandboxStatus::Error,
        ] {
            for vm in VMS {
                for memory_file in [false, true] {
                    let observed = Observed {
                        vm,
                        state_file: true,
                        memory_file,
                    };
                    let step = plan(&record(status, true, true), observed);
                    assert!(
                        matches!(step, Recovery::Keep | Recovery::DropMemoryFile),
                        "{status:?} with {observed:?} got {step:?}"
                    );
                }
            }
        }
    }
}
