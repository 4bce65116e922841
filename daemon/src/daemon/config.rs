//! The daemon's TOML configuration. Unknown keys are errors; every field is documented in
//! `systemd/mechwatch.toml`, which a test parses. Its default place is [`DEFAULT_PATH`];
//! relative paths inside it resolve against the folder that holds it (under systemd the
//! working directory is `/`, so resolving against it would surprise).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use policies::Policy;
use serde::Deserialize;

/// Where `mechwatch daemon` (and the .deb) look for the configuration without `--config`.
pub const DEFAULT_PATH: &str = "/etc/mechwatch/mechwatch.toml";

/// The most audits `concurrency` may run at once. Each is a child process that holds a model
/// in memory, watched by threads of its own: far more than a machine can hold would only
/// spawn threads until the system refuses one. A constant, not a share of this machine's
/// cores, so that a configuration is valid or not wherever it is read.
pub const MAX_CONCURRENCY: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the job queue (`state.db`) and the audit log (`audit.db`) live.
    pub state_dir: PathBuf,
    /// The signing key; without it, `$CREDENTIALS_DIRECTORY/mechwatch-signing-key`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A checkpoint is audited once its files have not changed for this long (or once its
    /// ready marker exists).
    #[serde(default = "defaults::quiet_period")]
    pub quiet_period_secs: f64,
    /// A full rescan of every watched directory, in case an event was missed.
    #[serde(default = "defaults::reconcile")]
    pub reconcile_interval_secs: f64,
    /// Audits run at the same time (each holds one model in memory).
    #[serde(default = "defaults::one")]
    pub concurrency: usize,
    /// Checkpoints whose estimated memory need exceeds this are not loaded; they get an error
    /// record instead.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// Each audit runs in a child process that limits its own address space to this many MB
    /// (RLIMIT_AS); past it, an allocation fails and the child aborts, and the daemon records
    /// an error for that checkpoint. Default: twice the checkpoint's estimated need plus
    /// 4096 MB. A `[[watch]]` may set its own.
    #[serde(default)]
    pub audit_memory_limit_mb: Option<u64>,
    /// The public key (SPKI PEM, or 64 hex digits) that signed the log's first record. The
    /// daemon verifies the whole log against it at start and refuses to start if it does not
    /// verify. Default: the signing key's own public key, right until the key is rotated.
    #[serde(default)]
    pub trusted_pubkey: Option<PathBuf>,
    /// On SIGTERM, running audits get this long to finish; then they are abandoned and
    /// requeued for the next start.
    #[serde(default = "defaults::shutdown")]
    pub shutdown_deadline_secs: f64,
    /// An audit that reports no progress for this long stops the watchdog pings, so systemd
    /// restarts the service.
    #[serde(default = "defaults::stall")]
    pub stall_timeout_secs: f64,
    /// `text` (journald-friendly: no colours, no timestamps under journald) or `json`.
    #[serde(default = "defaults::text")]
    pub log_format: String,
    pub watch: Vec<Watch>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// A directory watched recursively for checkpoints: `*.gguf` files, and directories
    /// holding `config.json` with `*.safetensors`.
    pub path: PathBuf,
    /// A policy file, a directory of them, or `default` (the shipped policies).
    pub policies: String,
    /// The model lineage for drift checks (default: each checkpoint's own name).
    #[serde(default)]
    pub lineage: Option<String>,
    /// The lineage's reference checkpoint (a GGUF file or an HF directory): the SAEs and
    /// directions are computed on it, as `check --base` does, and every audit of this watch
    /// measures with them (default: the lineage's last passing audit's instruments).
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// This directory's own `audit_memory_limit_mb`.
    #[serde(default)]
    pub audit_memory_limit_mb: Option<u64>,
}

mod defaults {
    pub fn quiet_period() -> f64 {
        30.0
    }
    pub fn reconcile() -> f64 {
        300.0
    }
    pub fn one() -> usize {
        1
    }
    pub fn shutdown() -> f64 {
        60.0
    }
    pub fn stall() -> f64 {
        900.0
    }
    pub fn text() -> String {
        "text".into()
    }
}

/// A watched directory with its loaded policies.
#[derive(Debug, Clone)]
pub struct LoadedWatch {
    pub watch: Watch,
    /// The configuration file it is written in (errors about the watch name it).
    pub config: PathBuf,
    pub policies: std::sync::Arc<Vec<Policy>>,
    /// sha256 over the digests of every file the policies read and the watch's `base`:
    /// audits are deduplicated on (checkpoint digest, this).
    pub policy_key: String,
}

impl LoadedWatch {
    /// Load the policies of `watch`, a `[[watch]]` of the configuration file `config`.
    pub fn load(watch: &Watch, config: &Path) -> anyhow::Result<Self> {
        let dir = crate::cmd::policy::resolve(&watch.policies)?;
        let policies = policies::load_policies(&dir)
            .map_err(|e| anyhow::Error::new(policies::PolicyErrors(e)))
            .with_context(|| format!("policies for {}", watch.path.display()))?;
        Ok(Self {
            policy_key: policy_key(&policies, watch.base.as_deref()),
            watch: watch.clone(),
            config: config.to_path_buf(),
            policies: std::sync::Arc::new(policies),
        })
    }
}

impl Config {
    /// Read and validate `path`, loading every watch's policies.
    pub fn load(path: &Path) -> anyhow::Result<(Self, Vec<LoadedWatch>)> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading config {} (pass --config FILE; systemd/mechwatch.toml is a commented \
                 example)",
                path.display()
            )
        })?;
        let mut cfg = Self::parse(path, &text)?;
        cfg.resolve_relative_to(&folder_of(path)?);
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut loaded = Vec::new();
        // One folder watched twice would audit every checkpoint in it twice.
        let mut folders: Vec<PathBuf> = Vec::new();
        for (i, w) in cfg.watch.iter().enumerate() {
            if !w.path.is_dir() {
                bail!(
                    "{} watched path {} is not a directory",
                    at(path, &text, Some(i), "path"),
                    w.path.display()
                );
            }
            let real = std::fs::canonicalize(&w.path).unwrap_or_else(|_| w.path.clone());
            if let Some(j) = folders.iter().position(|f| *f == real) {
                bail!(
                    "{} watched path {} is the folder [[watch]] {} already watches ({}): \
                     every checkpoint in it would be audited twice",
                    at(path, &text, Some(i), "path"),
                    w.path.display(),
                    j + 1,
                    real.display()
                );
            }
            folders.push(real);
            let watch = LoadedWatch::load(w, &file).with_context(|| {
                format!(
                    "{} the policies of [[watch]] {}",
                    at(path, &text, Some(i), "policies"),
                    w.path.display()
                )
            })?;
            loaded.push(watch);
        }
        Ok((cfg, loaded))
    }

    /// Parse and validate the text of `path` without touching the file system (the fuzz
    /// target `daemon_config` calls this); `path` only labels errors.
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let loc = policies::Loc::of(text, s.start);
                    format!("{}:{}:", loc.line, loc.col)
                })
                .unwrap_or_default();
            anyhow::anyhow!("{}:{at} {}", path.display(), e.message().trim_end())
        })?;
        let secs = |name: &str, v: f64| -> anyhow::Result<Duration> {
            // try_from: a finite number of seconds past u64::MAX would panic in from_secs_f64.
            match Duration::try_from_secs_f64(v) {
                Ok(d) => Ok(d),
                Err(_) => bail!(
                    "{} `{name}` must be a non-negative number of seconds below 2^64",
                    at(path, text, None, name)
                ),
            }
        };
        secs("quiet_period_secs", cfg.quiet_period_secs)?;
        secs("reconcile_interval_secs", cfg.reconcile_interval_secs)?;
        secs("shutdown_deadline_secs", cfg.shutdown_deadline_secs)?;
        secs("stall_timeout_secs", cfg.stall_timeout_secs)?;
        if !(1..=MAX_CONCURRENCY).contains(&cfg.concurrency) {
            bail!(
                "{} `concurrency` is {}: the audits run at once, from 1 to {MAX_CONCURRENCY}",
                at(path, text, None, "concurrency"),
                cfg.concurrency
            );
        }
        if !["text", "json"].contains(&cfg.log_format.as_str()) {
            bail!(
                "{} `log_format` is `text` or `json`",
                at(path, text, None, "log_format")
            );
        }
        if cfg.watch.is_empty() {
            bail!("{}: no [[watch]] directories", path.display());
        }
        Ok(cfg)
    }

    /// Make every relative path in the configuration relative to `base` (the config file's
    /// folder). `policies = "default"` names the shipped policies, not a path.
    pub fn resolve_relative_to(&mut self, base: &Path) {
        let at = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        at(&mut self.state_dir);
        for p in [&mut self.key, &mut self.trusted_pubkey]
            .into_iter()
            .flatten()
        {
            at(p);
        }
        for w in &mut self.watch {
            at(&mut w.path);
            if let Some(b) = &mut w.base {
                at(b);
            }
            if w.policies != "default" && Path::new(&w.policies).is_relative() {
                w.policies = base.join(&w.policies).display().to_string();
            }
        }
    }

    pub fn quiet_period(&self) -> Duration {
        Duration::from_secs_f64(self.quiet_period_secs)
    }
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs_f64(self.reconcile_interval_secs)
    }
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_deadline_secs)
    }
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stall_timeout_secs)
    }

    /// The address-space limit of the child that audits a checkpoint of `estimated_mb`.
    pub fn audit_memory_limit_mb(&self, watch: &Watch, estimated_mb: u64) -> u64 {
        watch
            .audit_memory_limit_mb
            .or(self.audit_memory_limit_mb)
            .unwrap_or(estimated_mb.saturating_mul(2).saturating_add(4096))
    }
}

/// `path:line:col:` of the value of `key` in the config `text` (in its `watch`-th [[watch]]
/// table when given), or `path:` where it is not written (a default).
fn at(path: &Path, text: &str, watch: Option<usize>, key: &str) -> String {
    use toml::de::{DeTable, DeValue};
    let find = || -> Option<usize> {
        let doc = DeTable::parse(text).ok()?.into_inner();
        let table = match watch {
            None => &doc,
            Some(i) => match doc.get("watch").map(toml::Spanned::get_ref) {
                Some(DeValue::Array(a)) => match a.get(i).map(toml::Spanned::get_ref) {
                    Some(DeValue::Table(t)) => t,
                    _ => return None,
                },
                _ => return None,
            },
        };
        Some(table.get(key)?.span().start)
    };
    match find() {
        Some(offset) => {
            let loc = policies::Loc::of(text, offset);
            format!("{}:{}:{}:", path.display(), loc.line, loc.col)
        }
        None => format!("{}:", path.display()),
    }
}

/// The absolute folder that holds the config file `path`.
pub fn folder_of(path: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(path)
        .with_context(|| format!("resolving the config path {}", path.display()))?;
    Ok(abs.parent().unwrap_or(Path::new("/")).to_path_buf())
}

/// sha256 over the sorted `kind path sha256` lines of every input file of `policies`, then
/// a `base PATH` line when the watch has a base: another base is another audit (and fixing
/// a base that did not load audits the checkpoints it failed for again).
pub fn policy_key(policies: &[Policy], base: Option<&Path>) -> String {
    let mut lines: Vec<String> = policies
        .iter()
        .flat_map(|p| {
            p.inputs
                .iter()
                .map(move |i| format!("{} {} {} {}", p.name, i.kind, i.path, i.sha256))
        })
        .collect();
    lines.sort();
    if let Some(b) = base {
        lines.push(format!("base {}", b.display()));
    }
    probes::digest::sha256_hex(lines.join("\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let text = include_str!("../../../systemd/mechwatch.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.concurrency, 1);
        assert_eq!(cfg.watch.len(), 1);
        assert_eq!(cfg.watch[0].policies, "default");
    }

    #[test]
    fn the_audit_memory_limit_is_the_watch_s_then_the_global_then_from_the_estimate() {
        let text = "state_dir = \"/x\"\naudit_memory_limit_mb = 900\ntrusted_pubkey = \"/k.pub\"\n\
                    [[watch]]\npath = \"/a\"\npolicies = \"default\"\naudit_memory_limit_mb = 300\n\
                    [[watch]]\npath = \"/b\"\npolicies = \"default\"\n";
        let mut cfg: Config = toml::from_str(text).unwrap();
        assert_eq!(cfg.audit_memory_limit_mb(&cfg.watch[0], 1000), 300);
        assert_eq!(cfg.audit_memory_limit_mb(&cfg.watch[1], 1000), 900);
        cfg.audit_memory_limit_mb = None;
        assert_eq!(cfg.audit_memory_limit_mb(&cfg.watch[1], 1000), 6096);
        assert_eq!(cfg.trusted_pubkey.as_deref(), Some(Path::new("/k.pub")));
    }

    /// Every input under `fuzz/regressions/daemon_config/` (seeds, the fuzzer's corpus and
    /// inputs that once crashed) goes through the fuzz target's own check: parsed, or refused
    /// with the file named; never a panic.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/daemon_config");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} holds no inputs", dir.display());
        let label = Path::new("/etc/mechwatch/fuzz-input.toml");
        for f in files {
            eprintln!("replaying {}", f.display());
            let Ok(text) = String::from_utf8(std::fs::read(&f).unwrap()) else {
                continue;
            };
            match Config::parse(label, &text) {
                Ok(cfg) => {
                    let _ = (cfg.quiet_period(), cfg.stall_timeout());
                }
                Err(e) => assert!(format!("{e:#}").contains("fuzz-input.toml"), "{e:#}"),
            }
        }
    }

    /// Found by the `daemon_config` fuzz target's check: 1e300 seconds is finite and
    /// non-negative, and `Duration::from_secs_f64` panicked on it.
    #[test]
    fn regression_huge_seconds_are_an_error_not_a_panic() {
        let text = "state_dir = \"/x\"\nquiet_period_secs = 1e300\n\
                    [[watch]]\npath = \"/a\"\npolicies = \"default\"\n";
        let e = Config::parse(Path::new("/c.toml"), text).unwrap_err();
        assert!(
            e.to_string().contains("/c.toml:2:21: `quiet_period_secs`"),
            "{e}"
        );
    }

    /// Found by the red team: `concurrency = 1000000` spawned threads until the system
    /// refused one, and the daemon panicked.
    #[test]
    fn regression_a_huge_concurrency_is_an_error_at_its_line() {
        for n in ["0", "65", "1000000"] {
            let text = format!(
                "state_dir = \"/x\"\nconcurrency = {n}\n[[watch]]\npath = \"/a\"\npolicies = \"default\"\n"
            );
            let e = Config::parse(Path::new("/c.toml"), &text).unwrap_err();
            let e = e.to_string();
            assert!(e.starts_with("/c.toml:2:15: `concurrency`"), "{e}");
            assert!(e.contains(&format!("from 1 to {MAX_CONCURRENCY}")), "{e}");
        }
        let text = format!(
            "state_dir = \"/x\"\nconcurrency = {MAX_CONCURRENCY}\n[[watch]]\npath = \"/a\"\npolicies = \"default\"\n"
        );
        assert_eq!(
            Config::parse(Path::new("/c.toml"), &text)
                .unwrap()
                .concurrency,
            MAX_CONCURRENCY
        );
    }

    #[test]
    fn a_watch_that_cannot_be_loaded_is_an_error_at_its_line() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("models")).unwrap();
        std::fs::write(tmp.path().join("file"), "").unwrap();
        std::fs::create_dir(tmp.path().join("pol")).unwrap();
        std::fs::write(
            tmp.path().join("pol/p.toml"),
            "schema = 1\nname = \"t\"\nversion = \"1\"\n[[checks]]\nid = \"c\"\n\
             kind = \"induction\"\nseverity = \"low\"\nmin_loss_drop = 1.0\n",
        )
        .unwrap();
        let config = tmp.path().join("d.toml");
        // The first watch loads; the second is the one at fault.
        let watch = |path: &str, policies: &str| {
            format!(
                "state_dir = \"state\"\n\n[[watch]]\npath = \"models\"\npolicies = \"pol\"\n\n\
                 [[watch]]\npath = \"{path}\"\npolicies = \"{policies}\"\n"
            )
        };
        std::fs::write(&config, watch("file", "default")).unwrap();
        let e = format!("{:#}", Config::load(&config).unwrap_err());
        let want = format!("{}:8:8: watched path", config.display());
        assert!(e.starts_with(&want), "{e}");
        assert!(e.contains("is not a directory"), "{e}");
        std::fs::create_dir(tmp.path().join("more")).unwrap();
        std::fs::write(&config, watch("more", "nopol")).unwrap();
        let e = format!("{:#}", Config::load(&config).unwrap_err());
        let want = format!("{}:9:12: the policies of [[watch]]", config.display());
        assert!(e.starts_with(&want), "{e}");
        assert!(e.contains("nopol"), "{e}");
        // The same folder under another spelling would audit every checkpoint twice.
        std::fs::write(&config, watch("./models/", "pol")).unwrap();
        let e = format!("{:#}", Config::load(&config).unwrap_err());
        let want = format!("{}:8:8: watched path", config.display());
        assert!(e.starts_with(&want), "{e}");
        assert!(e.contains("already watches"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let text = "state_dir = \"state\"\nkey = \"keys/k.pem\"\ntrusted_pubkey = \"/abs/k.pub\"\n\
                    [[watch]]\npath = \"../models\"\npolicies = \"policy\"\nbase = \"ref/base.gguf\"\n\
                    [[watch]]\npath = \"/srv/m\"\npolicies = \"default\"\nbase = \"/srv/base\"\n";
        let mut cfg = Config::parse(Path::new("/etc/mw/c.toml"), text).unwrap();
        cfg.resolve_relative_to(Path::new("/etc/mw"));
        assert_eq!(cfg.state_dir, Path::new("/etc/mw/state"));
        assert_eq!(cfg.key.as_deref(), Some(Path::new("/etc/mw/keys/k.pem")));
        assert_eq!(cfg.trusted_pubkey.as_deref(), Some(Path::new("/abs/k.pub")));
        assert_eq!(cfg.watch[0].path, Path::new("/etc/mw/../models"));
        assert_eq!(cfg.watch[0].policies, "/etc/mw/policy");
        assert_eq!(cfg.watch[1].path, Path::new("/srv/m"));
        assert_eq!(cfg.watch[1].policies, "default");
        assert_eq!(
            cfg.watch[0].base.as_deref(),
            Some(Path::new("/etc/mw/ref/base.gguf"))
        );
        assert_eq!(cfg.watch[1].base.as_deref(), Some(Path::new("/srv/base")));
    }

    #[test]
    fn a_base_is_part_of_the_dedup_key() {
        // Without a base the key is what it was before bases existed: logs keep their dedup.
        let none = policy_key(&[], None);
        assert_eq!(none, probes::digest::sha256_hex(b""));
        let a = policy_key(&[], Some(Path::new("/srv/a")));
        assert_ne!(a, none);
        assert_ne!(a, policy_key(&[], Some(Path::new("/srv/b"))));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e =
            toml::from_str::<Config>("state_dir = \"/x\"\nwatch = []\nquiet = 3\n").unwrap_err();
        assert!(e.to_string().contains("quiet"), "{e}");
    }
}
