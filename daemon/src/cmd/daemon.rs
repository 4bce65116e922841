//! `mechwatch daemon`, `mechwatch status`, and the hidden `mechwatch daemon-audit` that the
//! daemon runs for each audit (see `daemon::audit`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::text::terminal_safe;

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
    /// The log's first public key: verify the log, and exit 1 when it does not verify.
    /// Without it the log head is shown as not verified.
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
    /// Print one JSON object (queue, recent audits, log head) on standard output.
    #[arg(long)]
    pub json: bool,
}

/// What the log says about a finished job the unsigned job table reports: `None` when the
/// record at the job's seq has the verdict the job claims (`error` for an error record),
/// else the disagreement. The record itself is verified only with `--pubkey`.
fn cross_check(conn: &rusqlite::Connection, job: &crate::daemon::jobs::Finished) -> Option<String> {
    use audit_log::record::{RecordBody, Statement};
    let seq = u64::try_from(job.seq?).ok()?;
    let row = match audit_log::store::read_records_each(conn, seq, seq + 1) {
        Ok(rows) => rows.into_iter().next(),
        Err(e) => return Some(format!("could not read seq {seq}: {e}")),
    };
    let row = match row {
        None => return Some(format!("the log has no record with seq {seq}")),
        Some(Err(m)) => return Some(format!("{m}")),
        Some(Ok(row)) => row,
    };
    let Ok(st) = serde_json::from_slice::<Statement>(&row.bytes) else {
        return Some(format!("seq {seq} is malformed"));
    };
    let (path, verdict) = match &st.predicate.record {
        RecordBody::Audit { model, verdict, .. } => (Some(model.path.as_str()), verdict.as_str()),
        RecordBody::Error { model, .. } => (model.as_ref().map(|m| m.path.as_str()), "error"),
        RecordBody::KeyRotation { .. } => return Some(format!("seq {seq} is a key rotation")),
    };
    let claimed = job.verdict.as_deref().unwrap_or("-");
    (claimed != verdict).then(|| {
        format!(
            "seq {seq} is a {verdict} record{}",
            path.map(|p| format!(" of {p}")).unwrap_or_default()
        )
    })
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
    // The job table is unsigned: each finished job is checked against the log's record.
    let checked: Vec<Option<String>> = recent.iter().map(|f| cross_check(&conn, f)).collect();
    let verified = match &a.pubkey {
        None => None,
        Some(p) => {
            let key = audit_log::keys::load_public(p)?;
            let head = audit_log::store::read_head(&state_dir.join("audit.db"))?;
            Some(
                audit_log::verify_log_witnessed(&conn, &key, None, head.as_deref())
                    .map(|_| ())
                    .map_err(|f| f.to_string()),
            )
        }
    };
    let code = match &verified {
        Some(Err(_)) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    };
    if a.json {
        let v = json!({
            "state_dir": state_dir.display().to_string(),
            "queue": open.iter().map(|(path, state)| json!({ "path": path, "state": state })).collect::<Vec<_>>(),
            "recent": recent.iter().zip(&checked).map(|(f, disagrees)| json!({
                "updated_at": f.updated_at,
                "state": f.state,
                "verdict": f.verdict,
                "path": f.path,
                "seq": f.seq,
                "message": f.message,
                "log_disagrees": disagrees,
            })).collect::<Vec<_>>(),
            "log": {
                "records": n,
                "head_sha256": head,
                "checkpoint_size": checkpoint,
                "verified": verified.as_ref().map(Result::is_ok),
                "failure": verified.as_ref().and_then(|v| v.as_ref().err()),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(code);
    }
    println!("queue: {} job(s)", open.len());
    for (path, state) in &open {
        println!("  {state:<8} {}", terminal_safe(path));
    }
    println!("last audits (the daemon's unsigned job table, each checked against the log):");
    for (f, disagrees) in recent.iter().zip(&checked) {
        println!(
            "  {} {:<8} {:<6} {}{}{}{}",
            terminal_safe(&f.updated_at),
            terminal_safe(&f.state),
            terminal_safe(f.verdict.as_deref().unwrap_or("-")),
            terminal_safe(&f.path),
            f.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
            f.message
                .as_deref()
                .map(|m| format!(": {}", terminal_safe(m)))
                .unwrap_or_default(),
            disagrees
                .as_deref()
                .map(|d| format!("  [NOT what the log says: {}]", terminal_safe(d)))
                .unwrap_or_default()
        );
    }
    println!(
        "log: {n} record(s), head sha256:{} ({})",
        head.as_deref().unwrap_or("-"),
        match &verified {
            None => "not verified; pass --pubkey to verify".to_string(),
            Some(Ok(())) => "verified".to_string(),
            Some(Err(f)) => format!("FAILED verification: {}", terminal_safe(f)),
        }
    );
    if let Some(size) = checkpoint {
        println!("latest checkpoint covers {size} record(s)");
    }
    Ok(code)
}
