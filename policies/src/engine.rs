//! Evaluating policies on a model, in three steps.
//!
//! 1. Resolve: every reference of every applicable policy is checked against the model
//!    (hooks exist, SAEs fit, latents are in range, directions have the model's width), and
//!    every check plans the (prompt set, hook) pairs it reads, all before any forward pass. A
//!    failure here is an error for the whole run.
//! 2. Instruments are computed from the session's activations (or reused from the lineage's
//!    pins), each prompt set run once with every planned hook captured: the measured
//!    refusal tokens, the directions, then the instruments checks define themselves (a
//!    feature probe's selected latents).
//! 3. Each check runs (its module in [`crate::checks`]) and yields a finding; a warn or fail
//!    finding gets the logit lens of its prompts ([`crate::lens`]).
//!
//! The shared work lives in [`crate::session`], the instruments in [`crate::instruments`].
//! Nothing is random: the same model and policies give byte-identical results.

use probes::Model;

use crate::checks::{Cx, Planner, Resolver};
use crate::error::{PolicyError, PolicyErrors};
use crate::instruments::Instruments;
use crate::lineage::Lineage;
use crate::load::Policy;
use crate::result::{Evidence, Finding, InputRecord, ModelRef, PolicyResult, RunResult, Status};
use crate::schema::ModelMatch;
use crate::session::Session;

/// The arithmetic of every audit, recorded in its result: f32 weights and activations in
/// prompt passes and in generation's decode steps alike (the Q8_0 decode of interactive
/// `mechwatch generate` is never used), whatever the batch.
pub const AUDIT_PRECISION: &str = "f32 (prompt passes and decode steps)";
use crate::store::Store;

/// How a run is carried out.
pub struct RunOptions<'a> {
    /// The last passing result of this model's lineage, for `baseline = "last-pass"`.
    pub last_pass: Option<&'a RunResult>,
    /// Told about each step and long phase (a closure `|step: &str|` will do).
    pub progress: &'a mut dyn probes::progress::Report,
    /// Prompts per forward pass.
    pub micro_batch: usize,
    /// The model lineage recorded in the result (default: the checkpoint's file name).
    pub lineage: Option<String>,
    /// The instrument store (default: `$MECHWATCH_HOME/instruments`).
    pub store: Option<std::path::PathBuf>,
    /// The lineage's reference, whose pinned instruments this run reuses (from
    /// [`reference_instruments`], `check --base`); default: `last_pass`.
    pub reference: Option<&'a RunResult>,
}

impl RunOptions<'_> {
    fn store(&self) -> Store {
        match &self.store {
            Some(root) => Store::at(root.clone()),
            None => Store::in_cache(),
        }
    }
}

/// Resolve every reference of `policies` against `model` without running any check. A
/// builtin SAE that is not built yet is an error that says how to build it: this never
/// starts a training.
pub fn resolve_only(model: &Model, policies: &[Policy]) -> Result<(), PolicyErrors> {
    let mut session = Session::new(model, 16);
    let mut instruments = Instruments::new(Lineage::default(), Store::in_cache(), false);
    let applicable: Vec<&Policy> = policies
        .iter()
        .filter(|p| applies(&p.models, model))
        .collect();
    let mut errors = Vec::new();
    resolve_all(&mut session, &mut instruments, &applicable, &mut errors);
    // An instrument that is not there (a default SAE not built yet) would be an `error`
    // finding of every check reading it: here it is an error of the policy.
    broken_as_errors(&instruments, &applicable, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(errors))
    }
}

/// Resolve every policy's references and plan every check's passes before any forward pass,
/// then compute the instruments of the policies that resolved (refusal tokens, directions,
/// the checks' own): each prompt set then runs once with every hook any policy reads from it.
fn resolve_all(
    session: &mut Session<'_>,
    instruments: &mut Instruments,
    policies: &[&Policy],
    errors: &mut Vec<PolicyError>,
) {
    let mut resolved = Vec::new();
    for p in policies {
        let before = errors.len();
        instruments.resolve(session, p, errors);
        if let crate::refusal::ScoreTokens::Listed(words) = &p.refusal {
            errors.extend(crate::refusal::token_errors(session, p, words));
        }
        for check in &p.checks {
            check.body.plan(&mut Planner {
                session: &mut *session,
                instruments: &*instruments,
                policy: p,
                check,
                errors: &mut *errors,
            });
        }
        if errors.len() == before {
            resolved.push(*p);
        }
    }
    // Refusal tokens first: choosing them generates from the training sets, and those
    // generations' prefills capture what the directions read.
    for p in &resolved {
        instruments.resolve_refusal_tokens(session, p);
    }
    for p in &resolved {
        instruments.compute_directions(session, p, errors);
    }
    // Then the instruments checks define themselves, which may read those directions.
    for p in resolved {
        for check in &p.checks {
            check.body.resolve(&mut Resolver {
                session: &mut *session,
                instruments: &mut *instruments,
                policy: p,
                check,
            });
        }
    }
}

/// Each instrument of `policies` that did not resolve, as an error of its policy.
fn broken_as_errors(
    instruments: &Instruments,
    policies: &[&Policy],
    errors: &mut Vec<PolicyError>,
) {
    for p in policies {
        for (name, why) in instruments.broken_in(p) {
            errors.push(PolicyError::at(&p.path, None, format!("`{name}`: {why}")));
        }
    }
}

/// Seconds spent per check (`kind id`), in run order, for `mechwatch bench check`.
pub type Timings = Vec<(String, f64)>;

/// Evaluate `policies` on `model`. Errors are policy references the model cannot satisfy;
/// failures inside a check become that check's `error` finding instead. A run never trains
/// an instrument: a default SAE not built for this model is an `error` finding of each check
/// that reads it, saying how to build it ([`needs_default_sae`]).
pub fn run(
    model: &Model,
    policies: &[Policy],
    opts: &mut RunOptions<'_>,
) -> Result<(RunResult, Timings), PolicyErrors> {
    let mut session = Session::new(model, opts.micro_batch);
    let lineage_name = opts.lineage.clone().unwrap_or_else(|| lineage_of(model));
    let lineage = Lineage::new(&lineage_name, opts.reference.or(opts.last_pass), model);
    let mut instruments = Instruments::new(lineage, opts.store(), true);
    let applicable: Vec<bool> = policies.iter().map(|p| applies(&p.models, model)).collect();
    if !applicable.iter().any(|a| *a) {
        return Err(PolicyErrors(vec![PolicyError::at(
            &policies.first().map(|p| p.path.clone()).unwrap_or_default(),
            None,
            format!(
                "no policy applies to this model ({}, {} layers, d_model {}); nothing was checked",
                model.info().architecture,
                model.config().n_layers,
                model.config().d_model
            ),
        )]));
    }
    let mut errors = Vec::new();
    let checked: Vec<&Policy> = policies
        .iter()
        .zip(&applicable)
        .filter(|(_, a)| **a)
        .map(|(p, _)| p)
        .collect();
    resolve_all(&mut session, &mut instruments, &checked, &mut errors);
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let mut timings = Timings::new();
    let mut results = Vec::new();
    for (p, applies) in policies.iter().zip(applicable) {
        let mut findings = Vec::new();
        if applies {
            for c in &p.checks {
                opts.progress.step(&format!("{} / {}", p.name, c.id));
                let t0 = std::time::Instant::now();
                let outcome = c.body.evaluate(&mut Cx {
                    session: &mut session,
                    instruments: &instruments,
                    policy: p,
                    check: c,
                    last_pass: opts.last_pass,
                });
                timings.push((
                    format!("{} {}", c.kind.name(), c.id),
                    t0.elapsed().as_secs_f64(),
                ));
                let mut f = match outcome {
                    Ok(f) => f,
                    Err(e) => Finding::new(
                        Status::Error,
                        format!("could not check: {e}"),
                        Vec::new(),
                        Evidence::default(),
                    ),
                };
                f.check = c.id.clone();
                f.kind = c.kind;
                f.severity = c.severity;
                f.description = c.description.clone();
                crate::lens::attach(&mut session, p, &mut f);
                findings.push(f);
            }
        }
        results.push(PolicyResult {
            name: p.name.clone(),
            version: p.version.clone(),
            description: p.description.clone(),
            digest: p.digest.clone(),
            models: p.models.clone(),
            applies,
            verdict: findings
                .iter()
                .map(|f| f.status)
                .max()
                .unwrap_or(Status::Pass),
            findings,
        });
    }
    let mut inputs: Vec<InputRecord> = policies
        .iter()
        .flat_map(|p| p.inputs.iter().map(|f| InputRecord::new(&p.name, f)))
        .chain(instruments.inputs.iter().cloned())
        .collect();
    inputs.sort();
    inputs.dedup();
    let mut pins = instruments.pins.clone();
    pins.sort();
    pins.dedup();
    Ok((
        RunResult {
            model: model_ref(model, lineage_name),
            verdict: results
                .iter()
                .filter(|p| p.applies)
                .map(|p| p.verdict)
                .max()
                .unwrap_or(Status::Error),
            inputs,
            instruments: pins,
            policies: results,
        },
        timings,
    ))
}

/// Whether running `policies` on `model` would need its default SAE built first: a policy
/// that applies names the builtin SAE, the lineage's reference pins no SAE for it, and it is
/// neither shipped nor cached. The daemon then builds it as a step of its own, with progress.
pub fn needs_default_sae(
    model: &Model,
    policies: &[Policy],
    reference: Option<&RunResult>,
) -> bool {
    let pinned = |p: &Policy, name: &str| {
        reference.is_some_and(|r| {
            r.instruments
                .iter()
                .any(|i| i.kind == "sae" && i.policy == p.name && i.name == name)
        })
    };
    let wanted = policies
        .iter()
        .filter(|p| applies(&p.models, model))
        .any(|p| {
            p.saes.iter().any(|(name, e)| {
                matches!(e.source, crate::load::SaeSource::Builtin { .. }) && !pinned(p, name)
            })
        });
    wanted && matches!(probes::sae::default::built(model), Ok(None))
}

/// How a result names the checkpoint it was run on.
fn model_ref(model: &Model, lineage: String) -> ModelRef {
    let info = model.info();
    ModelRef {
        lineage,
        path: model.path.display().to_string(),
        digest: info.digest,
        architecture: info.architecture,
        n_layers: info.n_layers,
        d_model: info.d_model,
        vocab_size: info.vocab_size,
        tokenizer_digest: model.codec.digest().to_string(),
        precision: AUDIT_PRECISION.to_string(),
    }
}

/// Compute (or find) the instruments `policies` measure `model` with, store them, and return
/// them as a result with no findings: the model and its pinned instruments, the reference of
/// a lineage for [`RunOptions::reference`] (`check --base`). Runs no check; a builtin SAE that
/// is not built for `model` is an error that says how to build it.
pub fn reference_instruments(
    model: &Model,
    policies: &[Policy],
    lineage: &str,
    store: Option<std::path::PathBuf>,
) -> Result<RunResult, PolicyErrors> {
    let store = store.map(Store::at).unwrap_or_else(Store::in_cache);
    let mut session = Session::new(model, 16);
    let mut instruments = Instruments::new(Lineage::default(), store, true);
    let applicable: Vec<&Policy> = policies
        .iter()
        .filter(|p| applies(&p.models, model))
        .collect();
    let mut errors = Vec::new();
    resolve_all(&mut session, &mut instruments, &applicable, &mut errors);
    // An instrument that could not be made (a store that cannot be written) is an error
    // here: the run would otherwise measure with the audited checkpoint's own instead.
    broken_as_errors(&instruments, &applicable, &mut errors);
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    let mut pins = instruments.pins.clone();
    pins.sort();
    pins.dedup();
    Ok(RunResult {
        model: model_ref(model, lineage.to_string()),
        verdict: Status::Pass,
        inputs: Vec::new(),
        instruments: pins,
        policies: Vec::new(),
    })
}

/// The default lineage of a model: its file or directory name.
pub fn lineage_of(model: &Model) -> String {
    lineage_of_path(&model.path)
}

/// The default lineage of the checkpoint at `path`, before it is loaded: its file or
/// directory name.
pub fn lineage_of_path(path: &std::path::Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Whether a policy's `[models]` matcher admits `model`.
pub fn applies(m: &ModelMatch, model: &Model) -> bool {
    let c = model.config();
    let name = model
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (m.architectures.is_empty() || m.architectures.contains(&model.info().architecture))
        && m.n_layers.is_none_or(|n| n == c.n_layers)
        && m.d_model.is_none_or(|d| d == c.d_model)
        && (m.name_contains.is_empty() || m.name_contains.iter().any(|s| name.contains(s)))
}
