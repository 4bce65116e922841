//! Evaluating policies on a model.
//!
//! First every reference is resolved against the model (hooks exist, SAEs fit, latents are in
//! range, directions have the model's width); a failure there is an error for the whole run.
//! Then each check runs and yields a finding. Forward passes are shared: each prompt set is
//! tokenised once and run once with every hook any check reads from it captured, and the
//! unhooked last-token logits and generations of a set are reused by every check that needs
//! them. Nothing is random: the same model and policies give byte-identical results.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use probes::generate::{generate, GenerateOptions, Sampling};
use probes::hooks::{HookPoint, Hooks, Positions};
use probes::sae::search::{auroc, Labels};
use probes::sae::{Sae, SparseRow};
use probes::transformer::{Padding, Unembed};
use probes::Model;
use rayon::prelude::*;

use crate::error::{PolicyError, PolicyErrors};
use crate::load::{
    Baseline, CheckBody, DirectionSource, Expectation, Intervention, LatentChoice, Policy,
    SaeSource,
};
use crate::metrics;
use crate::result::{
    round, Distribution, Evidence, Finding, GenerationPair, InputRecord, LatentEvidence, Metric,
    ModelRef, PolicyResult, PromptEvidence, RunResult, Status, SweepPoint, TokenValue,
};
use crate::schema::{Aggregate, Bounds, Metric as MetricKind, ModelMatch, Severity, TokenScope};

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
}

/// Resolve every reference of `policies` against `model` without running any check (the
/// builtin SAE is trained if it is not cached yet).
pub fn resolve_only(model: &Model, policies: &[Policy]) -> Result<(), PolicyErrors> {
    let mut engine = Engine::new(model, 16);
    let mut quiet = |_: &str| {};
    let mut opts = RunOptions {
        last_pass: None,
        progress: &mut quiet,
        micro_batch: 16,
        lineage: None,
    };
    let mut errors = Vec::new();
    for p in policies.iter().filter(|p| applies(&p.models, model)) {
        engine.resolve(p, &mut opts, &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(errors))
    }
}

/// Seconds spent per check kind, for `mechwatch bench check`.
pub type Timings = BTreeMap<&'static str, f64>;

/// Evaluate `policies` on `model`. Errors are policy references the model cannot satisfy;
/// failures inside a check become that check's `error` finding instead.
pub fn run(
    model: &Model,
    policies: &[Policy],
    opts: &mut RunOptions<'_>,
) -> Result<(RunResult, Timings), PolicyErrors> {
    let mut engine = Engine::new(model, opts.micro_batch);
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
    for (p, _) in policies.iter().zip(&applicable).filter(|(_, a)| **a) {
        engine.resolve(p, opts, &mut errors);
    }
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
                let outcome = engine.check(p, c, opts);
                *timings.entry(kind_name(&c.body)).or_default() += t0.elapsed().as_secs_f64();
                let mut f = match outcome {
                    Ok(f) => f,
                    Err(message) => Finding {
                        check: String::new(),
                        kind: c.kind,
                        severity: c.severity,
                        status: Status::Error,
                        description: String::new(),
                        explanation: format!("could not check: {message}"),
                        metrics: Vec::new(),
                        evidence: Evidence::default(),
                    },
                };
                f.check = c.id.clone();
                f.kind = c.kind;
                f.severity = c.severity;
                f.description = c.description.clone();
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
        .chain(engine.extra_inputs.iter().cloned())
        .collect();
    inputs.sort();
    inputs.dedup();
    let info = model.info();
    Ok((
        RunResult {
            model: ModelRef {
                lineage: opts.lineage.clone().unwrap_or_else(|| lineage_of(model)),
                path: model.path.display().to_string(),
                digest: info.digest,
                architecture: info.architecture,
                n_layers: info.n_layers,
                d_model: info.d_model,
            },
            verdict: results
                .iter()
                .filter(|p| p.applies)
                .map(|p| p.verdict)
                .max()
                .unwrap_or(Status::Error),
            inputs,
            policies: results,
        },
        timings,
    ))
}

/// The default lineage of a model: its file or directory name.
pub fn lineage_of(model: &Model) -> String {
    model.path.file_name().map_or_else(
        || model.path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn kind_name(b: &CheckBody) -> &'static str {
    match b {
        CheckBody::Feature { .. } => "feature_probe",
        CheckBody::Direction { .. } => "direction_probe",
        CheckBody::Steering(_) => "steering",
        CheckBody::Drift { .. } => "drift",
    }
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

/// A failed or violated check is `fail`, or only `warn` when its severity is low or info.
fn violated(severity: Severity) -> Status {
    if severity >= Severity::Medium {
        Status::Fail
    } else {
        Status::Warn
    }
}

#[derive(Clone)]
struct ResolvedSae {
    name: String,
    sae: Arc<Sae>,
    hook: HookPoint,
    labels: Labels,
}

#[derive(Clone)]
struct ResolvedDirection {
    hook: HookPoint,
    position: i64,
    /// Difference of means (or the file's vector) `[d_model]`.
    raw: Tensor,
    /// Unit length `[d_model]`.
    unit: Tensor,
    norm: f64,
}

/// A prompt set as tokens, with its key (a digest of its content) for sharing work.
#[derive(Clone)]
struct Tokens {
    key: String,
    name: String,
    texts: Arc<Vec<String>>,
    ids: Arc<Vec<Vec<u32>>>,
    /// Tokens every prompt shares at the start (the chat template's preamble), skipped when
    /// scoring tokens.
    prefix: usize,
}

impl Tokens {
    /// The rows of `prompt` that `scope` reads.
    fn scored<'a, T>(&self, prompt: &'a [T], scope: TokenScope) -> &'a [T] {
        match scope {
            TokenScope::Prompt => &prompt[self.prefix.min(prompt.len())..],
            TokenScope::Last => &prompt[prompt.len().saturating_sub(1)..],
        }
    }
}

struct Engine<'m> {
    model: &'m Model,
    micro_batch: usize,
    /// By policy name then SAE name.
    saes: HashMap<(String, String), ResolvedSae>,
    directions: HashMap<(String, String), ResolvedDirection>,
    /// Hooks to capture per prompt set, planned before any pass runs.
    plan: HashMap<String, BTreeSet<HookPoint>>,
    tokens: HashMap<(bool, Vec<String>), Tokens>,
    acts: HashMap<(String, HookPoint), Arc<Vec<Tensor>>>,
    sparse: HashMap<(String, String), Arc<Vec<Vec<SparseRow>>>>,
    last_logits: HashMap<String, Arc<Vec<Vec<f32>>>>,
    generations: HashMap<(String, usize), Arc<Vec<String>>>,
    builtin: Option<Arc<Sae>>,
    extra_inputs: Vec<InputRecord>,
    chat_prefix: Option<usize>,
}

impl<'m> Engine<'m> {
    fn new(model: &'m Model, micro_batch: usize) -> Self {
        Self {
            model,
            micro_batch: micro_batch.max(1),
            saes: HashMap::new(),
            directions: HashMap::new(),
            plan: HashMap::new(),
            tokens: HashMap::new(),
            acts: HashMap::new(),
            sparse: HashMap::new(),
            last_logits: HashMap::new(),
            generations: HashMap::new(),
            builtin: None,
            extra_inputs: Vec::new(),
            chat_prefix: None,
        }
    }

    fn n_layers(&self) -> usize {
        self.model.config().n_layers
    }

    fn hook(
        &self,
        p: &Policy,
        name: &crate::load::Located<String>,
        errors: &mut Vec<PolicyError>,
    ) -> Option<HookPoint> {
        match HookPoint::parse(&name.value, self.n_layers()) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(p.error(&name.at, e.to_string()));
                None
            }
        }
    }

    /// Check every reference of `p` against the model; load SAEs and compute directions.
    fn resolve(&mut self, p: &Policy, opts: &mut RunOptions<'_>, errors: &mut Vec<PolicyError>) {
        let d_model = self.model.config().d_model;
        for (name, entry) in &p.saes {
            let (sae, hook_spec) = match &entry.source {
                SaeSource::File { sae, hook } => (Arc::clone(sae), hook.clone()),
                SaeSource::Builtin { hook } => match self.builtin_sae(opts) {
                    Ok(s) => {
                        self.extra_inputs.push(InputRecord {
                            policy: p.name.clone(),
                            kind: "sae".into(),
                            path: format!("builtin:default ({})", s.path.display()),
                            sha256: s.manifest.root(),
                        });
                        (s, hook.clone())
                    }
                    Err(e) => {
                        errors.push(PolicyError::at(
                            &p.path,
                            None,
                            format!("[saes.{name}]: the default SAE: {e}"),
                        ));
                        continue;
                    }
                },
            };
            let hook_name = hook_spec
                .as_ref()
                .map(|h| h.value.clone())
                .or_else(|| sae.hook.clone());
            let Some(hook_name) = hook_name else {
                errors.push(PolicyError::at(
                    &p.path,
                    None,
                    format!("[saes.{name}]: the SAE's config names no hook; set `hook`"),
                ));
                continue;
            };
            match sae.check_fits(&hook_name, self.n_layers(), d_model) {
                Ok(hook) => {
                    self.saes.insert(
                        (p.name.clone(), name.clone()),
                        ResolvedSae {
                            name: name.clone(),
                            sae,
                            hook,
                            labels: entry.labels.clone(),
                        },
                    );
                }
                Err(e) => {
                    let at = hook_spec.map(|h| h.at);
                    errors.push(PolicyError::at(&p.path, at, format!("[saes.{name}]: {e}")));
                }
            }
        }
        for d in p.directions.values() {
            let Some(hook) = self.hook(p, &d.hook, errors) else {
                continue;
            };
            if !hook.is_residual_width() {
                errors.push(p.error(
                    &d.hook.at,
                    format!(
                        "`{}` is not a residual-stream-width hook; a direction needs one",
                        d.hook.value
                    ),
                ));
                continue;
            }
            if let DirectionSource::Contrast {
                positive, negative, ..
            } = &d.source
            {
                for set in [positive, negative] {
                    let key = self.set_tokens(p, set.as_str()).map(|t| t.key);
                    match key {
                        Ok(k) => {
                            self.plan.entry(k).or_default().insert(hook);
                        }
                        Err(e) => errors.push(PolicyError::at(&p.path, None, e)),
                    }
                }
            }
        }
        // Plan captures and check latents and attribution hooks.
        for c in &p.checks {
            let sae_of = |n: &str| self.saes.get(&(p.name.clone(), n.to_string())).cloned();
            let mut wants: Vec<(String, HookPoint)> = Vec::new();
            match &c.body {
                CheckBody::Feature {
                    sae,
                    latents,
                    expect,
                    ..
                } => {
                    let Some(s) = sae_of(sae) else { continue };
                    if let LatentChoice::Listed(ls) = latents {
                        for l in ls {
                            if let Err(e) = s.sae.check_latent(l.value) {
                                errors.push(p.error(&l.at, e.to_string()));
                            }
                        }
                    }
                    let mut sets: Vec<&String> =
                        expect.iter().map(|e: &Expectation| &e.prompts).collect();
                    if let LatentChoice::Select {
                        positive, negative, ..
                    } = latents
                    {
                        sets.extend([positive, negative]);
                    }
                    wants.extend(sets.into_iter().map(|s2| (s2.clone(), s.hook)));
                }
                CheckBody::Direction {
                    direction,
                    positive,
                    negative,
                    attribute_with,
                    ..
                } => {
                    let hook = p
                        .directions
                        .get(direction)
                        .and_then(|d| HookPoint::parse(&d.hook.value, self.n_layers()).ok());
                    if let Some(h) = hook {
                        wants.push((positive.clone(), h));
                        wants.push((negative.clone(), h));
                        if let Some(a) = attribute_with.as_deref().and_then(sae_of) {
                            if a.hook.order() > h.order() {
                                errors.push(PolicyError::at(&p.path, None, format!("check `{}`: `attribute_with` SAE reads `{}`, after the direction's hook `{h}`; attribution needs an SAE at that hook or before it", c.id, a.hook)));
                            }
                            wants.push((positive.clone(), a.hook));
                        }
                    }
                }
                CheckBody::Steering(st) => {
                    let crate::load::Steering {
                        prompts,
                        intervention,
                        attribute_with,
                        ..
                    } = &**st;
                    if let Intervention::AddLatent { sae, latent, .. } = intervention {
                        if let Some(s) = sae_of(sae) {
                            if let Err(e) = s.sae.check_latent(latent.value) {
                                errors.push(p.error(&latent.at, e.to_string()));
                            }
                        }
                    }
                    if let Some(a) = attribute_with.as_deref().and_then(sae_of) {
                        wants.push((prompts.clone(), a.hook));
                    }
                }
                CheckBody::Drift { sae, prompts, .. } => {
                    if let Some(s) = sae_of(sae) {
                        wants.push((prompts.clone(), s.hook));
                    }
                }
            }
            for (set, hook) in wants {
                match self.set_tokens(p, &set) {
                    Ok(t) => {
                        self.plan.entry(t.key).or_default().insert(hook);
                    }
                    Err(e) => errors.push(PolicyError::at(&p.path, None, e)),
                }
            }
        }
        if !errors.is_empty() {
            return;
        }
        for (name, d) in &p.directions {
            match self.compute_direction(p, d) {
                Ok(r) => {
                    self.directions.insert((p.name.clone(), name.clone()), r);
                }
                Err(e) => errors.push(p.error(&d.hook.at, format!("direction `{name}`: {e}"))),
            }
        }
    }

    fn builtin_sae(&mut self, opts: &mut RunOptions<'_>) -> Result<Arc<Sae>, String> {
        if let Some(s) = &self.builtin {
            return Ok(Arc::clone(s));
        }
        let dir = probes::sae::default::ensure_reporting(self.model, &mut *opts.progress)
            .map_err(|e| e.to_string())?;
        let sae = Arc::new(probes::sae::load_sae(&dir).map_err(|e| e.to_string())?);
        self.builtin = Some(Arc::clone(&sae));
        Ok(sae)
    }

    /// The tokens of set `name` of policy `p`.
    fn set_tokens(&mut self, p: &Policy, name: &str) -> Result<Tokens, String> {
        let set = p
            .prompt_sets
            .get(name)
            .ok_or_else(|| format!("no prompt set `{name}`"))?;
        let k = (set.chat, set.prompts.clone());
        if let Some(t) = self.tokens.get(&k) {
            let mut t = t.clone();
            t.name = name.to_string();
            return Ok(t);
        }
        let ids = set
            .prompts
            .iter()
            .map(|s| self.model.encode_prompt(s, set.chat))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("prompt set `{name}`: {e}"))?;
        if let Some(i) = ids.iter().position(Vec::is_empty) {
            return Err(format!(
                "prompt set `{name}`: prompt {} has no tokens",
                i + 1
            ));
        }
        // Every prompt against the context once, before any chunking, so the error names the
        // prompt's place in its set (numbered from 0 by the check, from 1 here).
        let context = self.model.config().max_positions;
        if let Some(i) = ids.iter().position(|p| p.len() > context) {
            return Err(format!(
                "prompt set `{name}`: prompt {} has {} tokens, more than the model's context \
                 length of {context}",
                i + 1,
                ids[i].len()
            ));
        }
        let prefix = if set.chat { self.chat_prefix()? } else { 0 };
        let mut hasher_input = String::from(if set.chat { "chat\0" } else { "raw\0" });
        for s in &set.prompts {
            hasher_input.push_str(s);
            hasher_input.push('\0');
        }
        let t = Tokens {
            key: probes::digest::sha256_hex(hasher_input.as_bytes()),
            name: name.to_string(),
            texts: Arc::new(set.prompts.clone()),
            prefix: ids
                .iter()
                .map(|i| i.len() - 1)
                .min()
                .unwrap_or(0)
                .min(prefix),
            ids: Arc::new(ids),
        };
        self.tokens.insert(k, t.clone());
        Ok(t)
    }

    /// The number of tokens the chat template puts before every user message.
    fn chat_prefix(&mut self) -> Result<usize, String> {
        if let Some(n) = self.chat_prefix {
            return Ok(n);
        }
        let a = self
            .model
            .encode_prompt("a", true)
            .map_err(|e| e.to_string())?;
        let b = self
            .model
            .encode_prompt("b", true)
            .map_err(|e| e.to_string())?;
        let n = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        self.chat_prefix = Some(n);
        Ok(n)
    }

    /// Per prompt, the activations `[len, d]` at `hook` (one pass captures every planned hook).
    fn acts(&mut self, t: &Tokens, hook: HookPoint) -> Result<Arc<Vec<Tensor>>, String> {
        if let Some(a) = self.acts.get(&(t.key.clone(), hook)) {
            return Ok(Arc::clone(a));
        }
        let mut hooks = Hooks::new().capture(hook);
        for h in self.plan.get(&t.key).into_iter().flatten() {
            hooks = hooks.capture(*h);
        }
        let mut per_hook: BTreeMap<HookPoint, Vec<Tensor>> = BTreeMap::new();
        self.each_prompt(t, &hooks, |h, x| {
            per_hook.entry(h).or_default().push(x.contiguous()?);
            Ok(())
        })?;
        for (h, v) in per_hook {
            for (i, x) in v.iter().enumerate() {
                if x.sum_all()
                    .and_then(|s| s.to_scalar::<f32>())
                    .map_or(true, |s| !s.is_finite())
                {
                    return Err(format!(
                        "NaN or infinite activations at `{h}` for prompt {} of `{}`",
                        i + 1,
                        t.name
                    ));
                }
            }
            self.acts.insert((t.key.clone(), h), Arc::new(v));
        }
        Ok(Arc::clone(&self.acts[&(t.key.clone(), hook)]))
    }

    /// Sparse SAE activations of every token of every prompt of `t`.
    fn sparse(&mut self, t: &Tokens, s: &ResolvedSae) -> Result<Arc<Vec<Vec<SparseRow>>>, String> {
        let key = (
            t.key.clone(),
            format!("{}:{}", s.sae.manifest.root(), s.hook),
        );
        if let Some(a) = self.sparse.get(&key) {
            return Ok(Arc::clone(a));
        }
        let acts = self.acts(t, s.hook)?;
        let all = Tensor::cat(&acts, 0).map_err(|e| e.to_string())?;
        let rows = s.sae.encode_tokens(&all).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(acts.len());
        let mut it = rows.into_iter();
        for a in acts.iter() {
            out.push(it.by_ref().take(a.dim(0).unwrap_or(0)).collect());
        }
        let out = Arc::new(out);
        self.sparse.insert(key, Arc::clone(&out));
        Ok(out)
    }

    fn compute_direction(
        &mut self,
        p: &Policy,
        d: &crate::load::Direction,
    ) -> Result<ResolvedDirection, String> {
        let hook = HookPoint::parse(&d.hook.value, self.n_layers()).map_err(|e| e.to_string())?;
        let d_model = self.model.config().d_model;
        let dev = Device::Cpu;
        let (raw, position) = match &d.source {
            DirectionSource::File { vector } => {
                if vector.len() != d_model {
                    return Err(format!(
                        "the vector has {} entries but the model's d_model is {d_model}",
                        vector.len()
                    ));
                }
                (
                    Tensor::from_vec(vector.clone(), d_model, &dev).map_err(|e| e.to_string())?,
                    -1,
                )
            }
            DirectionSource::Contrast {
                positive,
                negative,
                position,
            } => {
                let mean = |eng: &mut Self, set: &str| -> Result<Tensor, String> {
                    let t = eng.set_tokens(p, set)?;
                    let acts = eng.acts(&t, hook)?;
                    let rows = acts
                        .iter()
                        .enumerate()
                        .map(|(i, a)| {
                            at_position(a, *position).ok_or_else(|| {
                                format!(
                                    "position {position} is outside prompt {} of `{set}`",
                                    i + 1
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Tensor::stack(&rows, 0)
                        .and_then(|x| x.mean(0))
                        .map_err(|e| e.to_string())
                };
                let pm = mean(self, positive)?;
                let nm = mean(self, negative)?;
                ((pm - nm).map_err(|e| e.to_string())?, *position)
            }
        };
        let norm = raw
            .sqr()
            .and_then(|x| x.sum_all())
            .and_then(|x| x.to_scalar::<f32>())
            .map_err(|e| e.to_string())?
            .sqrt() as f64;
        if !(norm.is_finite() && norm > 0.0) {
            return Err("the direction has zero or non-finite length".into());
        }
        let unit = (&raw / norm).map_err(|e| e.to_string())?;
        Ok(ResolvedDirection {
            hook,
            position,
            raw,
            unit,
            norm,
        })
    }

    fn sae(&self, p: &Policy, name: &str) -> Result<ResolvedSae, String> {
        self.saes
            .get(&(p.name.clone(), name.to_string()))
            .cloned()
            .ok_or_else(|| format!("SAE `{name}` was not resolved"))
    }

    fn direction(&self, p: &Policy, name: &str) -> Result<ResolvedDirection, String> {
        self.directions
            .get(&(p.name.clone(), name.to_string()))
            .cloned()
            .ok_or_else(|| format!("direction `{name}` was not resolved"))
    }

    fn check(
        &mut self,
        p: &Policy,
        check: &crate::load::Check,
        opts: &mut RunOptions<'_>,
    ) -> Result<Finding, String> {
        let (body, severity) = (&check.body, check.severity);
        match body {
            CheckBody::Feature {
                sae,
                latents,
                aggregate,
                tokens,
                threshold,
                expect,
            } => self.feature(
                p,
                sae,
                latents,
                (*aggregate, *tokens),
                *threshold,
                expect,
                severity,
            ),
            CheckBody::Direction {
                direction,
                positive,
                negative,
                min_auroc,
                attribute_with,
            } => self.direction_probe(
                p,
                direction,
                positive,
                negative,
                *min_auroc,
                attribute_with.as_deref(),
                severity,
            ),
            CheckBody::Steering(_) => self.steering(p, body, severity, opts),
            CheckBody::Drift {
                sae,
                prompts,
                baseline,
                max_rate_change,
            } => self.drift(
                p,
                &check.id,
                sae,
                prompts,
                baseline,
                *max_rate_change,
                severity,
                opts,
            ),
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.model.codec.token_text(id)
    }

    /// Per token after the preamble: text and `value(token index)`.
    fn token_values(
        &self,
        t: &Tokens,
        prompt: usize,
        value: impl Fn(usize) -> f64,
    ) -> Vec<TokenValue> {
        let ids = &t.ids[prompt];
        (t.prefix..ids.len())
            .map(|i| TokenValue {
                token: self.token_text(ids[i]),
                value: round(value(i)),
            })
            .collect()
    }

    /// `auto: 'a' 'b' 'c'`: the distinct tokens on which `latent` fires most in `sets`.
    fn auto_label(&self, latent: u32, sets: &[(&Tokens, &[Vec<SparseRow>])]) -> String {
        let mut hits: Vec<(f32, u32)> = Vec::new();
        for (t, rows) in sets {
            for (p, prompt) in rows.iter().enumerate() {
                for (i, row) in prompt.iter().enumerate().skip(t.prefix) {
                    if let Some(&(_, v)) = row.iter().find(|(l, _)| *l == latent) {
                        hits.push((v, t.ids[p][i]));
                    }
                }
            }
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut seen = Vec::new();
        for (_, id) in hits {
            let s = visible(&self.token_text(id));
            if !seen.contains(&s) {
                seen.push(s);
            }
            if seen.len() == 4 {
                break;
            }
        }
        if seen.is_empty() {
            "auto: (does not fire on these prompts)".into()
        } else {
            format!(
                "auto: fires on {}",
                seen.iter()
                    .map(|s| format!("'{s}'"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    }

    fn label(&self, s: &ResolvedSae, latent: u32, sets: &[(&Tokens, &[Vec<SparseRow>])]) -> String {
        match s.labels.get(latent as usize) {
            Some(l) => l.to_string(),
            None => self.auto_label(latent, sets),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn feature(
        &mut self,
        p: &Policy,
        sae_name: &str,
        choice: &LatentChoice,
        (aggregate, scope): (Aggregate, TokenScope),
        threshold: f64,
        expect: &[Expectation],
        severity: Severity,
    ) -> Result<Finding, String> {
        let s = self.sae(p, sae_name)?;
        let mut evidence = Evidence::default();
        let mut metric_rows = Vec::new();
        let latents: Vec<u32> = match choice {
            LatentChoice::Listed(v) => v.iter().map(|l| l.value as u32).collect(),
            LatentChoice::Select {
                top,
                positive,
                negative,
            } => {
                let (pt, nt) = (self.set_tokens(p, positive)?, self.set_tokens(p, negative)?);
                let (ps, ns) = (self.sparse(&pt, &s)?, self.sparse(&nt, &s)?);
                let chosen = select_latents(
                    &prompt_maxes(&pt, &ps, scope),
                    &prompt_maxes(&nt, &ns, scope),
                    *top,
                    threshold,
                );
                for (l, fp, fn_) in &chosen {
                    metric_rows.push(Metric {
                        name: format!("selected latent {l}: cumulative active fraction on {positive} / {negative}"),
                        value: round(fp - fn_),
                        bound: format!("{:.3} / {:.3}", fp, fn_),
                    });
                }
                chosen.iter().map(|c| c.0).collect()
            }
        };
        if latents.is_empty() {
            return Err(
                "no latent was selected: the SAE has no latent that fires on these prompts".into(),
            );
        }
        let mut violations = Vec::new();
        let mut label_sets: Vec<(Tokens, Arc<Vec<Vec<SparseRow>>>)> = Vec::new();
        let mut selection_sets = Vec::new();
        if let LatentChoice::Select {
            positive, negative, ..
        } = choice
        {
            for set in [positive, negative] {
                let t = self.set_tokens(p, set)?;
                let rows = self.sparse(&t, &s)?;
                selection_sets.push((t, rows));
            }
        }
        for e in expect {
            let t = self.set_tokens(p, &e.prompts)?;
            let rows = self.sparse(&t, &s)?;
            let score_token = |row: &SparseRow| -> f64 {
                row.iter()
                    .filter(|(l, _)| latents.contains(l))
                    .map(|(_, v)| *v as f64)
                    .fold(0.0, f64::max)
            };
            let scores: Vec<f64> = rows
                .iter()
                .map(|prompt| {
                    let toks = t.scored(prompt, scope);
                    match aggregate {
                        Aggregate::Max => toks.iter().map(&score_token).fold(0.0, f64::max),
                        Aggregate::Mean => {
                            toks.iter().map(&score_token).sum::<f64>() / toks.len().max(1) as f64
                        }
                    }
                })
                .collect();
            let active: Vec<bool> = scores.iter().map(|v| *v > threshold).collect();
            let frac = active.iter().filter(|a| **a).count() as f64 / active.len() as f64;
            let mut bound = Vec::new();
            let mut show_active = None;
            if let Some(min) = e.min_active_fraction {
                bound.push(format!(">= {min}"));
                if frac < min {
                    violations.push(format!(
                        "the probe fired on {:.0}% of `{}`, below the required {:.0}%",
                        frac * 100.0,
                        e.prompts,
                        min * 100.0
                    ));
                    show_active = Some(false);
                }
            }
            if let Some(max) = e.max_active_fraction {
                bound.push(format!("<= {max}"));
                if frac > max {
                    violations.push(format!(
                        "the probe fired on {:.0}% of `{}`, above the allowed {:.0}%",
                        frac * 100.0,
                        e.prompts,
                        max * 100.0
                    ));
                    show_active = Some(true);
                }
            }
            metric_rows.push(Metric {
                name: format!("active fraction on {}", e.prompts),
                value: round(frac),
                bound: bound.join(" and "),
            });
            evidence.distributions.push(Distribution {
                set: e.prompts.clone(),
                values: scores.iter().map(|v| round(*v)).collect(),
            });
            // The prompts that broke the expectation, else the strongest ones.
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let (picked, why): (Vec<usize>, &str) = match show_active {
                Some(true) => (
                    order
                        .iter()
                        .copied()
                        .filter(|&i| active[i])
                        .take(5)
                        .collect(),
                    "fired although it should not",
                ),
                Some(false) => (
                    order
                        .iter()
                        .rev()
                        .copied()
                        .filter(|&i| !active[i])
                        .take(5)
                        .collect(),
                    "did not fire although it should",
                ),
                None => (
                    order.iter().copied().take(2).collect(),
                    "strongest activation (expectation met)",
                ),
            };
            for i in picked {
                evidence.prompts.push(PromptEvidence {
                    set: e.prompts.clone(),
                    index: i,
                    text: t.texts[i].clone(),
                    value: round(scores[i]),
                    why: why.to_string(),
                    tokens: self.token_values(&t, i, |k| score_token(&rows[i][k])),
                });
            }
            label_sets.push((t, rows));
        }
        let sets: Vec<(&Tokens, &[Vec<SparseRow>])> = label_sets
            .iter()
            .chain(&selection_sets)
            .map(|(t, r)| (t, r.as_slice()))
            .collect();
        for &l in &latents {
            let (t0, r0) = &label_sets[0];
            let mean = r0
                .iter()
                .map(|prompt| {
                    t0.scored(prompt, scope)
                        .iter()
                        .flat_map(|row| row.iter().filter(|(i, _)| *i == l).map(|(_, v)| *v as f64))
                        .fold(0.0, f64::max)
                })
                .sum::<f64>()
                / r0.len() as f64;
            evidence.latents.push(LatentEvidence {
                sae: s.name.clone(),
                latent: l as usize,
                label: self.label(&s, l, &sets),
                value: round(mean),
                measure: format!("mean over `{}` of the prompt's max activation", t0.name),
            });
        }
        let names: Vec<String> = evidence
            .latents
            .iter()
            .map(|l| format!("{} ({})", l.latent, l.label))
            .collect();
        let status = if violations.is_empty() {
            Status::Pass
        } else {
            violated(severity)
        };
        let explanation = if violations.is_empty() {
            format!(
                "latents {} at `{}` met every expectation",
                names.join(", "),
                s.hook
            )
        } else {
            format!(
                "latents {} at `{}`: {}",
                names.join(", "),
                s.hook,
                violations.join("; ")
            )
        };
        Ok(Finding::new(status, explanation, metric_rows, evidence))
    }

    #[allow(clippy::too_many_arguments)]
    fn direction_probe(
        &mut self,
        p: &Policy,
        name: &str,
        positive: &str,
        negative: &str,
        min_auroc: f64,
        attribute_with: Option<&str>,
        severity: Severity,
    ) -> Result<Finding, String> {
        let d = self.direction(p, name)?;
        let mut evidence = Evidence::default();
        let mut scores = Vec::new();
        for set in [positive, negative] {
            let t = self.set_tokens(p, set)?;
            let acts = self.acts(&t, d.hook)?;
            let v = acts
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    at_position(a, d.position)
                        .map(|x| dot(&x, &d.unit))
                        .ok_or_else(|| {
                            format!(
                                "position {} is outside prompt {} of `{set}`",
                                d.position,
                                i + 1
                            )
                        })
                })
                .collect::<Result<Vec<f64>, String>>()?;
            evidence.distributions.push(Distribution {
                set: set.to_string(),
                values: v.iter().map(|x| round(*x)).collect(),
            });
            scores.push((t, acts, v));
        }
        let to32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        let a = auroc(&to32(&scores[0].2), &to32(&scores[1].2));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (mp, mn) = (mean(&scores[0].2), mean(&scores[1].2));
        // The prompts the direction ranks worst: the lowest positives and the highest negatives.
        for (k, (t, acts, v)) in scores.iter().enumerate() {
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&x, &y| v[x].total_cmp(&v[y]).then(x.cmp(&y)));
            if k == 1 {
                order.reverse();
            }
            for &i in order.iter().take(3) {
                let proj: Vec<f64> = (0..acts[i].dim(0).unwrap_or(0))
                    .map(|r| acts[i].get(r).map(|x| dot(&x, &d.unit)).unwrap_or(f64::NAN))
                    .collect();
                evidence.prompts.push(PromptEvidence {
                    set: t.name.clone(),
                    index: i,
                    text: t.texts[i].clone(),
                    value: round(v[i]),
                    why: if k == 0 {
                        "lowest projection among the positive prompts".into()
                    } else {
                        "highest projection among the negative prompts".into()
                    },
                    tokens: self.token_values(t, i, |r| proj[r]),
                });
            }
        }
        if let Some(sae_name) = attribute_with {
            let s = self.sae(p, sae_name)?;
            let t = scores[0].0.clone();
            evidence.latents = self.attribute(&s, &t, (d.hook, &d.unit), d.position)?;
        }
        let metrics = vec![
            Metric {
                name: format!("AUROC ({positive} vs {negative})"),
                value: round(a),
                bound: format!(">= {min_auroc}"),
            },
            Metric {
                name: format!("mean projection on {positive}"),
                value: round(mp),
                bound: String::new(),
            },
            Metric {
                name: format!("mean projection on {negative}"),
                value: round(mn),
                bound: String::new(),
            },
            Metric {
                name: "direction norm".into(),
                value: round(d.norm),
                bound: String::new(),
            },
        ];
        let status = if a >= min_auroc {
            Status::Pass
        } else {
            violated(severity)
        };
        let explanation = format!(
            "direction `{name}` at `{}` separates `{positive}` from `{negative}` with AUROC {:.3} ({} the required {min_auroc}); mean projections {:.2} vs {:.2}",
            d.hook, a, if a >= min_auroc { "meets" } else { "below" }, mp, mn
        );
        Ok(Finding::new(status, explanation, metrics, evidence))
    }

    /// The SAE latents behind a direction's projection at `position` of each prompt in `t`.
    ///
    /// With the SAE at the direction's own hook: activation x gradient of the projection (the
    /// gradient is the direction itself, so this is exact). With the SAE at an earlier hook,
    /// each candidate latent (the [`ATTRIBUTION_CANDIDATES`] with the largest direct-path
    /// estimate, and as many of the most active at the position) is removed there, at that
    /// position, with the SAE's error term kept, and the model re-run: its value is the mean
    /// drop in the projection at the direction's hook, through every path.
    fn attribute(
        &mut self,
        s: &ResolvedSae,
        t: &Tokens,
        (dir_hook, unit): (HookPoint, &Tensor),
        position: i64,
    ) -> Result<Vec<LatentEvidence>, String> {
        if s.hook.order() > dir_hook.order() {
            return Err(format!(
                "SAE `{}` reads `{}`, after the direction's hook `{dir_hook}`: it cannot explain it",
                s.name, s.hook
            ));
        }
        let acts = self.acts(t, s.hook)?;
        let rows = acts
            .iter()
            .map(|a| at_position(a, position).ok_or("position outside a prompt".to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let x = Tensor::stack(&rows, 0).map_err(|e| e.to_string())?;
        let sparse = s.sae.encode_tokens(&x).map_err(|e| e.to_string())?;
        let grads: Vec<f32> = s
            .sae
            .w_dec
            .matmul(&unit.unsqueeze(1).map_err(|e| e.to_string())?)
            .and_then(|g| g.flatten_all())
            .and_then(|g| g.to_vec1())
            .map_err(|e| e.to_string())?;
        let n = sparse.len() as f64;
        let (mut direct, mut active): (BTreeMap<u32, f64>, BTreeMap<u32, f64>) = Default::default();
        for row in &sparse {
            for &(l, v) in row {
                *direct.entry(l).or_default() += v as f64 * grads[l as usize] as f64 / n;
                *active.entry(l).or_default() += v as f64 / n;
            }
        }
        let (ranked, measure) = if s.hook == dir_hook {
            (
                by_magnitude(direct),
                "activation x gradient of the projection onto the direction".to_string(),
            )
        } else {
            let mut candidates: Vec<u32> = Vec::new();
            for scores in [direct, active] {
                let top = by_magnitude(scores)
                    .into_iter()
                    .take(ATTRIBUTION_CANDIDATES);
                for (l, _) in top {
                    if !candidates.contains(&l) {
                        candidates.push(l);
                    }
                }
            }
            let clean: Vec<f64> = self
                .acts(t, dir_hook)?
                .iter()
                .map(|a| at_position(a, position).map_or(f64::NAN, |x| dot(&x, unit)))
                .collect();
            let mut effects = BTreeMap::new();
            for l in candidates {
                let edit = probes::sae::LatentEdit::Scale {
                    latent: l as usize,
                    factor: 0.0,
                };
                let removed = probes::sae::keep_sinks(s.sae.splice(vec![edit], true), s.sae.d_in);
                let hooks =
                    Hooks::new().replace(s.hook, Positions::Indices(vec![position]), removed);
                let ablated = self.projections(t, dir_hook, unit, position, &hooks)?;
                let drop = clean.iter().zip(&ablated).map(|(c, a)| c - a).sum::<f64>() / n;
                effects.insert(l, drop);
            }
            (
                by_magnitude(effects),
                format!(
                    "drop in the projection onto the direction at `{dir_hook}` when the latent is removed at `{}` (error term kept)",
                    s.hook
                ),
            )
        };
        let all = self.sparse(t, s)?;
        let sets = [(t, all.as_slice())];
        Ok(ranked
            .into_iter()
            .take(8)
            .map(|(l, v)| LatentEvidence {
                sae: s.name.clone(),
                latent: l as usize,
                label: self.label(s, l, &sets),
                value: round(v),
                measure: format!("{measure}, mean over `{}`", t.name),
            })
            .collect())
    }

    /// Each prompt's projection onto `unit` at `position` of `hook`, with `interventions`.
    fn projections(
        &self,
        t: &Tokens,
        hook: HookPoint,
        unit: &Tensor,
        position: i64,
        interventions: &Hooks,
    ) -> Result<Vec<f64>, String> {
        let hooks = interventions.clone().capture(hook);
        let mut out = Vec::with_capacity(t.ids.len());
        self.each_prompt(t, &hooks, |_, x| {
            let x = at_position(&x, position).ok_or_else(|| {
                candle_core::Error::Msg(format!("position {position} is outside a prompt"))
            })?;
            out.push(dot(&x, unit));
            Ok(())
        })?;
        Ok(out)
    }

    /// Forward `t` with `hooks` in micro-batches, handing each prompt's activations at each
    /// captured hook, padding cut off, to `each` in prompt order.
    fn each_prompt(
        &self,
        t: &Tokens,
        hooks: &Hooks,
        mut each: impl FnMut(HookPoint, Tensor) -> candle_core::Result<()>,
    ) -> Result<(), String> {
        self.model
            .transformer
            .forward_chunked(
                &t.ids,
                self.micro_batch,
                Padding::Right,
                hooks,
                Unembed::None,
                |_, out| {
                    for (h, a) in &out.captures {
                        for (r, len) in out.layout.lengths.iter().enumerate() {
                            a.get(r)
                                .and_then(|x| x.narrow(0, 0, *len))
                                .and_then(|x| each(*h, x))
                                .map_err(|e| probes::RunError::Batch(e.to_string()))?;
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|e| format!("forward pass over `{}`: {e}", t.name))
    }

    /// The vector an intervention adds (or ablates), with its hook, and the hooks at `coeff`.
    fn intervention_hooks(
        &self,
        p: &Policy,
        i: &Intervention,
        coeff: Option<f64>,
    ) -> Result<(Hooks, Tensor, Option<HookPoint>), String> {
        Ok(match i {
            Intervention::Ablate { direction } => {
                let d = self.direction(p, direction)?;
                (
                    Hooks::new().ablate_everywhere(self.n_layers(), &d.unit),
                    d.unit,
                    Some(d.hook),
                )
            }
            Intervention::AddDirection {
                direction,
                coeff: c,
            } => {
                let d = self.direction(p, direction)?;
                let c = coeff.unwrap_or(*c) as f32;
                (
                    Hooks::new().add(d.hook, Positions::All, d.raw.clone(), c),
                    d.unit,
                    Some(d.hook),
                )
            }
            Intervention::AddLatent {
                sae,
                latent,
                coeff: c,
            } => {
                let s = self.sae(p, sae)?;
                let v = s
                    .sae
                    .decoder_direction(latent.value)
                    .map_err(|e| e.to_string())?;
                let c = coeff.unwrap_or(*c) as f32;
                (
                    Hooks::new().add(s.hook, Positions::All, v.clone(), c),
                    v,
                    Some(s.hook),
                )
            }
        })
    }

    /// Last-token logits of every prompt of `t` under `hooks` (cached when unhooked).
    fn last_logits(&mut self, t: &Tokens, hooks: &Hooks) -> Result<Arc<Vec<Vec<f32>>>, String> {
        if hooks.is_empty() {
            if let Some(l) = self.last_logits.get(&t.key) {
                return Ok(Arc::clone(l));
            }
        }
        let mut rows = Vec::with_capacity(t.ids.len());
        self.model
            .transformer
            .forward_chunked(
                &t.ids,
                self.micro_batch,
                Padding::Right,
                hooks,
                Unembed::Last,
                |_, out| {
                    let l = out
                        .logits
                        .ok_or_else(|| probes::RunError::Batch("no logits".into()))?;
                    let v: Vec<Vec<f32>> = l
                        .to_dtype(DType::F32)
                        .and_then(|l| l.to_vec2())
                        .map_err(|e| probes::RunError::Batch(e.to_string()))?;
                    rows.extend(v);
                    Ok(())
                },
            )
            .map_err(|e| format!("forward pass over `{}`: {e}", t.name))?;
        if let Some(i) = rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
            return Err(format!(
                "NaN or infinite logits for prompt {} of `{}`",
                i + 1,
                t.name
            ));
        }
        let rows = Arc::new(rows);
        if hooks.is_empty() {
            self.last_logits.insert(t.key.clone(), Arc::clone(&rows));
        }
        Ok(rows)
    }

    /// Greedy generations (decoded) of every prompt of `t` under `hooks` (cached when unhooked).
    fn generations(
        &mut self,
        t: &Tokens,
        hooks: &Hooks,
        max_tokens: usize,
    ) -> Result<Arc<Vec<String>>, String> {
        let key = (t.key.clone(), max_tokens);
        if hooks.is_empty() {
            if let Some(g) = self.generations.get(&key) {
                return Ok(Arc::clone(g));
            }
        }
        let opts = GenerateOptions {
            max_tokens,
            sampling: Sampling::Greedy,
            stop_tokens: self.model.stop_tokens(),
        };
        let mut texts = Vec::with_capacity(t.ids.len());
        // Decode steps cost little more for 32 rows than for 8: generate in larger batches.
        for chunk in t.ids.chunks(self.micro_batch.max(32)) {
            let out = generate(&self.model.transformer, chunk, hooks, &opts)
                .map_err(|e| format!("generating for `{}`: {e}", t.name))?;
            for ids in out {
                texts.push(self.model.codec.decode(&ids).map_err(|e| e.to_string())?);
            }
        }
        let texts = Arc::new(texts);
        if hooks.is_empty() {
            self.generations.insert(key, Arc::clone(&texts));
        }
        Ok(texts)
    }

    /// Per-prompt values of a last-token metric (refusal score or logit difference).
    fn logit_metric(
        &self,
        logits: &[Vec<f32>],
        metric: MetricKind,
        refusal: &[u32],
        target: &(Vec<u32>, Vec<u32>),
    ) -> Vec<f64> {
        logits
            .iter()
            .map(|row| match metric {
                MetricKind::LogitDiff => metrics::logit_diff(row, &target.0, &target.1),
                _ => metrics::refusal_score(row, refusal),
            })
            .collect()
    }

    /// The first token of each of `words`, as the assistant's reply would start with it.
    fn first_tokens(&self, words: &[String]) -> Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        for w in words {
            let t = self.model.codec.encode(w).map_err(|e| e.to_string())?;
            let id = *t.first().ok_or_else(|| format!("`{w}` has no tokens"))?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Mean KL(clean || hooked) over every real position, per prompt.
    fn kl_per_prompt(&self, t: &Tokens, hooks: &Hooks) -> Result<Vec<f64>, String> {
        let mb = self.micro_batch.min(8);
        let mut out = Vec::with_capacity(t.ids.len());
        for chunk in t.ids.chunks(mb) {
            let run = |h: &Hooks| {
                self.model
                    .transformer
                    .forward(chunk, Padding::Right, h, Unembed::All)
                    .map_err(|e| format!("forward pass over `{}`: {e}", t.name))
                    .and_then(|o| o.logits.ok_or_else(|| "no logits".to_string()))
            };
            let (clean, hooked) = (run(&Hooks::new())?, run(hooks)?);
            for (r, p) in chunk.iter().enumerate() {
                let c: Vec<Vec<f32>> = clean
                    .get(r)
                    .and_then(|x| x.narrow(0, 0, p.len()))
                    .and_then(|x| x.to_vec2())
                    .map_err(|e| e.to_string())?;
                let h: Vec<Vec<f32>> = hooked
                    .get(r)
                    .and_then(|x| x.narrow(0, 0, p.len()))
                    .and_then(|x| x.to_vec2())
                    .map_err(|e| e.to_string())?;
                let kl = c
                    .par_iter()
                    .zip(&h)
                    .map(|(a, b)| metrics::kl(a, b))
                    .sum::<f64>()
                    / p.len() as f64;
                if !kl.is_finite() {
                    return Err(format!("non-finite KL for a prompt of `{}`", t.name));
                }
                out.push(kl);
            }
        }
        Ok(out)
    }

    fn steering(
        &mut self,
        p: &Policy,
        body: &CheckBody,
        severity: Severity,
        _opts: &mut RunOptions<'_>,
    ) -> Result<Finding, String> {
        let CheckBody::Steering(st) = body else {
            return Err("internal: not a steering check".into());
        };
        let crate::load::Steering {
            prompts,
            intervention,
            metric,
            target,
            refusal_tokens,
            refusal_phrases,
            max_tokens,
            sweep,
            flip_at,
            bounds,
            attribute_with,
        } = &**st;
        let t = self.set_tokens(p, prompts)?;
        let refusal_ids = self.first_tokens(refusal_tokens)?;
        let target_ids = match target {
            Some((pos, neg)) => (self.first_tokens(pos)?, self.first_tokens(neg)?),
            None => (Vec::new(), Vec::new()),
        };
        let (hooks, unit, hook) = self.intervention_hooks(p, intervention, None)?;
        let mut evidence = Evidence::default();
        // Per-prompt metric under `h`, plus generations when the metric is the refusal rate.
        let measure = |eng: &mut Self, h: &Hooks| -> Result<Measured, String> {
            Ok(match metric {
                MetricKind::RefusalScore | MetricKind::LogitDiff => {
                    let l = eng.last_logits(&t, h)?;
                    (
                        eng.logit_metric(&l, *metric, &refusal_ids, &target_ids),
                        None,
                    )
                }
                MetricKind::RefusalRate => {
                    let g = eng.generations(&t, h, *max_tokens)?;
                    (
                        g.iter()
                            .map(|s| {
                                if metrics::refused(s, refusal_phrases) {
                                    1.0
                                } else {
                                    0.0
                                }
                            })
                            .collect(),
                        Some(g),
                    )
                }
                MetricKind::Kl => {
                    if h.is_empty() {
                        (vec![0.0; t.ids.len()], None)
                    } else {
                        (eng.kl_per_prompt(&t, h)?, None)
                    }
                }
            })
        };
        let (base, base_gen) = measure(self, &Hooks::new())?;
        let (value, value_gen) = measure(self, &hooks)?;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (b, v) = (mean(&base), mean(&value));
        let mname = metric_name(*metric);
        evidence.distributions.push(Distribution {
            set: format!("{prompts} (without intervention)"),
            values: base.iter().map(|x| round(*x)).collect(),
        });
        evidence.distributions.push(Distribution {
            set: format!("{prompts} (with intervention)"),
            values: value.iter().map(|x| round(*x)).collect(),
        });
        // Sweep.
        let mut flip = None;
        let main_coeff = match intervention {
            Intervention::AddDirection { coeff, .. } | Intervention::AddLatent { coeff, .. } => {
                Some(*coeff)
            }
            Intervention::Ablate { .. } => None,
        };
        for &c in sweep {
            let m = if Some(c) == main_coeff {
                v
            } else {
                let (h, _, _) = self.intervention_hooks(p, intervention, Some(c))?;
                mean(&measure(self, &h)?.0)
            };
            evidence.sweep.push(SweepPoint {
                coeff: c,
                value: round(m),
            });
            let crossed = if b < *flip_at {
                m >= *flip_at
            } else {
                m < *flip_at
            };
            if crossed && flip.is_none() {
                flip = Some(c);
            }
        }
        // Example generations with and without the intervention.
        let n_examples = 4.min(t.ids.len());
        let (bg, vg) = match (base_gen, value_gen) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                let ex = Tokens {
                    ids: Arc::new(t.ids[..n_examples].to_vec()),
                    texts: Arc::new(t.texts[..n_examples].to_vec()),
                    key: format!("{}:examples", t.key),
                    ..t.clone()
                };
                (
                    self.generations(&ex, &Hooks::new(), 24)?,
                    self.generations(&ex, &hooks, 24)?,
                )
            }
        };
        for i in 0..n_examples {
            evidence.generations.push(GenerationPair {
                prompt: t.texts[i].clone(),
                baseline: bg[i].clone(),
                intervened: vg[i].clone(),
                baseline_refused: metrics::refused(&bg[i], refusal_phrases),
                intervened_refused: metrics::refused(&vg[i], refusal_phrases),
            });
        }
        // The prompts the intervention moved most.
        let mut order: Vec<usize> = (0..base.len()).collect();
        order.sort_by(|&x, &y| {
            (value[y] - base[y])
                .abs()
                .total_cmp(&(value[x] - base[x]).abs())
                .then(x.cmp(&y))
        });
        for &i in order.iter().take(5) {
            evidence.prompts.push(PromptEvidence {
                set: prompts.clone(),
                index: i,
                text: t.texts[i].clone(),
                value: round(value[i]),
                why: format!(
                    "{mname} moved from {:.3} to {:.3} under the intervention",
                    base[i], value[i]
                ),
                tokens: Vec::new(),
            });
        }
        if let Some(sae_name) = attribute_with {
            let s = self.sae(p, sae_name)?;
            if let Some(hook) = hook {
                evidence.latents = self.attribute(&s, &t, (hook, &unit), -1)?;
            }
        }
        let (metric_rows, violations, undefined) = judge(mname, b, v, flip, bounds);
        let status = if !violations.is_empty() {
            violated(severity)
        } else if undefined.is_some() {
            Status::Warn
        } else {
            Status::Pass
        };
        let what = describe(intervention);
        let mut explanation = format!("{mname} on `{prompts}`: {b:.3} without, {v:.3} with {what}");
        if let Some(c) = flip {
            explanation.push_str(&format!("; the sweep flips it at coefficient {c}"));
        } else if !sweep.is_empty() {
            explanation.push_str(&format!("; no swept coefficient moved it across {flip_at}"));
        }
        if !violations.is_empty() {
            explanation.push_str(&format!(". Violated: {}", violations.join("; ")));
        }
        if let Some(u) = undefined {
            explanation.push_str(&format!(". Could not check: {u}"));
        }
        Ok(Finding::new(status, explanation, metric_rows, evidence))
    }

    #[allow(clippy::too_many_arguments)]
    fn drift(
        &mut self,
        p: &Policy,
        check_id: &str,
        sae_name: &str,
        prompts: &str,
        baseline: &Baseline,
        max_change: f64,
        severity: Severity,
        opts: &mut RunOptions<'_>,
    ) -> Result<Finding, String> {
        let s = self.sae(p, sae_name)?;
        let t = self.set_tokens(p, prompts)?;
        let rows = self.sparse(&t, &s)?;
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        let mut n_tokens = 0usize;
        for prompt in rows.iter() {
            for row in &prompt[t.prefix.min(prompt.len())..] {
                n_tokens += 1;
                for (l, _) in row {
                    *counts.entry(*l).or_default() += 1;
                }
            }
        }
        let rates: Vec<(u32, f64)> = counts
            .into_iter()
            .map(|(l, c)| (l, round(c as f64 / n_tokens.max(1) as f64)))
            .collect();
        let sae_digest = s.sae.manifest.root();
        let mut evidence = Evidence {
            firing_rates: rates.clone(),
            ..Evidence::default()
        };
        let loaded;
        let base: Option<&RunResult> = match baseline {
            Baseline::LastPass => opts.last_pass,
            Baseline::File { path, rel } => {
                let text = probes::files::read_regular(path)
                    .map_err(|e| format!("baseline `{rel}`: {e}"))?;
                loaded = serde_json::from_slice::<RunResult>(&text)
                    .map_err(|e| format!("baseline `{rel}` is not a mechwatch JSON result: {e}"))?;
                Some(&loaded)
            }
        };
        let Some(base) = base else {
            let metrics = vec![Metric {
                name: "latents firing".into(),
                value: rates.len() as f64,
                bound: String::new(),
            }];
            return Ok(Finding::new(Status::Warn, "no earlier passing audit of this model lineage to compare with; this run's firing rates are recorded as the baseline".into(), metrics, evidence));
        };
        let old = base
            .policies
            .iter()
            .filter(|bp| bp.name == p.name)
            .flat_map(|bp| bp.findings.iter())
            .find(|f| f.check == check_id)
            .ok_or_else(|| "the baseline has no result for this check".to_string())?;
        let base_sae = base
            .inputs
            .iter()
            .find(|i| i.policy == p.name && i.kind == "sae" && i.sha256 == sae_digest);
        if base_sae.is_none() {
            return Err(format!("the baseline was computed with a different SAE than `{sae_name}` ({sae_digest}); drift is only comparable with the same SAE"));
        }
        let old_rates: BTreeMap<u32, f64> = old.evidence.firing_rates.iter().copied().collect();
        let new_rates: BTreeMap<u32, f64> = rates.iter().copied().collect();
        let all: BTreeSet<u32> = old_rates.keys().chain(new_rates.keys()).copied().collect();
        let mut moved: Vec<(u32, f64, f64)> = all
            .into_iter()
            .map(|l| {
                (
                    l,
                    old_rates.get(&l).copied().unwrap_or(0.0),
                    new_rates.get(&l).copied().unwrap_or(0.0),
                )
            })
            .filter(|(_, o, n)| (n - o).abs() > max_change)
            .collect();
        moved.sort_by(|a, b| {
            (b.2 - b.1)
                .abs()
                .total_cmp(&(a.2 - a.1).abs())
                .then(a.0.cmp(&b.0))
        });
        let max_seen = moved.first().map_or(0.0, |m| (m.2 - m.1).abs());
        let sets = [(&t, rows.as_slice())];
        for &(l, o, n) in moved.iter().take(10) {
            evidence.latents.push(LatentEvidence {
                sae: s.name.clone(),
                latent: l as usize,
                label: self.label(&s, l, &sets),
                value: round(n - o),
                measure: format!("change in firing rate on `{prompts}` ({o:.4} -> {n:.4})"),
            });
        }
        let metrics = vec![
            Metric {
                name: "latents beyond the bound".into(),
                value: moved.len() as f64,
                bound: "<= 0".into(),
            },
            Metric {
                name: "largest firing-rate change".into(),
                value: round(max_seen),
                bound: format!("<= {max_change}"),
            },
        ];
        let (status, explanation) = if moved.is_empty() {
            (Status::Pass, format!("no latent's firing rate on `{prompts}` moved by more than {max_change} from the baseline"))
        } else {
            (violated(severity), format!("{} latents' firing rates on `{prompts}` moved by more than {max_change} from the baseline (largest {max_seen:.4})", moved.len()))
        };
        Ok(Finding::new(status, explanation, metrics, evidence))
    }
}

impl Finding {
    fn new(status: Status, explanation: String, metrics: Vec<Metric>, evidence: Evidence) -> Self {
        Self {
            check: String::new(),
            kind: crate::schema::CheckKind::Steering,
            severity: Severity::Info,
            status,
            description: String::new(),
            explanation,
            metrics,
            evidence,
        }
    }
}

/// Per-prompt metric values, and the generations they came from (for the refusal rate).
type Measured = (Vec<f64>, Option<Arc<Vec<String>>>);

fn metric_name(m: MetricKind) -> &'static str {
    match m {
        MetricKind::RefusalScore => "refusal score",
        MetricKind::RefusalRate => "refusal rate",
        MetricKind::LogitDiff => "logit difference",
        MetricKind::Kl => "KL divergence",
    }
}

fn describe(i: &Intervention) -> String {
    match i {
        Intervention::Ablate { direction } => {
            format!("direction `{direction}` ablated at every layer")
        }
        Intervention::AddDirection { direction, coeff } => {
            format!("{coeff} x direction `{direction}` added")
        }
        Intervention::AddLatent { sae, latent, coeff } => format!(
            "{coeff} x the decoder direction of latent {} of SAE `{sae}` added",
            latent.value
        ),
    }
}

/// Hold the baseline `b`, the value `v` and the flip coefficient to `bounds`. Returns the metric
/// rows, the violated bounds, and why a bound could not be evaluated (if one could not).
fn judge(
    name: &str,
    b: f64,
    v: f64,
    flip: Option<f64>,
    bounds: &Bounds,
) -> (Vec<Metric>, Vec<String>, Option<String>) {
    let mut rows = vec![
        Metric {
            name: format!("{name} without intervention"),
            value: round(b),
            bound: bounds
                .min_baseline
                .map(|x| format!(">= {x}"))
                .unwrap_or_default(),
        },
        Metric {
            name: format!("{name} with intervention"),
            value: round(v),
            bound: [
                bounds.min.map(|x| format!(">= {x}")),
                bounds.max.map(|x| format!("<= {x}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and "),
        },
        Metric {
            name: "change".into(),
            value: round(v - b),
            bound: [
                bounds.min_change.map(|x| format!(">= {x}")),
                bounds.max_change.map(|x| format!("<= {x}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and "),
        },
    ];
    let mut bad = Vec::new();
    let mut undefined = None;
    if !(b.is_finite() && v.is_finite()) {
        bad.push("the metric is not finite".to_string());
    }
    if let Some(x) = bounds.min_baseline {
        if b < x {
            bad.push(format!("{name} without intervention is {b:.3}, below {x}"));
        }
    }
    if let Some(x) = bounds.min {
        if v < x {
            bad.push(format!("{name} with intervention is {v:.3}, below {x}"));
        }
    }
    if let Some(x) = bounds.max {
        if v > x {
            bad.push(format!("{name} with intervention is {v:.3}, above {x}"));
        }
    }
    if let Some(x) = bounds.min_change {
        if v - b < x {
            bad.push(format!("the change {:.3} is below {x}", v - b));
        }
    }
    if let Some(x) = bounds.max_change {
        if v - b > x {
            bad.push(format!("the change {:.3} is above {x}", v - b));
        }
    }
    if let Some(x) = bounds.max_relative_drop {
        if b > 0.0 {
            let drop = (b - v) / b;
            rows.push(Metric {
                name: "relative drop".into(),
                value: round(drop),
                bound: format!("<= {x}"),
            });
            if drop > x {
                bad.push(format!(
                    "the intervention cut {name} by {:.0}%, more than {:.0}%",
                    drop * 100.0,
                    x * 100.0
                ));
            }
        } else {
            undefined = Some(format!("{name} without intervention is {b:.3}, so there is nothing for a relative drop to measure"));
        }
    }
    if let Some(x) = bounds.max_flip_coeff {
        rows.push(Metric {
            name: "flip coefficient".into(),
            value: flip.unwrap_or(f64::NAN),
            bound: format!("<= {x}"),
        });
        match flip {
            Some(c) if c.abs() <= x => {}
            Some(c) => bad.push(format!(
                "behaviour flips only at coefficient {c}, beyond {x}"
            )),
            None => bad.push(format!(
                "no swept coefficient up to {x} flips the behaviour"
            )),
        }
    }
    (rows, bad, undefined)
}

/// A token's text for a label: trimmed, or its escaped whitespace when that is all it is.
fn visible(token: &str) -> String {
    let t = token.trim();
    if t.is_empty() {
        token.escape_default().to_string()
    } else {
        t.to_string()
    }
}

/// Latents tried by cross-layer attribution, from each of its two rankings.
const ATTRIBUTION_CANDIDATES: usize = 6;

/// Largest magnitude first, ties by latent index.
fn by_magnitude(scores: BTreeMap<u32, f64>) -> Vec<(u32, f64)> {
    let mut ranked: Vec<(u32, f64)> = scores.into_iter().collect();
    ranked.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
    ranked
}

/// The activation row at `position` (negative counts from the end) of `a` `[len, d]`.
fn at_position(a: &Tensor, position: i64) -> Option<Tensor> {
    let len = a.dim(0).ok()? as i64;
    let i = if position < 0 {
        len + position
    } else {
        position
    };
    if i < 0 || i >= len {
        return None;
    }
    a.get(i as usize).ok()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .and_then(|x| x.sum(D::Minus1))
        .and_then(|x| x.to_scalar::<f32>())
        .map_or(f64::NAN, f64::from)
}

/// Per prompt, each firing latent's largest activation over the tokens after the preamble.
fn prompt_maxes(t: &Tokens, rows: &[Vec<SparseRow>], scope: TokenScope) -> Vec<BTreeMap<u32, f32>> {
    rows.iter()
        .map(|prompt| {
            let mut m = BTreeMap::new();
            for row in t.scored(prompt, scope) {
                for &(l, v) in row {
                    let e = m.entry(l).or_insert(0f32);
                    *e = e.max(v);
                }
            }
            m
        })
        .collect()
}

/// Greedily choose up to `top` latents whose union (a prompt counts when any of them exceeds
/// `threshold`) covers the most positive and fewest negative prompts: each step adds the
/// latent that most increases `covered positives - covered negatives` (as fractions), and the
/// selection stops when no latent increases it. Returns each chosen latent with the cumulative
/// positive and negative fractions after adding it. Ties go to the smaller index.
fn select_latents(
    pos: &[BTreeMap<u32, f32>],
    neg: &[BTreeMap<u32, f32>],
    top: usize,
    threshold: f64,
) -> Vec<(u32, f64, f64)> {
    let fires =
        |m: &BTreeMap<u32, f32>, l: u32| m.get(&l).is_some_and(|v| f64::from(*v) > threshold);
    let candidates: BTreeSet<u32> = pos.iter().flat_map(|m| m.keys().copied()).collect();
    let (np, nn) = (pos.len().max(1) as f64, neg.len().max(1) as f64);
    let mut covered_p = vec![false; pos.len()];
    let mut covered_n = vec![false; neg.len()];
    let mut chosen = Vec::new();
    for _ in 0..top {
        let mut best: Option<(u32, f64)> = None;
        for &l in &candidates {
            if chosen.iter().any(|c: &(u32, f64, f64)| c.0 == l) {
                continue;
            }
            let gp = pos
                .iter()
                .zip(&covered_p)
                .filter(|(m, c)| !**c && fires(m, l))
                .count() as f64
                / np;
            let gn = neg
                .iter()
                .zip(&covered_n)
                .filter(|(m, c)| !**c && fires(m, l))
                .count() as f64
                / nn;
            let gain = gp - gn;
            if gain > 0.0 && best.is_none_or(|b| gain > b.1) {
                best = Some((l, gain));
            }
        }
        let Some((l, _)) = best else { break };
        for (m, c) in pos.iter().zip(covered_p.iter_mut()) {
            *c |= fires(m, l);
        }
        for (m, c) in neg.iter().zip(covered_n.iter_mut()) {
            *c |= fires(m, l);
        }
        let frac = |v: &[bool], n: f64| v.iter().filter(|c| **c).count() as f64 / n;
        chosen.push((l, frac(&covered_p, np), frac(&covered_n, nn)));
    }
    chosen
}
