//! `feature_probe`: how often chosen SAE latents fire on prompt sets, held to expected
//! fractions. The latents are listed (by index or label) or selected as the few that best
//! separate two prompt sets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use probes::sae::SparseRow;

use serde::Deserialize;
use toml::Spanned;

use super::{violated, Cx, Kind, Planner};
use crate::error::CheckError;
use crate::load::{Located, Names, Validator};
use crate::result::{
    round, Distribution, Evidence, Finding, LatentEvidence, Metric, PromptEvidence, Status,
};
use crate::schema::{Aggregate, ExpectSet, LatentRef, Select, TokenScope};
use crate::session::Tokens;

/// The fields of a `feature_probe` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub sae: Option<Spanned<String>>,
    /// Latents by index or by label.
    #[serde(default)]
    pub latents: Vec<Spanned<LatentRef>>,
    /// Or pick the latents that best separate two prompt sets.
    #[serde(default)]
    pub select: Option<Select>,
    /// `max` (default) or `mean` over the scored tokens.
    #[serde(default)]
    pub aggregate: Option<Aggregate>,
    /// `prompt` (default) or `last`.
    #[serde(default)]
    pub tokens: Option<TokenScope>,
    /// A prompt counts as active when its aggregated activation exceeds this.
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default)]
    pub expect: Vec<ExpectSet>,
}

/// A validated feature probe.
#[derive(Debug, Clone)]
pub struct FeatureProbe {
    pub sae: String,
    pub latents: LatentChoice,
    pub aggregate: Aggregate,
    pub tokens: TokenScope,
    pub threshold: f64,
    pub expect: Vec<Expectation>,
}

#[derive(Debug, Clone)]
pub enum LatentChoice {
    /// Resolved indices (labels already looked up).
    Listed(Vec<Located<usize>>),
    Select {
        top: usize,
        positive: String,
        negative: String,
    },
}

#[derive(Debug, Clone)]
pub struct Expectation {
    pub prompts: String,
    pub min_active_fraction: Option<f64>,
    pub max_active_fraction: Option<f64>,
}

impl Kind for FeatureProbe {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self> {
        let sae_name = v.required(id, "sae", &spec.sae)?;
        let sae = v.named("SAE", sae_name, n.saes)?;
        let entry = &n.saes[&sae];
        let latents = match (&spec.select, spec.latents.is_empty()) {
            (Some(s), true) => {
                if s.top == 0 {
                    v.err(id, "`select.top` must be at least 1");
                }
                LatentChoice::Select {
                    top: s.top,
                    positive: v.set(&s.positive, n.prompts)?,
                    negative: v.set(&s.negative, n.prompts)?,
                }
            }
            (None, false) => LatentChoice::Listed(
                spec.latents
                    .iter()
                    .filter_map(|r| v.latent(r, entry))
                    .collect(),
            ),
            _ => {
                v.err(
                    id,
                    "a feature probe needs either `latents` or `select`, not both",
                );
                return None;
            }
        };
        if spec.expect.is_empty() {
            v.err(id, "a feature probe needs at least one [[checks.expect]]");
        }
        let mut expect = Vec::new();
        for e in &spec.expect {
            let prompts = v.set(&e.prompts, n.prompts)?;
            for f in [e.min_active_fraction, e.max_active_fraction]
                .into_iter()
                .flatten()
            {
                if !(0.0..=1.0).contains(&f) {
                    v.err(&e.prompts, format!("fraction {f} is outside [0, 1]"));
                }
            }
            if e.min_active_fraction.is_none() && e.max_active_fraction.is_none() {
                v.err(
                    &e.prompts,
                    "an expectation needs `min_active_fraction` or `max_active_fraction`",
                );
            }
            expect.push(Expectation {
                prompts,
                min_active_fraction: e.min_active_fraction,
                max_active_fraction: e.max_active_fraction,
            });
        }
        Some(FeatureProbe {
            sae,
            latents,
            aggregate: spec.aggregate.unwrap_or(Aggregate::Max),
            tokens: spec.tokens.unwrap_or(TokenScope::Prompt),
            threshold: v.finite(id, "threshold", spec.threshold.unwrap_or(0.0))?,
            expect,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        plan(self, p)
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        evaluate(self, cx)
    }
}

fn plan(k: &FeatureProbe, p: &mut Planner<'_, '_>) {
    let FeatureProbe {
        sae,
        latents,
        expect,
        ..
    } = k;
    let Some(s) = p.instruments.sae_if_resolved(p.policy, sae) else {
        return;
    };
    if let LatentChoice::Listed(ls) = latents {
        for l in ls {
            if let Err(e) = s.sae.check_latent(l.value) {
                p.errors.push(p.policy.error(&l.at, e.to_string()));
            }
        }
    }
    let mut sets: Vec<&String> = expect.iter().map(|e| &e.prompts).collect();
    if let LatentChoice::Select {
        positive, negative, ..
    } = latents
    {
        sets.extend([positive, negative]);
    }
    for set in sets {
        p.want(set, s.hook);
    }
}

fn evaluate(k: &FeatureProbe, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
    let FeatureProbe {
        sae: sae_name,
        latents: choice,
        aggregate,
        tokens: scope,
        threshold,
        expect,
    } = k;
    let (aggregate, scope, threshold) = (*aggregate, *scope, *threshold);
    let (p, severity) = (cx.policy, cx.check.severity);
    let s = cx.instruments.sae(p, sae_name)?;
    let session = &mut *cx.session;
    let mut evidence = Evidence::default();
    let mut metric_rows = Vec::new();
    let latents: Vec<u32> = match choice {
        LatentChoice::Listed(v) => v.iter().map(|l| l.value as u32).collect(),
        LatentChoice::Select {
            top,
            positive,
            negative,
        } => {
            let (pt, nt) = (
                session.set_tokens(p, positive)?,
                session.set_tokens(p, negative)?,
            );
            let (ps, ns) = (session.sparse(&pt, &s)?, session.sparse(&nt, &s)?);
            let chosen = select_latents(
                &prompt_maxes(&pt, &ps, scope),
                &prompt_maxes(&nt, &ns, scope),
                *top,
                threshold,
            );
            for (l, fp, fn_) in &chosen {
                metric_rows.push(Metric {
                    name: format!(
                        "selected latent {l}: cumulative active fraction on {positive} / {negative}"
                    ),
                    value: round(fp - fn_),
                    bound: format!("{:.3} / {:.3}", fp, fn_),
                });
            }
            chosen.iter().map(|c| c.0).collect()
        }
    };
    if latents.is_empty() {
        return Err(CheckError::Unmeasurable(
            "no latent was selected: the SAE has no latent that fires on these prompts".into(),
        ));
    }
    let mut violations = Vec::new();
    let mut label_sets: Vec<(Tokens, Arc<Vec<Vec<SparseRow>>>)> = Vec::new();
    let mut selection_sets = Vec::new();
    if let LatentChoice::Select {
        positive, negative, ..
    } = choice
    {
        for set in [positive, negative] {
            let t = session.set_tokens(p, set)?;
            let rows = session.sparse(&t, &s)?;
            selection_sets.push((t, rows));
        }
    }
    for e in expect {
        let t = session.set_tokens(p, &e.prompts)?;
        let rows = session.sparse(&t, &s)?;
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
                tokens: session.token_values(&t, i, |k| score_token(&rows[i][k])),
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
            label: session.label(&s, l, &sets),
            value: round(mean),
            effect: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn maxes(v: &[&[(u32, f32)]]) -> Vec<BTreeMap<u32, f32>> {
        v.iter().map(|m| m.iter().copied().collect()).collect()
    }

    #[test]
    fn selection_prefers_latents_that_fire_on_positives_only() {
        let pos = maxes(&[&[(1, 2.0), (2, 1.0)], &[(1, 3.0)], &[(3, 1.0)]]);
        let neg = maxes(&[&[(2, 5.0)], &[]]);
        let chosen = select_latents(&pos, &neg, 3, 0.5);
        let ids: Vec<u32> = chosen.iter().map(|c| c.0).collect();
        // 1 covers two positives and no negative; then 3 covers the last positive; 2 would
        // only add a negative.
        assert_eq!(ids, [1, 3]);
        assert_eq!(chosen[1].1, 1.0);
        assert_eq!(chosen[1].2, 0.0);
    }

    #[test]
    fn selection_is_empty_when_nothing_fires_above_the_threshold() {
        let pos = maxes(&[&[(1, 0.1)]]);
        assert!(select_latents(&pos, &[], 2, 0.5).is_empty());
    }
}

#[cfg(test)]
mod audit_tests {
    use crate::checks::testing::{metric, Tiny};
    use crate::result::Status;

    fn probe(threshold: f64, bound: &str) -> String {
        format!(
            r#"
[[checks]]
id = "f"
kind = "feature_probe"
severity = "medium"
sae = "s"
latents = [0, 1, 2, 3]
threshold = {threshold}

[[checks.expect]]
prompts = "pos"
{bound}
"#
        )
    }

    #[test]
    fn every_prompt_is_active_above_a_negative_threshold() {
        let tiny = Tiny::new();
        // A prompt's score is a max over tokens starting at 0, so it always exceeds -1.
        let f = tiny.finding(&probe(-1.0, "min_active_fraction = 1.0"));
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert_eq!(metric(&f, "active fraction on pos"), 1.0);
        assert_eq!(f.evidence.latents.len(), 4);
        assert_eq!(f.evidence.distributions[0].values.len(), 8);
    }

    #[test]
    fn a_probe_that_fires_too_often_fails_and_shows_the_offending_prompts() {
        let tiny = Tiny::new();
        let f = tiny.finding(&probe(-1.0, "max_active_fraction = 0.0"));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.explanation.contains("above the allowed 0%"), "{f:?}");
        assert_eq!(f.evidence.prompts.len(), 5);
        assert!(f
            .evidence
            .prompts
            .iter()
            .all(|p| p.why == "fired although it should not"));
    }
}
