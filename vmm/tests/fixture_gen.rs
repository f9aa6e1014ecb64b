//! Writes the format-4 `vmstate` fixtures of `tests/fixtures/` with the
//! encoder of format 4 (this commit's). Run once, by hand:
//! `cargo test --release -p wrenn-vmm --test fixture_gen -- --ignored`.
//! A committed fixture is never regenerated: later formats add their own.

// The sample sets a few fields of zeroed KVM structures.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::*;
use wrenn_vmm::devices::{DevicesState, SerialSaved};
use wrenn_vmm::snapshot::{VcpuState, VmState};
use wrenn_vmm::virtio::block::persist::OverlayState;
use wrenn_vmm::virtio::block::{DriveSource, LayeredSource};
use wrenn_vmm::virtio::net::MacAddr;
use wrenn_vmm::virtio::persist::*;
use wrenn_vmm::{Exit, Machine, MachineConfig};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
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

fn sample() -> VmState {
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
        vcpus_count: 1,
        memory_mb: 16,
        vcpus: vec![vcpu],
        pic_master: chip(0),
        pic_slave: chip(1),
        ioapic: chip(2),
        pit: kvm_pit_state2::default(),
        clock: kvm_clock_data {
            clock: 123_456_789,
            ..Default::default()
        },
        devices: DevicesState {
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

/// Packs a memory file as (u64 LE page index, 4096 bytes) per non-zero page.
fn pack_memory(memory: &Path, out: &Path) {
    let bytes = std::fs::read(memory).unwrap();
    let mut packed = Vec::new();
    for (index, page) in bytes.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            packed.extend_from_slice(&(index as u64).to_le_bytes());
            packed.extend_from_slice(page);
        }
    }
    std::fs::write(out, packed).unwrap();
}

#[test]
#[ignore]
fn write_format4_fixtures() {
    let mut bytes = postcard::to_extend(&sample(), vec![4u8]).unwrap();
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(fixtures().join("sample-format4.vmstate"), bytes).unwrap();

    let config = MachineConfig {
        vcpus: 1,
        memory_mb: 16,
        track_dirty_pages: false,
    };
    let ms: u64 = std::env::var("STOP_MS")
        .map(|s| s.parse().unwrap())
        .unwrap_or(30);
    let mut machine = Machine::new(config, Box::new(std::io::sink())).unwrap();
    machine
        .load_program(&std::fs::read(env!("WRENN_GUEST_COUNTER")).unwrap())
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            stop.store(true, Ordering::Release);
        })
    };
    assert_eq!(machine.run_until(&stop).unwrap(), Exit::Paused);
    stopper.join().unwrap();
    let dir = tempfile::tempdir().unwrap();
    machine.save(dir.path()).unwrap();
    let out = fixtures().join("counter-format4");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir.path().join("vmstate"), out.join("vmstate")).unwrap();
    pack_memory(&dir.path().join("memory"), &out.join("memory.pages"));
}
