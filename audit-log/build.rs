//! Records which git commit the build came from: `MECHWATCH_GIT_COMMIT` is the commit's full
//! hash, or empty when the source has no git metadata (a source tarball, a vendored copy).
//! Every signed record and `mechwatch --version` carry it.

use std::path::Path;
use std::process::Command;

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
    let commit = git(dir, &["rev-parse", "--verify", "HEAD"]).unwrap_or_default();
    println!("cargo:rustc-env=MECHWATCH_GIT_COMMIT={commit}");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let build_version = if commit.is_empty() {
        format!("{version} (built without git metadata: commit unknown)")
    } else {
        format!("{version} (git {commit})")
    };
    println!("cargo:rustc-env=MECHWATCH_BUILD_VERSION={build_version}");
    // Build again when HEAD moves: a commit, a checkout or a fetch that rewrites packed refs.
    if let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        if let Some(common) = git(dir, &["rev-parse", "--git-common-dir"]) {
            let common = dir.join(common);
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
            if let Some(r) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
                println!("cargo:rerun-if-changed={}", common.join(r).display());
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
