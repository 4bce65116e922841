//! The binary is built for x86-64-v3; on an older CPU it says so and exits 2 instead of dying
//! of SIGILL. Run for real under QEMU's user-mode emulator with an older CPU model (Debian's
//! qemu-user, which scripts/test-all installs), and with a v3 one.

use std::process::Command;

use e2e::*;

fn qemu(cpu: &str, args: &[&str]) -> std::process::Output {
    Command::new("qemu-x86_64")
        .args(["-cpu", cpu])
        .arg(mechwatch_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-x86_64: {e} (install Debian's qemu-user; scripts/test-all does)")
        })
}

/// Nehalem (2008): SSE4.2 and POPCNT, but no AVX, AVX2, BMI1/2, FMA, F16C, LZCNT, MOVBE or
/// XSAVE.
#[test]
fn on_a_cpu_without_avx2_it_says_so_and_exits_2() {
    let o = qemu("Nehalem", &["--version"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with(
            "mechwatch: this build needs an x86-64-v3 CPU (AVX2, BMI2, FMA...); this CPU lacks: "
        ),
        "{err}"
    );
    let lacks = err.lines().next().unwrap().rsplit(": ").next().unwrap();
    let lacks: Vec<&str> = lacks.split(", ").collect();
    for f in ["avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe"] {
        assert!(lacks.contains(&f), "{f} missing from {lacks:?}");
    }
    for f in ["sse4.2", "popcnt", "ssse3"] {
        assert!(!lacks.contains(&f), "{f} is there on Nehalem: {lacks:?}");
    }
    assert!(err.contains("target-cpu=x86-64"), "{err}");
    assert!(stdout(&o).is_empty());
}

/// The check passes where the features are there: natively (this machine has AVX2), and
/// under QEMU emulating Haswell, the first x86-64-v3 CPU.
#[test]
fn on_an_x86_64_v3_cpu_it_runs() {
    let native = mechwatch(&["--version"]);
    assert!(native.status.success(), "{}", stderr(&native));
    let o = qemu("Haswell", &["--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), stdout(&native));
}
