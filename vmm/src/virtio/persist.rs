//! What a snapshot keeps of each virtio device: the transport's negotiated
//! state and queue positions, and the device's own (see `block::persist`
//! and `net::persist`). Plain serde structures, saved in `VmState`; a
//! restored device's queues resume at the saved indices.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

pub use super::block::persist::BlockState;
pub use super::net::persist::NetState;

/// One device, in its slot's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub transport: TransportState,
    pub kind: DeviceStateKind,
}

/// Which device, and its own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceStateKind {
    Block(BlockState),
    Net(NetState),
}

/// The MMIO registers that hold state, and the queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueConfig>,
}

/// One queue: what the driver configured and where device and driver are
/// in its rings (virtio-queue's `QueueState`, which has no serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueConfig {
    fn from(state: QueueState) -> QueueConfig {
        QueueConfig {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx_enabled: state.event_idx_enabled,
        }
    }
}

impl QueueConfig {
    pub(crate) fn to_state(self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }
}
