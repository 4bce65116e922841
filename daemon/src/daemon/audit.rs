//! One audit job, run on a worker thread: hash the checkpoint, skip it if this digest was
//! already audited under these policies, load it, run the policies, re-hash it, and hand the
//! record to append back to the main loop (the log has a single writer).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use audit_log::record::{FileDigest, InputDigest, ModelSubject, RecordBody};
use probes::digest::Manifest;
use probes::{LoadOptions, Model};

use super::config::LoadedWatch;
use super::jobs::Job;
use super::scan;

/// (checkpoint digest, policy key) pairs that have a record in the log.
pub type Audited = Arc<Mutex<HashSet<(String, String)>>>;

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
    Requeue {
        job: Job,
        why: String,
    },
}

pub struct Context {
    pub watch: LoadedWatch,
    pub audited: Audited,
    pub log_db: PathBuf,
    pub memory_limit_mb: Option<u64>,
}

/// Run `job`, reporting each step through `progress`. Never panics outward: a panic inside
/// the audit becomes an error record.
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
            let key = (format!("panic:{}", job.path), ctx.watch.policy_key.clone());
            error(
                job,
                ctx,
                None,
                "internal",
                format!("internal error: {msg}"),
                key,
            )
        }
    }
}

/// What the daemon adds to every record: the checkpoint's on-disk digest and the digest of
/// the policy set, the two halves of the dedup key.
fn job_inputs(ctx: &Context, path: &str, digest: &str) -> [InputDigest; 2] {
    [
        InputDigest {
            kind: "checkpoint".into(),
            path: path.into(),
            sha256: digest.into(),
        },
        InputDigest {
            kind: "policy_set".into(),
            path: ctx.watch.watch.policies.clone(),
            sha256: ctx.watch.policy_key.clone(),
        },
    ]
}

/// Every file the policies read (for error records, which have no run result).
fn policy_inputs(ctx: &Context) -> impl Iterator<Item = InputDigest> + '_ {
    ctx.watch.policies.iter().flat_map(|p| {
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

fn error(
    job: Job,
    ctx: &Context,
    manifest: Option<&Manifest>,
    stage: &str,
    message: String,
    key: (String, String),
) -> Outcome {
    let path = PathBuf::from(&job.path);
    let body = RecordBody::Error {
        model: manifest.map(|m| subject(&path, m)),
        inputs: policy_inputs(ctx)
            .chain(job_inputs(ctx, &job.path, &key.0))
            .collect(),
        stage: stage.into(),
        message,
    };
    Outcome::Record {
        job,
        body: Box::new(body),
        verdict: "error".into(),
        key,
    }
}

fn audit(job: Job, ctx: &Context, progress: &mut dyn FnMut(&str)) -> Outcome {
    let path = PathBuf::from(&job.path);
    progress("hashing");
    let manifest = match scan::manifest(&path) {
        Ok(m) => m,
        Err(e) if !path.exists() => {
            return Outcome::Skipped {
                job,
                why: format!("the checkpoint is gone: {e}"),
            }
        }
        Err(e) => {
            let key = (
                format!("unreadable:{}", job.path),
                ctx.watch.policy_key.clone(),
            );
            return error(
                job,
                ctx,
                None,
                "hash",
                format!("cannot read the checkpoint: {e}"),
                key,
            );
        }
    };
    let digest = manifest.root();
    let key = (digest.clone(), ctx.watch.policy_key.clone());
    if ctx
        .audited
        .lock()
        .map(|a| a.contains(&key))
        .unwrap_or(false)
    {
        return Outcome::Skipped {
            job,
            why: format!("sha256:{digest} was already audited under these policies"),
        };
    }
    if let Some(limit) = ctx.memory_limit_mb {
        let need = scan::estimated_memory_mb(&manifest);
        if need > limit {
            let msg = format!(
                "the checkpoint needs about {need} MB to audit, over memory_limit_mb = {limit}"
            );
            return error(job, ctx, Some(&manifest), "memory_limit", msg, key);
        }
    }
    progress("loading model");
    let model = match Model::load_path(&path, &LoadOptions::default()) {
        Ok(m) => m,
        Err(e) => return error(job, ctx, Some(&manifest), "load_model", e.to_string(), key),
    };
    // The bytes the model was built from are the bytes that were hashed.
    for f in &model.manifest.files {
        let same = manifest
            .files
            .iter()
            .any(|g| g.path == f.path && g.sha256 == f.sha256);
        if !same {
            return Outcome::Requeue {
                job,
                why: format!("`{}` changed while the model was loading", f.path),
            };
        }
    }
    let lineage = ctx
        .watch
        .watch
        .lineage
        .clone()
        .unwrap_or_else(|| policies::engine::lineage_of(&model));
    let last_pass = audit_log::store::open_reader(&ctx.log_db)
        .ok()
        .and_then(|conn| crate::cmd::check::last_pass(&conn, &lineage).ok().flatten());
    let mut opts = policies::engine::RunOptions {
        last_pass: last_pass.as_ref(),
        progress,
        micro_batch: 16,
        lineage: Some(lineage),
    };
    let result = match policies::engine::run(&model, &ctx.watch.policies, &mut opts) {
        Ok((r, _)) => r,
        Err(e) => {
            return error(
                job,
                ctx,
                Some(&manifest),
                "resolve_policies",
                e.to_string(),
                key,
            )
        }
    };
    // The files the model was built from, already checked against the hashed bytes.
    let model_subject = crate::cmd::check::model_subject(&model);
    drop(model);
    match scan::manifest(&path) {
        Ok(after) if after.root() == digest => {}
        _ => {
            return Outcome::Requeue {
                job,
                why: "the checkpoint changed during the audit".into(),
            }
        }
    }
    let verdict = result.verdict.as_str().to_string();
    let mut body = match crate::cmd::check::audit_record(&result, model_subject) {
        Ok(b) => b,
        Err(e) => return error(job, ctx, Some(&manifest), "record", e.to_string(), key),
    };
    if let RecordBody::Audit { inputs, .. } = &mut body {
        inputs.extend(job_inputs(ctx, &job.path, &digest));
    }
    Outcome::Record {
        job,
        body: Box::new(body),
        verdict,
        key,
    }
}

/// Every (checkpoint digest, policy key) pair that has an audit or error record in the log.
pub fn audited_from_log(conn: &rusqlite::Connection) -> anyhow::Result<HashSet<(String, String)>> {
    let mut set = HashSet::new();
    let mut from = 0;
    loop {
        let rows = audit_log::store::read_records_from(conn, from, 512)?;
        let Some(last) = rows.last() else { break };
        from = last.seq + 1;
        for row in &rows {
            let Ok(st) = serde_json::from_slice::<audit_log::record::Statement>(&row.bytes) else {
                continue;
            };
            let inputs = match &st.predicate.record {
                RecordBody::Audit { inputs, .. } | RecordBody::Error { inputs, .. } => inputs,
                RecordBody::KeyRotation { .. } => continue,
            };
            let find = |kind: &str| {
                inputs
                    .iter()
                    .find(|i| i.kind == kind)
                    .map(|i| i.sha256.clone())
            };
            if let (Some(c), Some(p)) = (find("checkpoint"), find("policy_set")) {
                set.insert((c, p));
            }
        }
    }
    Ok(set)
}
