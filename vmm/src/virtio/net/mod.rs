//! virtio-net on a tap: one receive and one transmit queue, the MAC in the
//! configuration space (`VIRTIO_NET_F_MAC`), no offloads.
//!
//! Transmit writes each frame to the tap. Receive reads a frame from the
//! tap when it is readable and the guest has a buffer; a frame read while
//! the guest has none waits in the device until the guest posts one (its
//! notification retries), so the tap is never read faster than the guest
//! takes frames.

pub mod persist;
pub mod tap;

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use self::tap::{Tap, VNET_HDR_LEN};
use super::DeviceError;

/// Queue indices.
pub const RX: usize = 0;
pub const TX: usize = 1;
/// The largest frame with its header: 64 KiB of payload, Ethernet header
/// and VLAN tag.
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// A MAC address, written `06:00:ac:10:00:02`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<MacAddr, DeviceError> {
        let bad = || DeviceError::Mac(text.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(DeviceError::MulticastMac(text.to_owned()));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A network interface as the API configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub iface_id: String,
    /// The host's tap device, in the VMM's network namespace.
    pub tap_name: String,
    pub mac: MacAddr,
}

/// Whether `tap` can name a network device (Linux's rules).
pub fn check_tap_name(iface_id: &str, tap: &str) -> Result<(), DeviceError> {
    if tap.is_empty() || tap.len() >= libc::IFNAMSIZ || tap.contains(['/', '\0', ' ']) {
        return Err(DeviceError::TapName {
            iface_id: iface_id.to_owned(),
            tap: tap.to_owned(),
        });
    }
    Ok(())
}

/// The network device.
pub(crate) struct Net {
    config: NetConfig,
    tap: Tap,
    /// A frame read from the tap that no guest buffer has taken yet, and
    /// its length.
    pending: Vec<u8>,
    pending_len: Option<usize>,
}

impl Net {
    pub(crate) fn open(config: NetConfig) -> Result<Net, DeviceError> {
        check_tap_name(&config.iface_id, &config.tap_name)?;
        let tap = Tap::open(&config.tap_name).map_err(|source| DeviceError::OpenTap {
            iface_id: config.iface_id.clone(),
            tap: config.tap_name.clone(),
            source,
        })?;
        Ok(Net {
            config,
            tap,
            pending: vec![0; MAX_FRAME],
            pending_len: None,
        })
    }

    pub(crate) fn config(&self) -> &NetConfig {
        &self.config
    }

    pub(crate) fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    /// `struct virtio_net_config` up to `mac`.
    pub(crate) fn config_space(&self) -> Vec<u8> {
        self.config.mac.0.to_vec()
    }

    pub(crate) fn tap_fd(&self) -> std::os::fd::RawFd {
        self.tap.fd()
    }

    /// A device reset drops the frame that waited for a buffer.
    pub(crate) fn reset(&mut self) {
        self.pending_len = None;
    }

    /// Sends every frame the guest queued; returns whether any was.
    pub(crate) fn process_tx(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> bool {
        let mut served = false;
        let mut frame = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            frame.clear();
            if let Ok(reader) = Reader::new(memory, chain) {
                // A frame longer than any tap takes is cut short; the tap
                // then drops it, as a wire would.
                let _ = reader.take(MAX_FRAME as u64).read_to_end(&mut frame);
                // A full or downed tap drops the frame.
                let _ = self.tap.write(&frame);
            }
            if queue.add_used(memory, head, 0).is_err() {
                break;
            }
            served = true;
        }
        served
    }

    /// Moves frames from the tap into the guest's receive buffers until
    /// either runs out; returns whether any buffer was used.
    pub(crate) fn process_rx(&mut self, queue: &mut Queue, memory: &GuestMemoryMmap) -> bool {
        let mut served = false;
        loop {
            let len = match self.pending_len {
                Some(len) => len,
                None => match self.tap.read(&mut self.pending) {
                    Ok(len) if len >= VNET_HDR_LEN => len,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // WouldBlock, or the tap went away: nothing to take.
                    Err(_) => return served,
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                self.pending_len = Some(len);
                return served;
            };
            self.pending_len = None;
            let head = chain.head_index();
            let written = match Writer::new(memory, chain) {
                Ok(mut writer) if writer.available_bytes() >= len => {
                    let frame = &mut self.pending[..len];
                    // Without VIRTIO_NET_F_MRG_RXBUF each frame takes one
                    // buffer, which the header's num_buffers must say.
                    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    match writer.write_all(frame) {
                        Ok(()) => len as u32,
                        Err(_) => 0,
                    }
                }
                // A buffer too small for the frame: the frame is dropped
                // and the buffer returned empty.
                _ => 0,
            };
            if queue.add_used(memory, head, written).is_err() {
                return served;
            }
            served = true;
        }
    }
}
