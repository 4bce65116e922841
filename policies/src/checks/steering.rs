//! `steering`: a behaviour metric (refusal score or rate, logit difference, KL) on a prompt
//! set with and without an intervention (a direction ablated or added, an SAE latent added),
//! held to bounds; an optional sweep of coefficients finds where the behaviour flips.

use std::sync::Arc;

use probes::hooks::{HookPoint, Hooks, Positions};

use serde::Deserialize;
use toml::Spanned;

use super::{at_least, at_most, attribution, violated, Cx, Kind, Planner};
use crate::error::CheckError;
use crate::load::{Located, Names, Validator};
use crate::metrics::{self, Behaviour};
use crate::refusal::{self, Classifier};
use crate::result::{
    round, Distribution, Evidence, Finding, GenerationPair, InterventionMeans, Metric,
    PromptEvidence, Status, SweepPoint,
};
use crate::schema::{Bounds, BoundsSpec, InterventionSpec, Metric as MetricKind, TargetTokens};
use crate::session::{Reply, Session, Tokens};

/// The fields of a `steering` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub prompts: Option<Spanned<String>>,
    pub intervention: Option<InterventionSpec>,
    pub metric: Option<MetricKind>,
    #[serde(default)]
    pub target: Option<TargetTokens>,
    /// Tokens whose probability is the refusal probability, each a single token (default:
    /// the policy's `[refusal]` tokens).
    #[serde(default)]
    pub refusal_tokens: Option<Spanned<Vec<Spanned<String>>>>,
    /// Phrases that mark a generation as a refusal, any one anywhere (case-insensitive;
    /// default: the marker classifier of `refusal.rs`).
    #[serde(default)]
    pub refusal_phrases: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Coefficients at which the metric is also measured, to find where behaviour flips.
    #[serde(default)]
    pub sweep: Vec<Spanned<f64>>,
    /// The metric value that counts as flipped (default 0 for scores, 0.5 for rates).
    #[serde(default)]
    pub flip_at: Option<Spanned<f64>>,
    #[serde(default)]
    pub bounds: Option<Spanned<BoundsSpec>>,
    /// Attribute the behaviour without the intervention to this SAE's latents (attribution
    /// patching, checked by ablating the top latents; see `attribution.rs`). Refusal rates
    /// and KL have no gradient: they attribute the refusal score.
    #[serde(default)]
    pub attribute_with: Option<Spanned<String>>,
}

#[derive(Debug, Clone)]
pub enum Intervention {
    Ablate {
        direction: String,
    },
    AddDirection {
        direction: String,
        coeff: f64,
    },
    AddLatent {
        sae: String,
        latent: Located<usize>,
        coeff: f64,
    },
}

/// A validated steering check.
#[derive(Debug, Clone)]
pub struct Steering {
    pub prompts: String,
    pub intervention: Intervention,
    pub metric: MetricKind,
    pub target: Option<(Vec<String>, Vec<String>)>,
    /// The check's own refusal tokens; `None`: the policy's (see
    /// [`crate::instruments::Instruments::score_tokens`]).
    pub refusal_tokens: Option<Vec<Located<String>>>,
    pub classifier: Classifier,
    pub max_tokens: usize,
    pub sweep: Vec<f64>,
    pub flip_at: f64,
    pub bounds: Bounds,
    pub attribute_with: Option<String>,
}

impl Kind for Steering {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self> {
        let p = v.required(id, "prompts", &spec.prompts)?;
        let prompts = v.set(p, n.prompts)?;
        let iv = v.required(id, "intervention", &spec.intervention)?;
        let coeff = |v: &mut Validator<'_>, want: bool| -> Option<f64> {
            match (&iv.coeff, want) {
                (Some(x), true) => v.finite_at(x, "coeff"),
                (None, true) => {
                    v.err(id, "this intervention needs `coeff`");
                    None
                }
                (Some(x), false) => {
                    v.err(x, "an ablation takes no `coeff`");
                    None
                }
                (None, false) => Some(0.0),
            }
        };
        let intervention = match (&iv.ablate, &iv.add_direction, &iv.add_latent) {
            (Some(d), None, None) => {
                coeff(v, false)?;
                Intervention::Ablate {
                    direction: v.named("direction", d, n.directions)?,
                }
            }
            (None, Some(d), None) => Intervention::AddDirection {
                direction: v.named("direction", d, n.directions)?,
                coeff: coeff(v, true)?,
            },
            (None, None, Some(l)) => {
                let Some(s) = &iv.sae else {
                    v.err(id, "`add_latent` needs `sae`");
                    return None;
                };
                let sae = v.named("SAE", s, n.saes)?;
                let latent = v.latent(l, &n.saes[&sae])?;
                Intervention::AddLatent {
                    sae,
                    latent,
                    coeff: coeff(v, true)?,
                }
            }
            _ => {
                v.err(
                    id,
                    "an intervention is exactly one of `ablate`, `add_direction` or `add_latent`",
                );
                return None;
            }
        };
        let metric = *v.required(id, "metric", &spec.metric)?;
        let target = match (&spec.target, metric) {
            (Some(t), MetricKind::LogitDiff) => target_words(v, t),
            (None, MetricKind::LogitDiff) => {
                v.err(id, "the `logit_diff` metric needs `target = { positive = [...], negative = [...] }`");
                None
            }
            (Some(_), _) => {
                v.err(id, "`target` belongs to the `logit_diff` metric");
                None
            }
            (None, _) => None,
        };
        if !spec.sweep.is_empty() && matches!(intervention, Intervention::Ablate { .. }) {
            v.err(
                id,
                "`sweep` scales an added vector's coefficient; an ablation has none",
            );
        }
        let sweep: Vec<f64> = spec
            .sweep
            .iter()
            .filter_map(|x| v.finite_at(x, "sweep"))
            .collect();
        let rate = metric == MetricKind::RefusalRate;
        let bounds = match &spec.bounds {
            Some(b) => bounds(v, b, rate)?,
            None => Bounds::default(),
        };
        if bounds == Bounds::default() {
            let at = spec.bounds.as_ref().map_or(id.span(), |b| b.span());
            v.err(&Spanned::new(at, ()), "a steering check needs `bounds` (min, max, min_change, max_change, max_relative_drop, min_baseline or max_flip_coeff)");
        }
        if bounds.max_flip_coeff.is_some() && spec.sweep.is_empty() {
            v.err(id, "`max_flip_coeff` needs a `sweep`");
        }
        let flip_at = match &spec.flip_at {
            Some(x) if rate => v.within(x, "flip_at", 0.0, 1.0)?,
            Some(x) => v.finite_at(x, "flip_at")?,
            None if rate => 0.5,
            None => 0.0,
        };
        if let Some(t) = &spec.refusal_tokens {
            v.words(t, "refusal_tokens");
        }
        if let Some(p) = &spec.refusal_phrases {
            v.words(p, "refusal_phrases");
        }
        let attribute_with = match &spec.attribute_with {
            Some(s) => Some(v.named("SAE", s, n.saes)?),
            None => None,
        };
        let max_tokens = spec.max_tokens.unwrap_or(32);
        if max_tokens == 0 || max_tokens > 512 {
            v.err(id, "`max_tokens` must be between 1 and 512");
        }
        Some(Steering {
            prompts,
            intervention,
            metric,
            target,
            refusal_tokens: spec
                .refusal_tokens
                .as_ref()
                .map(|t| t.get_ref().iter().map(|w| v.located(w)).collect()),
            classifier: match &spec.refusal_phrases {
                Some(p) => {
                    Classifier::Phrases(p.get_ref().iter().map(|x| x.get_ref().clone()).collect())
                }
                None => Classifier::Markers,
            },
            max_tokens,
            sweep,
            flip_at,
            bounds,
            attribute_with,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        plan(self, p)
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        evaluate(self, cx)
    }
}

/// A `logit_diff` target: two non-empty lists of words, none blank, none in both (a word
/// on both sides cancels out of the difference).
fn target_words(v: &mut Validator<'_>, t: &TargetTokens) -> Option<(Vec<String>, Vec<String>)> {
    let ok = v.words(&t.positive, "target.positive") & v.words(&t.negative, "target.negative");
    if !ok {
        return None;
    }
    let words = |l: &Spanned<Vec<Spanned<String>>>| -> Vec<String> {
        l.get_ref().iter().map(|w| w.get_ref().clone()).collect()
    };
    let (positive, negative) = (words(&t.positive), words(&t.negative));
    if let Some(w) = t
        .negative
        .get_ref()
        .iter()
        .find(|w| positive.contains(w.get_ref()))
    {
        v.err(
            w,
            format!(
                "`{}` is in both `target.positive` and `target.negative`: it cancels out of \
                 the logit difference",
                w.get_ref()
            ),
        );
        return None;
    }
    Some((positive, negative))
}

/// A steering check's `bounds`, each value finite (a NaN bound can never be violated) and
/// in its range: a refusal rate's `min`, `max` and `min_baseline` within [0, 1];
/// `max_flip_coeff`, held to a coefficient's magnitude, at least 0; each lower bound at most
/// its upper bound. Every error is at its value's line.
fn bounds(v: &mut Validator<'_>, b: &Spanned<BoundsSpec>, rate: bool) -> Option<Bounds> {
    let b = b.get_ref();
    let before = v.error_count();
    let mut value = |x: &Option<Spanned<f64>>, field: &str, lo: f64, hi: f64| -> Option<f64> {
        let (x, field) = (x.as_ref()?, format!("bounds.{field}"));
        v.finite_at(x, &field)?;
        v.within(x, &field, lo, hi)
    };
    let any = (f64::NEG_INFINITY, f64::INFINITY);
    let rate_range = if rate { (0.0, 1.0) } else { any };
    let out = Bounds {
        min: value(&b.min, "min", rate_range.0, rate_range.1),
        max: value(&b.max, "max", rate_range.0, rate_range.1),
        min_change: value(&b.min_change, "min_change", any.0, any.1),
        max_change: value(&b.max_change, "max_change", any.0, any.1),
        max_relative_drop: value(&b.max_relative_drop, "max_relative_drop", any.0, any.1),
        min_baseline: value(&b.min_baseline, "min_baseline", rate_range.0, rate_range.1),
        max_flip_coeff: value(&b.max_flip_coeff, "max_flip_coeff", 0.0, f64::INFINITY),
    };
    for (lo, hi, at, what) in [
        (
            out.min,
            out.max,
            &b.max,
            "`bounds.max` is below `bounds.min`",
        ),
        (
            out.min_change,
            out.max_change,
            &b.max_change,
            "`bounds.max_change` is below `bounds.min_change`",
        ),
    ] {
        if let (Some(lo), Some(hi), Some(at)) = (lo, hi, at) {
            if lo > hi {
                v.err(at, format!("{what} ({hi} < {lo}): no value meets both"));
            }
        }
    }
    (v.error_count() == before).then_some(out)
}

fn plan(st: &Steering, p: &mut Planner<'_, '_>) {
    if let Some(words) = &st.refusal_tokens {
        let errors = refusal::token_errors(p.session, p.policy, words);
        p.errors.extend(errors);
    }
    if let Intervention::AddLatent { sae, latent, .. } = &st.intervention {
        if let Some(s) = p.instruments.sae_if_resolved(p.policy, sae) {
            if let Err(e) = s.sae.check_latent(latent.value) {
                p.errors.push(p.policy.error(&latent.at, e.to_string()));
            }
        }
    }
    let attribution = st
        .attribute_with
        .as_deref()
        .and_then(|a| p.instruments.sae_if_resolved(p.policy, a));
    if let Some(a) = attribution {
        p.want(&st.prompts, a.hook);
    }
    // A logit metric under an added direction runs from the set's activations at its hook
    // (the unhooked pass that measures the baseline captures them).
    let logits = matches!(st.metric, MetricKind::RefusalScore | MetricKind::LogitDiff);
    if let (true, Intervention::AddDirection { direction, .. }) = (logits, &st.intervention) {
        if let Some(h) = p.direction_hook(direction) {
            p.want(&st.prompts, h);
        }
    }
}

fn intervention_hooks(
    cx: &Cx<'_, '_>,
    i: &Intervention,
    coeff: Option<f64>,
) -> Result<(Hooks, Option<HookPoint>), CheckError> {
    let p = cx.policy;
    Ok(match i {
        Intervention::Ablate { direction } => {
            let d = cx.instruments.direction(p, direction)?;
            (
                Hooks::new().ablate_everywhere(cx.session.n_layers(), &d.unit),
                Some(d.hook),
            )
        }
        Intervention::AddDirection {
            direction,
            coeff: c,
        } => {
            let d = cx.instruments.direction(p, direction)?;
            let c = coeff.unwrap_or(*c) as f32;
            (
                Hooks::new().add(d.hook, Positions::All, d.raw.clone(), c),
                Some(d.hook),
            )
        }
        Intervention::AddLatent {
            sae,
            latent,
            coeff: c,
        } => {
            let s = cx.instruments.sae(p, sae)?;
            let v = s.sae.decoder_direction(latent.value)?;
            let c = coeff.unwrap_or(*c) as f32;
            (Hooks::new().add(s.hook, Positions::All, v, c), Some(s.hook))
        }
    })
}

fn logit_metric(
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

/// A per-prompt metric, and for the refusal rate the examples' whole replies.
type Measured = (Vec<f64>, Option<Vec<String>>);

/// Each reply's refusal (1) or not (0), and the whole replies the verdicts carry.
fn rates_and_replies(v: &[Reply]) -> Measured {
    (
        v.iter().map(|r| f64::from(u8::from(r.refused))).collect(),
        Some(v.iter().filter_map(|r| r.whole.clone()).collect()),
    )
}

fn evaluate(st: &Steering, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
    let (p, severity) = (cx.policy, cx.check.severity);
    let Steering {
        prompts,
        intervention,
        metric,
        target,
        refusal_tokens,
        classifier,
        max_tokens,
        sweep,
        flip_at,
        bounds,
        attribute_with,
    } = st;
    let t = cx.session.set_tokens(p, prompts)?;
    let mut evidence = Evidence::default();
    let refusal_ids = match (metric, refusal_tokens) {
        (MetricKind::RefusalScore, Some(words)) => refusal::single_tokens(cx.session, p, words)?,
        (MetricKind::RefusalScore, None) => {
            let (ids, chosen) = cx.instruments.score_tokens(cx.session, p)?;
            evidence.refusal_tokens = chosen;
            ids
        }
        _ => Vec::new(),
    };
    let target_ids = match target {
        Some((pos, neg)) => (cx.session.first_tokens(pos)?, cx.session.first_tokens(neg)?),
        None => (Vec::new(), Vec::new()),
    };
    let (hooks, hook) = intervention_hooks(cx, intervention, None)?;
    // Example generations with and without the intervention, of the first prompts.
    let n_examples = 4.min(t.ids.len());
    // Per-prompt metric under `h`; for the refusal rate, also the examples' whole replies
    // (their rows run on in the generation that decides the verdicts).
    let measure = |eng: &mut Session<'_>, h: &Hooks| -> Result<Measured, CheckError> {
        Ok(match metric {
            MetricKind::RefusalScore | MetricKind::LogitDiff => {
                let l = eng.last_logits(&t, h)?;
                (logit_metric(&l, *metric, &refusal_ids, &target_ids), None)
            }
            MetricKind::RefusalRate => {
                rates_and_replies(&eng.verdicts(&t, h, *max_tokens, classifier, n_examples)?)
            }
            MetricKind::Kl if h.is_empty() => (vec![0.0; t.ids.len()], None),
            MetricKind::Kl => (eng.kl_per_prompt(&t, h)?, None),
        })
    };
    let ((base, base_replies), (value, value_replies)) = match metric {
        // Two generations: decoded at once, they share each step's reading of the weights.
        MetricKind::RefusalRate => {
            let (b, v) = cx.session.verdicts_with_and_without(
                &t,
                &hooks,
                *max_tokens,
                classifier,
                n_examples,
            )?;
            (rates_and_replies(&b), rates_and_replies(&v))
        }
        _ => (
            measure(cx.session, &Hooks::new())?,
            measure(cx.session, &hooks)?,
        ),
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (b, v) = (mean(&base), mean(&value));
    let mname = metric_name(*metric);
    evidence.intervention = Some(InterventionMeans {
        set: prompts.clone(),
        metric: mname.into(),
        without: round(b),
        with: round(v),
    });
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
            let (h, _) = intervention_hooks(cx, intervention, Some(c))?;
            mean(&measure(cx.session, &h)?.0)
        };
        if m.is_nan() {
            return Err(CheckError::NonFinite(format!(
                "{mname} at sweep coefficient {c} is NaN"
            )));
        }
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
    // Whole replies: the refusal rate's, or replies of 24 tokens.
    let (bg, vg) = match (base_replies, value_replies) {
        (Some(b), Some(v)) => (Arc::new(b), Arc::new(v)),
        _ => {
            let ex = Tokens {
                ids: Arc::new(t.ids[..n_examples].to_vec()),
                texts: Arc::new(t.texts[..n_examples].to_vec()),
                key: format!("{}:examples", t.key),
                ..t.clone()
            };
            cx.session.generations_with_and_without(&ex, &hooks, 24)?
        }
    };
    for i in 0..n_examples {
        evidence.generations.push(GenerationPair {
            prompt: t.texts[i].clone(),
            baseline: bg[i].clone(),
            intervened: vg[i].clone(),
            baseline_refused: classifier.refused(&bg[i]),
            intervened_refused: classifier.refused(&vg[i]),
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
    let mut attributed = None;
    if let Some(sae_name) = attribute_with {
        let s = cx.instruments.sae(p, sae_name)?;
        let behaviour = match metric {
            MetricKind::LogitDiff => Behaviour::LogitDiff {
                positive: target_ids.0.clone(),
                negative: target_ids.1.clone(),
            },
            MetricKind::RefusalScore => Behaviour::RefusalScore(refusal_ids.clone()),
            // Rates and KL have no gradient: their latents are those of the refusal score.
            MetricKind::RefusalRate | MetricKind::Kl => {
                let (ids, chosen) = cx.instruments.score_tokens(cx.session, p)?;
                evidence.refusal_tokens = chosen;
                Behaviour::RefusalScore(ids)
            }
        };
        let (latents, fit) = attribution::attribute(cx.session, &s, &t, &behaviour)?;
        evidence.latents = latents;
        attributed = Some(fit);
    }
    let (mut metric_rows, violations, undefined) = judge(mname, b, v, flip, bounds)?;
    metric_rows.extend(attributed);
    let status = if !violations.is_empty() {
        violated(severity)
    } else if undefined.is_some() {
        Status::Warn
    } else {
        Status::Pass
    };
    let what = describe(intervention, hook);
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

fn metric_name(m: MetricKind) -> &'static str {
    match m {
        MetricKind::RefusalScore => "refusal score",
        MetricKind::RefusalRate => "refusal rate",
        MetricKind::LogitDiff => "logit difference",
        MetricKind::Kl => "KL divergence",
    }
}

/// The intervention in words, naming the hook its direction was read at.
fn describe(i: &Intervention, hook: Option<HookPoint>) -> String {
    let at = hook
        .map(|h| format!(" (read at `{h}`)"))
        .unwrap_or_default();
    match i {
        Intervention::Ablate { direction } => {
            format!("the one direction `{direction}`{at} ablated at every layer")
        }
        Intervention::AddDirection { direction, coeff } => {
            format!("{coeff} x direction `{direction}`{at} added")
        }
        Intervention::AddLatent { sae, latent, coeff } => format!(
            "{coeff} x the decoder direction of latent {} of SAE `{sae}` added",
            latent.value
        ),
    }
}

/// The metric rows, the violated bounds, and why a bound could not be evaluated (if one could
/// not).
type Judged = (Vec<Metric>, Vec<String>, Option<String>);

/// Hold the baseline `b`, the value `v` and the flip coefficient to `bounds`. A NaN metric or
/// bound is an error, never a pass: every comparison with NaN is false.
fn judge(
    name: &str,
    b: f64,
    v: f64,
    flip: Option<f64>,
    bounds: &Bounds,
) -> Result<Judged, CheckError> {
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
    let without = format!("{name} without intervention");
    let with = format!("{name} with intervention");
    for (what, x) in [(&without, b), (&with, v)] {
        if x.is_nan() {
            return Err(CheckError::NonFinite(format!("{what} is NaN")));
        }
    }
    if let Some(x) = bounds.min_baseline {
        if !at_least(&without, b, x)? {
            bad.push(format!("{name} without intervention is {b:.3}, below {x}"));
        }
    }
    if let Some(x) = bounds.min {
        if !at_least(&with, v, x)? {
            bad.push(format!("{name} with intervention is {v:.3}, below {x}"));
        }
    }
    if let Some(x) = bounds.max {
        if !at_most(&with, v, x)? {
            bad.push(format!("{name} with intervention is {v:.3}, above {x}"));
        }
    }
    if let Some(x) = bounds.min_change {
        if !at_least("the change", v - b, x)? {
            bad.push(format!("the change {:.3} is below {x}", v - b));
        }
    }
    if let Some(x) = bounds.max_change {
        if !at_most("the change", v - b, x)? {
            bad.push(format!("the change {:.3} is above {x}", v - b));
        }
    }
    if let Some(x) = bounds.max_relative_drop {
        if b.is_nan() {
            at_most(&without, b, x)?;
        }
        if b > 0.0 {
            let drop = (b - v) / b;
            rows.push(Metric {
                name: "relative drop".into(),
                value: round(drop),
                bound: format!("<= {x}"),
            });
            if !at_most("the relative drop", drop, x)? {
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
            Some(c) if at_most("the flip coefficient", c.abs(), x)? => {}
            Some(c) => bad.push(format!(
                "behaviour flips only at coefficient {c}, beyond {x}"
            )),
            None => bad.push(format!(
                "no swept coefficient up to {x} flips the behaviour"
            )),
        }
    }
    Ok((rows, bad, undefined))
}

#[cfg(test)]
mod tests {
    use crate::checks::testing::{metric, Tiny};
    use crate::engine::{run, RunOptions};
    use crate::result::Status;

    const SCORE: &str = r#"
[[checks]]
id = "score"
kind = "steering"
severity = "medium"
prompts = "neg"
intervention = { add_direction = "d", coeff = 2.0 }
metric = "refusal_score"
bounds = { max = 1000.0 }
"#;

    /// The run's policy errors for `checks` (which must not resolve), one per line.
    fn resolve_errors(tiny: &Tiny, checks: &str) -> String {
        let policy = tiny.policy(checks).expect("the test policy validates");
        let mut quiet = |_: &str| {};
        let mut opts = RunOptions {
            last_pass: None,
            progress: &mut quiet,
            micro_batch: 3,
            lineage: None,
            store: Some(tiny.store()),
            reference: None,
        };
        match run(&tiny.model, &[policy], &mut opts) {
            Ok(_) => panic!("the policy resolved"),
            Err(e) => e.to_string(),
        }
    }

    /// `file:line:` of the first line of the tiny policy that contains `needle`.
    fn line_of(tiny: &Tiny, needle: &str) -> String {
        let path = tiny.dir.path().join("policy/tiny.toml");
        let text = std::fs::read_to_string(&path).expect("the policy was written");
        let n = text
            .lines()
            .position(|l| l.contains(needle))
            .expect("the needle is in the policy");
        format!("{}:{}:", path.display(), n + 1)
    }

    #[test]
    fn a_refusal_token_of_several_tokens_is_an_error_at_its_line() {
        let tiny = Tiny::new();
        let checks = format!("{SCORE}refusal_tokens = [\n  \"w3\",\n  \"w3 w4\",\n]\n");
        let e = resolve_errors(&tiny, &checks);
        let at = line_of(&tiny, "\"w3 w4\"");
        assert!(e.contains(&at), "{e}");
        assert!(e.contains("`w3 w4` is 2 tokens"), "{e}");
        assert!(!e.contains("`w3` is"), "{e}");
    }

    #[test]
    fn a_policy_refusal_token_that_is_blank_is_an_error_at_its_line() {
        // Refused at validation, before any model is read: a blank token has no token id.
        let tiny = Tiny::new();
        let checks = format!("\n[refusal]\ntokens = [\"\"]\n{SCORE}");
        let errors = tiny.policy(&checks).unwrap_err();
        let e = errors[0].to_string();
        let at = line_of(&tiny, "tokens = [\"\"]");
        assert!(e.starts_with(&at), "{e}");
        assert!(e.contains("empty or blank entry"), "{e}");
    }

    #[test]
    fn a_nan_metric_or_bound_is_an_error_never_a_pass() {
        use super::judge;
        use crate::schema::Bounds;
        // Defence in depth: validation refuses NaN bounds, and judging never passes one.
        let max = Bounds {
            max: Some(f64::NAN),
            ..Bounds::default()
        };
        assert!(judge("kl", 0.0, 0.711, None, &max).is_err());
        let drop = Bounds {
            min_baseline: Some(f64::NAN),
            max_relative_drop: Some(f64::NAN),
            ..Bounds::default()
        };
        assert!(judge("refusal rate", 0.25, 0.0, None, &drop).is_err());
        let flip = Bounds {
            max_flip_coeff: Some(f64::NAN),
            ..Bounds::default()
        };
        assert!(judge("refusal score", -1.0, 1.0, Some(2.0), &flip).is_err());
        let finite = Bounds {
            max: Some(1.0),
            ..Bounds::default()
        };
        assert!(judge("kl", f64::NAN, f64::NAN, None, &finite).is_err());
        // A finite bound still judges.
        let (_, violated, _) = judge("kl", 0.0, 0.711, None, &finite).unwrap();
        assert!(violated.is_empty());
        let tight = Bounds {
            max: Some(0.1),
            ..Bounds::default()
        };
        assert_eq!(judge("kl", 0.0, 0.711, None, &tight).unwrap().1.len(), 1);
    }

    #[test]
    fn listed_policy_refusal_tokens_are_scored() {
        let tiny = Tiny::new();
        let listed = tiny.finding(&format!("\n[refusal]\ntokens = [\"w3\"]\n{SCORE}"));
        let check = tiny.finding(&format!("{SCORE}refusal_tokens = [\"w3\"]\n"));
        let default = tiny.finding(SCORE);
        assert_eq!(listed.status, Status::Pass, "{listed:?}");
        let score = |f: &crate::result::Finding| metric(f, "refusal score without");
        assert_eq!(score(&listed), score(&check));
        assert_ne!(score(&listed), score(&default));
    }

    #[test]
    fn a_model_that_refuses_nothing_has_no_refusal_tokens() {
        let tiny = Tiny::new();
        let f = tiny.finding(&format!(
            "\n[refusal]\nrefusing = \"pos\"\ncomplying = \"neg\"\n{SCORE}"
        ));
        assert_eq!(f.status, Status::Error, "{f:?}");
        assert!(
            f.explanation.contains("refused none of the 16 prompts"),
            "{}",
            f.explanation
        );
    }

    #[test]
    fn the_refusal_table_takes_sets_or_tokens() {
        let tiny = Tiny::new();
        let errors = tiny
            .policy(&format!("\n[refusal]\nrefusing = \"pos\"\n{SCORE}"))
            .unwrap_err();
        assert!(
            errors[0]
                .message
                .contains("both `refusing` and `complying`"),
            "{errors:?}"
        );
        let errors = tiny
            .policy(&format!(
                "\n[refusal]\nrefusing = \"pos\"\ncomplying = \"nope\"\n{SCORE}"
            ))
            .unwrap_err();
        assert!(
            errors[0].message.contains("no prompt set `nope`"),
            "{errors:?}"
        );
    }

    #[test]
    fn ablating_a_direction_moves_the_next_token_distribution() {
        let tiny = Tiny::new();
        let f = tiny.finding(
            r#"
[[checks]]
id = "kl"
kind = "steering"
severity = "medium"
prompts = "neg"
intervention = { ablate = "d" }
metric = "kl"
bounds = { max = 1000.0 }
"#,
        );
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert_eq!(metric(&f, "KL divergence without"), 0.0);
        assert!(metric(&f, "KL divergence with intervention") > 0.0, "{f:?}");
        assert_eq!(f.evidence.generations.len(), 4);
        // The means for the report's bar chart are the finding's own metrics.
        let means = f
            .evidence
            .intervention
            .as_ref()
            .expect("the means are recorded");
        assert_eq!(
            (means.set.as_str(), means.metric.as_str()),
            ("neg", "KL divergence")
        );
        assert_eq!(means.without, metric(&f, "KL divergence without"));
        assert_eq!(means.with, metric(&f, "KL divergence with intervention"));
    }

    #[test]
    fn a_sweep_measures_each_coefficient_and_bounds_are_held() {
        let tiny = Tiny::new();
        let f = tiny.finding(
            r#"
[[checks]]
id = "add"
kind = "steering"
severity = "high"
prompts = "neg"
intervention = { add_direction = "d", coeff = 2.0 }
metric = "logit_diff"
target = { positive = ["w3"], negative = ["w4"] }
sweep = [0.0, 2.0]
bounds = { max_change = -1000.0 }
"#,
        );
        // No change is below -1000: the bound is violated.
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert_eq!(f.evidence.sweep.len(), 2);
        // At coefficient 0 nothing is added: the sweep point equals the baseline.
        let base = metric(&f, "logit difference without");
        assert!((f.evidence.sweep[0].value - base).abs() < 1e-4, "{f:?}");
        let with = metric(&f, "logit difference with intervention");
        assert_eq!(f.evidence.sweep[1].value, with);
    }

    #[test]
    fn an_ablation_takes_no_sweep() {
        let tiny = Tiny::new();
        let errors = tiny
            .policy(
                r#"
[[checks]]
id = "s"
kind = "steering"
severity = "high"
prompts = "neg"
intervention = { ablate = "d" }
metric = "kl"
sweep = [1.0]
bounds = { max = 1.0 }
"#,
            )
            .unwrap_err();
        assert!(
            errors[0].to_string().contains("an ablation has none"),
            "{errors:?}"
        );
    }
}
