//! What a snapshot keeps of a network device: which tap and which MAC. A
//! frame waiting for a guest buffer is not kept (a wire may drop it too).

use serde::{Deserialize, Serialize};

use super::{MacAddr, Net, NetConfig};
use crate::virtio::DeviceError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub iface_id: String,
    pub tap_name: String,
    pub mac: MacAddr,
}

impl Net {
    pub(crate) fn save(&self) -> NetState {
        NetState {
            iface_id: self.config.iface_id.clone(),
            tap_name: self.config.tap_name.clone(),
            mac: self.config.mac,
        }
    }

    /// Reattaches to the tap of the same name in the VMM's namespace.
    pub(crate) fn restore(state: &NetState) -> Result<Net, DeviceError> {
        Net::open(NetConfig {
            iface_id: state.iface_id.clone(),
            tap_name: state.tap_name.clone(),
            mac: state.mac,
        })
    }
}
