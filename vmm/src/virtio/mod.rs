//! virtio devices on the MMIO transport (virtio 1.x, "modern" only): a
//! block device backed by a raw file or a layered disk, and a network
//! device on a tap.
//!
//! - [`mmio`]: the register file a vCPU thread reads and writes; it owns a
//!   device's queues and negotiated state.
//! - [`block`], [`net`]: the devices, each with its snapshot state in a
//!   `persist` file beside it; [`persist`] holds the transport's.
//! - [`event_loop`]: the `devices` thread, which waits on the queues'
//!   ioeventfds and the taps and does the I/O, so vCPU threads only ever
//!   touch registers.
//!
//! Not here: the descriptor rings themselves (virtio-queue does them) and
//! how the guest learns where the devices are (ACPI tables or the kernel
//! command line, from [`Devices::slots`]).
//!
//! Layout: device `i` answers at [`MMIO_BASE`]` + i * `[`MMIO_SLOT_LEN`]
//! and raises GSI [`FIRST_GSI`]` + i` (the serial port has GSI 4).

pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
pub mod persist;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use crate::acpi::MmioSlot;

use self::block::{Block, DriveConfig, DriveSource};
use self::event_loop::DeviceThread;
use self::mmio::MmioTransport;
use self::net::{Net, NetConfig};
use self::persist::{DeviceState, DeviceStateKind};
use crate::persist::Persist;

/// Guest address of the first device's registers.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Each device's register window.
pub const MMIO_SLOT_LEN: u64 = 0x1000;
/// The first device's interrupt line; the next device takes the next one.
pub const FIRST_GSI: u32 = 5;
/// How many devices fit between [`FIRST_GSI`] and the IOAPIC's 24 lines.
pub const MAX_DEVICES: usize = 24 - FIRST_GSI as usize;

/// Where device number `index` lives: its register window and GSI.
pub fn slot(index: usize) -> MmioSlot {
    MmioSlot {
        addr: MMIO_BASE + index as u64 * MMIO_SLOT_LEN,
        len: MMIO_SLOT_LEN,
        gsi: FIRST_GSI + index as u32,
    }
}

/// `slot` as Linux's `virtio_mmio.device=` parameter describes it (for
/// kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`; others find
/// the devices in the ACPI tables).
pub fn cmdline_arg(slot: &MmioSlot) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        slot.len / 1024,
        slot.addr,
        slot.gsi
    )
}

/// A device that cannot be set up, restored or run.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("drive {drive_id}: cannot open {path}: {source}; give a path to an existing raw disk image the VMM may {mode}")]
    OpenDrive {
        drive_id: String,
        path: PathBuf,
        mode: &'static str,
        source: std::io::Error,
    },
    #[error("drive {drive_id}: {path} is {len} bytes, not a whole number of 512-byte sectors (at least one)")]
    DriveSize {
        drive_id: String,
        path: PathBuf,
        len: u64,
    },
    #[error("drive {drive_id}: the layered disk's base cannot be used: {source}; header_path must be a header file of the layer store (<state dir>/headers/<id>) and layers_dir its layer folder (<state dir>/layers)")]
    LayeredBase {
        drive_id: String,
        source: wrenn_layers::Error,
    },
    #[error("drive {drive_id}: overlay {path} {problem}")]
    Overlay {
        drive_id: String,
        path: PathBuf,
        problem: String,
    },
    #[error("drive {drive_id}: {path} holds {now} sectors but the snapshot's guest knows {saved}; restore onto a disk at least as large")]
    DriveShrunk {
        drive_id: String,
        path: PathBuf,
        saved: u64,
        now: u64,
    },
    #[error("network interface {iface_id}: cannot open tap {tap}: {source}; create it first (ip tuntap add {tap} mode tap) in the VMM's network namespace")]
    OpenTap {
        iface_id: String,
        tap: String,
        source: std::io::Error,
    },
    #[error(
        "network interface {iface_id}: tap name {tap:?} must be 1 to 15 bytes without '/' or NUL"
    )]
    TapName { iface_id: String, tap: String },
    #[error(
        "{0:?} is not a MAC address: write six hex bytes separated by ':', like 06:00:ac:10:00:02"
    )]
    Mac(String),
    #[error("{0} is not a unicast MAC address (its first byte is odd): pick one whose first byte is even, like 06")]
    MulticastMac(String),
    #[error("drive {drive_id} cannot be the root device: drive {root} is; make one of them is_root_device false")]
    SecondRoot { root: String, drive_id: String },
    #[error("the machine has {MAX_DEVICES} virtio devices already")]
    TooMany,
    #[error("a device with id {0:?} exists already")]
    DuplicateId(String),
    #[error("snapshot: {0}")]
    State(String),
    #[error("cannot make or connect an event descriptor for {what}: {source}")]
    Event {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start or stop the devices thread: {0}")]
    Thread(String),
}

/// A device's interrupt: the status bits the guest reads in
/// `InterruptStatus`, and the irqfd that raises its GSI.
pub(crate) struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// Sets `bits` (`VIRTIO_MMIO_INT_VRING` or `_CONFIG`) and raises the
    /// line.
    pub(crate) fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // An eventfd write fails only when its counter would overflow,
        // which means an interrupt is pending anyway.
        let _ = self.irqfd.write(1);
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device does with its queues.
pub(crate) enum Backend {
    Block(Block),
    Net(Net),
}

impl Backend {
    fn id(&self) -> &str {
        match self {
            Backend::Block(block) => &block.config().drive_id,
            Backend::Net(net) => &net.config().iface_id,
        }
    }
}

/// One plugged device.
pub(crate) struct Slot {
    pub(crate) mmio: MmioSlot,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    /// One ioeventfd per queue, registered on `QueueNotify` with the queue
    /// index as the value.
    pub(crate) notify: Arc<Vec<EventFd>>,
}

impl Slot {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drive sources to use instead of a snapshot's, by drive id (a snapshot
/// restored into another sandbox uses that sandbox's disk or overlay).
pub type DriveOverrides = HashMap<String, DriveSource>;

/// The machine's virtio devices. Shared by the vCPU threads (register
/// access) and the `devices` thread (queue processing): each device sits
/// behind its own lock; the list is written only while devices are
/// plugged in, before the guest runs.
pub struct Devices {
    slots: RwLock<Vec<Slot>>,
    memory: GuestMemoryMmap,
    thread: Mutex<Option<DeviceThread>>,
}

impl Devices {
    /// No devices yet, on the guest's `memory`.
    pub(crate) fn new(memory: GuestMemoryMmap) -> Devices {
        Devices {
            slots: RwLock::new(Vec::new()),
            memory,
            thread: Mutex::new(None),
        }
    }

    /// Where each device is, in slot order.
    pub fn slots(&self) -> Vec<MmioSlot> {
        self.list().iter().map(|slot| slot.mmio).collect()
    }

    fn list(&self) -> RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a block device backed by `config.source`.
    pub(crate) fn add_drive(
        &self,
        vm: &VmFd,
        config: DriveConfig,
    ) -> Result<MmioSlot, DeviceError> {
        self.check_id(&config.drive_id)?;
        let block = Block::open(config, None, None)?;
        self.plug(vm, |interrupt| {
            MmioTransport::new(Backend::Block(block), interrupt, self.memory.clone())
        })
    }

    /// Adds a network device on the tap `config.tap_name`.
    pub(crate) fn add_net(&self, vm: &VmFd, config: NetConfig) -> Result<MmioSlot, DeviceError> {
        self.check_id(&config.iface_id)?;
        let net = Net::open(config)?;
        self.plug(vm, |interrupt| {
            MmioTransport::new(Backend::Net(net), interrupt, self.memory.clone())
        })
    }

    fn check_id(&self, id: &str) -> Result<(), DeviceError> {
        if self
            .list()
            .iter()
            .any(|slot| slot.lock().backend().id() == id)
        {
            return Err(DeviceError::DuplicateId(id.to_owned()));
        }
        Ok(())
    }

    /// Connects the transport `transport` makes (given the slot's interrupt)
    /// at the next slot: its registers, one ioeventfd per queue, its irqfd.
    fn plug(
        &self,
        vm: &VmFd,
        transport: impl FnOnce(Arc<Interrupt>) -> Result<MmioTransport, DeviceError>,
    ) -> Result<MmioSlot, DeviceError> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        if slots.len() >= MAX_DEVICES {
            return Err(DeviceError::TooMany);
        }
        let mmio = slot(slots.len());
        let event = |what| move |source| DeviceError::Event { what, source };
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(event("an interrupt"))?;
        vm.register_irqfd(&irqfd, mmio.gsi)
            .map_err(|e| DeviceError::Event {
                what: "an interrupt",
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        let interrupt = Arc::new(Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        });
        let transport = transport(interrupt)?;
        let notify_addr = IoEventAddress::Mmio(mmio.addr + u64::from(mmio::QUEUE_NOTIFY));
        let mut notify = Vec::new();
        for index in 0..transport.queues().len() as u32 {
            let eventfd = EventFd::new(libc::EFD_NONBLOCK).map_err(event("a queue"))?;
            vm.register_ioevent(&eventfd, &notify_addr, index)
                .map_err(|e| DeviceError::Event {
                    what: "a queue",
                    source: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            notify.push(eventfd);
        }
        slots.push(Slot {
            mmio,
            transport: Arc::new(Mutex::new(transport)),
            notify: Arc::new(notify),
        });
        Ok(mmio)
    }

    /// Serves a vCPU's read at guest address `addr`; false if no device
    /// is there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match find(&self.list(), addr) {
            Some((slot, offset)) => {
                slot.lock().read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Serves a vCPU's write at guest address `addr`; false if no device
    /// is there.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match find(&self.list(), addr) {
            Some((slot, offset)) => {
                slot.lock().write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Starts the `devices` thread (with its own seccomp filter if
    /// `seccomp`); it first serves whatever the queues and taps hold, so
    /// notifications that arrived while it was stopped (or before a
    /// snapshot) are not lost. Does nothing without devices or if it runs.
    pub fn start(&self, seccomp: bool) -> Result<(), DeviceError> {
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        let slots = self.list();
        if slots.is_empty() || thread.is_some() {
            return Ok(());
        }
        *thread = Some(DeviceThread::spawn(&slots, self.memory.clone(), seccomp)?);
        Ok(())
    }

    /// Stops the `devices` thread between two requests and waits for it:
    /// afterwards every request the guest made is either finished (in the
    /// used ring) or not started (still in the available ring).
    pub fn stop(&self) -> Result<(), DeviceError> {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match thread {
            Some(thread) => thread.stop(),
            None => Ok(()),
        }
    }

    /// Whether the `devices` thread runs.
    pub fn running(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Every device's state, in slot order; the devices must be stopped.
    pub fn save(&self) -> Result<Vec<DeviceState>, DeviceError> {
        if self.running() {
            return Err(DeviceError::State(
                "the devices thread is running: stop the devices before saving them".into(),
            ));
        }
        self.list().iter().map(|slot| slot.lock().save()).collect()
    }

    /// Plugs the devices of a snapshot back in, in their slots, reopening
    /// their files and taps (`overrides` replaces drive paths by id).
    pub(crate) fn restore(
        &self,
        vm: &VmFd,
        states: &[DeviceState],
        overrides: &DriveOverrides,
    ) -> Result<(), DeviceError> {
        for id in overrides.keys() {
            let known = states.iter().any(|s| match &s.kind {
                DeviceStateKind::Block(block) => &block.drive_id == id,
                DeviceStateKind::Net(_) => false,
            });
            if !known {
                return Err(DeviceError::State(format!(
                    "drive_overrides names drive {id:?}, which the snapshot does not have"
                )));
            }
        }
        for state in states {
            let drive = match &state.kind {
                DeviceStateKind::Block(saved) => overrides.get(&saved.drive_id),
                DeviceStateKind::Net(_) => None,
            };
            self.plug(vm, |interrupt| {
                let args = mmio::TransportArgs {
                    interrupt,
                    memory: self.memory.clone(),
                    drive,
                };
                MmioTransport::restore(args, state)
            })?;
        }
        Ok(())
    }
}

/// The device whose window holds `addr`, and the offset in it.
fn find(slots: &[Slot], addr: u64) -> Option<(&Slot, u64)> {
    let index = usize::try_from(addr.checked_sub(MMIO_BASE)? / MMIO_SLOT_LEN).ok()?;
    let slot = slots.get(index)?;
    Some((slot, addr - slot.mmio.addr))
}

impl Drop for Devices {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("wrenn-vmm: {e}");
        }
    }
}

impl crate::Machine {
    /// Plugs in a block device; before the guest starts.
    pub fn add_drive(&mut self, config: DriveConfig) -> crate::Result<MmioSlot> {
        Ok(self.devices.virtio.add_drive(&self.vm, config)?)
    }

    /// Plugs in a network device; before the guest starts.
    pub fn add_net(&mut self, config: NetConfig) -> crate::Result<MmioSlot> {
        Ok(self.devices.virtio.add_net(&self.vm, config)?)
    }

    /// The virtio devices: their slots, their thread.
    pub fn virtio(&self) -> &Devices {
        &self.devices.virtio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_serial_port_and_each_other() {
        let first = slot(0);
        assert_eq!((first.addr, first.len, first.gsi), (0xd000_0000, 0x1000, 5));
        assert_eq!(slot(2).addr, 0xd000_2000);
        assert_eq!(slot(MAX_DEVICES - 1).gsi, 23);
        assert_eq!(cmdline_arg(&first), "virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn macs_parse_and_print_and_bad_ones_say_why() {
        let mac: net::MacAddr = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "zz:00:00:00:00:00",
        ] {
            let err = bad.parse::<net::MacAddr>().unwrap_err().to_string();
            assert!(err.contains("not a MAC address"), "{bad}: {err}");
        }
        let err = "01:00:5e:00:00:01".parse::<net::MacAddr>().unwrap_err();
        assert!(err.to_string().contains("unicast"), "{err}");
    }
}
