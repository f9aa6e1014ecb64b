//! What a snapshot keeps of a network device: which tap and which MAC. A
//! frame waiting for a guest buffer is not kept (a wire may drop it too).

use serde::{Deserialize, Serialize};

use super::{MacAddr, Net, NetConfig};
use crate::persist::Persist;
use crate::virtio::DeviceError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub iface_id: String,
    pub tap_name: String,
    pub mac: MacAddr,
}

impl Persist<'_> for Net {
    type State = NetState;
    type ConstructorArgs = ();
    type Error = DeviceError;

    fn save(&self) -> Result<NetState, DeviceError> {
        Ok(NetState {
            iface_id: self.config.iface_id.clone(),
            tap_name: self.config.tap_name.clone(),
            mac: self.config.mac,
        })
    }

    /// Reattaches to the tap of the same name in the VMM's namespace.
    fn restore((): (), state: &NetState) -> Result<Net, DeviceError> {
        Net::open(NetConfig {
            iface_id: state.iface_id.clone(),
            tap_name: state.tap_name.clone(),
            mac: state.mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_device_restored_from_its_state_saves_the_same_state() {
        let config = NetConfig {
            iface_id: "eth0".into(),
            tap_name: format!("wrnp{}", std::process::id() % 100_000),
            mac: MacAddr([6, 0, 0xac, 0x10, 0, 2]),
        };
        // Opening a tap creates it, which needs CAP_NET_ADMIN.
        let net = match Net::open(config) {
            Ok(net) => net,
            Err(e) => {
                eprintln!("SKIPPED: cannot make a tap here: {e}");
                return;
            }
        };
        let saved = net.save().expect("saved");
        // The tap goes with its last descriptor; the restore makes it anew.
        drop(net);
        let restored = Net::restore((), &saved).expect("restored");
        assert_eq!(restored.save().expect("saved again"), saved);
    }
}
