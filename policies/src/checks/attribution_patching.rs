//! `attribution_patching`: which components carry a behaviour from clean prompts to corrupted
//! ones (Nanda 2023; Syed, Rager and Conmy 2023), and how far the linear estimate of each
//! component's effect can be trusted.
//!
//! Prompts of two sets are paired line by line (same token length). For each pair, one
//! gradient pass on the corrupted prompt gives the metric's gradient at every component, and
//! the estimate of patching the component's clean activation into the corrupted run is
//! `grad(metric at corrupted) . (clean - corrupted)`, summed over d_model. Components:
//!
//! - the residual stream at each block's input, per layer and position
//!   (`blocks.L.hook_resid_pre[P]`);
//! - each attention head's contribution to the residual stream, summed over positions
//!   (`blocks.L.attn.hook_result[H]`);
//! - each MLP's output, summed over positions (`blocks.L.hook_mlp_out`);
//! - with `sae`, each of the SAE's latents at its hook, summed over positions
//!   (`<hook>.hook_sae_acts_post[L]`, SAELens's name): the estimate is
//!   `sum over positions of (c_clean - c_corrupted)[pos, L] * (W_dec[L] . grad[pos])`, with `c`
//!   each latent's coefficient on its decoder row (`Sae::contributions`), and patching it adds
//!   that difference times `W_dec[L]` at the hook, so the SAE's error term stays as it was.
//!
//! The `top_k` components with the largest mean estimate (and any `heads` the policy names)
//! are then patched for real: the corrupted prompt is run with that one component replaced by
//! its clean value, and the metric's change is the real effect. The Pearson correlation of
//! estimates and real effects over the top components is the evidence that the estimate can
//! be trusted; a policy bounds it (`min_correlation`) and the largest real effect.
//!
//! Metrics, at each prompt's last token: `logit_diff`, the logit of `tokens[0]` minus that of
//! `tokens[1]`; `refusal_score`, the log-odds of the policy's refusal tokens (its `[refusal]`
//! table, as steering checks read it); `kl`, KL(clean || run) of the next-token distributions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor, D};
use probes::hooks::{Block, HookPoint, Hooks, Positions, ReplaceFn};
use probes::{Padding, Transformer, Unembed};
use serde::Deserialize;
use toml::Spanned;

use super::{at_least, at_most, violated, Cx, Kind, Planner};
use crate::error::{CheckError, Loc};
use crate::load::{Located, Names, Validator};
use crate::metrics::{log_softmax, Behaviour};
use crate::result::{
    round, AttributionMap, ComponentEffect, Evidence, Finding, Metric, RefusalToken, Status,
};
use crate::session::ResolvedSae;

/// Most components a check may patch for real.
const MAX_TOP_K: i64 = 256;
/// Most prompt pairs: each costs a gradient pass and a patched pass of `top_k + 1` rows.
const MAX_PAIRS: usize = 64;

/// The fields of an `attribution_patching` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The prompt set of clean prompts.
    pub clean: Spanned<String>,
    /// The prompt set of corrupted prompts, paired with `clean` line by line; each pair has
    /// the same number of tokens.
    pub corrupted: Spanned<String>,
    /// `logit_diff` (default), `refusal_score` or `kl`.
    pub metric: Option<Spanned<String>>,
    /// For `logit_diff`: `[answer, other]`, two texts of one token each (e.g. `[" Paris",
    /// " Rome"]`).
    pub tokens: Option<Spanned<Vec<String>>>,
    /// Which components: any of `resid`, `heads`, `mlp` (default all three).
    pub components: Option<Spanned<Vec<String>>>,
    /// Also attribute this SAE's latents, at the SAE's hook.
    pub sae: Option<Spanned<String>>,
    /// Heads patched and shown besides the top components, as `"layer.head"`.
    #[serde(default)]
    pub heads: Vec<Spanned<String>>,
    /// Components patched for real, by largest estimate (default 20).
    pub top_k: Option<Spanned<i64>>,
    /// The Pearson correlation of estimates and real effects over the top components is at
    /// least this.
    pub min_correlation: Option<Spanned<f64>>,
    /// The largest real effect (in absolute value) of a patched component is at least this:
    /// some component carries the behaviour.
    pub min_top_effect: Option<Spanned<f64>>,
    /// The largest real effect (in absolute value) is at most this.
    pub max_top_effect: Option<Spanned<f64>>,
}

/// The behaviour metric at each prompt's last token.
#[derive(Debug, Clone)]
pub enum MetricKind {
    /// `logit[answer] - logit[other]`, the texts with where they were written.
    LogitDiff(Located<Vec<String>>),
    /// The log-odds of the policy's refusal tokens.
    RefusalScore,
    /// KL(clean || run) of the next-token distributions.
    Kl,
}

/// Which component families are attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    pub resid: bool,
    pub heads: bool,
    pub mlp: bool,
}

/// A validated attribution-patching check.
#[derive(Debug, Clone)]
pub struct AttributionPatching {
    pub clean: String,
    /// The corrupted set, with where it was named (pair errors point there).
    pub corrupted: Located<String>,
    pub metric: MetricKind,
    pub families: Families,
    /// The SAE whose latents are attributed too.
    pub sae: Option<String>,
    /// Where the components were chosen (or the check's id).
    pub families_at: Loc,
    /// `(layer, head)`, checked against the model when the check runs.
    pub heads: Vec<Located<(Block, usize)>>,
    pub top_k: usize,
    pub min_correlation: Option<f64>,
    pub min_top_effect: Option<f64>,
    pub max_top_effect: Option<f64>,
}

impl Kind for AttributionPatching {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self> {
        let check = format!("check `{}`", id.get_ref());
        let pair = v.contrast(
            ("clean", &spec.clean),
            ("corrupted", &spec.corrupted),
            n.prompts,
        );
        let clean = pair.map(|(clean, _)| clean);
        let corrupted = clean.as_ref().map(|_| v.located(&spec.corrupted));
        let metric = match spec.metric.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("logit_diff") => match &spec.tokens {
                Some(t) if t.get_ref().len() == 2 && t.get_ref()[0] != t.get_ref()[1] => {
                    Some(MetricKind::LogitDiff(v.located(t)))
                }
                Some(t) => {
                    v.err(
                        t,
                        format!(
                            "{check}: `tokens` is `[answer, other]`, two different texts of \
                             one token each (e.g. [\" Paris\", \" Rome\"])"
                        ),
                    );
                    None
                }
                None => {
                    v.err(
                        id,
                        format!(
                            "{check}: the `logit_diff` metric needs `tokens = [answer, other]`"
                        ),
                    );
                    None
                }
            },
            Some(name @ ("kl" | "refusal_score")) => {
                if let Some(t) = &spec.tokens {
                    v.err(
                        t,
                        format!(
                            "{check}: `tokens` is for `logit_diff`, not `{name}` (the refusal \
                             score reads the policy's `[refusal]` tokens)"
                        ),
                    );
                }
                Some(if name == "kl" {
                    MetricKind::Kl
                } else {
                    MetricKind::RefusalScore
                })
            }
            Some(other) => {
                let m = spec.metric.as_ref().expect("matched Some");
                v.err(
                    m,
                    format!(
                        "{check}: unknown metric `{other}` (valid: logit_diff, refusal_score, kl)"
                    ),
                );
                None
            }
        };
        let (families, families_at) = match &spec.components {
            None => (
                Families {
                    resid: true,
                    heads: true,
                    mlp: true,
                },
                v.located(id).at,
            ),
            Some(c) => {
                let mut f = Families {
                    resid: false,
                    heads: false,
                    mlp: false,
                };
                for name in c.get_ref() {
                    let slot = match name.as_str() {
                        "resid" => &mut f.resid,
                        "heads" => &mut f.heads,
                        "mlp" => &mut f.mlp,
                        _ => {
                            v.err(
                                c,
                                format!(
                                    "{check}: unknown component `{name}` (valid: resid, heads, mlp)"
                                ),
                            );
                            continue;
                        }
                    };
                    *slot = true;
                }
                if !(f.resid || f.heads || f.mlp) {
                    v.err(c, format!("{check}: `components` names no component"));
                }
                (f, v.located(c).at)
            }
        };
        let sae = match &spec.sae {
            Some(s) => Some(v.named("SAE", s, n.saes)?),
            None => None,
        };
        let heads = super::induction::parse_heads(v, &check, &spec.heads);
        if !heads.is_empty() && !families.heads {
            v.err(
                &spec.heads[0],
                format!("{check}: `heads` are patched as heads, which `components` leaves out"),
            );
        }
        let top_k = match &spec.top_k {
            None => 20,
            Some(k) => {
                let x = *k.get_ref();
                if !(1..=MAX_TOP_K).contains(&x) {
                    v.err(
                        k,
                        format!("{check}: `top_k` {x} is outside [1, {MAX_TOP_K}]"),
                    );
                }
                x.clamp(1, MAX_TOP_K) as usize
            }
        };
        let min_correlation = spec.min_correlation.as_ref().map(|s| {
            let x = *s.get_ref();
            if !(-1.0..=1.0).contains(&x) {
                v.err(
                    s,
                    format!("{check}: `min_correlation` {x} is outside [-1, 1]"),
                );
            }
            x
        });
        let effect = |v: &mut Validator<'_>, s: &Option<Spanned<f64>>, field: &str| {
            s.as_ref().map(|s| {
                let x = *s.get_ref();
                if !x.is_finite() || x < 0.0 {
                    v.err(
                        s,
                        format!(
                            "{check}: `{field}` bounds an absolute effect: a finite number >= 0"
                        ),
                    );
                }
                x
            })
        };
        let min_top_effect = effect(v, &spec.min_top_effect, "min_top_effect");
        let max_top_effect = effect(v, &spec.max_top_effect, "max_top_effect");
        if min_correlation.is_none() && min_top_effect.is_none() && max_top_effect.is_none() {
            v.err(
                id,
                format!(
                    "{check} needs `min_correlation`, `min_top_effect` or `max_top_effect`: \
                     without a bound it could not fail"
                ),
            );
        }
        Some(AttributionPatching {
            clean: clean?,
            corrupted: corrupted?,
            metric: metric?,
            families,
            sae,
            families_at,
            heads,
            top_k,
            min_correlation,
            min_top_effect,
            max_top_effect,
        })
    }

    /// The check runs its own passes (a gradient pass and patched passes per pair); nothing
    /// is planned in the shared ones.
    fn plan(&self, _: &mut Planner<'_, '_>) {}

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        let run = Run::new(self, cx)?;
        let mut pairs = Vec::with_capacity(run.ids.len());
        for (clean, corrupted) in &run.ids {
            pairs.push(run.pair(clean, corrupted)?);
        }
        let n = pairs.len() as f64;
        let mut estimates: BTreeMap<Component, f64> = BTreeMap::new();
        for p in &pairs {
            for (c, e) in &p.estimates {
                *estimates.entry(*c).or_default() += e / n;
            }
        }
        let mut ranked: Vec<(Component, f64)> = estimates.iter().map(|(c, e)| (*c, *e)).collect();
        ranked.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
        let top: Vec<Component> = ranked.iter().take(self.top_k).map(|r| r.0).collect();
        let mut patched = top.clone();
        for &(layer, head) in &run.heads {
            let c = Component::Head { layer, head };
            if !patched.contains(&c) {
                patched.push(c);
            }
        }
        let mut effects = vec![0.0; patched.len()];
        for p in &pairs {
            for (e, x) in effects.iter_mut().zip(run.patch(p, &patched)?) {
                *e += x / n;
            }
        }
        let est: Vec<f64> = patched.iter().map(|c| estimates[c]).collect();
        if est.iter().chain(&effects).any(|x| !x.is_finite()) {
            return Err(CheckError::NonFinite(
                "an attribution estimate or a patched metric is NaN or infinite".into(),
            ));
        }
        let k = top.len();
        let pearson = correlation(&est[..k], &effects[..k]);
        let spearman = correlation(&ranks(&est[..k]), &ranks(&effects[..k]));
        let top_effect = effects[..k].iter().map(|e| e.abs()).fold(0.0, f64::max);
        let mean = |f: fn(&PairRun) -> f64| pairs.iter().map(f).sum::<f64>() / n;
        let metric_name = run.metric_name();
        let mut metrics = vec![
            Metric {
                name: format!("{metric_name} on clean prompts"),
                value: round(mean(|p| p.clean_metric)),
                bound: String::new(),
            },
            Metric {
                name: format!("{metric_name} on corrupted prompts"),
                value: round(mean(|p| p.baseline)),
                bound: String::new(),
            },
        ];
        let mut broken = Vec::new();
        match (self.min_correlation, pearson) {
            (Some(min), None) => {
                return Err(CheckError::Unmeasurable(format!(
                    "the correlation of estimates and real effects is undefined: the {k} top \
                     components' estimates or effects do not vary (min_correlation {min})"
                )))
            }
            (min, r) => {
                let r = r.unwrap_or(f64::NAN);
                if let Some(min) = min {
                    if !at_least("the correlation of estimates and real effects", r, min)? {
                        broken.push(format!("correlation {} < {min}", round(r)));
                    }
                }
                metrics.push(Metric {
                    name: format!("pearson correlation, estimate vs patching, top {k}"),
                    value: round(r),
                    bound: min.map(|m| format!(">= {m}")).unwrap_or_default(),
                });
            }
        }
        metrics.push(Metric {
            name: format!("spearman correlation, estimate vs patching, top {k}"),
            value: round(spearman.unwrap_or(f64::NAN)),
            bound: String::new(),
        });
        let mut bound = Vec::new();
        if let Some(min) = self.min_top_effect {
            bound.push(format!(">= {min}"));
            if !at_least("the largest real effect", top_effect, min)? {
                broken.push(format!("largest effect {} < {min}", round(top_effect)));
            }
        }
        if let Some(max) = self.max_top_effect {
            bound.push(format!("<= {max}"));
            if !at_most("the largest real effect", top_effect, max)? {
                broken.push(format!("largest effect {} > {max}", round(top_effect)));
            }
        }
        metrics.push(Metric {
            name: "largest |effect| of a top component".into(),
            value: round(top_effect),
            bound: bound.join(", "),
        });
        let components = patched
            .iter()
            .zip(est.iter().zip(&effects))
            .map(|(c, (e, x))| ComponentEffect {
                component: c.name(),
                estimate: round(*e),
                effect: round(*x),
            })
            .collect();
        let evidence = Evidence {
            components,
            attribution_map: run.map(&estimates),
            refusal_tokens: run.refusal_tokens.clone(),
            ..Evidence::default()
        };
        let summary = format!(
            "{} pairs, {metric_name}: the top {k} of {} components' estimates correlate with \
             real patching at {} (Pearson); the largest real effect is {}",
            pairs.len(),
            estimates.len(),
            round(pearson.unwrap_or(f64::NAN)),
            round(top_effect)
        );
        let (status, explanation) = if broken.is_empty() {
            (Status::Pass, summary)
        } else {
            (
                violated(cx.check.severity),
                format!("{}: {summary}", broken.join("; ")),
            )
        };
        Ok(Finding::new(status, explanation, metrics, evidence))
    }
}

/// One attributed component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Component {
    Resid { layer: usize, position: usize },
    Head { layer: usize, head: usize },
    Mlp { layer: usize },
    Latent { hook: HookPoint, latent: usize },
}

impl Component {
    /// TransformerLens's name, with the position or head in brackets.
    fn name(self) -> String {
        match self {
            Component::Resid { layer, position } => {
                format!("{}[{position}]", HookPoint::ResidPre(layer))
            }
            Component::Head { layer, head } => format!("blocks.{layer}.attn.hook_result[{head}]"),
            Component::Mlp { layer } => HookPoint::MlpOut(layer).to_string(),
            Component::Latent { hook, latent } => format!("{hook}.hook_sae_acts_post[{latent}]"),
        }
    }

    /// The hook it is patched at (and whose gradient it reads).
    fn hook(self) -> HookPoint {
        match self {
            Component::Resid { layer, .. } => HookPoint::ResidPre(layer),
            Component::Head { layer, .. } => HookPoint::AttnOut(layer),
            Component::Mlp { layer } => HookPoint::MlpOut(layer),
            Component::Latent { hook, .. } => hook,
        }
    }
}

/// The check's settings against the model: token pairs, metric tokens, hooks.
struct Run<'c, 'm> {
    check: &'c AttributionPatching,
    t: &'m Transformer,
    n_layers: usize,
    ids: Vec<(Vec<u32>, Vec<u32>)>,
    /// The metric, when it is read from one run's logits; `None` for `kl`.
    behaviour: Option<Behaviour>,
    /// How the refusal score's tokens were chosen, when they were measured.
    refusal_tokens: Vec<RefusalToken>,
    /// The SAE whose latents are attributed.
    sae: Option<ResolvedSae>,
    /// The first clean prompt's tokens, as text.
    first: Vec<String>,
    /// The heads the policy names, as (block, head) of this model.
    heads: Vec<(usize, usize)>,
}

/// What one pair's passes left: activations, gradients and estimates.
struct PairRun {
    corrupted: Vec<u32>,
    /// Clean minus corrupted activation per component family's hook, `[pos, d_model]`.
    deltas: BTreeMap<HookPoint, Tensor>,
    /// Per layer, clean minus corrupted head results `[pos, head, d_model]`.
    head_deltas: BTreeMap<usize, Tensor>,
    /// Clean minus corrupted latent coefficients at the SAE's hook, `[pos, d_sae]`.
    latent_deltas: Option<Tensor>,
    estimates: Vec<(Component, f64)>,
    /// The clean run's next-token log-probabilities, for `kl`.
    clean_logp: Vec<f64>,
    clean_metric: f64,
    baseline: f64,
}

impl<'c, 'm> Run<'c, 'm> {
    fn new(check: &'c AttributionPatching, cx: &mut Cx<'_, 'm>) -> Result<Self, CheckError> {
        let id = &cx.check.id;
        let policy = cx.policy;
        let bad = |at: &Loc, why: String| {
            CheckError::Unmeasurable(policy.error(at, format!("check `{id}`: {why}")).to_string())
        };
        let model = cx.session.model;
        let c = model.config();
        let mut heads = Vec::with_capacity(check.heads.len());
        for h in &check.heads {
            let (block, head) = h.value;
            let layer = block.resolve(c.n_layers).map_err(|why| bad(&h.at, why))?;
            heads.push((layer, head));
            if layer >= c.n_layers || head >= c.n_heads {
                return Err(bad(
                    &h.at,
                    format!(
                        "head `{layer}.{head}` is out of range: the model has {} blocks of {} \
                         heads (0.0 to {}.{})",
                        c.n_layers,
                        c.n_heads,
                        c.n_layers.saturating_sub(1),
                        c.n_heads.saturating_sub(1)
                    ),
                ));
            }
        }
        if check.families.heads && !model.transformer.heads_separable() {
            return Err(bad(
                &check.families_at,
                "attention heads cannot be captured in this model: it normalises each \
                 attention output before the residual add (sandwich norms), so a head's \
                 contribution is not separable; leave `heads` out of `components`"
                    .into(),
            ));
        }
        let mut refusal_tokens = Vec::new();
        let behaviour = match &check.metric {
            MetricKind::Kl => None,
            MetricKind::RefusalScore => {
                let (ids, chosen) = cx.instruments.score_tokens(cx.session, policy)?;
                refusal_tokens = chosen;
                Some(Behaviour::RefusalScore(ids))
            }
            MetricKind::LogitDiff(t) => {
                let mut ids = [0u32; 2];
                for (slot, text) in ids.iter_mut().zip(&t.value) {
                    let enc = model.codec.encode(text)?;
                    match enc[..] {
                        [one] => *slot = one,
                        _ => {
                            return Err(bad(
                                &t.at,
                                format!(
                                    "metric token {text:?} is {} tokens ({enc:?}), not one: \
                                     the logit difference needs single tokens",
                                    enc.len()
                                ),
                            ))
                        }
                    }
                }
                Some(Behaviour::LogitDiff {
                    positive: vec![ids[0]],
                    negative: vec![ids[1]],
                })
            }
        };
        let sae = match &check.sae {
            Some(name) => Some(cx.instruments.sae(policy, name)?),
            None => None,
        };
        let clean = cx.session.set_tokens(policy, &check.clean)?;
        let corrupted = cx.session.set_tokens(policy, &check.corrupted.value)?;
        let (a, b) = (clean.ids.len(), corrupted.ids.len());
        if a != b {
            return Err(bad(
                &check.corrupted.at,
                format!(
                    "`{}` has {a} prompts and `{}` {b}: they are paired line by line",
                    check.clean, check.corrupted.value
                ),
            ));
        }
        if a > MAX_PAIRS {
            return Err(bad(
                &check.corrupted.at,
                format!("{a} prompt pairs, more than the {MAX_PAIRS} a check may use"),
            ));
        }
        for (i, (x, y)) in clean.ids.iter().zip(corrupted.ids.iter()).enumerate() {
            if x.len() != y.len() {
                return Err(bad(
                    &check.corrupted.at,
                    format!(
                        "pair {} (line {} of `{}` and of `{}`): the clean prompt has {} tokens \
                         and the corrupted one {}: paired prompts need the same token length",
                        i + 1,
                        i + 1,
                        check.clean,
                        check.corrupted.value,
                        x.len(),
                        y.len()
                    ),
                ));
            }
        }
        let first = clean
            .ids
            .first()
            .map(|p| p.iter().map(|&t| cx.session.token_text(t)).collect())
            .unwrap_or_default();
        Ok(Self {
            check,
            t: &model.transformer,
            n_layers: c.n_layers,
            ids: clean
                .ids
                .iter()
                .cloned()
                .zip(corrupted.ids.iter().cloned())
                .collect(),
            behaviour,
            refusal_tokens,
            sae,
            first,
            heads,
        })
    }

    fn metric_name(&self) -> &'static str {
        match self.check.metric {
            MetricKind::LogitDiff(_) => "logit difference",
            MetricKind::RefusalScore => "refusal score",
            MetricKind::Kl => "KL(clean || run)",
        }
    }

    /// The hooks whose gradient the estimates read, and those whose activations they read.
    fn hooks(&self) -> (BTreeSet<HookPoint>, BTreeSet<HookPoint>) {
        let f = self.check.families;
        let (mut grad, mut acts) = (BTreeSet::new(), BTreeSet::new());
        for l in 0..self.n_layers {
            if f.resid {
                grad.insert(HookPoint::ResidPre(l));
                acts.insert(HookPoint::ResidPre(l));
            }
            if f.heads {
                grad.insert(HookPoint::AttnOut(l));
                acts.insert(HookPoint::ResidPre(l));
                acts.insert(HookPoint::AttnPattern(l));
            }
            if f.mlp {
                grad.insert(HookPoint::MlpOut(l));
                acts.insert(HookPoint::MlpOut(l));
            }
        }
        if let Some(s) = &self.sae {
            grad.insert(s.hook);
            acts.insert(s.hook);
        }
        (grad, acts)
    }

    /// The metric of one row of last-token logits, in f64.
    fn metric_of(&self, logits: &[f32], clean_logp: &[f64]) -> f64 {
        match &self.behaviour {
            Some(b) => b.value(logits),
            None => {
                let logq = log_softmax(logits);
                clean_logp
                    .iter()
                    .zip(&logq)
                    .map(|(p, q)| p.exp() * (p - q))
                    .sum()
            }
        }
    }

    /// The clean pass, the gradient pass on the corrupted prompt and every component's
    /// estimate.
    fn pair(&self, clean: &[u32], corrupted: &[u32]) -> Result<PairRun, CheckError> {
        let (grad_points, act_points) = self.hooks();
        let mut capture = Hooks::new();
        for h in &act_points {
            capture = capture.capture(*h);
        }
        let forward = |source| CheckError::Forward {
            set: self.check.clean.clone(),
            source,
        };
        let out = self
            .t
            .forward(&[clean.to_vec()], Padding::Left, &capture, Unembed::Last)
            .map_err(forward)?;
        let clean_last: Vec<f32> = out
            .logits
            .as_ref()
            .ok_or_else(|| CheckError::NonFinite("the clean pass produced no logits".into()))?
            .i(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let clean_logp = log_softmax(&clean_last);
        let clean_metric = self.metric_of(&clean_last, &clean_logp);
        let logp_tensor = Tensor::from_vec(
            clean_logp.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
            clean_logp.len(),
            self.t.device(),
        )?;
        let behaviour = self.behaviour.clone();
        let metric = move |logits: &Tensor, _: &probes::BatchLayout| {
            let last = logits.i(0)?; // [vocab]
            match &behaviour {
                Some(b) => b.tensor(&last.unsqueeze(0)?)?.sum_all(),
                None => {
                    // The shift only steadies exp; log-softmax does not depend on it.
                    let m = last.max_keepdim(D::Minus1)?.detach();
                    let lse = (last
                        .broadcast_sub(&m)?
                        .exp()?
                        .sum_keepdim(D::Minus1)?
                        .log()?
                        + &m)?;
                    let logq = last.broadcast_sub(&lse)?;
                    (logp_tensor.exp()? * (&logp_tensor - logq)?)?.sum_all()
                }
            }
        };
        let g = self
            .t
            .gradients(&[corrupted.to_vec()], &capture, &grad_points, &metric)
            .map_err(|source| CheckError::Forward {
                set: self.check.corrupted.value.clone(),
                source,
            })?;
        let row = |m: &BTreeMap<HookPoint, Tensor>, h: HookPoint| -> Result<Tensor, CheckError> {
            let x = m.get(&h).ok_or_else(|| {
                CheckError::Unmeasurable(format!("the pass did not capture `{h}`"))
            })?;
            Ok(x.i(0)?.to_dtype(DType::F32)?)
        };
        let mut deltas = BTreeMap::new();
        let mut head_deltas = BTreeMap::new();
        let mut estimates = Vec::new();
        let f = self.check.families;
        for l in 0..self.n_layers {
            if f.resid {
                let h = HookPoint::ResidPre(l);
                let d = (row(&out.captures, h)? - row(&g.acts, h)?)?; // [pos, d]
                let per_pos: Vec<f32> = (row(&g.grads, h)? * &d)?.sum(D::Minus1)?.to_vec1()?;
                for (position, e) in per_pos.into_iter().enumerate() {
                    estimates.push((Component::Resid { layer: l, position }, f64::from(e)));
                }
                deltas.insert(h, d);
            }
            if f.heads {
                let heads = |m: &BTreeMap<HookPoint, Tensor>| -> Result<Tensor, CheckError> {
                    let r = m.get(&HookPoint::ResidPre(l));
                    let p = m.get(&HookPoint::AttnPattern(l));
                    let (Some(r), Some(p)) = (r, p) else {
                        return Err(CheckError::Unmeasurable(format!(
                            "the pass did not capture block {l}'s attention"
                        )));
                    };
                    Ok(self.t.head_results(l, r, p)?.i(0)?)
                };
                let d = (heads(&out.captures)? - heads(&g.acts)?)?; // [pos, head, d]
                let grad = row(&g.grads, HookPoint::AttnOut(l))?.unsqueeze(1)?;
                let per_head: Vec<f32> =
                    d.broadcast_mul(&grad)?.sum(D::Minus1)?.sum(0)?.to_vec1()?;
                for (head, e) in per_head.into_iter().enumerate() {
                    estimates.push((Component::Head { layer: l, head }, f64::from(e)));
                }
                head_deltas.insert(l, d);
            }
            if f.mlp {
                let h = HookPoint::MlpOut(l);
                let d = (row(&out.captures, h)? - row(&g.acts, h)?)?;
                let e: f32 = (row(&g.grads, h)? * &d)?.sum_all()?.to_scalar()?;
                estimates.push((Component::Mlp { layer: l }, f64::from(e)));
                deltas.insert(h, d);
            }
        }
        let mut latent_deltas = None;
        if let Some(s) = &self.sae {
            let h = s.hook;
            let coefficients = |m: &BTreeMap<HookPoint, Tensor>| -> Result<Tensor, CheckError> {
                Ok(s.sae.contributions(&row(m, h)?)?)
            };
            let d = (coefficients(&out.captures)? - coefficients(&g.acts)?)?; // [pos, d_sae]
            let per_latent: Vec<f32> = s
                .sae
                .latent_effects(&d, &row(&g.grads, h)?)?
                .sum(0)?
                .to_vec1()?;
            let moved: Vec<f32> = d.abs()?.sum(0)?.to_vec1()?;
            for (latent, (e, m)) in per_latent.into_iter().zip(moved).enumerate() {
                if m > 0.0 {
                    estimates.push((Component::Latent { hook: h, latent }, f64::from(e)));
                }
            }
            latent_deltas = Some(d);
        }
        PairRun {
            corrupted: corrupted.to_vec(),
            deltas,
            head_deltas,
            latent_deltas,
            estimates,
            clean_logp,
            clean_metric,
            baseline: 0.0,
        }
        .with_baseline(self)
    }

    /// The real effect of each of `components` on this pair: one batched pass of the
    /// corrupted prompt, row 0 unpatched and row `i + 1` with component `i` set to its clean
    /// value; each effect is the row's metric minus row 0's.
    fn patch(&self, p: &PairRun, components: &[Component]) -> Result<Vec<f64>, CheckError> {
        let rows = components.len() + 1;
        let len = p.corrupted.len();
        let mut per_hook: BTreeMap<HookPoint, Vec<Option<Tensor>>> = BTreeMap::new();
        for (i, c) in components.iter().enumerate() {
            let delta = self.delta(p, *c)?;
            per_hook.entry(c.hook()).or_insert_with(|| vec![None; rows])[i + 1] = Some(delta);
        }
        let mut hooks = Hooks::new();
        for (hook, deltas) in per_hook {
            let d_model = deltas
                .iter()
                .flatten()
                .next()
                .map(|t| t.dim(1))
                .transpose()?
                .unwrap_or(0);
            let zero = Tensor::zeros((len, d_model), DType::F32, self.t.device())?;
            let stacked: Vec<Tensor> = deltas
                .into_iter()
                .map(|d| d.unwrap_or_else(|| zero.clone()))
                .collect();
            let delta = Tensor::stack(&stacked, 0)?; // [rows, pos, d]
            let f: ReplaceFn = Arc::new(move |x: &Tensor| x + &delta);
            hooks = hooks.replace(hook, Positions::All, f);
        }
        let prompts = vec![p.corrupted.clone(); rows];
        let out = self
            .t
            .forward(&prompts, Padding::Left, &hooks, Unembed::Last)
            .map_err(|source| CheckError::Forward {
                set: self.check.corrupted.value.clone(),
                source,
            })?;
        let logits: Vec<Vec<f32>> = out
            .logits
            .ok_or_else(|| CheckError::NonFinite("the patched pass produced no logits".into()))?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        let base = self.metric_of(&logits[0], &p.clean_logp);
        Ok(logits[1..]
            .iter()
            .map(|l| self.metric_of(l, &p.clean_logp) - base)
            .collect())
    }

    /// Clean minus corrupted activation of `c` at its hook, `[pos, d_model]`.
    fn delta(&self, p: &PairRun, c: Component) -> Result<Tensor, CheckError> {
        let missing = || CheckError::Unmeasurable(format!("no activations for `{}`", c.name()));
        Ok(match c {
            Component::Resid { position, .. } => {
                let d = p.deltas.get(&c.hook()).ok_or_else(missing)?;
                let len = d.dim(0)?;
                if position >= len {
                    return Tensor::zeros(d.shape(), DType::F32, d.device()).map_err(Into::into);
                }
                let mut mask = vec![0f32; len];
                mask[position] = 1.0;
                let mask = Tensor::from_vec(mask, (len, 1), d.device())?;
                d.broadcast_mul(&mask)?
            }
            Component::Head { layer, head } => p
                .head_deltas
                .get(&layer)
                .ok_or_else(missing)?
                .narrow(1, head, 1)?
                .squeeze(1)?
                .contiguous()?,
            Component::Mlp { .. } => p.deltas.get(&c.hook()).ok_or_else(missing)?.clone(),
            Component::Latent { latent, .. } => {
                let s = self.sae.as_ref().ok_or_else(missing)?;
                let d = p.latent_deltas.as_ref().ok_or_else(missing)?;
                s.sae.decoded_latent(d, latent)?
            }
        })
    }

    /// The residual stream's mean estimate, layer x position, when it is attributed.
    fn map(&self, estimates: &BTreeMap<Component, f64>) -> Option<AttributionMap> {
        if !self.check.families.resid {
            return None;
        }
        let width = self.ids.iter().map(|p| p.0.len()).max().unwrap_or(0);
        let mut rows = vec![vec![0.0; width]; self.n_layers];
        for (c, e) in estimates {
            if let Component::Resid { layer, position } = *c {
                rows[layer][position] = round(*e);
            }
        }
        Some(AttributionMap {
            hook: "hook_resid_pre".into(),
            tokens: self.first.clone(),
            rows,
        })
    }
}

impl PairRun {
    /// Row 0 of the patched pass with nothing patched: the corrupted metric, measured the
    /// way every patched row is.
    fn with_baseline(mut self, run: &Run<'_, '_>) -> Result<Self, CheckError> {
        let out = run
            .t
            .forward(
                &[self.corrupted.clone()],
                Padding::Left,
                &Hooks::new(),
                Unembed::Last,
            )
            .map_err(|source| CheckError::Forward {
                set: run.check.corrupted.value.clone(),
                source,
            })?;
        let logits: Vec<f32> = out
            .logits
            .ok_or_else(|| CheckError::NonFinite("the corrupted pass produced no logits".into()))?
            .i(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        self.baseline = run.metric_of(&logits, &self.clean_logp);
        Ok(self)
    }
}

/// Pearson correlation; `None` when either side does not vary or has fewer than 2 values.
pub(crate) fn correlation(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    if a.len() < 2 || a.len() != b.len() {
        return None;
    }
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

/// Ranks from 1, ties given their mean rank (for Spearman's correlation).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]).then(i.cmp(&j)));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::{metric, Tiny};

    /// An attribution-patching check over the tiny policy's `pos` (clean) and `neg`
    /// (corrupted) sets, after `extra` (more TOML, e.g. prompt sets) .
    fn check(fields: &str) -> String {
        format!(
            "\n[[checks]]\nid = \"ap\"\nkind = \"attribution_patching\"\nseverity = \"medium\"\n\
             clean = \"pos\"\ncorrupted = \"neg\"\n{fields}"
        )
    }

    /// The finding's explanation, asserting that it is an error naming the policy file,
    /// `line` and the check.
    fn error_at(f: &Finding, line: usize) -> &str {
        assert_eq!(f.status, Status::Error, "{f:?}");
        let e = &f.explanation;
        assert!(e.contains(&format!("tiny.toml:{line}:")), "{e}");
        assert!(e.contains("check `ap`"), "{e}");
        e
    }

    /// The 1-based line of the first line of the policy that starts with `start`.
    fn line_of(tiny: &Tiny, start: &str) -> usize {
        let text = std::fs::read_to_string(tiny.dir.path().join("policy/tiny.toml")).unwrap();
        text.lines().position(|l| l.starts_with(start)).unwrap() + 1
    }

    #[test]
    fn estimates_track_real_patching_on_the_tiny_model() {
        let tiny = Tiny::new();
        let f = tiny.finding(&check(
            "tokens = [\"w3\", \"w4\"]\ntop_k = 12\nmin_correlation = 0.8\nheads = [\"0.1\"]",
        ));
        assert_eq!(f.status, Status::Pass, "{f:?}");
        let r = metric(&f, "pearson");
        assert!((0.8..=1.0).contains(&r), "{r}");
        // The top 12 by estimate, then the named head.
        let c = &f.evidence.components;
        assert_eq!(c.len(), 13, "{c:?}");
        assert_eq!(c[12].component, "blocks.0.attn.hook_result[1]");
        for w in c[..12].windows(2) {
            assert!(w[0].estimate.abs() >= w[1].estimate.abs(), "{c:?}");
        }
        // Patching a component changes the metric: the effects are real measurements.
        assert!(c.iter().any(|x| x.effect.abs() > 1e-3), "{c:?}");
        let map = f.evidence.attribution_map.as_ref().unwrap();
        assert_eq!(map.rows.len(), probes::testing::LAYERS);
        assert_eq!(map.tokens.len(), map.rows[0].len());
        // The map holds the residual components' estimates.
        for x in c.iter().filter(|x| x.component.contains("resid_pre")) {
            let (layer, position) = (&x.component[7..8], &x.component[24..25]);
            let cell =
                map.rows[layer.parse::<usize>().unwrap()][position.parse::<usize>().unwrap()];
            assert_eq!(cell, x.estimate, "{}", x.component);
        }
    }

    #[test]
    fn sae_latents_are_attributed_and_patched_on_the_refusal_score() {
        let tiny = Tiny::new();
        let f = tiny.finding(&check(
            "metric = \"refusal_score\"\nsae = \"s\"\ncomponents = [\"mlp\"]\ntop_k = 8\n\
             min_correlation = 0.5\n\n[refusal]\ntokens = [\"w5\", \"w7\"]",
        ));
        assert_eq!(f.status, Status::Pass, "{f:?}");
        let latent = "blocks.0.hook_resid_post.hook_sae_acts_post[";
        let c = &f.evidence.components;
        let latents: Vec<_> = c
            .iter()
            .filter(|x| x.component.starts_with(latent))
            .collect();
        assert!(!latents.is_empty(), "{c:?}");
        assert!(latents.iter().any(|x| x.effect.abs() > 1e-4), "{c:?}");
        // Only the MLPs and the latents were asked for.
        assert!(c
            .iter()
            .all(|x| x.component.starts_with(latent) || x.component.ends_with("hook_mlp_out")));
        let clean = metric(&f, "refusal score on clean prompts");
        let corrupted = metric(&f, "refusal score on corrupted prompts");
        assert!(clean.is_finite() && corrupted.is_finite() && clean != corrupted);
    }

    #[test]
    fn an_unreachable_bound_fails() {
        let tiny = Tiny::new();
        let f = tiny.finding(&check(
            "metric = \"kl\"\ncomponents = [\"mlp\", \"heads\"]\nmin_top_effect = 1e6",
        ));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(
            f.explanation.contains("largest effect"),
            "{}",
            f.explanation
        );
        assert!(f.evidence.attribution_map.is_none());
        assert!(f
            .evidence
            .components
            .iter()
            .all(|c| !c.component.contains("resid")));
    }

    #[test]
    fn repeated_runs_are_byte_identical() {
        let tiny = Tiny::new();
        let c = check("tokens = [\"w3\", \"w4\"]\ntop_k = 6\nmin_correlation = 0.0");
        let a = serde_json::to_string(&tiny.finding(&c)).unwrap();
        let b = serde_json::to_string(&tiny.finding(&c)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn pairs_of_different_lengths_are_an_error_naming_the_pair() {
        let tiny = Tiny::new();
        let short: String = (0..8)
            .map(|i| format!("w{} w{}\n", 20 + i, 30 + i))
            .collect();
        std::fs::write(tiny.dir.path().join("policy/prompts/short.txt"), short).unwrap();
        let fields = "tokens = [\"w3\", \"w4\"]\nmin_correlation = 0.5\n\n\
                      [prompts.short]\nfile = \"prompts/short.txt\"\nchat = false";
        let f =
            tiny.finding(&check(fields).replace("corrupted = \"neg\"", "corrupted = \"short\""));
        let e = error_at(&f, line_of(&tiny, "corrupted ="));
        assert!(
            e.contains("pair 1") && e.contains("same token length"),
            "{e}"
        );
    }

    #[test]
    fn a_metric_token_of_several_tokens_is_an_error() {
        let tiny = Tiny::new();
        let f = tiny.finding(&check(
            "tokens = [\"w3 w5\", \"w4\"]\nmin_correlation = 0.5",
        ));
        let e = error_at(&f, line_of(&tiny, "tokens ="));
        assert!(e.contains("\"w3 w5\" is 2 tokens"), "{e}");
    }

    #[test]
    fn a_head_out_of_range_is_an_error() {
        let tiny = Tiny::new();
        let f = tiny.finding(&check(
            "tokens = [\"w3\", \"w4\"]\nheads = [\"1.9\"]\nmin_correlation = 0.5",
        ));
        let e = error_at(&f, line_of(&tiny, "heads ="));
        assert!(e.contains("head `1.9` is out of range"), "{e}");
    }

    #[test]
    fn bad_fields_are_errors_at_their_lines() {
        let tiny = Tiny::new();
        for (fields, needle) in [
            (
                "tokens = [\"w3\"]\nmin_correlation = 0.5",
                "[answer, other]",
            ),
            ("metric = \"kl\"\n", "without a bound"),
            (
                "metric = \"loss\"\nmin_correlation = 0.5",
                "unknown metric `loss`",
            ),
            (
                "metric = \"kl\"\ncomponents = [\"attn\"]\nmin_correlation = 0.5",
                "`attn`",
            ),
            ("metric = \"kl\"\nmin_correlation = 2.0", "outside [-1, 1]"),
            (
                "metric = \"refusal_score\"\ntokens = [\"w3\", \"w4\"]\nmin_correlation = 0.5",
                "`tokens` is for `logit_diff`, not `refusal_score`",
            ),
            (
                "metric = \"kl\"\nsae = \"nope\"\nmin_correlation = 0.5",
                "nope",
            ),
            (
                "metric = \"kl\"\ntop_k = 0\nmin_correlation = 0.5",
                "`top_k` 0",
            ),
        ] {
            let errors = match tiny.policy(&check(fields)) {
                Ok(_) => panic!("`{fields}` was accepted"),
                Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>(),
            };
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains(needle) && e.contains("tiny.toml:")),
                "{fields}: {errors:?}"
            );
        }
    }

    #[test]
    fn spearman_ranks_share_ties() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
        assert_eq!(correlation(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]), Some(1.0));
        assert_eq!(correlation(&[1.0, 1.0], &[2.0, 4.0]), None);
    }
}
