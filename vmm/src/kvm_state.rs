//! The machine state KVM holds in the kernel, as a snapshot keeps it: each
//! vCPU's registers and local devices ([`KvmVcpu`], [`VcpuState`]) and the
//! VM's in-kernel chips and clock ([`KvmChips`], [`VmChipsState`]).
//!
//! Both are views of file descriptors the [`crate::Machine`] owns: a
//! restore sets the saved state on freshly created ones (with the irqchip
//! and PIT already made) and hands the view back. The KVM structures are
//! kvm-bindings' own, serialized by its serde support (their bytes).
//!
//! Not here: guest memory, the user-space devices, the file layout.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::error::{kvm_err, Error, Result};
use crate::persist::Persist;

/// What a snapshot keeps of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area, which holds the FPU and SSE state.
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    /// Every MSR KVM lists, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
}

/// One vCPU, with the MSRs a save reads (`KVM_GET_MSR_INDEX_LIST`).
pub struct KvmVcpu<'a> {
    fd: &'a VcpuFd,
    msr_indices: &'a [u32],
}

impl<'a> KvmVcpu<'a> {
    pub fn new(fd: &'a VcpuFd, msr_indices: &'a [u32]) -> KvmVcpu<'a> {
        KvmVcpu { fd, msr_indices }
    }

    fn read_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Snapshot(format!("too many MSRs: {e:?}")))?;
        let read = self.fd.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
        if let Some(failed) = entries.get(read) {
            return Err(Error::Snapshot(format!(
                "KVM lists MSR {:#x} but cannot read it",
                failed.index
            )));
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }
}

impl<'a> Persist<'a> for KvmVcpu<'a> {
    type State = VcpuState;
    type ConstructorArgs = KvmVcpu<'a>;
    type Error = Error;

    fn save(&self) -> Result<VcpuState> {
        let fd = self.fd;
        Ok(VcpuState {
            regs: fd.get_regs().map_err(kvm_err("read registers"))?,
            sregs: fd.get_sregs().map_err(kvm_err("read special registers"))?,
            xsave: fd.get_xsave().map_err(kvm_err("read XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(kvm_err("read XCRs"))?,
            msrs: self.read_msrs()?,
            lapic: fd.get_lapic().map_err(kvm_err("read the LAPIC"))?,
            mp_state: fd.get_mp_state().map_err(kvm_err("read the MP state"))?,
            events: fd.get_vcpu_events().map_err(kvm_err("read vCPU events"))?,
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm_err("read debug registers"))?,
        })
    }

    /// Sets `saved` on a freshly created vCPU (CPUID set): special
    /// registers before registers, the LAPIC before the MP state and
    /// events, as KVM expects.
    fn restore(vcpu: KvmVcpu<'a>, saved: &VcpuState) -> Result<KvmVcpu<'a>> {
        let fd = vcpu.fd;
        fd.set_sregs(&saved.sregs)
            .map_err(kvm_err("set special registers"))?;
        fd.set_regs(&saved.regs).map_err(kvm_err("set registers"))?;
        // SAFETY: the XSAVE area is a whole `kvm_xsave` read from a vCPU of
        // KVM (a saved snapshot) and is handed back unchanged; KVM checks
        // its contents.
        unsafe { fd.set_xsave(&saved.xsave) }.map_err(kvm_err("set XSAVE state"))?;
        fd.set_xcrs(&saved.xcrs).map_err(kvm_err("set XCRs"))?;
        crate::boot::set_msrs(fd, &saved.msrs, |index| {
            Error::Snapshot(format!("KVM refused MSR {index:#x} from the snapshot"))
        })?;
        fd.set_lapic(&saved.lapic)
            .map_err(kvm_err("set the LAPIC"))?;
        fd.set_mp_state(saved.mp_state)
            .map_err(kvm_err("set the MP state"))?;
        fd.set_vcpu_events(&saved.events)
            .map_err(kvm_err("set vCPU events"))?;
        fd.set_debug_regs(&saved.debug_regs)
            .map_err(kvm_err("set debug registers"))?;
        Ok(vcpu)
    }
}

/// What a snapshot keeps of the VM itself: both PICs and the IOAPIC, the
/// PIT and the KVM clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmChipsState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The VM's in-kernel irqchip, PIT and clock.
pub struct KvmChips<'a> {
    vm: &'a VmFd,
}

impl<'a> KvmChips<'a> {
    pub fn new(vm: &'a VmFd) -> KvmChips<'a> {
        KvmChips { vm }
    }

    fn chip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut chip)
            .map_err(kvm_err("read the irqchip"))?;
        Ok(chip)
    }
}

impl<'a> Persist<'a> for KvmChips<'a> {
    type State = VmChipsState;
    type ConstructorArgs = &'a VmFd;
    type Error = Error;

    fn save(&self) -> Result<VmChipsState> {
        Ok(VmChipsState {
            pic_master: self.chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(kvm_err("read the PIT"))?,
            clock: self.vm.get_clock().map_err(kvm_err("read the KVM clock"))?,
        })
    }

    /// Sets the chips of a VM made with its irqchip and PIT, after its
    /// vCPUs were restored. The clock takes only the saved time: the
    /// saved flags describe the old host's clock source.
    fn restore(vm: &'a VmFd, saved: &VmChipsState) -> Result<KvmChips<'a>> {
        for chip in [&saved.pic_master, &saved.pic_slave, &saved.ioapic] {
            vm.set_irqchip(chip).map_err(kvm_err("set the irqchip"))?;
        }
        vm.set_pit2(&saved.pit).map_err(kvm_err("set the PIT"))?;
        let clock = kvm_clock_data {
            clock: saved.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("set the KVM clock"))?;
        Ok(KvmChips { vm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Machine, MachineConfig};

    const CONFIG: MachineConfig = MachineConfig {
        vcpus: 1,
        memory_mb: 16,
        track_dirty_pages: false,
    };

    fn machine() -> Option<Machine> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no /dev/kvm");
            return None;
        }
        Some(Machine::new(CONFIG, Box::new(std::io::sink())).expect("a KVM VM"))
    }

    fn bytes<T: Serialize>(value: &T) -> Vec<u8> {
        postcard::to_allocvec(value).expect("encodes")
    }

    fn msr(state: &VcpuState, index: u32) -> Option<u64> {
        state
            .msrs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, v)| *v)
    }

    #[test]
    fn a_vcpu_saved_and_restored_into_a_new_vm_has_the_saved_state() {
        let Some(mut first) = machine() else { return };
        first
            .load_program(&[0xf4])
            .expect("a program of one HLT loads");
        let mut regs = first.vcpus[0].get_regs().expect("registers");
        regs.rax = 0xdead_beef;
        regs.r15 = 0x1234_5678;
        first.vcpus[0].set_regs(&regs).expect("registers set");
        let indices = first.kvm.get_msr_index_list().expect("MSR list");
        let saved = KvmVcpu::new(&first.vcpus[0], indices.as_slice())
            .save()
            .expect("saved");
        assert!(!saved.msrs.is_empty());

        let second = machine().expect("a second VM");
        let restored = KvmVcpu::restore(KvmVcpu::new(&second.vcpus[0], indices.as_slice()), &saved)
            .expect("restored");
        let again = restored.save().expect("saved again");
        assert_eq!(again.regs.rax, 0xdead_beef);
        assert_eq!(bytes(&again.regs), bytes(&saved.regs));
        assert_eq!(bytes(&again.sregs), bytes(&saved.sregs));
        assert_eq!(bytes(&again.xcrs), bytes(&saved.xcrs));
        assert_eq!(bytes(&again.debug_regs), bytes(&saved.debug_regs));
        assert_eq!(again.mp_state.mp_state, saved.mp_state.mp_state);
        const EFER: u32 = 0xc000_0080;
        assert_eq!(msr(&again, EFER), msr(&saved, EFER));
        let listed = |s: &VcpuState| s.msrs.iter().map(|(i, _)| *i).collect::<Vec<_>>();
        assert_eq!(listed(&again), listed(&saved));
    }

    #[test]
    fn the_vm_chips_saved_and_restored_into_a_new_vm_have_the_saved_state() {
        let Some(first) = machine() else { return };
        // Mask every IOAPIC line but one, a state a new VM does not have.
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        first.vm.get_irqchip(&mut ioapic).expect("IOAPIC");
        // SAFETY: `ioapic` was filled by KVM_GET_IRQCHIP for the IOAPIC,
        // so the `ioapic` member of the union is the one in use.
        unsafe {
            ioapic.chip.ioapic.redirtbl[3].bits = 0x0001_0030;
        }
        first.vm.set_irqchip(&ioapic).expect("IOAPIC set");
        let saved = KvmChips::new(&first.vm).save().expect("saved");

        let second = machine().expect("a second VM");
        let restored = KvmChips::restore(&second.vm, &saved).expect("restored");
        let again = restored.save().expect("saved again");
        assert_eq!(bytes(&again.ioapic), bytes(&saved.ioapic));
        assert_eq!(bytes(&again.pic_master), bytes(&saved.pic_master));
        assert_eq!(bytes(&again.pic_slave), bytes(&saved.pic_slave));
        // The clock runs on from the saved time.
        assert!(again.clock.clock >= saved.clock.clock);
        assert!(again.clock.clock < saved.clock.clock + 60_000_000_000);
    }
}
