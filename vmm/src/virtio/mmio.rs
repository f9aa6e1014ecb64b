//! The virtio-mmio register file, version 2 (virtio 1.x): what a vCPU
//! thread reads and writes at a device's slot. It negotiates features,
//! takes the queues' addresses and sizes, and tracks the device status;
//! the queues it configures are served by the `devices` thread.
//!
//! Registers are 32-bit; other widths read as zero and writes of them are
//! dropped. The device's configuration space starts at `0x100` and may be
//! read at any width. Only "modern" drivers are served: one that does not
//! accept `VIRTIO_F_VERSION_1` cannot set `FEATURES_OK`.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::block::{Block, DriveSource};
use super::net::Net;
use super::persist::{DeviceState, DeviceStateKind, QueueConfig, TransportState};
use super::{Backend, DeviceError, Interrupt};
use crate::persist::Persist;

/// `QueueNotify`, where each queue's ioeventfd listens.
pub const QUEUE_NOTIFY: u32 = VIRTIO_MMIO_QUEUE_NOTIFY;
/// "virt" in little-endian ASCII.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "WREN" in little-endian ASCII: no PCI vendor, so anything stable.
const VENDOR: u32 = 0x4e45_5257;
/// The most descriptors a queue may have.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// One device's transport: registers, queues, and the device behind them.
pub(crate) struct MmioTransport {
    backend: Backend,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    interrupt: Arc<Interrupt>,
    memory: GuestMemoryMmap,
}

impl MmioTransport {
    pub(crate) fn new(
        backend: Backend,
        interrupt: Arc<Interrupt>,
        memory: GuestMemoryMmap,
    ) -> Result<MmioTransport, DeviceError> {
        let count = match &backend {
            Backend::Block(_) => 1,
            Backend::Net(_) => 2,
        };
        let queues = (0..count)
            .map(|_| Queue::new(QUEUE_MAX_SIZE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeviceError::State(format!("cannot make a queue: {e}")))?;
        Ok(MmioTransport {
            backend,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            interrupt,
            memory,
        })
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The device, its queues and its interrupt, for the `devices` thread.
    pub(crate) fn parts(&mut self) -> (&mut Backend, &mut [Queue], &Interrupt) {
        (&mut self.backend, &mut self.queues, &self.interrupt)
    }

    /// Whether the driver has finished setting the device up (and the
    /// device accepted it): only then are its queues served.
    pub(crate) fn activated(&self) -> bool {
        self.status
            & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)
            == VIRTIO_CONFIG_S_DRIVER_OK
    }

    fn device_features(&self) -> u64 {
        let own = match &self.backend {
            Backend::Block(block) => block.features(),
            Backend::Net(net) => net.features(),
        };
        own | 1 << VIRTIO_F_VERSION_1
    }

    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config = match &self.backend {
                Backend::Block(block) => block.config_space(),
                Backend::Net(net) => net.config_space(),
            };
            read_config(&config, offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let queue = self.queues.get(self.queue_sel as usize);
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => match &self.backend {
                Backend::Block(_) => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
                Backend::Net(_) => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            },
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        // The configuration spaces of these devices are read-only.
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.ack_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.configure_queue(|q| q.set_size(value as u16)),
            VIRTIO_MMIO_QUEUE_READY => self.configure_queue(|q| q.set_ready(value == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.configure_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.configure_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.configure_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.configure_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.configure_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.configure_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            // QueueNotify is served by the ioeventfds; a write that did
            // not match one names no queue.
            _ => {}
        }
    }

    /// Features are taken while the driver negotiates (DRIVER set,
    /// FEATURES_OK not yet); bits the device does not offer are dropped.
    fn ack_features(&mut self, value: u32) {
        if self.status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
            != VIRTIO_CONFIG_S_DRIVER
        {
            return;
        }
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff << 32),
            _ => return,
        };
        let offered = self.device_features() & mask;
        self.acked_features = (self.acked_features & !mask) | (u64::from(value) << shift & offered);
    }

    /// Queues are set up after feature negotiation and before DRIVER_OK,
    /// and only while not ready.
    fn configure_queue(&mut self, change: impl FnOnce(&mut Queue)) {
        let phase =
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED;
        if self.status & phase != VIRTIO_CONFIG_S_FEATURES_OK {
            return;
        }
        if let Some(queue) = self.queues.get_mut(self.queue_sel as usize) {
            change(queue);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // A legacy driver: refuse, it reads FEATURES_OK back as clear.
            value &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let usable = value & VIRTIO_CONFIG_S_FEATURES_OK != 0
                && self
                    .queues
                    .iter()
                    .filter(|q| q.ready())
                    .all(|q| q.is_valid(&self.memory));
            if !usable {
                value |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = value;
    }

    /// Back to the state of a device the driver has not touched.
    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
        for queue in &mut self.queues {
            queue.reset();
        }
        if let Backend::Net(net) = &mut self.backend {
            net.reset();
        }
    }

    /// Takes the saved registers and queue positions of `state`.
    fn set_state(&mut self, state: &TransportState) -> Result<(), DeviceError> {
        if state.queues.len() != self.queues.len() {
            return Err(DeviceError::State(format!(
                "a device has {} queues in the snapshot but {} here",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let offered = self.device_features();
        if state.acked_features & !offered != 0 {
            return Err(DeviceError::State(format!(
                "the snapshot's driver accepted features {:#x} this device does not offer ({offered:#x})",
                state.acked_features
            )));
        }
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            *queue = Queue::try_from(saved.to_state())
                .map_err(|e| DeviceError::State(format!("a saved queue is not valid: {e}")))?;
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        Ok(())
    }
}

/// What a transport's restore needs besides its state.
pub(crate) struct TransportArgs<'a> {
    /// The new VM's interrupt for the device's slot.
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) memory: GuestMemoryMmap,
    /// For a block device: the drive to open instead of the saved one.
    pub(crate) drive: Option<&'a DriveSource>,
}

/// A transport saves its device with it: the slot's whole state.
impl<'a> Persist<'a> for MmioTransport {
    type State = DeviceState;
    type ConstructorArgs = TransportArgs<'a>;
    type Error = DeviceError;

    fn save(&self) -> Result<DeviceState, DeviceError> {
        let transport = TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueConfig::from(q.state()))
                .collect(),
        };
        let kind = match &self.backend {
            Backend::Block(block) => DeviceStateKind::Block(block.save()?),
            Backend::Net(net) => DeviceStateKind::Net(net.save()?),
        };
        Ok(DeviceState { transport, kind })
    }

    /// Reopens the device (its drive or tap), then takes the saved
    /// registers and queue positions.
    fn restore(args: TransportArgs<'a>, state: &DeviceState) -> Result<Self, DeviceError> {
        let backend = match &state.kind {
            DeviceStateKind::Block(saved) => Backend::Block(Block::restore(args.drive, saved)?),
            DeviceStateKind::Net(saved) => Backend::Net(Net::restore((), saved)?),
        };
        let mut transport = MmioTransport::new(backend, args.interrupt, args.memory)?;
        transport.set_state(&state.transport)?;
        Ok(transport)
    }
}

/// Copies `data.len()` bytes of `config` at `offset`; what lies beyond it
/// reads as zero.
fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start + data.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::block::DriveConfig;

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
        })
    }

    fn write(transport: &mut MmioTransport, register: u32, value: u32) {
        transport.write(u64::from(register), &value.to_le_bytes());
    }

    #[test]
    fn a_transport_restored_from_its_state_has_the_negotiated_features_and_queues() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(64 << 10))
            .expect("a raw image");
        let config = DriveConfig {
            drive_id: "rootfs".into(),
            source: DriveSource::Raw { path },
            is_root_device: true,
            read_only: false,
        };
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])
            .expect("guest memory");
        let block = Block::open(config, None, None).expect("opens");
        let mut transport =
            MmioTransport::new(Backend::Block(block), interrupt(), memory.clone()).expect("made");
        // A driver's set-up: ACKNOWLEDGE | DRIVER, VERSION_1, FEATURES_OK,
        // one queue of 128 at 64 KiB, DRIVER_OK.
        write(&mut transport, VIRTIO_MMIO_STATUS, 3);
        write(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write(&mut transport, VIRTIO_MMIO_STATUS, 0xb);
        write(&mut transport, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(&mut transport, VIRTIO_MMIO_QUEUE_NUM, 128);
        write(&mut transport, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1_0000);
        write(&mut transport, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1_1000);
        write(&mut transport, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1_2000);
        write(&mut transport, VIRTIO_MMIO_QUEUE_READY, 1);
        write(&mut transport, VIRTIO_MMIO_STATUS, 0xf);
        assert!(transport.activated());
        transport.interrupt.raise(1);
        let saved = transport.save().expect("saved");
        assert_eq!(saved.transport.acked_features, 1 << VIRTIO_F_VERSION_1);
        assert_eq!(saved.transport.queues[0].size, 128);
        drop(transport);

        let args = TransportArgs {
            interrupt: interrupt(),
            memory,
            drive: None,
        };
        let restored = MmioTransport::restore(args, &saved).expect("restored");
        assert!(restored.activated());
        assert_eq!(restored.save().expect("saved again"), saved);
        let mut status = [0u8; 4];
        restored.read(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), &mut status);
        assert_eq!(
            u32::from_le_bytes(status),
            1,
            "the pending interrupt is kept"
        );
    }
}
