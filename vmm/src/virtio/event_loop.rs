//! The `devices` thread: one epoll set over every queue's ioeventfd, every
//! tap and a stop eventfd. A guest's `QueueNotify` write is absorbed by
//! KVM into the queue's ioeventfd, so the vCPU does not leave the kernel
//! for it; this thread wakes, serves the queue under the device's lock and
//! raises the device's irqfd.
//!
//! Stopping (pause, snapshot) writes the stop eventfd; the thread returns
//! between two wake-ups, so no request is half done. Notifications that
//! arrive while it is stopped stay counted in their eventfds, and a
//! starting thread serves every queue once anyway (a restored VM's
//! notifications were lost with the old process).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::net::{RX, TX};
use super::{Backend, DeviceError, Slot};

const STOP: u64 = u64::MAX;
/// Event data: device index in the high half, then what woke it.
const TAP: u64 = 0xffff;

fn token(device: usize, source: u64) -> u64 {
    (device as u64) << 32 | source
}

/// A running `devices` thread.
pub(crate) struct DeviceThread {
    stop: EventFd,
    handle: JoinHandle<Result<(), String>>,
}

struct Device {
    transport: Arc<Mutex<MmioTransport>>,
    notify: Arc<Vec<EventFd>>,
}

impl DeviceThread {
    /// Starts the thread for `slots`. With `seccomp`, it installs the
    /// devices filter before anything else.
    pub(crate) fn spawn(
        slots: &[Slot],
        memory: GuestMemoryMmap,
        seccomp: bool,
    ) -> Result<DeviceThread, DeviceError> {
        let event = |source| DeviceError::Event {
            what: "the devices thread",
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(event)?;
        let epoll = Epoll::new().map_err(event)?;
        let watch = |fd, events, data| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                .map_err(event)
        };
        watch(stop.as_raw_fd(), EventSet::IN, STOP)?;
        let mut devices = Vec::new();
        for (index, slot) in slots.iter().enumerate() {
            for (queue, eventfd) in slot.notify.iter().enumerate() {
                watch(
                    eventfd.as_raw_fd(),
                    EventSet::IN,
                    token(index, queue as u64),
                )?;
            }
            if let Backend::Net(net) = slot.lock().backend() {
                // Edge-triggered: a frame left in the tap for want of guest
                // buffers is retried on the receive queue's notification.
                watch(
                    net.tap_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    token(index, TAP),
                )?;
            }
            devices.push(Device {
                transport: Arc::clone(&slot.transport),
                notify: Arc::clone(&slot.notify),
            });
        }
        let told = stop.try_clone().map_err(event)?;
        let handle = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if seccomp {
                    crate::seccomp::install_devices_filter().map_err(|e| e.to_string())?;
                }
                serve(&epoll, &devices, &memory)
            })
            .map_err(|e| DeviceError::Thread(e.to_string()))?;
        Ok(DeviceThread { stop: told, handle })
    }

    /// Tells the thread to stop and waits for it.
    pub(crate) fn stop(self) -> Result<(), DeviceError> {
        self.stop
            .write(1)
            .map_err(|e| DeviceError::Thread(format!("cannot signal it: {e}")))?;
        match self.handle.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DeviceError::Thread(format!("it failed: {e}"))),
            Err(_) => Err(DeviceError::Thread("it panicked".into())),
        }
    }
}

/// The thread's loop, until the stop eventfd is written.
fn serve(epoll: &Epoll, devices: &[Device], memory: &GuestMemoryMmap) -> Result<(), String> {
    for device in devices {
        let queues = device.notify.len() as u64;
        for source in (0..queues).chain([TAP]) {
            wake(device, source, memory);
        }
    }
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(ready) => ready,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        };
        for event in &events[..ready] {
            let data = event.data();
            if data == STOP {
                return Ok(());
            }
            let Some(device) = devices.get((data >> 32) as usize) else {
                continue;
            };
            let source = data & 0xffff_ffff;
            if let Some(eventfd) = device.notify.get(source as usize) {
                // Reset the counter; one pass serves every notification.
                let _ = eventfd.read();
            }
            wake(device, source, memory);
        }
    }
}

/// Serves what `source` (a queue index or [`TAP`]) says is ready, and
/// interrupts the guest if it used buffers and wants to hear of it.
fn wake(device: &Device, source: u64, memory: &GuestMemoryMmap) {
    let mut transport = device
        .transport
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if !transport.activated() {
        return;
    }
    let (backend, queues, interrupt) = transport.parts();
    let used = match (backend, source) {
        (Backend::Block(block), 0) => used_queue(queues, 0, |q| block.process_queue(q, memory)),
        (Backend::Net(net), s) if s == RX as u64 || s == TAP => {
            used_queue(queues, RX, |q| net.process_rx(q, memory))
        }
        (Backend::Net(net), s) if s == TX as u64 => {
            used_queue(queues, TX, |q| net.process_tx(q, memory))
        }
        _ => None,
    };
    if let Some(queue) = used {
        if queue.needs_notification(memory).unwrap_or(true) {
            interrupt.raise(VIRTIO_MMIO_INT_VRING);
        }
    }
}

/// Runs `process` on ready queue `index`; the queue if it used buffers.
fn used_queue(
    queues: &mut [Queue],
    index: usize,
    process: impl FnOnce(&mut Queue) -> bool,
) -> Option<&mut Queue> {
    let queue = queues.get_mut(index).filter(|q| q.ready())?;
    process(queue).then_some(queue)
}
