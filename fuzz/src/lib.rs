//! What the fuzz targets check, as a library so that each target under `fuzz_targets/` is one
//! line and the same checks replay the committed corpus without libFuzzer (see
//! `docs/lab/fuzzing.md`).

pub mod checks;
pub mod daemon_config;

/// `daemon/src/daemon/config.rs` (compiled into this crate by [`daemon_config`]) names
/// `crate::cmd::policy::resolve`, which only `Config::load` reaches when it loads a watch's
/// policies; the fuzz target calls `Config::parse`, which reads no files. The daemon's own
/// `resolve` lives among its CLI commands, so this crate carries the same mapping.
mod cmd {
    pub mod policy {
        use std::path::PathBuf;

        /// `default` means the shipped policies.
        #[allow(dead_code)]
        pub fn resolve(path: &str) -> anyhow::Result<PathBuf> {
            if path == "default" {
                Ok(policies::shipped::materialize()?)
            } else {
                Ok(PathBuf::from(path))
            }
        }
    }
}
