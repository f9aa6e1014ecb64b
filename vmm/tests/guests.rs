//! Small guest programs (vmm/guests/*.s) run in a real KVM VM. They need
//! /dev/kvm (hardware KVM or this machine's PVM); without it each test says
//! so and passes.

#![allow(clippy::unwrap_used)] // tests and benchmarks may unwrap (workspace lints)

mod common;

use common::{kvm_or_skip, Console};
use wrenn_vmm::{Exit, Machine, MachineConfig};

/// Runs `program` in a fresh VM and returns how it ended and what it printed.
fn run(program: &[u8], memory_mb: u32) -> (Exit, String) {
    let console = Console::default();
    let config = MachineConfig {
        vcpus: 1,
        memory_mb,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, Box::new(console.clone())).expect("machine");
    machine.load_program(program).expect("load");
    let exit = machine.run().expect("run");
    drop(machine);
    (exit, console.text())
}

#[test]
fn hello_prints_on_the_serial_port_and_resets() {
    if !kvm_or_skip("hello") {
        return;
    }
    let program = std::fs::read(env!("WRENN_GUEST_HELLO")).unwrap();
    let (exit, output) = run(&program, 16);
    assert_eq!(exit, Exit::Reset);
    assert_eq!(output, "hello from a wrenn-vmm guest\n");
}

#[test]
fn bad_machine_configs_are_refused_with_a_reason() {
    let refused = |vcpus, memory_mb| {
        Machine::new(
            MachineConfig {
                vcpus,
                memory_mb,
                track_dirty_pages: false,
            },
            Box::new(std::io::sink()),
        )
        .err()
        .expect("refused")
        .to_string()
    };
    assert!(refused(0, 64).contains("vcpus is 0"));
    assert!(refused(1, 1).contains("memory_mb is 1"));
    assert!(refused(1, 1 << 20).contains("between 16 and 3072"));
}

#[test]
fn memory_written_by_the_guest_is_what_the_host_reads() {
    if !kvm_or_skip("memory") {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    let program = std::fs::read(env!("WRENN_GUEST_MEMORY")).unwrap();
    let console = Console::default();
    let config = MachineConfig {
        vcpus: 1,
        memory_mb: 16,
        track_dirty_pages: false,
    };
    let mut machine = Machine::new(config, Box::new(console.clone())).unwrap();
    machine.load_program(&program).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(machine.run().unwrap(), Exit::Reset);
    eprintln!("memory guest ran in {:?}", started.elapsed());

    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let words = (1u64 << 20) / 8;
    let mut sum = 0u64;
    for i in 0..words {
        let expected = (i + 1).wrapping_mul(K);
        sum = sum.wrapping_add(expected);
        if i % 1021 == 0 || i == words - 1 {
            let word: u64 = machine
                .memory()
                .read_obj(GuestAddress(0x20_0000 + 8 * i))
                .unwrap();
            assert_eq!(word, expected, "word {i}");
        }
    }
    assert_eq!(console.text(), format!("{sum:016x}\n"));
}

#[test]
fn timer_interrupts_reach_the_guest_through_the_pic() {
    if !kvm_or_skip("timer") {
        return;
    }
    let program = std::fs::read(env!("WRENN_GUEST_TIMER")).unwrap();
    let (exit, output) = run(&program, 16);
    assert_eq!((exit, output.as_str()), (Exit::Reset, "ticks 10\n"));
}
