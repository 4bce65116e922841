//! Helpers for the end-to-end tests in `tests/tests/`: they drive the real `mechwatch`
//! binary, built from this workspace, against real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of the release `mechwatch` binary, built once per test process.
pub fn mechwatch_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "-p", "mechwatch"])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building mechwatch failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("release").join("mechwatch")
    })
}

/// Run `mechwatch args...` to completion.
pub fn mechwatch(args: &[&str]) -> Output {
    Command::new(mechwatch_bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running mechwatch")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The cached default model (fetching it through the binary on first use).
pub fn default_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let o = mechwatch(&["model", "fetch-default"]);
        assert!(o.status.success(), "fetch-default failed: {}", stderr(&o));
        PathBuf::from(stdout(&o).trim())
    })
    .clone()
}
