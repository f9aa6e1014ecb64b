//! The VM state of the current layout ([`super::STATE_VERSION`]): the
//! machine's shape, then what each part's [`Persist::save`] returned, in
//! restore order.
//!
//! A change to any type reachable from [`VmState`] (here or in a part's
//! state struct) is a change of the layout: the golden test below fails,
//! and the change needs a new state version (docs/vmm.md, "Changing the
//! VM state"). Serde attributes that make postcard's output depend on the
//! value (`skip_serializing_if`, `flatten`, `untagged`) must not be used:
//! postcard is not self-describing.
//!
//! [`Persist::save`]: crate::persist::Persist::save

use serde::{Deserialize, Serialize};

use crate::devices::SerialSaved;
use crate::kvm_state::{VcpuState, VmChipsState};
use crate::machine::MachineConfig;
use crate::virtio::persist::DeviceState;

/// The whole VM except its memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub machine: MachineShape,
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The PICs, the IOAPIC, the PIT and the clock.
    pub chips: VmChipsState,
    /// The serial port's registers and unread input.
    pub serial: SerialSaved,
    /// The virtio devices, in slot order.
    pub virtio: Vec<DeviceState>,
}

/// What the VM is made of: a restore creates it so before setting state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub vcpus: u8,
    pub memory_mb: u32,
}

impl VmState {
    /// The machine a restore creates for this state.
    pub fn config(&self) -> MachineConfig {
        MachineConfig {
            vcpus: self.machine.vcpus,
            memory_mb: self.machine.memory_mb,
            track_dirty_pages: false,
        }
    }

    /// Whether the parts agree with each other.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.vcpus.len() != usize::from(self.machine.vcpus) {
            return Err(format!(
                "it holds {} vCPUs but says {}",
                self.vcpus.len(),
                self.machine.vcpus
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! A fixed state with every kind of part, and the golden test of its
    //! encoding.

    // The sample sets a few fields of zeroed KVM structures.
    #![allow(clippy::field_reassign_with_default)]

    use std::path::{Path, PathBuf};

    use kvm_bindings::*;

    use super::*;
    use crate::snapshot::format::{decode, encode, FileVersion};
    use crate::virtio::block::persist::OverlayState;
    use crate::virtio::block::{DriveSource, LayeredSource};
    use crate::virtio::net::MacAddr;
    use crate::virtio::persist::{
        BlockState, DeviceStateKind, NetState, QueueConfig, TransportState,
    };

    pub(crate) fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn queue(desc: u64, next: u16) -> QueueConfig {
        QueueConfig {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: desc,
            avail_ring: desc + 0x1000,
            used_ring: desc + 0x2000,
            next_avail: next,
            next_used: next - 1,
            event_idx_enabled: false,
        }
    }

    fn transport(queues: Vec<QueueConfig>) -> TransportState {
        TransportState {
            device_features_sel: 1,
            driver_features_sel: 1,
            acked_features: 1 << 32 | 1 << 5,
            queue_sel: 0,
            status: 15,
            config_generation: 0,
            interrupt_status: 1,
            queues,
        }
    }

    /// The same values as the format-4 sample
    /// (`tests/fixtures/sample-format4.vmstate`), in today's layout.
    pub(crate) fn sample() -> VmState {
        let mut regs = kvm_regs::default();
        regs.rip = 0x10_0000;
        regs.rsp = 0x8000;
        regs.rax = 0x1234;
        regs.rflags = 2;
        let mut sregs = kvm_sregs::default();
        sregs.cr0 = 0x8000_0031;
        sregs.cr3 = 0x9000;
        sregs.efer = 0x500;
        let mut xcrs = kvm_xcrs::default();
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].value = 7;
        let mut debug_regs = kvm_debugregs::default();
        debug_regs.dr7 = 0x400;
        let vcpu = VcpuState {
            regs,
            sregs,
            xsave: kvm_xsave::default(),
            xcrs,
            msrs: vec![(0x10, 42), (0xc000_0080, 0x500)],
            lapic: kvm_lapic_state::default(),
            mp_state: kvm_mp_state { mp_state: 0 },
            events: kvm_vcpu_events::default(),
            debug_regs,
        };
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        VmState {
            machine: MachineShape {
                vcpus: 1,
                memory_mb: 16,
            },
            vcpus: vec![vcpu],
            chips: VmChipsState {
                pic_master: chip(0),
                pic_slave: chip(1),
                ioapic: chip(2),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 123_456_789,
                    ..Default::default()
                },
            },
            serial: SerialSaved {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 1,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"ls\n".to_vec(),
            },
            virtio: vec![
                DeviceState {
                    transport: transport(vec![queue(0x40_0000, 7)]),
                    kind: DeviceStateKind::Block(BlockState {
                        drive_id: "rootfs".into(),
                        source: DriveSource::Layered(LayeredSource {
                            header: "state/headers/base".into(),
                            layers_dir: "state/layers".into(),
                            overlay: "state/sandboxes/sb-1/overlay".into(),
                        }),
                        is_root_device: true,
                        read_only: false,
                        capacity: 2048,
                        overlay: Some(OverlayState {
                            block_size: 4096,
                            blocks: vec![0, 3, 9],
                        }),
                    }),
                },
                DeviceState {
                    transport: transport(vec![queue(0x50_0000, 3)]),
                    kind: DeviceStateKind::Block(BlockState {
                        drive_id: "data".into(),
                        source: DriveSource::Raw {
                            path: "data.img".into(),
                        },
                        is_root_device: false,
                        read_only: true,
                        capacity: 8,
                        overlay: None,
                    }),
                },
                DeviceState {
                    transport: transport(vec![queue(0x60_0000, 2), queue(0x70_0000, 5)]),
                    kind: DeviceStateKind::Net(NetState {
                        iface_id: "eth0".into(),
                        tap_name: "tap0".into(),
                        mac: MacAddr([6, 0, 0xac, 0x10, 0, 2]),
                    }),
                },
            ],
        }
    }

    /// The body bytes of a state: the KVM structures have no `PartialEq`,
    /// so states are compared by their encoding.
    pub(crate) fn body(state: &VmState) -> Vec<u8> {
        postcard::to_allocvec(state).expect("encodes")
    }

    const SAMPLE_1_0: &str = "sample-1.0.vmstate";

    #[test]
    fn the_sample_encodes_to_the_committed_1_0_bytes() {
        let golden = std::fs::read(fixture(SAMPLE_1_0)).expect("the committed 1.0 sample");
        assert!(
            encode(&sample()).expect("encodes") == golden,
            "the encoding of VmState changed: that needs a new state version, see docs/vmm.md"
        );
        let (decoded, version) = decode(Path::new(SAMPLE_1_0), &golden).expect("decodes");
        assert_eq!(version.to_string(), "1.0");
        assert!(matches!(version, FileVersion::Versioned(_)));
        assert_eq!(body(&decoded), body(&sample()));
    }

    #[test]
    fn the_format_4_sample_upgrades_to_the_same_state() {
        let name = "sample-format4.vmstate";
        let bytes = std::fs::read(fixture(name)).expect("the committed format-4 sample");
        let (upgraded, version) = decode(Path::new(name), &bytes).expect("decodes");
        assert_eq!(version, FileVersion::Legacy(4));
        assert_eq!(body(&upgraded), body(&sample()));
    }

    #[test]
    fn a_state_that_miscounts_its_vcpus_is_refused() {
        let mut state = sample();
        state.machine.vcpus = 2;
        let bytes = encode(&state).expect("encodes");
        let err = decode(Path::new("vmstate"), &bytes).err().expect("refused");
        assert!(err.to_string().contains("1 vCPUs but says 2"), "{err}");
    }

    /// Writes the sample fixture of this version; refuses to replace one. Run once
    /// when a version is added: `cargo test --release -p wrenn-vmm
    /// write_sample_fixture -- --ignored`.
    #[test]
    #[ignore]
    fn write_sample_fixture() {
        let path = fixture(&format!(
            "sample-{}.vmstate",
            crate::snapshot::STATE_VERSION
        ));
        assert!(
            !path.exists(),
            "{} is committed: a fixture is never regenerated, only added",
            path.display()
        );
        std::fs::write(&path, encode(&sample()).expect("encodes")).expect("written");
    }
}
