//! Links the CPU check (`src/cpu_check.c`) into the `mechwatch` binary when it is built for
//! more than baseline x86-64 (`.cargo/config.toml` asks for x86-64-v3). Rust code built for
//! v3 may use AVX anywhere, even before `main`, so an older CPU would die of SIGILL with no
//! word why. The check is C compiled for baseline x86-64 and runs from `.init_array` before
//! any Rust code; it looks for exactly the features this build enables (read from cargo's
//! `CARGO_CFG_TARGET_FEATURE`), so a baseline build (RUSTFLAGS="-C target-cpu=x86-64") links
//! no check at all.

/// The target features the check knows, with the name `src/cpu_check.c` defines for each.
const CHECKED: [(&str, &str); 15] = [
    ("sse3", "SSE3"),
    ("ssse3", "SSSE3"),
    ("sse4.1", "SSE4_1"),
    ("sse4.2", "SSE4_2"),
    ("popcnt", "POPCNT"),
    ("cmpxchg16b", "CMPXCHG16B"),
    ("avx", "AVX"),
    ("avx2", "AVX2"),
    ("bmi1", "BMI1"),
    ("bmi2", "BMI2"),
    ("fma", "FMA"),
    ("f16c", "F16C"),
    ("lzcnt", "LZCNT"),
    ("movbe", "MOVBE"),
    ("xsave", "XSAVE"),
];

fn main() {
    println!("cargo:rerun-if-changed=src/cpu_check.c");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_ARCH") != "x86_64" || var("CARGO_CFG_TARGET_OS") != "linux" {
        return;
    }
    let enabled = var("CARGO_CFG_TARGET_FEATURE");
    let enabled: Vec<&str> = enabled.split(',').collect();
    let needed: Vec<&str> = CHECKED
        .iter()
        .filter(|(f, _)| enabled.contains(f))
        .map(|(_, define)| *define)
        .collect();
    if needed.is_empty() {
        return;
    }
    let mut build = cc::Build::new();
    build
        .file("src/cpu_check.c")
        // Baseline x86-64 whatever the Rust code is built for: this code runs on any CPU.
        .flag("-march=x86-64")
        .flag("-mtune=generic")
        .warnings(true);
    for d in needed {
        build.define(&format!("MECHWATCH_NEEDS_{d}"), None);
    }
    // The object itself, not an archive member: the linker keeps an archive member only if
    // something refers to it, and nothing calls a constructor.
    for obj in build.compile_intermediates() {
        println!("cargo:rustc-link-arg-bins={}", obj.display());
    }
}
