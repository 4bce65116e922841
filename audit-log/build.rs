//! Records which git commit the build came from: `MECHWATCH_GIT_COMMIT` is the commit's full
//! hash, or empty when the source has no git metadata (a source tarball, a vendored copy) and
//! the builder did not name it in the `MECHWATCH_GIT_COMMIT` variable. Every signed record and
//! `mechwatch --version` carry it; the wording lives in `src/build_info.rs`.

use std::path::Path;
use std::process::Command;

#[path = "src/build_info.rs"]
mod build_info;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&dir);
    println!("cargo:rerun-if-env-changed={}", build_info::COMMIT_VARIABLE);
    let given = std::env::var(build_info::COMMIT_VARIABLE)
        .ok()
        .filter(|v| !v.is_empty());
    let commit = match given {
        Some(v) => match build_info::commit_from_variable(&v) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        None => git(dir, &["rev-parse", "--verify", "HEAD"]),
    };
    println!(
        "cargo:rustc-env=MECHWATCH_GIT_COMMIT={}",
        commit.as_deref().unwrap_or_default()
    );
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    println!(
        "cargo:rustc-env=MECHWATCH_BUILD_VERSION={}",
        build_info::build_version(&version, commit.as_deref())
    );
    println!(
        "cargo:rustc-env=MECHWATCH_LONG_VERSION={}",
        build_info::long_version(&version, commit.as_deref())
    );
    // Build again when HEAD moves: a checkout rewrites HEAD; a commit, reset or pull writes
    // the branch's loose ref under refs/heads (watched as a folder, so a ref that was packed
    // and is written loose again counts); a fetch may rewrite packed-refs. Only paths that
    // exist are named: cargo counts a missing one as changed on every build, and a
    // repository whose refs were never packed has no packed-refs.
    if let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) {
        let mut watched = vec![Path::new(&git_dir).join("HEAD")];
        if let Some(common) = git(dir, &["rev-parse", "--git-common-dir"]) {
            let common = dir.join(common);
            watched.push(common.join("packed-refs"));
            watched.push(common.join("refs").join("heads"));
        }
        for path in watched.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/build_info.rs");
}
