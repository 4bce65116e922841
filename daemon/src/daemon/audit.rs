//! One audit job. A worker thread of the daemon hashes the checkpoint, skips it if this
//! digest was already audited under these policies, and hands the audit itself to a child
//! process, `mechwatch daemon-audit`, then re-hashes the checkpoint and hands the record to
//! append back to the main loop (the log has a single writer; the signing key never leaves
//! the daemon).
//!
//! The child limits its own address space first thing (RLIMIT_AS), loads the model, runs the
//! policies and writes one JSON line per progress step and a last line with its finding to
//! standard output; its logs go to the daemon's standard error. An allocation past the limit
//! aborts the child, not the daemon: a child that dies (a signal, or a non-zero exit without
//! a finding) gets one error record keyed by the checkpoint's digest, so that checkpoint
//! state is quarantined: never retried, and never recorded twice across restarts.
//!
//! Error records are keyed by the checkpoint's content digest; when the content cannot be
//! hashed (a FIFO, an unreadable file), by a digest of its files' names, sizes and
//! modification times (input kind `checkpoint_state`): one record per checkpoint state.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use audit_log::record::{FileDigest, InputDigest, ModelSubject, RecordBody};
use probes::digest::Manifest;
use probes::{LoadOptions, Model};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::config::{LoadedWatch, Watch};
use super::jobs::Job;
use super::scan;

/// (checkpoint digest, policy key) pairs that have a verified record in the log.
pub type Audited = Arc<Mutex<HashSet<(String, String)>>>;

/// The running audit children, by job id, so that the daemon can kill them when it abandons
/// their audits at shutdown.
pub type Children = Arc<Mutex<HashMap<i64, Child>>>;

/// Audits of one checkpoint state aborted because it changed, before an error record ends
/// the retries.
pub const MAX_REQUEUES: u32 = 3;

pub enum Outcome {
    /// A record to append: an audit, or an error ("could not check").
    Record {
        job: Job,
        body: Box<RecordBody>,
        verdict: String,
        key: (String, String),
    },
    Skipped {
        job: Job,
        why: String,
    },
    /// The checkpoint changed during the audit; audit it again once it settles, unless this
    /// state was requeued [`MAX_REQUEUES`] times already: then append `give_up` under `key`.
    Requeue {
        job: Job,
        why: String,
        key: (String, String),
        give_up: Box<RecordBody>,
    },
}

pub struct Context {
    pub watch: LoadedWatch,
    pub audited: Audited,
    pub children: Children,
    pub log_db: PathBuf,
    /// The key the log verifies against: decisions read only verified records.
    pub trusted: ed25519_dalek::VerifyingKey,
    pub memory_limit_mb: Option<u64>,
    /// The child's address-space limit for a checkpoint of this estimated need (MB).
    pub audit_memory_limit_mb: Arc<dyn Fn(u64) -> u64 + Send + Sync>,
    pub log_format: String,
}

/// What the daemon sends the child on its standard input.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub path: String,
    pub watch: Watch,
    /// The configuration file the watch is written in.
    pub config: PathBuf,
    /// The policy key the daemon computed; the child's must match.
    pub policy_key: String,
    /// The checkpoint as the daemon hashed it.
    pub manifest: Manifest,
    pub log_db: PathBuf,
    /// The key the log verifies against (hex of the Ed25519 public key).
    pub trusted_pubkey: String,
}

/// One line of the child's standard output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    Progress(String),
    Done(Finding),
}

/// What the child found.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Finding {
    Record {
        body: Box<RecordBody>,
        verdict: String,
    },
    Requeue {
        why: String,
    },
    Skipped {
        why: String,
    },
}

/// Run `job`, reporting each step through `progress`. Never panics outward: a panic in the
/// daemon's part becomes an error record for the checkpoint state.
pub fn run(job: Job, ctx: &Context, progress: &mut dyn FnMut(&str)) -> Outcome {
    let j = job.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| audit(j, ctx, progress))) {
        Ok(o) => o,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let path = PathBuf::from(&job.path);
            let state = scan::snapshot(&path).map_or_else(
                || probes::digest::sha256_hex(job.path.as_bytes()),
                |s| s.state_digest(&path),
            );
            let key = (state, ctx.watch.policy_key.clone());
            let body = error_body(
                &ctx.watch,
                &job.path,
                None,
                "internal",
                format!("internal error: {msg}"),
                &key.0,
                "checkpoint_state",
            );
            record(job, body, key)
        }
    }
}

/// What the daemon adds to every record: the checkpoint's digest (`kind` is `checkpoint`
/// for its content digest, `checkpoint_state` for a state digest) and the digest of the
/// policy set, the two halves of the dedup key.
fn job_inputs(w: &LoadedWatch, path: &str, digest: &str, kind: &str) -> [InputDigest; 2] {
    [
        InputDigest {
            kind: kind.into(),
            path: path.into(),
            sha256: digest.into(),
        },
        InputDigest {
            kind: "policy_set".into(),
            path: w.watch.policies.clone(),
            sha256: w.policy_key.clone(),
        },
    ]
}

/// Every file the policies read (for error records, which have no run result).
fn policy_inputs(w: &LoadedWatch) -> impl Iterator<Item = InputDigest> + '_ {
    w.policies.iter().flat_map(|p| {
        p.inputs.iter().map(move |i| InputDigest {
            kind: i.kind.clone(),
            path: format!("{}/{}", p.name, i.path),
            sha256: i.sha256.clone(),
        })
    })
}

fn subject(path: &Path, m: &Manifest) -> ModelSubject {
    ModelSubject {
        path: path.display().to_string(),
        root_sha256: m.root(),
        files: m
            .files
            .iter()
            .map(|f| FileDigest {
                path: f.path.clone(),
                sha256: f.sha256.clone(),
                size: f.size,
            })
            .collect(),
    }
}

fn error_body(
    w: &LoadedWatch,
    path: &str,
    manifest: Option<&Manifest>,
    stage: &str,
    message: String,
    digest: &str,
    kind: &str,
) -> RecordBody {
    RecordBody::Error {
        model: manifest.map(|m| subject(Path::new(path), m)),
        inputs: policy_inputs(w)
            .chain(job_inputs(w, path, digest, kind))
            .collect(),
        stage: stage.into(),
        message,
    }
}

fn record(job: Job, body: RecordBody, key: (String, String)) -> Outcome {
    Outcome::Record {
        job,
        body: Box::new(body),
        verdict: "error".into(),
        key,
    }
}

fn audit(job: Job, ctx: &Context, progress: &mut dyn FnMut(&str)) -> Outcome {
    let path = PathBuf::from(&job.path);
    let w = &ctx.watch;
    progress("hashing");
    let snapshot = scan::snapshot(&path);
    let manifest = match scan::manifest_reporting(&path, &mut *progress) {
        Ok(m) => m,
        Err(e) if !path.exists() && !path.is_symlink() => {
            return Outcome::Skipped {
                job,
                why: format!("the checkpoint is gone: {e}"),
            }
        }
        Err(e) => {
            let Some(state) = snapshot.map(|s| s.state_digest(&path)) else {
                return Outcome::Skipped {
                    job,
                    why: format!("the checkpoint is gone: {e}"),
                };
            };
            let key = (state, w.policy_key.clone());
            if is_audited(ctx, &key) {
                return Outcome::Skipped {
                    job,
                    why: "this unreadable checkpoint state already has an error record".into(),
                };
            }
            let msg = format!("cannot read the checkpoint: {e}");
            let body = error_body(w, &job.path, None, "hash", msg, &key.0, "checkpoint_state");
            return record(job, body, key);
        }
    };
    let digest = manifest.root();
    let key = (digest.clone(), w.policy_key.clone());
    if is_audited(ctx, &key) {
        return Outcome::Skipped {
            job,
            why: format!("sha256:{digest} was already audited under these policies"),
        };
    }
    let error = |job: Job, stage: &str, message: String| {
        let body = error_body(
            w,
            &job.path,
            Some(&manifest),
            stage,
            message,
            &digest,
            "checkpoint",
        );
        record(job, body, key.clone())
    };
    let need = scan::estimated_memory_mb(&manifest);
    if let Some(limit) = ctx.memory_limit_mb {
        if need > limit {
            let msg = format!(
                "the checkpoint needs about {need} MB to audit, over memory_limit_mb = {limit}"
            );
            return error(job, "memory_limit", msg);
        }
    }
    let limit_mb = (ctx.audit_memory_limit_mb)(need);
    let request = Request {
        path: job.path.clone(),
        watch: w.watch.clone(),
        config: w.config.clone(),
        policy_key: w.policy_key.clone(),
        manifest: manifest.clone(),
        log_db: ctx.log_db.clone(),
        trusted_pubkey: hex::encode(ctx.trusted.as_bytes()),
    };
    let finding = match in_child(&job, ctx, &request, limit_mb, progress) {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Outcome::Skipped {
                job,
                why: "abandoned at shutdown".into(),
            }
        }
        Err(e) => return error(job, "audit_process", format!("{e:#}")),
    };
    match finding {
        Finding::Skipped { why } => Outcome::Skipped { job, why },
        Finding::Requeue { why } => requeue(job, ctx, &manifest, key.clone(), why),
        Finding::Record { body, verdict } => {
            if verdict != "error" {
                // The record stands for the bytes hashed before the audit.
                match scan::manifest(&path) {
                    Ok(after) if after.root() == digest => {}
                    _ => {
                        let why = "the checkpoint changed during the audit".to_string();
                        return requeue(job, ctx, &manifest, key.clone(), why);
                    }
                }
            }
            Outcome::Record {
                job,
                body,
                verdict,
                key: key.clone(),
            }
        }
    }
}

fn is_audited(ctx: &Context, key: &(String, String)) -> bool {
    ctx.audited.lock().map(|a| a.contains(key)).unwrap_or(false)
}

fn requeue(
    job: Job,
    ctx: &Context,
    manifest: &Manifest,
    key: (String, String),
    why: String,
) -> Outcome {
    let give_up = error_body(
        &ctx.watch,
        &job.path,
        Some(manifest),
        "changed_during_audit",
        format!("the audit was abandoned {MAX_REQUEUES} times because the checkpoint changed under it; the last time: {why}"),
        &key.0,
        "checkpoint",
    );
    Outcome::Requeue {
        job,
        why,
        key,
        give_up: Box::new(give_up),
    }
}

/// Run the audit in a `mechwatch daemon-audit` child limited to `limit_mb` of address
/// space. `Ok(None)`: the daemon killed the child (shutdown). `Err`: the child died.
fn in_child(
    job: &Job,
    ctx: &Context,
    request: &Request,
    limit_mb: u64,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Option<Finding>> {
    let exe = std::env::current_exe().context("finding the mechwatch executable")?;
    let mut child = Command::new(exe)
        .args([
            "daemon-audit",
            "--memory-limit-mb",
            &limit_mb.to_string(),
            "--log-format",
            &ctx.log_format,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the audit process")?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    if let Ok(mut c) = ctx.children.lock() {
        c.insert(job.id, child);
    }
    if let Some(mut stdin) = stdin {
        // A child that died at once shows in its exit status below.
        let _ = serde_json::to_writer(&mut stdin, request);
    }
    let mut finding = None;
    if let Some(out) = stdout {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Line>(&line) {
                Ok(Line::Progress(step)) => progress(&step),
                Ok(Line::Done(f)) => finding = Some(f),
                Err(_) => warn!(pid, line = %line, "unexpected output from the audit process"),
            }
        }
    }
    let child = ctx.children.lock().ok().and_then(|mut c| c.remove(&job.id));
    let Some(mut child) = child else {
        return Ok(None);
    };
    let status = child.wait().context("waiting for the audit process")?;
    match finding {
        Some(f) if status.success() => Ok(Some(f)),
        _ => anyhow::bail!(
            "the audit process {}; it was limited to {limit_mb} MB of address space \
             (audit_memory_limit_mb), past which an allocation aborts it",
            describe(status)
        ),
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            6 => " (SIGABRT)",
            7 => " (SIGBUS)",
            9 => " (SIGKILL)",
            11 => " (SIGSEGV)",
            15 => " (SIGTERM)",
            _ => "",
        };
        format!("was killed by signal {sig}{name}")
    } else {
        match status.code() {
            Some(101) => "panicked (exit status 101)".into(),
            Some(c) => format!("exited with status {c} without a finding"),
            None => "ended without a finding".into(),
        }
    }
}

/// The child's side: `mechwatch daemon-audit`. Reads a [`Request`] on standard input, audits,
/// and writes [`Line`]s to standard output.
pub fn child_main(memory_limit_mb: u64) -> anyhow::Result<()> {
    let bytes = memory_limit_mb.saturating_mul(1024 * 1024);
    rlimit::setrlimit(rlimit::Resource::AS, bytes, bytes)
        .context("limiting the audit's address space (RLIMIT_AS)")?;
    // An orphan (the daemon was killed) stops instead of auditing for nobody.
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(3);
        }
    });
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("reading the audit request")?;
    let req: Request = serde_json::from_str(&text).context("parsing the audit request")?;
    let out = std::io::stdout();
    let emit = |l: &Line| -> anyhow::Result<()> {
        let mut o = out.lock();
        serde_json::to_writer(&mut o, l)?;
        o.write_all(b"\n")?;
        o.flush()?;
        Ok(())
    };
    let w = LoadedWatch::load(&req.watch, &req.config)?;
    let finding = if w.policy_key != req.policy_key {
        Finding::Skipped {
            why: "the policy files changed on disk since the daemon loaded them; reload it \
                  (SIGHUP) to audit with them"
                .into(),
        }
    } else {
        let mut progress = |step: &str| {
            let _ = emit(&Line::Progress(step.to_string()));
        };
        audit_in_child(&req, &w, &mut progress)
    };
    emit(&Line::Done(finding))
}

fn audit_in_child(req: &Request, w: &LoadedWatch, progress: &mut dyn FnMut(&str)) -> Finding {
    let path = PathBuf::from(&req.path);
    let digest = req.manifest.root();
    let error = |stage: &str, message: String| Finding::Record {
        body: Box::new(error_body(
            w,
            &req.path,
            Some(&req.manifest),
            stage,
            message,
            &digest,
            "checkpoint",
        )),
        verdict: "error".into(),
    };
    let lineage = w
        .watch
        .lineage
        .clone()
        .unwrap_or_else(|| policies::engine::lineage_of_path(&path));
    let mut progress = progress;
    // The base's instruments first, and the base dropped before the checkpoint loads: the
    // audit's memory limit is sized for one model.
    let reference = match &w.watch.base {
        Some(base) => match base_reference(w, base, &lineage, &mut *progress) {
            Ok(r) => Some(r),
            Err((stage, why)) => {
                let message = format!(
                    "{}: the [[watch]] for {} has base = \"{}\", which {why}",
                    w.config.display(),
                    w.watch.path.display(),
                    base.display()
                );
                return error(stage, message);
            }
        },
        None => None,
    };
    progress("loading model");
    let model = match Model::load_path(&path, &LoadOptions::default()) {
        Ok(m) => m,
        Err(e) => return error("load_model", e.to_string()),
    };
    // The bytes the model was built from are the bytes that were hashed.
    for f in &model.manifest.files {
        match req.manifest.files.iter().find(|g| g.path == f.path) {
            None => {
                return error(
                    "manifest",
                    format!(
                        "the model loads `{}`, which is not among the checkpoint's hashed files \
                         (hidden names, starting with `.`, are never hashed), so no record \
                         could cover it; rename it",
                        f.path
                    ),
                )
            }
            Some(g) if g.sha256 != f.sha256 => {
                return Finding::Requeue {
                    why: format!("`{}` changed while the model was loading", f.path),
                }
            }
            Some(_) => {}
        }
    }
    // The drift baseline comes from verified records only; a log that does not verify is
    // reported, not read around.
    let trusted = match hex::decode(&req.trusted_pubkey)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
    {
        Some(k) => k,
        None => return error("read_log", "the daemon sent a malformed trusted key".into()),
    };
    let last_pass = match audit_log::store::open_reader(&req.log_db)
        .map_err(anyhow::Error::from)
        .and_then(|conn| crate::verified::rows(&conn, &req.log_db, &trusted))
    {
        Ok(rows) => crate::verified::last_pass(&rows, &lineage),
        Err(e) => return error("read_log", format!("{e:#}")),
    };
    // A default SAE is built as a step of its own, with its cost said up front and its
    // progress in `mechwatch status`; the audit itself never trains one.
    let pins = reference.as_ref().or(last_pass.as_ref());
    if policies::engine::needs_default_sae(&model, &w.policies, pins) {
        if let Err(e) = probes::sae::default::ensure_reporting(&model, &mut progress) {
            return error("build_default_sae", e.to_string());
        }
    }
    let mut opts = policies::engine::RunOptions {
        last_pass: last_pass.as_ref(),
        progress: &mut progress,
        micro_batch: 16,
        lineage: Some(lineage),
        store: None,
        reference: reference.as_ref(),
    };
    let result = match policies::engine::run(&model, &w.policies, &mut opts) {
        Ok((r, _)) => r,
        Err(e) => return error("resolve_policies", e.to_string()),
    };
    // The files the model was built from, already checked against the hashed bytes.
    let model_subject = crate::cmd::check::model_subject(&model);
    drop(model);
    let verdict = result.verdict.as_str().to_string();
    let mut body = match crate::cmd::check::audit_record(&result, model_subject) {
        Ok(b) => b,
        Err(e) => return error("record", e.to_string()),
    };
    if let RecordBody::Audit { inputs, .. } = &mut body {
        inputs.extend(job_inputs(w, &req.path, &digest, "checkpoint"));
    }
    Finding::Record {
        body: Box::new(body),
        verdict,
    }
}

/// The instruments of the watch's `base` checkpoint, computed (or found in the instrument
/// store) as `check --base` computes them, its default SAE built first if a policy needs it.
/// `Err`: the stage, and what went wrong as the end of a sentence about the base.
fn base_reference(
    w: &LoadedWatch,
    base: &Path,
    lineage: &str,
    mut progress: &mut dyn FnMut(&str),
) -> Result<policies::RunResult, (&'static str, String)> {
    progress("loading the base checkpoint");
    let model = Model::load_path(base, &LoadOptions::default())
        .map_err(|e| ("load_base", format!("does not load: {e}")))?;
    if policies::engine::needs_default_sae(&model, &w.policies, None) {
        probes::sae::default::ensure_reporting(&model, &mut progress).map_err(|e| {
            (
                "build_default_sae",
                format!("needs its default SAE, which could not be built: {e}"),
            )
        })?;
    }
    progress("computing the base's instruments");
    policies::engine::reference_instruments(&model, &w.policies, lineage, None).map_err(|e| {
        (
            "resolve_base",
            format!("the policies' instruments could not be computed on: {e}"),
        )
    })
}

/// Every (checkpoint digest, policy key) pair that has an audit or error record in the log,
/// decided from verified records only: the whole log is verified against `trusted` (its
/// first signing key) and the rows read are the rows verified (same count, same Merkle
/// root). A log that does not verify is an error: the daemon refuses to start rather than
/// trust rows anyone with write access to the database could have inserted.
pub fn audited_from_log(
    conn: &rusqlite::Connection,
    db: &Path,
    trusted: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<HashSet<(String, String)>> {
    let rows = crate::verified::rows(conn, db, trusted)?;
    let mut set = HashSet::new();
    for row in &rows {
        let Ok(st) = serde_json::from_slice::<audit_log::record::Statement>(&row.bytes) else {
            continue;
        };
        if let Some(k) = dedup_key(&st.predicate.record) {
            set.insert(k);
        }
    }
    Ok(set)
}

/// The (checkpoint digest, policy key) pair a record was written for.
fn dedup_key(r: &RecordBody) -> Option<(String, String)> {
    let inputs = match r {
        RecordBody::Audit { inputs, .. } | RecordBody::Error { inputs, .. } => inputs,
        _ => return None,
    };
    let find = |kind: &str| {
        inputs
            .iter()
            .find(|i| i.kind == kind)
            .map(|i| i.sha256.clone())
    };
    let checkpoint = find("checkpoint").or_else(|| find("checkpoint_state"))?;
    Some((checkpoint, find("policy_set")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit_log::store::AuditLog;
    use audit_log::Signer;

    fn error_record(digest: &str) -> RecordBody {
        RecordBody::Error {
            model: None,
            inputs: vec![
                InputDigest {
                    kind: "checkpoint".into(),
                    path: "/m.gguf".into(),
                    sha256: digest.into(),
                },
                InputDigest {
                    kind: "policy_set".into(),
                    path: "default".into(),
                    sha256: "p".into(),
                },
            ],
            stage: "load_model".into(),
            message: "truncated".into(),
        }
    }

    #[test]
    fn the_daemon_trusts_unverified_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("audit.db");
        let signer = Signer::generate();
        let public = signer.public();
        let mut log = AuditLog::open(&db, Some(signer)).unwrap();
        log.append(error_record("a")).unwrap();
        let audited = audited_from_log(log.connection(), &db, &public).unwrap();
        assert!(audited.contains(&("a".to_string(), "p".to_string())));
        // Another key is not trusted.
        let other = Signer::generate().public();
        let e = audited_from_log(log.connection(), &db, &other).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        // A plain INSERT naming another digest, unsigned: the log no longer verifies.
        let (bytes, key_id): (Vec<u8>, String) = log
            .connection()
            .query_row("SELECT bytes, key_id FROM records WHERE seq = 0", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let forged = String::from_utf8(bytes).unwrap().replace("\"a\"", "\"b\"");
        log.connection()
            .execute(
                "INSERT INTO records (seq, bytes, sig, key_id, kind, subject) VALUES (1, ?1, ?2, ?3, 'error', 'x')",
                rusqlite::params![forged.as_bytes(), vec![0u8; 64], key_id],
            )
            .unwrap();
        let e = audited_from_log(log.connection(), &db, &public).unwrap_err();
        assert!(e.to_string().contains("seq 1: bad signature"), "{e}");
    }

    #[test]
    fn a_panic_writes_a_new_error_record_on_every_restart() {
        // A crashed child is described, and its record is keyed like any other: by digest.
        use std::os::unix::process::ExitStatusExt;
        let panicked = describe(std::process::ExitStatus::from_raw(101 << 8));
        assert!(panicked.contains("panicked"), "{panicked}");
        let aborted = describe(std::process::ExitStatus::from_raw(6));
        assert!(aborted.contains("SIGABRT"), "{aborted}");
        // Records of unhashable checkpoints are keyed by their state digest.
        let mut r = error_record("s");
        if let RecordBody::Error { inputs, .. } = &mut r {
            inputs[0].kind = "checkpoint_state".into();
        }
        assert_eq!(dedup_key(&r), Some(("s".to_string(), "p".to_string())));
    }
}
