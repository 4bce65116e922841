//! `mechwatch daemon`, `mechwatch status`, and the hidden `mechwatch daemon-audit` that the
//! daemon runs for each audit (see `daemon::audit`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct DaemonArgs {
    /// The TOML configuration (see systemd/mechwatch.toml). Relative paths in it resolve
    /// against its folder.
    #[arg(long, default_value = crate::daemon::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

/// The daemon's audit child: reads its request on standard input, writes progress and the
/// finding as JSON lines on standard output. Not for direct use.
#[derive(Args)]
pub struct DaemonAuditArgs {
    /// The address-space limit (RLIMIT_AS) the child sets on itself first, in MB.
    #[arg(long)]
    pub memory_limit_mb: u64,
    /// `text` or `json`, as the daemon logs.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The daemon's configuration, for its state directory (default:
    /// /etc/mechwatch/mechwatch.toml).
    #[arg(long, conflicts_with = "state_dir")]
    pub config: Option<PathBuf>,
    /// Or the state directory itself.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Finished audits to list.
    #[arg(long, default_value_t = 10)]
    pub last: usize,
    /// Print one JSON object (queue, recent audits, log head) on standard output.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DaemonArgs) -> anyhow::Result<ExitCode> {
    let format = std::fs::read_to_string(&a.config)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .and_then(|t| {
            t.get("log_format")
                .and_then(|v| v.as_str().map(str::to_string))
        });
    crate::daemon::logging::init(format.as_deref());
    require_config(&a.config)?;
    crate::daemon::run(&a.config)?;
    Ok(ExitCode::SUCCESS)
}

pub fn audit_child(a: DaemonAuditArgs) -> anyhow::Result<ExitCode> {
    crate::daemon::logging::init(Some(&a.log_format));
    crate::daemon::audit::child_main(a.memory_limit_mb)?;
    Ok(ExitCode::SUCCESS)
}

/// Refuse a config path that does not exist with a message that says what to pass.
fn require_config(path: &Path) -> anyhow::Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let what = if path.exists() {
        "is not a file"
    } else {
        "does not exist"
    };
    anyhow::bail!(
        "config {} {what}; pass --config with the path of the daemon's TOML configuration \
         (a commented example with every key is systemd/mechwatch.toml, described in \
         docs/daemon.md)",
        path.display()
    )
}

pub fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = a
        .config
        .unwrap_or_else(|| PathBuf::from(crate::daemon::config::DEFAULT_PATH));
    let state_dir = match (a.state_dir, config) {
        (Some(d), _) => d,
        (None, c) => {
            require_config(&c)?;
            let text =
                std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display()))?;
            let t: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", c.display()))?;
            let dir = PathBuf::from(
                t.get("state_dir")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| anyhow::anyhow!("{}: no state_dir", c.display()))?,
            );
            // As the daemon reads it: relative to the config's folder.
            crate::daemon::config::folder_of(&c)?.join(dir)
        }
    };
    if !state_dir.is_dir() {
        anyhow::bail!(
            "state directory {} does not exist; pass the daemon's state_dir (where its state.db \
             and audit.db live), or start the daemon once to create it",
            state_dir.display()
        );
    }
    let jobs = crate::daemon::jobs::Jobs::open_read_only(&state_dir.join("state.db"))?;
    let open = jobs.open_jobs()?;
    let recent = jobs.recent(a.last)?;
    let conn = audit_log::store::open_reader(&state_dir.join("audit.db"))?;
    let n = audit_log::store::record_count(&conn)?;
    let head = if n > 0 {
        audit_log::store::read_records(&conn, n - 1, n)?
            .first()
            .map(|r| r.hash_hex())
    } else {
        None
    };
    let checkpoint = audit_log::store::read_checkpoints(&conn)?
        .last()
        .map(|(size, _)| *size);
    if a.json {
        let v = json!({
            "state_dir": state_dir.display().to_string(),
            "queue": open.iter().map(|(path, state)| json!({ "path": path, "state": state })).collect::<Vec<_>>(),
            "recent": recent.iter().map(|f| json!({
                "updated_at": f.updated_at,
                "state": f.state,
                "verdict": f.verdict,
                "path": f.path,
                "seq": f.seq,
                "message": f.message,
            })).collect::<Vec<_>>(),
            "log": { "records": n, "head_sha256": head, "checkpoint_size": checkpoint },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("queue: {} job(s)", open.len());
    for (path, state) in &open {
        println!("  {state:<8} {path}");
    }
    println!("last audits:");
    for f in recent {
        println!(
            "  {} {:<8} {:<6} {}{}{}",
            f.updated_at,
            f.state,
            f.verdict.as_deref().unwrap_or("-"),
            f.path,
            f.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
            f.message.map(|m| format!(": {m}")).unwrap_or_default()
        );
    }
    println!(
        "log: {n} record(s), head sha256:{}",
        head.as_deref().unwrap_or("-")
    );
    if let Some(size) = checkpoint {
        println!("latest checkpoint covers {size} record(s)");
    }
    Ok(ExitCode::SUCCESS)
}
