//! `feature_probe`: how often chosen SAE latents fire on prompt sets, held to expected
//! fractions. The latents are listed (by index or label) or selected as the few that best
//! separate two prompt sets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use probes::sae::SparseRow;

use probes::digest::sha256_hex;
use serde::Deserialize;
use serde_json::json;
use toml::Spanned;

use super::{at_least, at_most, violated, Cx, Kind, Planner, Resolver};
use crate::error::CheckError;
use crate::lineage::{content_digest, set_definition};
use crate::load::{Located, Names, Validator};
use crate::result::{
    round, Distribution, Evidence, Finding, LatentEvidence, Metric, PinnedInstrument,
    PromptEvidence, SelectedLatent, Status,
};
use crate::schema::{Aggregate, ExpectSet, LatentRef, Select, TokenScope};
use crate::session::{ResolvedSae, Session, Tokens};

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
    pub threshold: Option<Spanned<f64>>,
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
                let (positive, negative) = v.contrast(
                    ("select.positive", &s.positive),
                    ("select.negative", &s.negative),
                    n.prompts,
                )?;
                LatentChoice::Select {
                    top: s.top,
                    positive,
                    negative,
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
            let fraction = |v: &mut Validator<'_>, f: &Option<Spanned<f64>>, field: &str| {
                f.as_ref().map(|f| v.within(f, field, 0.0, 1.0))
            };
            let min = fraction(v, &e.min_active_fraction, "min_active_fraction");
            let max = fraction(v, &e.max_active_fraction, "max_active_fraction");
            if let (Some(Some(lo)), Some(Some(hi)), Some(at)) = (min, max, &e.max_active_fraction) {
                if lo > hi {
                    v.err(
                        at,
                        format!(
                            "`max_active_fraction` {hi} is below `min_active_fraction` {lo}: \
                             no fraction meets both"
                        ),
                    );
                }
            }
            if min.is_none() && max.is_none() {
                v.err(
                    &e.prompts,
                    "an expectation needs `min_active_fraction` or `max_active_fraction`",
                );
            }
            expect.push(Expectation {
                prompts,
                min_active_fraction: min.flatten(),
                max_active_fraction: max.flatten(),
            });
        }
        Some(FeatureProbe {
            sae,
            latents,
            aggregate: spec.aggregate.unwrap_or(Aggregate::Max),
            tokens: spec.tokens.unwrap_or(TokenScope::Prompt),
            threshold: match &spec.threshold {
                Some(t) => v.finite_at(t, "threshold")?,
                None => 0.0,
            },
            expect,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        plan(self, p)
    }

    fn resolve(&self, r: &mut Resolver<'_, '_>) {
        resolve(self, r)
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        evaluate(self, cx)
    }
}

/// The kind of the instrument a selecting probe pins: the latents it chose.
const LATENT_SELECTION: &str = "latent-selection";

/// Select the latents of a probe that selects them, or reuse those its lineage pinned, so
/// that every checkpoint of the lineage is probed with the latents chosen on its reference
/// (and a later audit runs no pass over the selection's prompts).
fn resolve(k: &FeatureProbe, r: &mut Resolver<'_, '_>) {
    let LatentChoice::Select {
        top,
        positive,
        negative,
    } = &k.latents
    else {
        return;
    };
    let p = r.policy;
    let Some(s) = r.instruments.sae_if_resolved(p, &k.sae) else {
        return;
    };
    if !r.instruments.records() {
        return;
    }
    let id = &r.check.id;
    let recipe = sha256_hex(
        json!({
            "sae": s.sae.manifest.root(),
            "hook": s.hook.to_string(),
            "positive": set_definition(p, positive),
            "negative": set_definition(p, negative),
            "top": top,
            "threshold": k.threshold,
            "tokens": format!("{:?}", k.tokens),
        })
        .to_string()
        .as_bytes(),
    );
    let outcome = match r.instruments.check_pin(p, id, LATENT_SELECTION, &recipe) {
        Err(why) => Err(why),
        Ok(Some(pin)) => pinned_selection(&pin, &s, r.instruments.lineage_name()).map(|()| pin),
        Ok(None) => select(k, r.session, p, &s, (positive, negative), *top).map(|latents| {
            let sha = content_digest(&latents);
            let pin =
                r.instruments
                    .built_check_pin(r.session, p, id, LATENT_SELECTION, recipe, sha);
            PinnedInstrument { latents, ..pin }
        }),
    };
    r.instruments.keep_check_instrument(p, id, outcome);
}

/// Choose up to `top` latents of `s` that separate the two `sets` on this checkpoint, each
/// labelled from those sets' prompts.
fn select(
    k: &FeatureProbe,
    session: &mut Session<'_>,
    p: &crate::load::Policy,
    s: &ResolvedSae,
    (positive, negative): (&String, &String),
    top: usize,
) -> Result<Vec<SelectedLatent>, String> {
    let read = |session: &mut Session<'_>, set: &str| -> Result<_, CheckError> {
        let t = session.set_tokens(p, set)?;
        let rows = session.sparse(&t, s)?;
        Ok((t, rows))
    };
    let (pt, ps) = read(session, positive).map_err(|e| e.to_string())?;
    let (nt, ns) = read(session, negative).map_err(|e| e.to_string())?;
    let chosen = select_latents(
        &prompt_maxes(&pt, &ps, k.tokens),
        &prompt_maxes(&nt, &ns, k.tokens),
        top,
        k.threshold,
    );
    if chosen.is_empty() {
        return Err(format!(
            "no latent was selected: no latent of SAE `{}` at `{}` fires above {} on more of \
             `{positive}` than of `{negative}`",
            s.name, s.hook, k.threshold
        ));
    }
    let sets = [(&pt, ps.as_slice()), (&nt, ns.as_slice())];
    Ok(chosen
        .into_iter()
        .map(|c| SelectedLatent {
            label: session.label(s, c.latent, &sets),
            latent: c.latent,
            positive_covered: c.positive_covered,
            positive_prompts: ps.len(),
            negative_covered: c.negative_covered,
            negative_prompts: ns.len(),
        })
        .collect())
}

/// Check a lineage's pinned selection against its digest and the SAE it indexes.
fn pinned_selection(pin: &PinnedInstrument, s: &ResolvedSae, lineage: &str) -> Result<(), String> {
    if pin.latents.is_empty() || content_digest(&pin.latents) != pin.sha256 {
        return Err(format!(
            "the lineage `{lineage}`'s pinned latent selection of check `{}` does not match \
             its digest {}: set the lineage's reference again with `check --base <reference \
             checkpoint>`, or audit under a new `--lineage`",
            pin.name, pin.sha256
        ));
    }
    for l in &pin.latents {
        s.sae.check_latent(l.latent as usize).map_err(|e| {
            format!(
                "the lineage `{lineage}`'s pinned latent selection of check `{}`, chosen on \
                 {}: {e}",
                pin.name, pin.reference
            )
        })?;
    }
    Ok(())
}

/// The cumulative fractions of the positive and negative prompts a selection covers.
fn fractions(l: &SelectedLatent) -> (f64, f64) {
    let frac = |covered: usize, of: usize| covered as f64 / of.max(1) as f64;
    (
        frac(l.positive_covered, l.positive_prompts),
        frac(l.negative_covered, l.negative_prompts),
    )
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
    let mut selected: Vec<SelectedLatent> = Vec::new();
    let latents: Vec<u32> = match choice {
        LatentChoice::Listed(v) => v.iter().map(|l| l.value as u32).collect(),
        LatentChoice::Select {
            positive, negative, ..
        } => {
            let pin = cx
                .instruments
                .check_instrument(p, &cx.check.id, "latent selection")?;
            for l in &pin.latents {
                let (fp, fn_) = fractions(l);
                metric_rows.push(Metric {
                    name: format!(
                        "selected latent {}: cumulative active fraction on {positive} / {negative} when selected",
                        l.latent
                    ),
                    value: round(fp - fn_),
                    bound: format!("{fp:.3} / {fn_:.3}"),
                });
            }
            selected = pin.latents.clone();
            pin.latents.iter().map(|l| l.latent).collect()
        }
    };
    let mut violations = Vec::new();
    let mut label_sets: Vec<(Tokens, Arc<Vec<Vec<SparseRow>>>)> = Vec::new();
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
            if !at_least(
                &format!("the active fraction on `{}`", e.prompts),
                frac,
                min,
            )? {
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
            if !at_most(
                &format!("the active fraction on `{}`", e.prompts),
                frac,
                max,
            )? {
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
    let sets: Vec<(&Tokens, &[Vec<SparseRow>])> =
        label_sets.iter().map(|(t, r)| (t, r.as_slice())).collect();
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
            // A selected latent's label is its selection's (read on the prompts that chose it).
            // A labels file's label first; else a selected latent's pinned one, read on the
            // prompts that chose it.
            label: match (
                s.labels.get(l as usize),
                selected.iter().find(|c| c.latent == l),
            ) {
                (None, Some(c)) => c.label.clone(),
                _ => session.label(&s, l, &sets),
            },
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

/// A latent [`select_latents`] chose, with the prompts of each set covered once it is added.
#[derive(Debug, PartialEq)]
struct Chosen {
    latent: u32,
    positive_covered: usize,
    negative_covered: usize,
}

/// Greedily choose up to `top` latents whose union (a prompt counts when any of them exceeds
/// `threshold`) covers the most positive and fewest negative prompts: each step adds the
/// latent that most increases `covered positives - covered negatives` (as fractions), and the
/// selection stops when no latent increases it. Returns each chosen latent with the positive
/// and negative prompts covered after adding it. Ties go to the smaller index.
fn select_latents(
    pos: &[BTreeMap<u32, f32>],
    neg: &[BTreeMap<u32, f32>],
    top: usize,
    threshold: f64,
) -> Vec<Chosen> {
    let fires =
        |m: &BTreeMap<u32, f32>, l: u32| m.get(&l).is_some_and(|v| f64::from(*v) > threshold);
    let candidates: BTreeSet<u32> = pos.iter().flat_map(|m| m.keys().copied()).collect();
    let (np, nn) = (pos.len().max(1) as f64, neg.len().max(1) as f64);
    let mut covered_p = vec![false; pos.len()];
    let mut covered_n = vec![false; neg.len()];
    let mut chosen: Vec<Chosen> = Vec::new();
    for _ in 0..top {
        let mut best: Option<(u32, f64)> = None;
        for &l in &candidates {
            if chosen.iter().any(|c| c.latent == l) {
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
        let count = |v: &[bool]| v.iter().filter(|c| **c).count();
        chosen.push(Chosen {
            latent: l,
            positive_covered: count(&covered_p),
            negative_covered: count(&covered_n),
        });
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
        let ids: Vec<u32> = chosen.iter().map(|c| c.latent).collect();
        // 1 covers two positives and no negative; then 3 covers the last positive; 2 would
        // only add a negative.
        assert_eq!(ids, [1, 3]);
        assert_eq!(
            (chosen[1].positive_covered, chosen[1].negative_covered),
            (3, 0)
        );
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
    use crate::result::{PinnedInstrument, RunResult, Status};

    const SELECTING: &str = r#"
[[checks]]
id = "sel"
kind = "feature_probe"
severity = "medium"
sae = "s"
select = { top = 3, positive = "pos", negative = "neg" }
threshold = 0.0

[[checks.expect]]
prompts = "pos"
min_active_fraction = 0.0
"#;

    /// `check --base` selects on the reference and pins it; a selection that cannot be made
    /// there is an error naming the check, not a reference without it.
    #[test]
    fn a_base_checkpoint_pins_the_selection_or_says_why_it_cannot() {
        let tiny = Tiny::new();
        let base =
            probes::testing::load(&probes::testing::llama_dir(&tiny.dir.path().join("b"), 8));
        let reference = |checks: &str| {
            let policy = tiny.policy(checks).unwrap();
            crate::engine::reference_instruments(&base, &[policy], "t", Some(tiny.store()))
        };
        let r = reference(SELECTING).unwrap();
        assert_eq!(selection(&r).reference, base.manifest.root());
        let run = tiny.run_with(SELECTING, None, Some(&r));
        assert_eq!(selection(&run), selection(&r));

        let never = SELECTING.replace("threshold = 0.0", "threshold = 1e30");
        let e = reference(&never).unwrap_err().to_string();
        assert!(
            e.contains("`sel`") && e.contains("no latent was selected"),
            "{e}"
        );
    }

    fn selection(r: &RunResult) -> &PinnedInstrument {
        r.instruments
            .iter()
            .find(|i| i.kind == "latent-selection")
            .expect("the selection is pinned")
    }

    /// A probe that selects its latents selects them on the lineage's reference: a later
    /// checkpoint is probed with those, not with the ones it would select itself, and a pin
    /// edited since is an error, not a pass.
    #[test]
    fn a_lineage_probes_every_checkpoint_with_its_references_selection() {
        let tiny = Tiny::new();
        let other =
            probes::testing::load(&probes::testing::llama_dir(&tiny.dir.path().join("b"), 8));
        let policy = tiny.policy(SELECTING).unwrap();
        let first = tiny.run(SELECTING, None);
        let pin = selection(&first);
        assert_eq!(pin.reference, tiny.model.manifest.root());
        assert_eq!(pin.name, "sel");
        let chosen: Vec<u32> = pin.latents.iter().map(|l| l.latent).collect();
        let probed = |r: &RunResult| -> Vec<u32> {
            let f = &r.policies[0].findings[0];
            assert_ne!(f.status, Status::Error, "{f:?}");
            f.evidence.latents.iter().map(|l| l.latent as u32).collect()
        };
        assert_eq!(probed(&first), chosen);

        let own = tiny.run_on(&other, &policy, None);
        assert_ne!(
            selection(&own).latents,
            pin.latents,
            "the other checkpoint selects the same latents: the test cannot tell reuse"
        );
        let second = tiny.run_on(&other, &policy, Some(&first));
        assert_eq!(selection(&second), pin);
        assert_eq!(probed(&second), chosen);

        let mut edited = first.clone();
        let e = edited
            .instruments
            .iter_mut()
            .find(|i| i.kind == "latent-selection")
            .unwrap();
        e.latents[0].positive_covered += 1;
        let f = tiny.run_on(&other, &policy, Some(&edited)).policies[0].findings[0].clone();
        assert_eq!(f.status, Status::Error, "{f:?}");
        assert!(f.explanation.contains("does not match its digest"), "{f:?}");
    }

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
