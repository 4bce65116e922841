//! The daemon's configuration parser, compiled from the daemon's own source file: the daemon
//! is a binary crate without a library target, and `Config::parse` is the whole of what
//! `mechwatch daemon --config` does with the file's text before it looks at the disk.

use std::path::Path;

#[path = "../../daemon/src/daemon/config.rs"]
#[allow(dead_code)]
mod config;

/// The label `daemon_config` gives its input; every refusal must name it.
pub const PATH: &str = "/etc/mechwatch/fuzz-input.toml";

/// `daemon_config`: arbitrary text gives a configuration whose durations and limits can be
/// used, or an error that names the file; never a panic.
pub fn daemon_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::Config::parse(Path::new(PATH), text) {
        Ok(cfg) => {
            assert!(cfg.concurrency >= 1);
            assert!(!cfg.watch.is_empty());
            let _ = (
                cfg.quiet_period(),
                cfg.reconcile_interval(),
                cfg.shutdown_deadline(),
                cfg.stall_timeout(),
            );
            for w in &cfg.watch {
                let _ = cfg.audit_memory_limit_mb(w, u64::MAX);
            }
        }
        Err(e) => assert!(format!("{e:#}").contains(PATH), "{e:#}"),
    }
}
