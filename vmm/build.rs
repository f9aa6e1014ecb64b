//! Assembles the small guest programs in `guests/` (GNU as and ld, from
//! binutils) into flat binaries loaded at 0x100000, for the tests and the
//! benchmarks. Each `guests/NAME.s` becomes `$OUT_DIR/NAME.bin`, named by
//! the variable `WRENN_GUEST_NAME` at compile time. `guests/*.inc` hold
//! routines the programs `.include`.

use std::path::Path;
use std::process::Command;

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=guests");
    let mut sources: Vec<_> = std::fs::read_dir("guests")
        .expect("vmm/guests exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "s"))
        .collect();
    sources.sort();
    for source in sources {
        let name = source
            .file_stem()
            .expect("a guest source file has a name")
            .to_string_lossy()
            .into_owned();
        let object = Path::new(&out).join(format!("{name}.o"));
        let binary = Path::new(&out).join(format!("{name}.bin"));
        run(Command::new("as")
            .args(["--64", "-I", "guests", "-o"])
            .arg(&object)
            .arg(&source));
        run(Command::new("ld")
            .args([
                "-nostdlib",
                "-e",
                "_start",
                "-Ttext=0x100000",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&binary)
            .arg(&object));
        println!(
            "cargo:rustc-env=WRENN_GUEST_{}={}",
            name.to_uppercase(),
            binary.display()
        );
    }
}

fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}; install binutils (`make deps`)"));
    assert!(status.success(), "{command:?} failed");
}
