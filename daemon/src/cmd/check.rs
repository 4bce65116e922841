//! `mechwatch check`: the release gate. Runs the policies once on a model, prints the
//! findings, optionally appends a signed record, and exits 0 (pass; warnings allowed unless
//! --fail-on-warn), 1 (a policy failed) or 2 (could not check).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use audit_log::record::{FileDigest, InputDigest, ModelSubject, RecordBody};
use audit_log::store::AuditLog;
use clap::Args;
use policies::result::{RunResult, Status};
use probes::Model;

use crate::gate::{CheckError, Format, Outcome};

mod outputs;

#[derive(Args)]
pub struct CheckArgs {
    /// A GGUF file, an HF directory, or a name from `mechwatch model list` (`default`).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// A policy file, a directory of them, or `default` (the shipped policies).
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// The format of the main report, which goes to --out.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Write the main report (--format) to FILE; `-` is standard output, the default unless
    /// another report takes it (then the main report goes to standard error).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also write the JSON report (the full result) to FILE; `-` is standard output.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write a JUnit XML report (a testcase per check) to FILE; `-` is standard output.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Also write a SARIF 2.1.0 report (a result per finding) to FILE; `-` is standard output.
    #[arg(long, value_name = "FILE")]
    pub sarif: Option<PathBuf>,
    /// Append a signed record of the result (or of why it could not check) to this log.
    #[arg(long, value_name = "DB")]
    pub log: Option<PathBuf>,
    /// The signing key (PKCS#8 PEM); without it, $CREDENTIALS_DIRECTORY/mechwatch-signing-key.
    #[arg(long, value_name = "KEY")]
    pub key: Option<PathBuf>,
    /// The public key the log verifies against before its records are trusted as a drift
    /// baseline: the log's first signing key (default: the signing key's own public key).
    #[arg(long, value_name = "PUB")]
    pub trusted_pubkey: Option<PathBuf>,
    /// Exit 1 on warnings too.
    #[arg(long)]
    pub fail_on_warn: bool,
    /// The model lineage, for drift against its last passing audit and for reusing the SAEs
    /// and directions that audit pinned (default: the file name).
    #[arg(long)]
    pub lineage: Option<String>,
    /// The lineage's reference checkpoint (a GGUF file, an HF directory or a model name): the
    /// SAEs and directions are computed on it (or found in the instrument store) and this
    /// audit measures with them (default: the lineage's last passing audit's instruments).
    #[arg(long, value_name = "PATH")]
    pub base: Option<String>,
}

pub fn run(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let reports = outputs::destinations(&a)?;
    // A log that cannot be opened is an error like any other: the reports still carry it.
    let (mut log, opened) = match &a.log {
        Some(db) => match open_log(db, a.key.as_deref()) {
            Ok(l) => (Some(l), Ok(())),
            Err(e) => (None, Err(("open_log", None, e))),
        },
        None => (None, Ok(())),
    };
    let outcome = opened
        .and_then(|()| outputs::folders_exist(&reports).map_err(|e| ("write_output", None, e)))
        .and_then(|()| audit(&a, log.as_mut()));
    let (result, model) = match outcome {
        Ok(r) => r,
        Err((stage, model, e)) => {
            if let Some(log) = log.as_mut() {
                let r = log.append(RecordBody::Error {
                    model: model.clone(),
                    inputs: Vec::new(),
                    stage: stage.into(),
                    message: format!("{e:#}"),
                })?;
                eprintln!("could not check; error record appended at seq {}", r.seq);
            }
            let error = CheckError {
                stage: stage.into(),
                message: crate::error_chain(&e),
                model,
            };
            outputs::write_error(&reports, &Outcome::CouldNotCheck(&error));
            return Err(e);
        }
    };
    // The audit happened, so its record is appended before the reports are written: a report
    // that cannot be written does not lose the signed result.
    if let Some(log) = log.as_mut() {
        let r = log.append(audit_record(&result, model)?)?;
        if !crate::progress::quiet() {
            eprintln!("signed record appended at seq {} ({})", r.seq, r.hash);
        }
    }
    outputs::write(&reports, &Outcome::Checked(&result))?;
    Ok(exit_code(result.verdict, a.fail_on_warn))
}

pub fn exit_code(verdict: Status, fail_on_warn: bool) -> ExitCode {
    match verdict {
        Status::Pass => ExitCode::SUCCESS,
        Status::Warn if !fail_on_warn => ExitCode::SUCCESS,
        Status::Warn | Status::Fail => ExitCode::from(1),
        Status::Error => ExitCode::from(2),
    }
}

fn open_log(db: &Path, key: Option<&Path>) -> anyhow::Result<AuditLog> {
    let signer = super::key::load_signer(key)?;
    AuditLog::open(db, Some(signer)).with_context(|| format!("opening log {}", db.display()))
}

type Failure = (&'static str, Option<ModelSubject>, anyhow::Error);

/// Load, validate and run. Errors carry the stage they happened at.
fn audit(a: &CheckArgs, log: Option<&mut AuditLog>) -> Result<(RunResult, ModelSubject), Failure> {
    let mut progress = crate::progress::Progress::stderr();
    let model =
        super::load_model_showing(&a.model, &progress).map_err(|e| ("load_model", None, e))?;
    let subject = model_subject(&model);
    let dir = super::policy::resolve(&a.policy)
        .map_err(|e| ("load_policies", Some(subject.clone()), e))?;
    let policies = policies::load_policies(&dir).map_err(|errs| {
        (
            "load_policies",
            Some(subject.clone()),
            anyhow::Error::new(policies::PolicyErrors(errs)),
        )
    })?;
    let lineage = a
        .lineage
        .clone()
        .unwrap_or_else(|| policies::engine::lineage_of(&model));
    let last_pass = match log {
        Some(log) => verified_last_pass(a, log, &lineage)
            .map_err(|e| ("read_log", Some(subject.clone()), e))?,
        None => None,
    };
    let reference = match &a.base {
        Some(base) => {
            let base = super::load_model_showing(base, &progress)
                .map_err(|e| ("load_model", Some(subject.clone()), e))?;
            let r = policies::engine::reference_instruments(&base, &policies, &lineage, None)
                .map_err(|e| {
                    (
                        "resolve_policies",
                        Some(subject.clone()),
                        anyhow::Error::new(e)
                            .context(format!("the base checkpoint {}", base.path.display())),
                    )
                })?;
            Some(r)
        }
        None => None,
    };
    let checks = policies
        .iter()
        .filter(|p| policies::engine::applies(&p.models, &model))
        .map(|p| p.checks.len() as u64)
        .sum();
    progress.begin("running the checks", Some(checks), "checks", None);
    progress.message("building directions, loading SAEs");
    let mut opts = policies::engine::RunOptions {
        last_pass: last_pass.as_ref(),
        progress: &mut progress,
        micro_batch: 16,
        lineage: Some(lineage),
        store: None,
        reference: reference.as_ref(),
    };
    let run = policies::engine::run(&model, &policies, &mut opts);
    progress.end(run.is_ok());
    let (result, _) = run.map_err(|e| {
        (
            "resolve_policies",
            Some(subject.clone()),
            anyhow::Error::new(e),
        )
    })?;
    Ok((result, subject))
}

pub fn model_subject(model: &Model) -> ModelSubject {
    ModelSubject {
        path: model.path.display().to_string(),
        root_sha256: model.manifest.root(),
        files: model
            .manifest
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

pub fn audit_record(result: &RunResult, model: ModelSubject) -> anyhow::Result<RecordBody> {
    Ok(RecordBody::Audit {
        model,
        inputs: result
            .inputs
            .iter()
            .map(|i| InputDigest {
                kind: i.kind.clone(),
                path: format!("{}/{}", i.policy, i.path),
                sha256: i.sha256.clone(),
            })
            .collect(),
        verdict: result.verdict.as_str().into(),
        result: serde_json::to_value(result)?,
    })
}

/// The newest passing audit of `lineage`, read from the log only once it has verified.
fn verified_last_pass(
    a: &CheckArgs,
    log: &AuditLog,
    lineage: &str,
) -> anyhow::Result<Option<RunResult>> {
    let db = a.log.as_deref().unwrap_or(Path::new("?"));
    let trusted = match &a.trusted_pubkey {
        Some(p) => audit_log::keys::load_public(p)
            .with_context(|| format!("reading the trusted public key {}", p.display()))?,
        None => super::key::load_signer(a.key.as_deref())?.public(),
    };
    let rows = crate::verified::rows(log.connection(), db, &trusted)?;
    Ok(crate::verified::last_pass(&rows, lineage))
}
