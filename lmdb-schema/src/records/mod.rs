//! Record types: the values of each database, current version.
//!
//! One file per database. Each holds the current struct with its
//! [`Record`](crate::Record) impl and, once a layout has changed, the frozen
//! older versions and their upgrades. Records are plain data with small
//! helpers; lifecycle policy belongs to the agent.
//!
//! Serde attributes that make postcard's output depend on the value
//! (`skip_serializing_if`, `flatten`, `untagged`) must not be used here:
//! postcard is not self-describing.

mod event;
mod kinds;
mod layer;
mod sandbox;
mod slot;
mod template;

pub use event::EventRecord;
pub use kinds::{DiskFormat, RuntimeKind, VmStateVersion};
pub use layer::LayerRecord;
pub use sandbox::{SandboxRecord, SandboxStatus, TimeoutAction, VmmProcess};
pub use slot::SlotRecord;
pub use template::{TemplateKind, TemplateRecord};

#[cfg(test)]
pub(crate) mod samples {
    //! One filled-in value of every record, for tests.

    use std::collections::BTreeMap;

    use super::*;
    use crate::keys::{SandboxId, SlotId, TemplateName};
    use wrenn_layers::HeaderId;

    pub fn sandbox_id() -> SandboxId {
        SandboxId::parse("sb-test1").unwrap()
    }

    pub fn sandbox() -> SandboxRecord {
        SandboxRecord {
            id: sandbox_id(),
            status: SandboxStatus::Running,
            template: TemplateName::parse("base").unwrap(),
            vcpus: 2,
            memory_mb: 512,
            metadata: BTreeMap::from([("owner".into(), "ci".into())]),
            env: BTreeMap::from([("LANG".into(), "C.UTF-8".into())]),
            internet: true,
            created_at_ms: 1_700_000_000_000,
            expires_at_ms: Some(1_700_000_300_000),
            timeout_action: TimeoutAction::Pause,
            slot: Some(SlotId(3)),
            runtime: RuntimeKind::Qemu,
            vmm: Some(VmmProcess {
                pid: 4242,
                start_time_ticks: 123_456,
                control_socket: "/run/wrenn/sb-test1/qmp.sock".into(),
            }),
            envd_token: Some("secret".into()),
            error: None,
            updated_at_ms: 1_700_000_000_500,
            memory_header: Some(HeaderId([0xcd; 32])),
            vm_state_version: None,
            idle_timeout_s: Some(120),
            last_active_ms: 1_700_000_000_400,
            owner: None,
        }
    }

    pub fn template() -> TemplateRecord {
        TemplateRecord {
            name: TemplateName::parse("snap-1").unwrap(),
            kind: TemplateKind::Snapshot,
            vcpus: Some(2),
            memory_mb: None,
            kernel: "vmlinuz".into(),
            initramfs: "initramfs.cpio.gz".into(),
            rootfs: "rootfs.ext4".into(),
            disk_format: DiskFormat::Raw,
            runtime: Some(RuntimeKind::Native),
            size_bytes: 2 << 30,
            sha256: Some("ab".repeat(32)),
            parent_sandbox: Some(sandbox_id()),
            created_at_ms: 1_700_000_000_000,
            memory_header: Some(HeaderId([0xef; 32])),
            vm_state: Some("vmstate".into()),
            disk_base: Some("rootfs.ext4".into()),
            envd_token: Some("token".into()),
            vm_state_version: Some(VmStateVersion { major: 1, minor: 0 }),
            owner: None,
        }
    }

    pub fn slot() -> SlotRecord {
        SlotRecord {
            sandbox: sandbox_id(),
            allocated_at_ms: 1_700_000_000_000,
        }
    }

    pub fn layer() -> LayerRecord {
        LayerRecord {
            size_bytes: 3 * 4096,
            block_size: 4096,
            blocks: 3,
            sha256: [0xab; 32],
            refcount: 2,
            created_at_ms: 1_700_000_000_000,
        }
    }

    pub fn event() -> EventRecord {
        EventRecord {
            at_ms: 1_700_000_000_000,
            sandbox: Some(sandbox_id()),
            kind: "sandbox.created".into(),
            detail: "template base".into(),
        }
    }
}

#[cfg(test)]
mod golden {
    //! Every version of every record is frozen. If a test here fails, a
    //! record's layout changed without a new record version: see
    //! docs/state.md, "Changing a record".

    use super::samples;
    use crate::codec::{decode, encode, Record};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn check<R: Record + PartialEq + std::fmt::Debug>(version: u8, record: R, golden: &str) {
        assert_eq!(
            R::CURRENT_VERSION,
            version,
            "pin the new version and keep this one as an upgrade test"
        );
        let bytes = encode(&record).unwrap();
        assert_eq!(hex(&bytes), golden, "{} layout changed", R::DATABASE);
        assert_eq!(decode::<R>(&"golden", &bytes).unwrap(), record);
    }

    /// Bytes of an older version decode to the current record.
    fn upgrades<R: Record + PartialEq + std::fmt::Debug>(golden: &str, expected: R) {
        let bytes: Vec<u8> = (0..golden.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&golden[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(decode::<R>(&"golden", &bytes).unwrap(), expected);
    }

    #[test]
    fn sandbox_v1_upgrades() {
        let mut expected = samples::sandbox();
        expected.idle_timeout_s = None;
        expected.last_active_ms = expected.updated_at_ms;
        expected.memory_header = None;
        expected.vm_state_version = None;
        upgrades(
            "010873622d746573743101046261736502800401056f776e657202636901044c414e4707432e5554462d380180d095ffbc3101e0f7a7ffbc310101030471656d75019221c0c4071c2f72756e2f7772656e6e2f73622d74657374312f716d702e736f636b010673656372657400f4d395ffbc31",
            expected,
        );
    }

    #[test]
    fn sandbox_v2_upgrades() {
        let mut expected = samples::sandbox();
        expected.idle_timeout_s = None;
        expected.last_active_ms = expected.updated_at_ms;
        expected.vm_state_version = None;
        upgrades(
            "020873622d746573743101046261736502800401056f776e657202636901044c414e4707432e5554462d380180d095ffbc3101e0f7a7ffbc310101030471656d75019221c0c4071c2f72756e2f7772656e6e2f73622d74657374312f716d702e736f636b010673656372657400f4d395ffbc3101cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
            expected,
        );
    }

    #[test]
    fn sandbox_v3_upgrades() {
        let mut expected = samples::sandbox();
        expected.vm_state_version = Some(crate::records::VmStateVersion { major: 1, minor: 2 });
        expected.idle_timeout_s = None;
        expected.last_active_ms = expected.updated_at_ms;
        upgrades(
            "030873622d746573743101046261736502800401056f776e657202636901044c414e4707432e5554462d380180d095ffbc3101e0f7a7ffbc3101010300019221c0c4071c2f72756e2f7772656e6e2f73622d74657374312f716d702e736f636b010673656372657400f4d395ffbc3101cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd010102",
            expected,
        );
    }

    #[test]
    fn sandbox_v4_upgrades() {
        let mut expected = samples::sandbox();
        expected.vm_state_version = Some(crate::records::VmStateVersion { major: 1, minor: 2 });
        upgrades(
            "040873622d746573743101046261736502800401056f776e657202636901044c414e4707432e5554462d380180d095ffbc3101e0f7a7ffbc3101010300019221c0c4071c2f72756e2f7772656e6e2f73622d74657374312f716d702e736f636b010673656372657400f4d395ffbc3101cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd010102017890d395ffbc31",
            expected,
        );
    }

    #[test]
    fn sandbox_v5() {
        let mut record = samples::sandbox();
        record.vm_state_version = Some(crate::records::VmStateVersion { major: 1, minor: 2 });
        record.owner = Some("team-a".into());
        check(
            5,
            record,
            "050873622d746573743101046261736502800401056f776e657202636901044c414e4707432e5554462d380180d095ffbc3101e0f7a7ffbc3101010300019221c0c4071c2f72756e2f7772656e6e2f73622d74657374312f716d702e736f636b010673656372657400f4d395ffbc3101cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd010102017890d395ffbc3101067465616d2d61",
        );
    }

    #[test]
    fn template_v1_upgrades() {
        let mut expected = samples::template();
        expected.memory_header = None;
        expected.vm_state = None;
        expected.disk_base = None;
        expected.envd_token = None;
        expected.vm_state_version = None;
        upgrades(
            "0106736e61702d310101020007766d6c696e757a11696e697472616d66732e6370696f2e677a0b726f6f7466732e657874348080808008014061626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162010873622d746573743180d095ffbc31",
            expected,
        );
    }

    #[test]
    fn template_v2_upgrades() {
        // A snapshot whose disk is not .qcow2 was the native runtime's.
        let mut expected = samples::template();
        expected.vm_state_version = None;
        upgrades(
            "0206736e61702d310101020007766d6c696e757a11696e697472616d66732e6370696f2e677a0b726f6f7466732e657874348080808008014061626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162010873622d746573743180d095ffbc3101efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef0107766d7374617465010b726f6f7466732e657874340105746f6b656e",
            expected,
        );
    }

    #[test]
    fn template_v3_upgrades() {
        upgrades(
            "0306736e61702d310101020007766d6c696e757a11696e697472616d66732e6370696f2e677a0b726f6f7466732e657874340001018080808008014061626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162010873622d746573743180d095ffbc3101efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef0107766d7374617465010b726f6f7466732e657874340105746f6b656e010100",
            samples::template(),
        );
    }

    #[test]
    fn template_v4() {
        let mut record = samples::template();
        record.owner = Some("team-a".into());
        check(
            4,
            record,
            "0406736e61702d310101020007766d6c696e757a11696e697472616d66732e6370696f2e677a0b726f6f7466732e657874340001018080808008014061626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162010873622d746573743180d095ffbc3101efefefefefefefefefefefefefefefefefefefefefefefefefefefefefefefef0107766d7374617465010b726f6f7466732e657874340105746f6b656e01010001067465616d2d61",
        );
    }

    #[test]
    fn slot_v1() {
        check(1, samples::slot(), "010873622d746573743180d095ffbc31");
    }

    #[test]
    fn layer_v1() {
        check(
            1,
            samples::layer(),
            "018060802003abababababababababababababababababababababababababababababababab0280d095ffbc31",
        );
    }

    #[test]
    fn event_v1() {
        check(
            1,
            samples::event(),
            "0180d095ffbc31010873622d74657374310f73616e64626f782e637265617465640d74656d706c6174652062617365",
        );
    }
}
