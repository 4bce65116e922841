//! Selecting a direction among candidates as Arditi et al. (2024, appendix on direction
//! selection) do. A candidate is the difference of means of the training sets at one block's
//! `hook_resid_pre` and one post-instruction position. The paper scores every candidate on
//! held-out prompts by three interventions; that costs three passes per candidate, far above
//! the one pass per training set a fixed-hook direction costs. So every candidate is ranked by
//! a cheap proxy first (how far its projection separates the validation sets, from one
//! captured pass per set), and only the best candidate of each of the best [`SCORED`] blocks
//! within the depth limit gets the causal scores, on the first [`SCORED_PROMPTS`] prompts of
//! each validation set:
//! - bypass: mean refusal score on harmful prompts with the candidate ablated at every layer;
//! - induce: mean refusal score on harmless prompts with the candidate added at its layer;
//! - KL: mean last-position KL on harmless prompts, ablated against clean.
//!
//! Kept are candidates whose ablation lowers the harmful prompts' refusal score and whose
//! addition raises the harmless prompts' (each against the same prompts without any
//! intervention), with KL < `max_kl`; the lowest bypass score wins, ties going to the better
//! proxy rank. No candidate left is an error that says why.
//!
//! The paper keeps candidates whose addition makes refusal likelier than not (induce > 0). On
//! small models no candidate does (Qwen2.5-Coder-0.5B-Instruct: -1.1 to -2.5 for the twelve
//! best, docs/lab/direction-selection.md) although adding them does raise refusal; the filter
//! here asks for that rise, which the record shows beside the unsteered score.

use candle_core::{Tensor, D};
use probes::hooks::{HookPoint, Hooks, Positions};

use crate::error::{CheckError, PolicyError};
use crate::instruments::ResolvedDirection;
use crate::load::{CandidatePositions, Direction, DirectionSource, Policy, SelectSpec};
use crate::metrics;
use crate::result::{round, CandidateRecord, SelectionRecord};
use crate::session::{Session, Tokens};

/// Blocks (best proxy first, within the depth limit) whose best candidate gets the three
/// causal scores, unless the policy says `scored`.
pub const SCORED: usize = 3;
/// The most candidates a policy may have scored.
pub const MAX_SCORED: usize = 256;
/// Validation prompts per set the causal scores average over.
pub const SCORED_PROMPTS: usize = 8;

/// The candidate blocks of `range` (fractions of depth, inclusive) on an `n`-block model.
pub(crate) fn candidate_layers(range: [f64; 2], n: usize) -> Result<Vec<usize>, String> {
    let [from, to] = range;
    let lo = (from * n as f64).ceil() as usize;
    let hi = ((to * n as f64).floor() as usize).min(n.saturating_sub(1));
    if n == 0 || lo > hi {
        return Err(format!(
            "`layers` [{from}, {to}] holds no block of this {n}-block model (blocks L with \
             {from} <= L/{n} <= {to}); widen the range"
        ));
    }
    Ok((lo..=hi).collect())
}

/// The candidate offsets (negative, from the end of a prompt) given the number of tokens the
/// chat template puts after the user's message.
pub(crate) fn candidate_offsets(p: CandidatePositions, suffix: usize) -> Result<Vec<i64>, String> {
    if suffix == 0 {
        return Err(
            "this model's chat template puts no tokens after the user's message, so there are \
             no post-instruction positions to read candidates at"
                .into(),
        );
    }
    let n = suffix as i64;
    match p {
        CandidatePositions::PostInstruction => Ok((-n..=-1).collect()),
        CandidatePositions::Range(a, b) if a >= -n => Ok((a..=b).collect()),
        CandidatePositions::Range(a, b) => Err(format!(
            "positions [{a}, {b}] reach outside the {n} post-instruction tokens of this model's \
             chat template (offsets [-{n}, -1])"
        )),
    }
}

/// The candidate blocks and offsets of `sel` on this model, or the error at its place.
fn candidates(
    s: &Session<'_>,
    p: &Policy,
    sel: &SelectSpec,
) -> Result<(Vec<usize>, Vec<i64>), PolicyError> {
    let n = s.n_layers();
    let layers = candidate_layers(sel.layers.value, n).map_err(|e| p.error(&sel.layers.at, e))?;
    let limit = sel.max_depth * n as f64;
    if layers.iter().all(|&l| l as f64 >= limit) {
        return Err(p.error(
            &sel.layers.at,
            format!(
                "this {n}-block model is too short for `layers` {:?}: every candidate block \
                 ({layers:?}) is at or beyond `max_depth` {} of its depth",
                sel.layers.value, sel.max_depth
            ),
        ));
    }
    let suffix = s
        .chat_suffix()
        .map_err(|e| p.error(&sel.positions.at, e.to_string()))?;
    let offsets = candidate_offsets(sel.positions.value, suffix)
        .map_err(|e| p.error(&sel.positions.at, e))?;
    Ok((layers, offsets))
}

/// Check `d`'s selection against the model and plan its passes: one per training and
/// validation set, each capturing every candidate block.
pub(crate) fn plan(
    s: &mut Session<'_>,
    p: &Policy,
    d: &Direction,
    sel: &SelectSpec,
    errors: &mut Vec<PolicyError>,
) {
    let (layers, _) = match candidates(s, p, sel) {
        Ok(c) => c,
        Err(e) => return errors.push(e),
    };
    let DirectionSource::Contrast {
        positive, negative, ..
    } = &d.source
    else {
        return;
    };
    for set in [
        positive,
        negative,
        &sel.validate_positive,
        &sel.validate_negative,
    ] {
        if p.prompt_sets.get(set).is_some_and(|x| !x.chat) {
            errors.push(p.error(
                &sel.positions.at,
                format!(
                    "prompt set `{set}` has `chat = false`: without the chat template it has \
                     no post-instruction tokens to select a direction at"
                ),
            ));
            continue;
        }
        for &l in &layers {
            if let Err(e) = s.want(p, set, HookPoint::ResidPre(l)) {
                errors.push(PolicyError::at(&p.path, None, e.to_string()));
            }
        }
    }
}

/// Per candidate block, every prompt's last `w` activations `[n_prompts, w, d_model]`.
fn tails(
    s: &mut Session<'_>,
    t: &Tokens,
    layers: &[usize],
    w: usize,
) -> Result<Vec<Tensor>, CheckError> {
    layers
        .iter()
        .map(|&l| {
            let acts = s.acts(t, HookPoint::ResidPre(l))?;
            let rows = acts
                .iter()
                .map(|a| a.narrow(0, a.dim(0)? - w, w))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Cohen's d of `pos` against `neg`: the gap of the means over the pooled deviation.
fn separation(pos: &[f64], neg: &[f64]) -> f64 {
    let var = |v: &[f64], m: f64| v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    let (mp, mn) = (mean(pos), mean(neg));
    let pooled = ((var(pos, mp) + var(neg, mn)) / 2.0).sqrt();
    if pooled > 0.0 {
        (mp - mn) / pooled
    } else {
        0.0
    }
}

/// One candidate while it is selected.
struct Candidate {
    layer: usize,
    offset: i64,
    raw: Tensor,
    unit: Option<Tensor>,
    record: CandidateRecord,
}

/// Select `d` among its candidates on this model: the direction, and the evidence.
pub(crate) fn select(
    s: &mut Session<'_>,
    p: &Policy,
    d: &Direction,
    sel: &SelectSpec,
    refusal: &[u32],
) -> Result<(ResolvedDirection, SelectionRecord), CheckError> {
    let (layers, offsets) =
        candidates(s, p, sel).map_err(|e| CheckError::Unmeasurable(e.to_string()))?;
    let DirectionSource::Contrast {
        positive, negative, ..
    } = &d.source
    else {
        return Err(CheckError::Unmeasurable(
            "a selected direction is a difference of means".into(),
        ));
    };
    let n = s.n_layers();
    let w = (-offsets[0]) as usize;
    let row = |o: i64| (w as i64 + o) as usize;
    // The validation sets' unhooked passes run to the logits, capturing every candidate block
    // on the way: the causal scores' clean baselines are their first rows.
    for name in [&sel.validate_positive, &sel.validate_negative] {
        let t = s.set_tokens(p, name)?;
        s.last_logits(&t, &Hooks::new())?;
    }
    let mut set = |name: &str| -> Result<(Tokens, Vec<Tensor>), CheckError> {
        let t = s.set_tokens(p, name)?;
        let x = tails(s, &t, &layers, w)?;
        Ok((t, x))
    };
    let (_, train_pos) = set(positive)?;
    let (_, train_neg) = set(negative)?;
    let (vp, val_pos) = set(&sel.validate_positive)?;
    let (vn, val_neg) = set(&sel.validate_negative)?;
    let limit = sel.max_depth * n as f64;
    let mut all = Vec::new();
    for (i, &layer) in layers.iter().enumerate() {
        // [w, d_model]
        let diff = (train_pos[i].mean(0)? - train_neg[i].mean(0)?)?;
        let norms: Vec<f32> = diff.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
        for &offset in &offsets {
            let raw = diff.get(row(offset))?;
            let norm = f64::from(norms[row(offset)]);
            let unit = (norm.is_finite() && norm > 0.0)
                .then(|| &raw / norm)
                .transpose()?;
            let proxy = match &unit {
                Some(u) => {
                    let project = |x: &Tensor| -> Result<Vec<f64>, CheckError> {
                        let x = x.narrow(1, row(offset), 1)?.squeeze(1)?;
                        let v: Vec<f32> = x.broadcast_mul(u)?.sum(D::Minus1)?.to_vec1()?;
                        Ok(v.into_iter().map(f64::from).collect())
                    };
                    round(separation(&project(&val_pos[i])?, &project(&val_neg[i])?))
                }
                None => 0.0,
            };
            let outcome = if unit.is_none() {
                "zero length".to_string()
            } else if layer as f64 >= limit {
                format!("depth: block {layer} >= max_depth {} x {n}", sel.max_depth)
            } else {
                String::new()
            };
            all.push(Candidate {
                layer,
                offset,
                raw,
                unit,
                record: CandidateRecord {
                    layer,
                    position: offset,
                    proxy,
                    bypass: None,
                    induce: None,
                    kl: None,
                    outcome,
                },
            });
        }
    }
    // Best proxy first; ties to the earlier block, then the earlier position.
    let mut ranked: Vec<usize> = (0..all.len())
        .filter(|&i| all[i].record.outcome.is_empty())
        .collect();
    ranked.sort_by(|&a, &b| {
        let (x, y) = (&all[a].record, &all[b].record);
        y.proxy
            .total_cmp(&x.proxy)
            .then(x.layer.cmp(&y.layer))
            .then(x.position.cmp(&y.position))
    });
    // The best candidate of each block, best proxy first, up to `scored` blocks: neighbouring
    // positions of one block separate alike, and scoring them would spend the causal passes on
    // a few late blocks, whose ablation often moves harmless outputs most.
    let mut blocks = std::collections::BTreeSet::new();
    let mut scored = Vec::new();
    for (rank, &i) in ranked.iter().enumerate() {
        let layer = all[i].layer;
        if blocks.len() < sel.scored && blocks.insert(layer) {
            scored.push(i);
            continue;
        }
        all[i].record.outcome = if blocks.contains(&layer) {
            format!(
                "not scored: proxy rank {}, below block {layer}'s best",
                rank + 1
            )
        } else {
            format!(
                "not scored: proxy rank {}, block beyond the best {} blocks",
                rank + 1,
                sel.scored
            )
        };
    }
    let ranked = scored;
    let (vp, vn) = (
        s.first_prompts(&vp, SCORED_PROMPTS),
        s.first_prompts(&vn, SCORED_PROMPTS),
    );
    let score = |logits: &[Vec<f32>]| {
        round(mean(
            &logits
                .iter()
                .map(|l| metrics::refusal_score(l, refusal))
                .collect::<Vec<_>>(),
        ))
    };
    let clean = s.last_logits(&vn, &Hooks::new())?;
    let harmless_score = score(&clean);
    let harmful_score = score(&s.last_logits(&vp, &Hooks::new())?);
    let mut best: Option<usize> = None;
    for &i in &ranked {
        let c = &all[i];
        let unit = c.unit.as_ref().expect("ranked candidates have length");
        let ablate = Hooks::new().ablate_everywhere(n, unit);
        let bypass = score(&s.last_logits(&vp, &ablate)?);
        let ablated = s.last_logits(&vn, &ablate)?;
        let kl = round(mean(
            &clean
                .iter()
                .zip(ablated.iter())
                .map(|(a, b)| metrics::kl(a, b))
                .collect::<Vec<_>>(),
        ));
        let add = Hooks::new().add(
            HookPoint::ResidPre(c.layer),
            Positions::All,
            c.raw.clone(),
            1.0,
        );
        let induce = score(&s.last_logits(&vn, &add)?);
        let mut why = Vec::new();
        if bypass.is_nan() || bypass >= harmful_score {
            why.push(format!("bypass: {bypass} >= unablated {harmful_score}"));
        }
        if induce.is_nan() || induce <= harmless_score {
            why.push(format!("induce: {induce} <= unsteered {harmless_score}"));
        }
        if kl.is_nan() || kl >= sel.max_kl {
            why.push(format!("kl: {kl} >= max_kl {}", sel.max_kl));
        }
        let r = &mut all[i].record;
        (r.bypass, r.induce, r.kl) = (Some(bypass), Some(induce), Some(kl));
        if why.is_empty() {
            r.outcome = "kept".into();
            // `ranked` is in proxy order: an equal bypass score keeps the earlier candidate.
            if best.is_none_or(|b| bypass < all[b].record.bypass.unwrap_or(f64::INFINITY)) {
                best = Some(i);
            }
        } else {
            r.outcome = why.join("; ");
        }
    }
    let Some(b) = best else {
        let scored: Vec<String> = ranked
            .iter()
            .map(|&i| {
                let r = &all[i].record;
                format!("block {} position {}: {}", r.layer, r.position, r.outcome)
            })
            .collect();
        return Err(CheckError::Unmeasurable(format!(
            "no candidate direction passes the selection filters (bypass < {harmful_score}, \
             induce > {harmless_score}, KL < max_kl {}, block < max_depth {} x {n}); of the best \
             candidates of the {} best blocks by proxy: {}",
            sel.max_kl,
            sel.max_depth,
            scored.len(),
            if scored.is_empty() {
                "every candidate within the depth limit has zero length".to_string()
            } else {
                scored.join(", ")
            }
        )));
    };
    all[b].record.outcome = "chosen".into();
    let hook = HookPoint::ResidPre(all[b].layer);
    let direction = ResolvedDirection::new(hook, all[b].offset, all[b].raw.clone())?;
    let record = SelectionRecord {
        hook: hook.to_string(),
        position: all[b].offset,
        scored: sel.scored,
        prompts: vp.ids.len().min(vn.ids.len()),
        harmful_score: Some(harmful_score),
        harmless_score: Some(harmless_score),
        candidates: all.into_iter().map(|c| c.record).collect(),
    };
    Ok((direction, record))
}

/// One selected direction's cost, for `mechwatch bench check`.
pub struct SelectionCost {
    pub policy: String,
    pub direction: String,
    /// The hook it selected, or why none was.
    pub outcome: String,
    /// Seconds to select it, from fresh passes.
    pub select: f64,
    /// Seconds to build it at the selected hook and position from the same training sets, as
    /// a fixed-hook direction is built (one pass per training set).
    pub fixed: f64,
}

/// Select every selected direction of `policies` on `model`, and build it again with its
/// chosen hook fixed, each in a session of its own, timing both.
pub fn bench(
    model: &probes::Model,
    policies: &[Policy],
    micro_batch: usize,
) -> Result<Vec<SelectionCost>, String> {
    let mut out = Vec::new();
    for p in policies {
        for (name, d) in &p.directions {
            let Some(sel) = &d.select else { continue };
            let mut s = Session::new(model, micro_batch);
            // The refusal score's tokens are the policy's, shared with its steering checks (a
            // `[refusal]` table generates on the training sets to choose them): not a cost of
            // selecting.
            let (refusal, _) =
                crate::refusal::score_tokens(&mut s, p).map_err(|e| e.to_string())?;
            let t0 = std::time::Instant::now();
            let mut errors = Vec::new();
            plan(&mut s, p, d, sel, &mut errors);
            if let Some(e) = errors.first() {
                return Err(e.to_string());
            }
            // A selection that finds no candidate costs the same; the fixed build then reads
            // the middle candidate block's last token.
            let (hook, offset, outcome) = match select(&mut s, p, d, sel, &refusal) {
                Ok((r, _)) => (r.hook, r.position, format!("chose {}", r.hook)),
                Err(e) => {
                    let (layers, _) = candidates(&s, p, sel).map_err(|e| e.to_string())?;
                    let mid = HookPoint::ResidPre(layers[layers.len() / 2]);
                    (mid, -1, format!("no candidate passed: {e}"))
                }
            };
            let select_secs = t0.elapsed().as_secs_f64();
            let mut fixed = d.clone();
            fixed.select = None;
            fixed.hook = Some(crate::load::Located {
                value: hook.to_string(),
                at: d.at,
            });
            if let DirectionSource::Contrast { position, .. } = &mut fixed.source {
                *position = offset;
            }
            let t0 = std::time::Instant::now();
            let mut s = Session::new(model, micro_batch);
            crate::instruments::compute_direction(&mut s, p, &fixed).map_err(|e| e.to_string())?;
            out.push(SelectionCost {
                policy: p.name.clone(),
                direction: name.clone(),
                outcome,
                select: select_secs,
                fixed: t0.elapsed().as_secs_f64(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::engine::{run, RunOptions};
    use crate::result::{PinnedInstrument, RunResult};
    use crate::store::Store;
    use crate::Policy;

    /// Harmful prompts mix trigger words (w10..w19) into neutral ones; harmless ones have none.
    fn prompts(dir: &Path) {
        let p = dir.join("prompts");
        std::fs::create_dir_all(&p).unwrap();
        let line = |i: usize, harmful: bool| -> String {
            (0..6)
                .map(|j| {
                    if harmful && (i + j).is_multiple_of(2) {
                        format!("w{}", 10 + (3 * i + j) % 10)
                    } else {
                        format!("w{}", 30 + (7 * i + 5 * j) % 50)
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (name, harmful) in [("harmful.txt", true), ("harmless.txt", false)] {
            let text: String = (0..24).map(|i| line(i, harmful) + "\n").collect();
            std::fs::write(p.join(name), text).unwrap();
        }
    }

    const HEAD: &str = r#"schema = 1
name = "planted"
version = "1"

[prompts.harmful_train]
file = "prompts/harmful.txt"
lines = [1, 12]

[prompts.harmless_train]
file = "prompts/harmless.txt"
lines = [1, 12]

[prompts.harmful_val]
file = "prompts/harmful.txt"
lines = [13, 24]

[prompts.harmless_val]
file = "prompts/harmless.txt"
lines = [13, 24]
"#;

    const CHECK: &str = r#"
[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "refusal"
positive = "harmful_val"
negative = "harmless_val"
min_auroc = 0.5
"#;

    struct Planted {
        dir: tempfile::TempDir,
        model: probes::Model,
        u: Vec<f32>,
    }

    impl Planted {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (path, u) = probes::testing::planted_dir(dir.path());
            prompts(&dir.path().join("policy"));
            Self {
                model: probes::testing::load(&path),
                dir,
                u,
            }
        }

        fn policy(&self, direction: &str) -> Result<Policy, Vec<crate::PolicyError>> {
            let path = self.dir.path().join("policy/planted.toml");
            std::fs::write(&path, format!("{HEAD}\n{direction}\n{CHECK}")).unwrap();
            Policy::load(&path)
        }

        fn run(&self, direction: &str, last_pass: Option<&RunResult>) -> RunResult {
            let policy = self.policy(direction).expect("the policy validates");
            let mut quiet = |_: &str| {};
            let mut opts = RunOptions {
                last_pass,
                progress: &mut quiet,
                micro_batch: 4,
                lineage: None,
                store: Some(self.dir.path().join("store")),
                reference: None,
            };
            run(&self.model, &[policy], &mut opts)
                .map_err(|e| e.to_string())
                .expect("the policy resolves")
                .0
        }

        /// The error of resolving `direction` against the model.
        fn error(&self, direction: &str) -> String {
            let policy = match self.policy(direction) {
                Ok(p) => p,
                Err(e) => return e.iter().map(|e| e.to_string()).collect(),
            };
            let mut quiet = |_: &str| {};
            let mut opts = RunOptions {
                last_pass: None,
                progress: &mut quiet,
                micro_batch: 4,
                lineage: None,
                store: None,
                reference: None,
            };
            match run(&self.model, &[policy], &mut opts) {
                Ok(_) => panic!("`{direction}` resolved"),
                Err(e) => e.to_string(),
            }
        }
    }

    const SELECT: &str = r#"[directions.refusal]
layers = [0.0, 1.0]
positions = "post_instruction"
positive = "harmful_train"
negative = "harmless_train"
validate_positive = "harmful_val"
validate_negative = "harmless_val"
max_depth = 0.75"#;

    fn pin(r: &RunResult) -> &PinnedInstrument {
        r.instruments
            .iter()
            .find(|i| i.name == "refusal")
            .expect("the direction is pinned")
    }

    #[test]
    fn selection_picks_the_planted_direction_and_excludes_blocks_near_the_output() {
        let t = Planted::new();
        let r = t.run(SELECT, None);
        let pin = pin(&r);
        let sel = pin.selection.as_ref().expect("selection evidence");
        eprintln!("{}", serde_json::to_string_pretty(sel).unwrap());
        // 8 blocks x 3 post-instruction positions, all recorded.
        assert_eq!(sel.candidates.len(), 8 * 3);
        let chosen: Vec<_> = sel
            .candidates
            .iter()
            .filter(|c| c.outcome == "chosen")
            .collect();
        assert_eq!(chosen.len(), 1, "{sel:?}");
        let c = chosen[0];
        assert_eq!(sel.hook, format!("blocks.{}.hook_resid_pre", c.layer));
        assert_eq!(sel.position, c.position);
        assert!(
            c.layer > probes::testing::PLANTED_AT && c.layer < 6,
            "{c:?}"
        );
        assert!(c.induce.unwrap() > 0.0 && c.kl.unwrap() < 0.1, "{c:?}");
        assert!(c.induce.unwrap() > sel.harmless_score.unwrap(), "{sel:?}");
        assert!(c.bypass.unwrap() < sel.harmful_score.unwrap(), "{sel:?}");
        for c in sel.candidates.iter().filter(|c| c.layer >= 6) {
            assert!(c.outcome.starts_with("depth"), "{c:?}");
            assert!(c.bypass.is_none(), "{c:?}");
        }
        let scored = sel.candidates.iter().filter(|c| c.bypass.is_some()).count();
        assert_eq!(scored, super::SCORED);
        let store = Store::at(t.dir.path().join("store"));
        let d = store.direction(&pin.sha256, probes::testing::D).unwrap();
        assert_eq!(d.hook, sel.hook);
        let dot: f32 = d.vector.iter().zip(&t.u).map(|(a, b)| a * b).sum();
        let norm: f32 = d.vector.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(dot / norm > 0.9, "cosine {}", dot / norm);
    }

    #[test]
    fn selection_is_deterministic() {
        let t = Planted::new();
        let a = t.run(SELECT, None);
        let b = t.run(SELECT, None);
        assert_eq!(
            serde_json::to_string(pin(&a)).unwrap(),
            serde_json::to_string(pin(&b)).unwrap()
        );
    }

    #[test]
    fn a_second_run_of_the_lineage_reuses_the_selection() {
        let t = Planted::new();
        let first = t.run(SELECT, None);
        let second = t.run(SELECT, Some(&first));
        assert_eq!(pin(&second), pin(&first));
        assert_eq!(second.policies, first.policies);
        // The lineage's pin now names the negated vector: a second selection would give the
        // same AUROC, the reused pin its complement.
        let auroc = crate::checks::testing::metric(&first.policies[0].findings[0], "AUROC");
        let store = Store::at(t.dir.path().join("store"));
        let mut base = first.clone();
        let p = base
            .instruments
            .iter_mut()
            .find(|i| i.name == "refusal")
            .unwrap();
        let d = store.direction(&p.sha256, probes::testing::D).unwrap();
        p.sha256 = store
            .put_direction(&crate::store::StoredDirection {
                vector: d.vector.iter().map(|x| -x).collect(),
                ..d
            })
            .unwrap();
        let flipped = t.run(SELECT, Some(&base));
        let f = crate::checks::testing::metric(&flipped.policies[0].findings[0], "AUROC");
        assert!((f - (1.0 - auroc)).abs() < 1e-5, "{auroc} {f}");
        assert_eq!(pin(&flipped).selection, pin(&first).selection);
        // A changed definition selects afresh.
        // (Below half depth the planted block's best candidate moves the harmless outputs by a
        // KL of 0.24, so the narrower definition also allows more.)
        let narrower = SELECT.replace("max_depth = 0.75", "max_depth = 0.5\nmax_kl = 0.25");
        let third = t.run(&narrower, Some(&first));
        assert_ne!(pin(&third).recipe, pin(&first).recipe);
        let sel = pin(&third).selection.as_ref().unwrap();
        assert!(sel
            .candidates
            .iter()
            .any(|c| c.layer == 4 && c.outcome.starts_with("depth")));
    }

    fn assert_error(t: &Planted, direction: &str, parts: &[&str]) {
        let e = t.error(direction);
        for part in parts {
            assert!(e.contains(part), "{part}: {e}");
        }
    }

    #[test]
    fn bad_selections_are_errors_at_their_line() {
        let t = Planted::new();
        // The `[directions.refusal]` table starts at line 21 of the policy.
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "layers = [0.0, 1.0]",
                "layers = [0.2, 1.5]",
                &["planted.toml:22", "[0, 1]"],
            ),
            (
                "layers = [0.0, 1.0]",
                "layers = [0.51, 0.55]",
                &["planted.toml:22", "no block of this 8-block model"],
            ),
            (
                "layers = [0.0, 1.0]",
                "layers = [0.8, 1.0]",
                &["planted.toml:22", "too short"],
            ),
            (
                "positions = \"post_instruction\"",
                "positions = [-5, -1]",
                &["planted.toml:23", "3 post-instruction tokens"],
            ),
            (
                "positions = \"post_instruction\"",
                "positions = \"last\"",
                &["planted.toml:23", "post_instruction"],
            ),
            (
                "layers = [0.0, 1.0]",
                "layers = [0.0, 1.0]\nhook = \"blocks.1.hook_resid_pre\"",
                &["planted.toml:22", "not both"],
            ),
            (
                "validate_negative = \"harmless_val\"",
                "",
                &["planted.toml:22", "validate_negative"],
            ),
            (
                "validate_negative = \"harmless_val\"",
                "validate_negative = \"harmless_val\"\nscored = 0",
                &["planted.toml:", "`scored`", "1 to 256"],
            ),
        ];
        for (from, to, parts) in cases {
            assert_error(&t, &SELECT.replace(from, to), parts);
        }
    }

    #[test]
    fn a_set_without_the_chat_template_is_an_error() {
        let t = Planted::new();
        let path = t.dir.path().join("policy/planted.toml");
        let text = format!("{HEAD}\n{SELECT}\n{CHECK}").replace(
            "[prompts.harmless_val]\n",
            "[prompts.harmless_val]\nchat = false\n",
        );
        std::fs::write(&path, text).unwrap();
        let policy = Policy::load(&path).unwrap();
        let mut quiet = |_: &str| {};
        let mut opts = RunOptions {
            last_pass: None,
            progress: &mut quiet,
            micro_batch: 4,
            lineage: None,
            store: None,
            reference: None,
        };
        let e = run(&t.model, &[policy], &mut opts)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("harmless_val") && e.contains("chat = false"),
            "{e}"
        );
    }
}
