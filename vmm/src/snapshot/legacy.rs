//! Format 4, frozen: the `vmstate` layout before the versioned header
//! (byte 0 the format number 4, then the postcard body, then a CRC-32C).
//! Decoded and upgraded to [`VmState`], never written.
//!
//! Every type a format-4 body reaches is copied here as it was, so that
//! later changes to the live state types cannot change how these files
//! decode; `tests/fixtures/sample-format4.vmstate` and
//! `tests/fixtures/counter-format4/` hold bytes the format-4 encoder
//! wrote. The KVM structures are kvm-bindings' own (their bytes).
//!
//! Not here: formats 1 to 3, which were refused before the header too.

use std::path::PathBuf;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::Deserialize;

use super::state::{MachineShape, VmState};
use crate::devices::SerialSaved;
use crate::kvm_state::{VcpuState, VmChipsState};
use crate::virtio::block::persist::OverlayState;
use crate::virtio::block::{DriveSource, LayeredSource};
use crate::virtio::net::MacAddr;
use crate::virtio::persist::{
    BlockState, DeviceState, DeviceStateKind, NetState, QueueConfig, TransportState,
};

#[derive(Deserialize)]
pub(crate) struct VmStateV4 {
    vcpus_count: u8,
    memory_mb: u32,
    vcpus: Vec<VcpuStateV4>,
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    devices: DevicesStateV4,
    virtio: Vec<DeviceStateV4>,
}

#[derive(Deserialize)]
struct VcpuStateV4 {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    msrs: Vec<(u32, u64)>,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debug_regs: kvm_debugregs,
}

#[derive(Deserialize)]
struct DevicesStateV4 {
    serial: SerialV4,
}

#[derive(Deserialize)]
struct SerialV4 {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

#[derive(Deserialize)]
struct DeviceStateV4 {
    transport: TransportStateV4,
    kind: DeviceStateKindV4,
}

#[derive(Deserialize)]
enum DeviceStateKindV4 {
    Block(BlockStateV4),
    Net(NetStateV4),
}

#[derive(Deserialize)]
struct TransportStateV4 {
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    interrupt_status: u32,
    queues: Vec<QueueConfigV4>,
}

#[derive(Deserialize)]
struct QueueConfigV4 {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
}

#[derive(Deserialize)]
struct BlockStateV4 {
    drive_id: String,
    source: DriveSourceV4,
    is_root_device: bool,
    read_only: bool,
    capacity: u64,
    overlay: Option<OverlayStateV4>,
}

#[derive(Deserialize)]
enum DriveSourceV4 {
    Raw { path: PathBuf },
    Layered(LayeredSourceV4),
}

#[derive(Deserialize)]
struct LayeredSourceV4 {
    header: PathBuf,
    layers_dir: PathBuf,
    overlay: PathBuf,
}

#[derive(Deserialize)]
struct OverlayStateV4 {
    block_size: u32,
    blocks: Vec<u64>,
}

#[derive(Deserialize)]
struct NetStateV4 {
    iface_id: String,
    tap_name: String,
    mac: MacAddrV4,
}

#[derive(Deserialize)]
struct MacAddrV4([u8; 6]);

/// Format 4 held the same parts as 1.0, grouped differently: the shape
/// and the chips were loose fields, the serial port sat in a `devices`
/// struct.
impl From<VmStateV4> for VmState {
    fn from(v4: VmStateV4) -> VmState {
        VmState {
            machine: MachineShape {
                vcpus: v4.vcpus_count,
                memory_mb: v4.memory_mb,
            },
            vcpus: v4.vcpus.into_iter().map(VcpuState::from).collect(),
            chips: VmChipsState {
                pic_master: v4.pic_master,
                pic_slave: v4.pic_slave,
                ioapic: v4.ioapic,
                pit: v4.pit,
                clock: v4.clock,
            },
            serial: v4.devices.serial.into(),
            virtio: v4.virtio.into_iter().map(DeviceState::from).collect(),
        }
    }
}

impl From<VcpuStateV4> for VcpuState {
    fn from(v4: VcpuStateV4) -> VcpuState {
        VcpuState {
            regs: v4.regs,
            sregs: v4.sregs,
            xsave: v4.xsave,
            xcrs: v4.xcrs,
            msrs: v4.msrs,
            lapic: v4.lapic,
            mp_state: v4.mp_state,
            events: v4.events,
            debug_regs: v4.debug_regs,
        }
    }
}

impl From<SerialV4> for SerialSaved {
    fn from(v4: SerialV4) -> SerialSaved {
        SerialSaved {
            baud_divisor_low: v4.baud_divisor_low,
            baud_divisor_high: v4.baud_divisor_high,
            interrupt_enable: v4.interrupt_enable,
            interrupt_identification: v4.interrupt_identification,
            line_control: v4.line_control,
            line_status: v4.line_status,
            modem_control: v4.modem_control,
            modem_status: v4.modem_status,
            scratch: v4.scratch,
            in_buffer: v4.in_buffer,
        }
    }
}

impl From<DeviceStateV4> for DeviceState {
    fn from(v4: DeviceStateV4) -> DeviceState {
        let t = v4.transport;
        DeviceState {
            transport: TransportState {
                device_features_sel: t.device_features_sel,
                driver_features_sel: t.driver_features_sel,
                acked_features: t.acked_features,
                queue_sel: t.queue_sel,
                status: t.status,
                config_generation: t.config_generation,
                interrupt_status: t.interrupt_status,
                queues: t.queues.into_iter().map(QueueConfig::from).collect(),
            },
            kind: match v4.kind {
                DeviceStateKindV4::Block(block) => DeviceStateKind::Block(block.into()),
                DeviceStateKindV4::Net(net) => DeviceStateKind::Net(NetState {
                    iface_id: net.iface_id,
                    tap_name: net.tap_name,
                    mac: MacAddr(net.mac.0),
                }),
            },
        }
    }
}

impl From<QueueConfigV4> for QueueConfig {
    fn from(q: QueueConfigV4) -> QueueConfig {
        QueueConfig {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<BlockStateV4> for BlockState {
    fn from(v4: BlockStateV4) -> BlockState {
        BlockState {
            drive_id: v4.drive_id,
            source: match v4.source {
                DriveSourceV4::Raw { path } => DriveSource::Raw { path },
                DriveSourceV4::Layered(l) => DriveSource::Layered(LayeredSource {
                    header: l.header,
                    layers_dir: l.layers_dir,
                    overlay: l.overlay,
                }),
            },
            is_root_device: v4.is_root_device,
            read_only: v4.read_only,
            capacity: v4.capacity,
            overlay: v4.overlay.map(|o| OverlayState {
                block_size: o.block_size,
                blocks: o.blocks,
            }),
        }
    }
}
