//! `mechwatch daemon`, `mechwatch status`, and the hidden `mechwatch daemon-audit` that the
//! daemon runs for each audit (see `daemon::audit`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

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
    /// The daemon's configuration (for its state directory).
    #[arg(long, conflicts_with = "state_dir")]
    pub config: Option<PathBuf>,
    /// Or the state directory itself.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Finished audits to list.
    #[arg(long, default_value_t = 10)]
    pub last: usize,
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
    crate::daemon::run(&a.config)?;
    Ok(ExitCode::SUCCESS)
}

pub fn audit_child(a: DaemonAuditArgs) -> anyhow::Result<ExitCode> {
    crate::daemon::logging::init(Some(&a.log_format));
    crate::daemon::audit::child_main(a.memory_limit_mb)?;
    Ok(ExitCode::SUCCESS)
}

pub fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let state_dir = match (a.state_dir, a.config) {
        (Some(d), _) => d,
        (None, Some(c)) => {
            let t: toml::Table = toml::from_str(&std::fs::read_to_string(&c)?)?;
            let dir = PathBuf::from(
                t.get("state_dir")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| anyhow::anyhow!("{}: no state_dir", c.display()))?,
            );
            // As the daemon reads it: relative to the config's folder.
            crate::daemon::config::folder_of(&c)?.join(dir)
        }
        (None, None) => anyhow::bail!("pass --config or --state-dir"),
    };
    let jobs = crate::daemon::jobs::Jobs::open_read_only(&state_dir.join("state.db"))?;
    let open = jobs.open_jobs()?;
    println!("queue: {} job(s)", open.len());
    for (path, state) in &open {
        println!("  {state:<8} {path}");
    }
    println!("last audits:");
    for f in jobs.recent(a.last)? {
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
    let conn = audit_log::store::open_reader(&state_dir.join("audit.db"))?;
    let n = audit_log::store::record_count(&conn)?;
    let head = if n > 0 {
        audit_log::store::read_records(&conn, n - 1, n)?
            .first()
            .map(|r| r.hash_hex())
            .unwrap_or_default()
    } else {
        "-".into()
    };
    println!("log: {n} record(s), head sha256:{head}");
    let cps = audit_log::store::read_checkpoints(&conn)?;
    if let Some((size, _)) = cps.last() {
        println!("latest checkpoint covers {size} record(s)");
    }
    Ok(ExitCode::SUCCESS)
}
