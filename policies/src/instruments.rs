//! The instruments a policy measures with, resolved against the model before any check runs:
//! its SAEs (loaded, fitted to a hook of this model; the builtin default SAE found or built)
//! and its directions (a file's vector, or a difference of means computed from the session's
//! activations once every policy has planned its hooks).
//!
//! A builtin SAE or a direction that the lineage's last passing audit pinned is reused from
//! the instrument store ([`crate::store`]) instead: the lineage measures every checkpoint
//! with its reference's instruments. A pin that cannot be used is an `error` finding of every
//! check that reads it, never a pass and never a silent rebuild.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use probes::hooks::HookPoint;
use probes::sae::Sae;

use crate::error::{CheckError, PolicyError};
use crate::lineage::{
    builtin_sae_recipe, direction_recipe, refusal_tokens_digest, refusal_tokens_recipe, Lineage,
};
use crate::load::{Direction, DirectionSource, Located, Policy, SaeSource};
use crate::refusal::{self, ScoreTokens};
use crate::result::{InputRecord, PinnedInstrument, RefusalToken, SelectionRecord};
use crate::selection;
use crate::session::{at_position, ResolvedSae, Session};
use crate::store::{Store, StoredDirection};

/// A direction as a policy names it, with its vector computed on this model.
#[derive(Clone)]
pub(crate) struct ResolvedDirection {
    pub hook: HookPoint,
    pub position: i64,
    /// Difference of means (or the file's vector) `[d_model]`.
    pub raw: Tensor,
    /// Unit length `[d_model]`.
    pub unit: Tensor,
    pub norm: f64,
}

/// Every policy's resolved SAEs and directions, by policy name then the policy's own name.
pub(crate) struct Instruments {
    saes: HashMap<(String, String), ResolvedSae>,
    directions: HashMap<(String, String), ResolvedDirection>,
    builtin: Option<Arc<Sae>>,
    /// Inputs found while resolving (the builtin SAE), for the run's record.
    pub inputs: Vec<InputRecord>,
    /// The lineage's pins this run may reuse.
    lineage: Lineage,
    /// Where pinned instruments are kept.
    store: Store,
    /// Whether this run stores and pins what it computes (not when only resolving).
    record: bool,
    /// Every instrument this run measures with, for its record.
    pub pins: Vec<PinnedInstrument>,
    /// Pinned instruments that cannot be used, with why (the error of each check reading one).
    broken: HashMap<(String, String), String>,
    /// Directions to compute on this checkpoint (not pinned by the lineage).
    to_compute: HashSet<(String, String)>,
    /// Each policy's measured refusal-score tokens (ids, and the evidence of the choice), or
    /// why there are none; policies with listed or default tokens have no entry.
    refusal_tokens: HashMap<String, Result<RefusalTokens, String>>,
    /// The instruments checks define themselves ([`crate::checks::Kind::resolve`]), by policy
    /// and check id: the pin, or why it could be neither reused nor made.
    of_checks: HashMap<(String, String), Result<PinnedInstrument, String>>,
}

/// Refusal-score token ids and the evidence of their choice.
pub(crate) type RefusalTokens = (Vec<u32>, Vec<RefusalToken>);

/// The policy's own name for its measured refusal tokens, in the record's pins.
const REFUSAL_TOKENS: &str = "refusal";

impl Instruments {
    pub fn new(lineage: Lineage, store: Store, record: bool) -> Self {
        Self {
            saes: HashMap::new(),
            directions: HashMap::new(),
            builtin: None,
            inputs: Vec::new(),
            lineage,
            store,
            record,
            pins: Vec::new(),
            broken: HashMap::new(),
            to_compute: HashSet::new(),
            refusal_tokens: HashMap::new(),
            of_checks: HashMap::new(),
        }
    }

    fn key(p: &Policy, name: &str) -> (String, String) {
        (p.name.clone(), name.to_string())
    }

    /// Why `p`'s instruments that could not be resolved failed, by name (a check's own by
    /// the check's id), in name order.
    pub fn broken_in(&self, p: &Policy) -> Vec<(&str, &str)> {
        let of_checks = self
            .of_checks
            .iter()
            .filter_map(|(k, outcome)| match outcome {
                Err(why) => Some((k, why)),
                Ok(_) => None,
            });
        let mut out: Vec<(&str, &str)> = self
            .broken
            .iter()
            .chain(of_checks)
            .filter(|((policy, _), _)| *policy == p.name)
            .map(|((_, name), why)| (name.as_str(), why.as_str()))
            .collect();
        out.sort();
        out
    }

    /// The error of a check that reads `name`, which did not resolve.
    fn missing(&self, p: &Policy, what: &'static str, name: &str) -> CheckError {
        match self.broken.get(&Self::key(p, name)) {
            Some(why) => CheckError::Instrument(why.clone()),
            None => CheckError::Unresolved {
                what,
                name: name.to_string(),
            },
        }
    }

    pub fn sae(&self, p: &Policy, name: &str) -> Result<ResolvedSae, CheckError> {
        self.saes
            .get(&Self::key(p, name))
            .cloned()
            .ok_or_else(|| self.missing(p, "SAE", name))
    }

    /// The SAE if it resolved (its errors are reported once, where it is defined).
    pub fn sae_if_resolved(&self, p: &Policy, name: &str) -> Option<ResolvedSae> {
        self.saes.get(&(p.name.clone(), name.to_string())).cloned()
    }

    pub fn direction(&self, p: &Policy, name: &str) -> Result<ResolvedDirection, CheckError> {
        self.directions
            .get(&Self::key(p, name))
            .cloned()
            .ok_or_else(|| self.missing(p, "direction", name))
    }

    /// `name` as a hook of this model, or an error at its place in the policy.
    pub fn hook(
        s: &Session<'_>,
        p: &Policy,
        name: &Located<String>,
        errors: &mut Vec<PolicyError>,
    ) -> Option<HookPoint> {
        match HookPoint::parse(&name.value, s.n_layers()) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(p.error(&name.at, e.to_string()));
                None
            }
        }
    }

    /// Load and fit `p`'s SAEs, check its directions' hooks, and plan the passes its
    /// contrast directions read.
    pub fn resolve(&mut self, s: &mut Session<'_>, p: &Policy, errors: &mut Vec<PolicyError>) {
        let d_model = s.model.config().d_model;
        for (name, entry) in &p.saes {
            let (sae, hook_spec) = match &entry.source {
                SaeSource::File { sae, hook } => (Arc::clone(sae), hook.clone()),
                SaeSource::Builtin { hook } => {
                    // The hook as resolved on this model: a fraction of depth and the block it
                    // names are one definition (a bad name is reported where the SAE is fitted).
                    let read_at = hook.as_ref().map(|h| {
                        HookPoint::parse(&h.value, s.n_layers())
                            .map_or_else(|_| h.value.clone(), |p| p.to_string())
                    });
                    let recipe = builtin_sae_recipe(read_at.as_deref());
                    let at = |why: String| {
                        PolicyError::at(&p.path, None, format!("[saes.{name}]: {why}")).to_string()
                    };
                    let pinned = self.lineage.pin(&p.name, name, "sae", &recipe);
                    let found = match (&self.lineage.unrelated, pinned) {
                        (Some(why), _) => Err(at(why.clone())),
                        (None, Some(pin)) => self
                            .pinned_sae(pin)
                            .map(|sae| (sae, pin.clone()))
                            .map_err(at),
                        (None, None) => self.builtin_sae(s).map_err(at).and_then(|sae| {
                            self.pin_builtin(s, p, name, &recipe, &sae)
                                .map(|pin| (sae, pin))
                                .map_err(at)
                        }),
                    };
                    match found {
                        Ok((sae, pin)) => {
                            self.inputs.push(InputRecord {
                                policy: p.name.clone(),
                                kind: "sae".into(),
                                path: format!("builtin:default ({})", sae.path.display()),
                                sha256: sae.manifest.root(),
                            });
                            self.pins.push(pin);
                            (sae, hook.clone())
                        }
                        Err(why) => {
                            self.broken.insert(Self::key(p, name), why);
                            continue;
                        }
                    }
                }
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
            match sae.check_fits(&hook_name, s.n_layers(), d_model) {
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
        for (name, d) in &p.directions {
            // A selected direction's hook is the stored choice when reused.
            let hook = match &d.hook {
                Some(h) => {
                    let Some(hook) = Self::hook(s, p, h, errors) else {
                        continue;
                    };
                    if !hook.is_residual_width() {
                        errors.push(p.error(
                            &h.at,
                            format!(
                                "`{}` is not a residual-stream-width hook; a direction needs one",
                                h.value
                            ),
                        ));
                        continue;
                    }
                    Some(hook)
                }
                None => None,
            };
            let recipe = direction_recipe(p, d, hook);
            let pinned = self.lineage.pin(&p.name, name, "direction", &recipe);
            let reused = match (&self.lineage.unrelated, pinned) {
                (Some(why), _) => Some(Err(why.clone())),
                (None, Some(pin)) => Some(self.pinned_direction(s, pin, hook).map(|r| (r, pin))),
                (None, None) => None,
            };
            match reused {
                Some(Ok((r, pin))) => {
                    self.pins.push(pin.clone());
                    self.directions.insert(Self::key(p, name), r);
                    continue;
                }
                Some(Err(why)) => {
                    let why = p.error(&d.at, format!("[directions.{name}]: {why}"));
                    self.broken.insert(Self::key(p, name), why.to_string());
                    continue;
                }
                None => {}
            }
            self.to_compute.insert(Self::key(p, name));
            if let (Some(sel), None) = (&d.select, hook) {
                selection::plan(s, p, d, sel, errors);
            } else if let (
                DirectionSource::Contrast {
                    positive, negative, ..
                },
                Some(hook),
            ) = (&d.source, hook)
            {
                for set in [positive, negative] {
                    if let Err(e) = s.want(p, set, hook) {
                        errors.push(PolicyError::at(&p.path, None, e.to_string()));
                    }
                }
            }
        }
    }

    /// The lineage's pinned SAE: the shipped default SAE, or the store's copy.
    fn pinned_sae(&self, pin: &PinnedInstrument) -> Result<Arc<Sae>, String> {
        let sae = if pin.origin == "shipped" {
            probes::sae::shipped::folder()
                .map_err(|e| e.to_string())
                .and_then(|dir| {
                    crate::store::load_checked(&dir, &pin.sha256).map_err(|e| e.to_string())
                })
        } else {
            self.store.sae(&pin.sha256).map_err(|e| e.to_string())
        };
        sae.map(Arc::new).map_err(|e| {
            format!(
                "the lineage `{}` measures with the SAE {} ({}, computed on {}), but {e}. A \
                 lineage's instruments are never rebuilt silently: restore the file, set the \
                 lineage's reference again with `check --lineage {} --base <reference \
                 checkpoint>`, or audit under a new `--lineage`",
                self.lineage.name, pin.sha256, pin.origin, pin.reference, self.lineage.name
            )
        })
    }

    /// The pin of a builtin SAE found or built for this checkpoint; a built one is copied
    /// into the store so that later checkpoints of the lineage find it.
    fn pin_builtin(
        &self,
        s: &Session<'_>,
        p: &Policy,
        name: &str,
        recipe: &str,
        sae: &Sae,
    ) -> Result<PinnedInstrument, String> {
        let digest = s.model.manifest.root();
        let origin = if probes::sae::shipped::applies_to(s.model) {
            "shipped".to_string()
        } else {
            if self.record {
                self.store
                    .put_sae(sae)
                    .map_err(|e| format!("storing the default SAE for the lineage: {e}"))?;
            }
            format!("built on {digest}")
        };
        Ok(PinnedInstrument {
            policy: p.name.clone(),
            name: name.to_string(),
            kind: "sae".into(),
            sha256: sae.manifest.root(),
            recipe: recipe.to_string(),
            reference: digest,
            origin,
            selection: None,
            refusal_tokens: Vec::new(),
            latents: Vec::new(),
        })
    }

    /// The lineage's pinned direction from the store, checked against the policy's hook (a
    /// selected direction's hook is the one its selection chose).
    fn pinned_direction(
        &self,
        s: &Session<'_>,
        pin: &PinnedInstrument,
        hook: Option<HookPoint>,
    ) -> Result<ResolvedDirection, String> {
        let stored = self
            .store
            .direction(&pin.sha256, s.model.config().d_model)
            .map_err(|e| {
                format!(
                    "the lineage `{}` measures with the direction {} (computed on {}), but {e}. \
                     A lineage's instruments are never rebuilt silently: restore the file, set \
                     the lineage's reference again with `check --base <reference checkpoint>`, \
                     or audit under a new `--lineage`",
                    self.lineage.name,
                    pin.sha256,
                    if pin.reference.is_empty() {
                        "the policy's vector"
                    } else {
                        &pin.reference
                    }
                )
            })?;
        let hook = match (hook, &pin.selection) {
            (Some(h), _) => h,
            (None, Some(sel)) => HookPoint::parse(&sel.hook, s.n_layers())
                .map_err(|e| format!("the pinned selection's hook: {e}"))?,
            (None, None) => {
                return Err(format!(
                    "the pinned direction {} carries no selection evidence",
                    pin.sha256
                ))
            }
        };
        if stored.hook != hook.to_string() {
            return Err(format!(
                "the stored direction {} reads `{}`, not `{hook}`",
                pin.sha256, stored.hook
            ));
        }
        let raw = Tensor::from_vec(stored.vector, s.model.config().d_model, &Device::Cpu)
            .map_err(|e| e.to_string())?;
        ResolvedDirection::new(hook, stored.position, raw).map_err(|e| e.to_string())
    }

    /// Compute every direction of `p` that the lineage did not pin (after every policy
    /// planned its hooks), store it and pin it to this checkpoint.
    pub fn compute_directions(
        &mut self,
        s: &mut Session<'_>,
        p: &Policy,
        errors: &mut Vec<PolicyError>,
    ) {
        for (name, d) in &p.directions {
            if !self.to_compute.contains(&Self::key(p, name)) {
                continue;
            }
            let computed = match &d.select {
                Some(sel) => self
                    .score_tokens(s, p)
                    .and_then(|(refusal, _)| selection::select(s, p, d, sel, &refusal))
                    .map(|(r, e)| (r, Some(e))),
                None => compute_direction(s, p, d).map(|r| (r, None)),
            };
            let pinned = computed.and_then(|(r, evidence)| {
                let pin = self.pin_direction(s, p, name, d, &r, evidence)?;
                Ok((r, pin))
            });
            match pinned {
                Ok((r, pin)) => {
                    self.directions.insert(Self::key(p, name), r);
                    self.pins.extend(pin);
                }
                Err(e) => errors.push(p.error(&d.at, format!("direction `{name}`: {e}"))),
            }
        }
    }

    /// Choose `p`'s measured refusal-score tokens from the model's replies to its `[refusal]`
    /// prompt sets, or reuse those its lineage pinned, so that the refusal score reads the
    /// same tokens on every checkpoint of the lineage (and a later audit generates nothing
    /// to choose them). Nothing for listed or default tokens, which cost nothing to find, and
    /// nothing when only resolving a policy without a selected direction: no check reads them
    /// then, and a model they cannot be chosen on fails its checks, not its policy.
    pub fn resolve_refusal_tokens(&mut self, s: &mut Session<'_>, p: &Policy) {
        let ScoreTokens::Measured {
            refusing,
            complying,
            max_tokens,
        } = &p.refusal
        else {
            return;
        };
        if !self.record && p.directions.values().all(|d| d.select.is_none()) {
            return;
        }
        let recipe = refusal_tokens_recipe(p, refusing, complying, *max_tokens);
        let pinned = self
            .lineage
            .pin(&p.name, REFUSAL_TOKENS, "refusal-tokens", &recipe)
            .cloned();
        let outcome = match pinned {
            Some(pin) => self.pinned_refusal_tokens(s, &pin).map(|ids| {
                let evidence = pin.refusal_tokens.clone();
                self.pins.push(pin);
                (ids, evidence)
            }),
            None => refusal::measured(s, p, refusing, complying, *max_tokens)
                .map_err(|e| e.to_string())
                .inspect(|(_, evidence)| {
                    if self.record {
                        let digest = s.model.manifest.root();
                        self.pins.push(PinnedInstrument {
                            policy: p.name.clone(),
                            name: REFUSAL_TOKENS.into(),
                            kind: "refusal-tokens".into(),
                            sha256: refusal_tokens_digest(evidence),
                            recipe,
                            reference: digest.clone(),
                            origin: format!("built on {digest}"),
                            selection: None,
                            refusal_tokens: evidence.clone(),
                            latents: Vec::new(),
                        });
                    }
                }),
        };
        self.refusal_tokens.insert(p.name.clone(), outcome);
    }

    /// The ids of the refusal tokens a lineage pinned, checked against their digest and
    /// against this model's tokenizer (each id must still be the same token).
    fn pinned_refusal_tokens(
        &self,
        s: &Session<'_>,
        pin: &PinnedInstrument,
    ) -> Result<Vec<u32>, String> {
        let tokens = &pin.refusal_tokens;
        if tokens.is_empty() || refusal_tokens_digest(tokens) != pin.sha256 {
            return Err(format!(
                "the lineage `{}`'s pinned refusal tokens do not match their digest {}: set the \
                 lineage's reference again with `check --base <reference checkpoint>`, or audit \
                 under a new `--lineage`",
                self.lineage.name, pin.sha256
            ));
        }
        let vocab = s.model.config().vocab_size;
        for t in tokens {
            let here = (t.id as usize) < vocab;
            if !here || s.token_text(t.id) != t.token {
                return Err(format!(
                    "the lineage `{}` scores refusal with the tokens chosen on {} (`{}` is id \
                     {}), but this model's tokenizer {}: it cannot be measured with the \
                     lineage's refusal tokens. Audit it under a new `--lineage`",
                    self.lineage.name,
                    pin.reference,
                    t.token,
                    t.id,
                    if here {
                        format!("reads id {} as `{}`", t.id, s.token_text(t.id))
                    } else {
                        format!("has only {vocab} ids")
                    }
                ));
            }
        }
        Ok(tokens.iter().map(|t| t.id).collect())
    }

    /// The name of the lineage whose pins this run may reuse.
    pub fn lineage_name(&self) -> &str {
        &self.lineage.name
    }

    /// Whether this run builds and pins instruments: one that only resolves its policies
    /// runs no pass to make a check's own.
    pub fn records(&self) -> bool {
        self.record
    }

    /// The lineage's pin of the instrument of `kind` that `p`'s check `check` defines, where
    /// its definition (`recipe`) is unchanged; an error where the lineage is another model's.
    pub fn check_pin(
        &self,
        p: &Policy,
        check: &str,
        kind: &str,
        recipe: &str,
    ) -> Result<Option<PinnedInstrument>, String> {
        match &self.lineage.unrelated {
            Some(why) => Err(why.clone()),
            None => Ok(self.lineage.pin(&p.name, check, kind, recipe).cloned()),
        }
    }

    /// A pin for the instrument of `kind` that `p`'s check `check` defines, made on this
    /// checkpoint, whose content has digest `sha256` (the caller adds the content).
    pub fn built_check_pin(
        &self,
        s: &Session<'_>,
        p: &Policy,
        check: &str,
        kind: &str,
        recipe: String,
        sha256: String,
    ) -> PinnedInstrument {
        let digest = s.model.manifest.root();
        PinnedInstrument {
            policy: p.name.clone(),
            name: check.to_string(),
            kind: kind.to_string(),
            sha256,
            recipe,
            origin: format!("built on {digest}"),
            reference: digest,
            selection: None,
            refusal_tokens: Vec::new(),
            latents: Vec::new(),
        }
    }

    /// Keep the instrument `p`'s check `check` defines (pinned in the record), or why it has
    /// none (the check's error).
    pub fn keep_check_instrument(
        &mut self,
        p: &Policy,
        check: &str,
        outcome: Result<PinnedInstrument, String>,
    ) {
        if let Ok(pin) = &outcome {
            self.pins.push(pin.clone());
        }
        self.of_checks.insert(Self::key(p, check), outcome);
    }

    /// The instrument `p`'s check `check` defines, as kept by
    /// [`Instruments::keep_check_instrument`].
    pub fn check_instrument(
        &self,
        p: &Policy,
        check: &str,
        what: &'static str,
    ) -> Result<&PinnedInstrument, CheckError> {
        match self.of_checks.get(&Self::key(p, check)) {
            Some(Ok(pin)) => Ok(pin),
            Some(Err(why)) => Err(CheckError::Instrument(why.clone())),
            None => Err(CheckError::Unresolved {
                what,
                name: check.to_string(),
            }),
        }
    }

    /// `p`'s refusal-score token ids and the evidence of their choice: measured ones as
    /// resolved ([`Instruments::resolve_refusal_tokens`]), listed or default ones looked up.
    pub fn score_tokens(&self, s: &Session<'_>, p: &Policy) -> Result<RefusalTokens, CheckError> {
        match (&p.refusal, self.refusal_tokens.get(&p.name)) {
            (_, Some(Ok(r))) => Ok(r.clone()),
            (_, Some(Err(why))) => Err(CheckError::Unmeasurable(why.clone())),
            (ScoreTokens::Measured { .. }, None) => Err(CheckError::Unresolved {
                what: "refusal tokens",
                name: REFUSAL_TOKENS.into(),
            }),
            _ => refusal::listed_or_default(s, p),
        }
    }

    /// Store a direction computed on this checkpoint and pin it (nothing when there is no
    /// store: resolving only).
    fn pin_direction(
        &self,
        s: &Session<'_>,
        p: &Policy,
        name: &str,
        d: &Direction,
        r: &ResolvedDirection,
        selection: Option<SelectionRecord>,
    ) -> Result<Option<PinnedInstrument>, CheckError> {
        if !self.record {
            return Ok(None);
        }
        let sha = self
            .store
            .put_direction(&StoredDirection {
                hook: r.hook.to_string(),
                position: r.position,
                vector: r.raw.to_vec1::<f32>()?,
            })
            .map_err(|e| CheckError::Instrument(format!("storing it for the lineage: {e}")))?;
        let (reference, origin) = match d.source {
            DirectionSource::File { .. } => (String::new(), "file".to_string()),
            DirectionSource::Contrast { .. } => {
                let digest = s.model.manifest.root();
                (digest.clone(), format!("built on {digest}"))
            }
        };
        Ok(Some(PinnedInstrument {
            policy: p.name.clone(),
            name: name.to_string(),
            kind: "direction".into(),
            sha256: sha,
            recipe: direction_recipe(p, d, d.hook.as_ref().map(|_| r.hook)),
            reference,
            origin,
            selection,
            refusal_tokens: Vec::new(),
            latents: Vec::new(),
        }))
    }

    /// The default SAE of the model: shipped or cached. A run never trains one (minutes to
    /// hours): a missing one is an error saying how to build it and about how long that takes.
    fn builtin_sae(&mut self, s: &Session<'_>) -> Result<Arc<Sae>, String> {
        if let Some(sae) = &self.builtin {
            return Ok(Arc::clone(sae));
        }
        let dir = probes::sae::default::built(s.model)
            .map_err(|e| format!("the default SAE: {e}"))?
            .ok_or_else(|| {
                format!(
                    "the default SAE is not built for this model yet, and an audit never \
                     trains one; `mechwatch sae default --model {}` builds it once (about {} \
                     minutes on two cores), and the daemon builds it as a job of its own",
                    s.model.path.display(),
                    probes::sae::default::estimated_minutes(s.model)
                )
            })?;
        let sae = Arc::new(probes::sae::load_sae(&dir).map_err(|e| e.to_string())?);
        self.builtin = Some(Arc::clone(&sae));
        Ok(sae)
    }
}

pub(crate) fn compute_direction(
    s: &mut Session<'_>,
    p: &Policy,
    d: &Direction,
) -> Result<ResolvedDirection, CheckError> {
    let name = d.hook.as_ref().map_or("", |h| h.value.as_str());
    let hook = HookPoint::parse(name, s.n_layers())
        .map_err(|e| CheckError::Unmeasurable(e.to_string()))?;
    let d_model = s.model.config().d_model;
    let dev = Device::Cpu;
    let (raw, position) = match &d.source {
        DirectionSource::File { vector } => {
            if vector.len() != d_model {
                return Err(CheckError::Unmeasurable(format!(
                    "the vector has {} entries but the model's d_model is {d_model}",
                    vector.len()
                )));
            }
            (Tensor::from_vec(vector.clone(), d_model, &dev)?, -1)
        }
        DirectionSource::Contrast {
            positive,
            negative,
            position,
        } => {
            let mut mean = |set: &str| -> Result<Tensor, CheckError> {
                let t = s.set_tokens(p, set)?;
                let acts = s.acts(&t, hook)?;
                let rows = acts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        at_position(a, *position).ok_or_else(|| CheckError::Position {
                            position: *position,
                            prompt: i + 1,
                            set: set.to_string(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Tensor::stack(&rows, 0).and_then(|x| x.mean(0))?)
            };
            let pm = mean(positive)?;
            let nm = mean(negative)?;
            ((pm - nm)?, *position)
        }
    };
    ResolvedDirection::new(hook, position, raw)
}

impl ResolvedDirection {
    pub(crate) fn new(hook: HookPoint, position: i64, raw: Tensor) -> Result<Self, CheckError> {
        let norm = raw.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
        if !(norm.is_finite() && norm > 0.0) {
            return Err(CheckError::Unmeasurable(
                "the direction has zero or non-finite length".into(),
            ));
        }
        let unit = (&raw / norm)?;
        Ok(Self {
            hook,
            position,
            raw,
            unit,
            norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::{metric, Tiny};
    use crate::result::Status;
    use crate::store::{Store, StoredDirection};

    const PROBE: &str = r#"
[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "pos"
negative = "neg"
min_auroc = 0.5
"#;

    #[test]
    fn one_policy_with_a_fraction_of_depth_reads_the_block_each_model_has() {
        let tiny = Tiny::new();
        let policy = tiny.policy_at("blocks.0.5.hook_resid_post", PROBE).unwrap();
        let root = tiny.dir.path();
        let deep = probes::testing::load(&probes::testing::llama_dir_deep(root, "deep", 7, 5));
        let deeper = probes::testing::load(&probes::testing::llama_dir_deep(root, "deeper", 7, 8));
        // round(0.5 * (n - 1)): block 1 of 2 (0.5 rounds away from zero), 2 of 5, 4 of 8.
        for (model, block) in [(&tiny.model, 1), (&deep, 2), (&deeper, 4)] {
            let r = tiny.run_on(model, &policy, None);
            let f = &r.policies[0].findings[0];
            let hook = format!("`blocks.{block}.hook_resid_post`");
            assert!(f.explanation.contains(&hook), "{}", f.explanation);
            let pin = r.instruments.iter().find(|i| i.name == "d").unwrap();
            let stored = Store::at(tiny.store())
                .direction(&pin.sha256, probes::testing::D)
                .unwrap();
            assert_eq!(stored.hook, hook.trim_matches('`'));
        }
    }

    #[test]
    fn a_block_beyond_the_model_is_an_error_at_its_line() {
        let tiny = Tiny::new();
        let policy = tiny.policy_at("blocks.2.hook_resid_post", PROBE).unwrap();
        let mut quiet = |_: &str| {};
        let mut opts = crate::engine::RunOptions {
            last_pass: None,
            progress: &mut quiet,
            micro_batch: 3,
            lineage: None,
            store: Some(tiny.store()),
            reference: None,
        };
        let e = crate::engine::run(&tiny.model, &[policy], &mut opts)
            .expect_err("a block the model lacks is refused")
            .to_string();
        let text = std::fs::read_to_string(tiny.dir.path().join("policy/tiny.toml")).unwrap();
        let line = text.lines().position(|l| l.contains("blocks.2")).unwrap() + 1;
        assert!(e.contains(&format!("tiny.toml:{line}:")), "{e}");
        assert!(e.contains("the model has 2 blocks (0..1)"), "{e}");
    }

    #[test]
    fn a_fraction_naming_the_pinned_block_reuses_its_direction() {
        let tiny = Tiny::new();
        let first = tiny.run(PROBE, None);
        // 1.0 of depth is block 1 of the tiny model's 2, where `d` was pinned: same recipe.
        let same = tiny.policy_at("blocks.1.0.hook_resid_post", PROBE).unwrap();
        let second = tiny.run_on(&tiny.model, &same, Some(&first));
        assert_eq!(second.instruments, first.instruments);
        assert_eq!(second.policies[0].findings, first.policies[0].findings);
        // 0.0 of depth is block 0: another definition, computed afresh.
        let moved = tiny.policy_at("blocks.0.0.hook_resid_post", PROBE).unwrap();
        let third = tiny.run_on(&tiny.model, &moved, Some(&first));
        let recipe = |r: &crate::result::RunResult| {
            r.instruments
                .iter()
                .find(|i| i.name == "d")
                .unwrap()
                .recipe
                .clone()
        };
        assert_ne!(recipe(&third), recipe(&first));
        assert!(third.policies[0].findings[0]
            .explanation
            .contains("`blocks.0.hook_resid_post`"));
    }

    #[test]
    fn a_run_pins_the_direction_it_computed_and_the_next_reuses_it() {
        let tiny = Tiny::new();
        let first = tiny.run(PROBE, None);
        let pin = first
            .instruments
            .iter()
            .find(|i| i.kind == "direction" && i.name == "d")
            .expect("the direction is pinned");
        let digest = tiny.model.manifest.root();
        assert_eq!(pin.reference, digest);
        assert_eq!(pin.origin, format!("built on {digest}"));
        let second = tiny.run(PROBE, Some(&first));
        assert_eq!(second.instruments, first.instruments);
        assert_eq!(second.policies, first.policies);
    }

    #[test]
    fn a_pinned_direction_is_read_from_the_store_not_recomputed() {
        let tiny = Tiny::new();
        let first = tiny.run(PROBE, None);
        let auroc = metric(&first.policies[0].findings[0], "AUROC");
        // The lineage's pin now names the negated vector: a recomputed direction would give
        // the same AUROC, the pinned one gives its complement.
        let store = Store::at(tiny.dir.path().join("store"));
        let mut base = first.clone();
        let pin = base.instruments.iter_mut().find(|i| i.name == "d").unwrap();
        let path = store.direction_path(&pin.sha256).unwrap();
        let d = store.direction(&pin.sha256, probes::testing::D).unwrap();
        pin.sha256 = store
            .put_direction(&StoredDirection {
                vector: d.vector.iter().map(|x| -x).collect(),
                ..d
            })
            .unwrap();
        assert!(path.exists());
        let second = tiny.run(PROBE, Some(&base));
        let flipped = metric(&second.policies[0].findings[0], "AUROC");
        assert!((flipped - (1.0 - auroc)).abs() < 1e-5, "{auroc} {flipped}");
    }

    #[test]
    fn an_edited_pinned_direction_is_an_error_naming_it() {
        let tiny = Tiny::new();
        let first = tiny.run(PROBE, None);
        let pin = first.instruments.iter().find(|i| i.name == "d").unwrap();
        let path = Store::at(tiny.dir.path().join("store"))
            .direction_path(&pin.sha256)
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let second = tiny.run(PROBE, Some(&first));
        let f = &second.policies[0].findings[0];
        assert_eq!(f.status, Status::Error, "{f:?}");
        for part in [
            path.display().to_string(),
            "tiny.toml".into(),
            "[directions.d]".into(),
            "no longer matches".into(),
        ] {
            assert!(f.explanation.contains(&part), "{part}: {}", f.explanation);
        }
        assert_eq!(second.verdict, Status::Error);
    }

    #[test]
    fn a_base_checkpoint_is_the_reference_whose_instruments_a_run_uses() {
        let tiny = Tiny::new();
        let base_dir = probes::testing::llama_dir(&tiny.dir.path().join("base"), 8);
        let base = probes::testing::load(&base_dir);
        let policy = tiny.policy(PROBE).unwrap();
        let reference =
            crate::engine::reference_instruments(&base, &[policy], "t", Some(tiny.store()))
                .unwrap();
        let pin = reference
            .instruments
            .iter()
            .find(|i| i.name == "d")
            .expect("the base's direction is pinned");
        assert_eq!(pin.reference, base.manifest.root());
        assert_ne!(pin.reference, tiny.model.manifest.root());
        let run = tiny.run_with(PROBE, None, Some(&reference));
        assert_eq!(run.instruments, reference.instruments);
        // Not the direction this checkpoint would compute itself.
        let own = tiny.run(PROBE, None);
        assert_ne!(own.instruments, reference.instruments);
    }

    #[test]
    fn a_lineage_of_another_model_is_an_error_not_a_pass() {
        let tiny = Tiny::new();
        let mut first = tiny.run(PROBE, None);
        first.model.architecture = "qwen2".into();
        let second = tiny.run(PROBE, Some(&first));
        let f = &second.policies[0].findings[0];
        assert_eq!(f.status, Status::Error, "{f:?}");
        assert!(f.explanation.contains("qwen2"), "{}", f.explanation);
    }

    const MEASURED: &str = r#"
[refusal]
refusing = "pos"
complying = "neg"

[[checks]]
id = "score"
kind = "steering"
severity = "medium"
prompts = "neg"
intervention = { add_direction = "d", coeff = 2.0 }
metric = "refusal_score"
bounds = { max = 1000.0 }
"#;

    /// A lineage's pinned refusal tokens are read from its record and checked against this
    /// model's tokenizer, never chosen again: the tiny model refuses nothing, so choosing
    /// them afresh would fail.
    #[test]
    fn pinned_refusal_tokens_are_reused_and_checked_against_the_tokenizer() {
        let tiny = Tiny::new();
        let first = tiny.run(MEASURED, None);
        let f = &first.policies[0].findings[0];
        assert_eq!(f.status, Status::Error, "{f:?}");
        assert!(f.explanation.contains("refused none"), "{}", f.explanation);
        assert!(!first.instruments.iter().any(|i| i.kind == "refusal-tokens"));

        let policy = tiny.policy(MEASURED).unwrap();
        let ScoreTokens::Measured {
            refusing,
            complying,
            max_tokens,
        } = &policy.refusal
        else {
            panic!("measured tokens")
        };
        let tokens: Vec<RefusalToken> = [3u32, 5]
            .iter()
            .map(|&id| RefusalToken {
                token: tiny.model.codec.token_text(id),
                id,
                refusals: 4,
                compliant: 0,
            })
            .collect();
        let mut base = first.clone();
        base.instruments.push(PinnedInstrument {
            policy: policy.name.clone(),
            name: REFUSAL_TOKENS.into(),
            kind: "refusal-tokens".into(),
            sha256: refusal_tokens_digest(&tokens),
            recipe: refusal_tokens_recipe(&policy, refusing, complying, *max_tokens),
            reference: "sha256:reference".into(),
            origin: "built on sha256:reference".into(),
            selection: None,
            refusal_tokens: tokens.clone(),
            latents: Vec::new(),
        });
        let second = tiny.run(MEASURED, Some(&base));
        let f = &second.policies[0].findings[0];
        assert_ne!(f.status, Status::Error, "{f:?}");
        assert_eq!(f.evidence.refusal_tokens, tokens);
        assert!(second
            .instruments
            .iter()
            .any(|i| i.kind == "refusal-tokens" && i.refusal_tokens == tokens));

        let error_of = |edit: &dyn Fn(&mut PinnedInstrument)| {
            let mut lineage = base.clone();
            let pin = lineage
                .instruments
                .iter_mut()
                .find(|i| i.kind == "refusal-tokens")
                .unwrap();
            edit(pin);
            let f = tiny.run(MEASURED, Some(&lineage)).policies[0].findings[0].clone();
            assert_eq!(f.status, Status::Error, "{f:?}");
            f.explanation
        };
        // Another tokenizer: the pinned id is another token here.
        let e = error_of(&|pin| {
            pin.refusal_tokens[0].token = "not-a-token".into();
            pin.sha256 = refusal_tokens_digest(&pin.refusal_tokens);
        });
        assert!(
            e.contains("`not-a-token`") && e.contains("tokenizer"),
            "{e}"
        );
        // An edited pin no longer matches its digest.
        let e = error_of(&|pin| pin.refusal_tokens[0].refusals = 9);
        assert!(e.contains("do not match their digest"), "{e}");
    }
}
