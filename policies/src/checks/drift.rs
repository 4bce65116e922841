//! `drift`: how far each SAE latent's firing rate on a prompt set moved from a baseline (the
//! last passing audit of the model's lineage, or a saved result), with the same SAE. The SAE
//! is the lineage's: it must still reconstruct this checkpoint's activations (its FVU on the
//! prompt set is held to `max_fvu`) and what the model computes from them (the CE loss it
//! recovers there, to `min_ce_recovered`), or the firing rates it reports mean little.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{at_least, at_most, violated, Cx, Kind, Planner};
use crate::error::CheckError;
use crate::load::{Names, Validator};
use crate::result::{round, Evidence, Finding, LatentEvidence, Metric, RunResult, Status};

/// The fields of a `drift` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub sae: Option<Spanned<String>>,
    pub prompts: Option<Spanned<String>>,
    /// `last-pass` (the last passing audit of the same model lineage) or a file holding a
    /// previous run's JSON result.
    pub baseline: Option<Spanned<String>>,
    pub max_rate_change: Option<Spanned<f64>>,
    /// The most variance of this checkpoint's activations on `prompts` the SAE may leave
    /// unexplained (FVU, default [`DEFAULT_MAX_FVU`]).
    pub max_fvu: Option<Spanned<f64>>,
    /// The least share of the next-token CE loss that zero-ablating the SAE's hook costs on
    /// `prompts` the SAE's reconstruction must win back (default [`DEFAULT_MIN_CE_RECOVERED`]).
    pub min_ce_recovered: Option<Spanned<f64>>,
}

/// The default bound on the SAE's FVU: the shipped default SAE leaves 0.27 of the default
/// model's variance unexplained on the shipped `harmful_eval` set (docs/lab/lineage.md);
/// past half, the SAE no longer describes the checkpoint.
pub const DEFAULT_MAX_FVU: f64 = 0.5;

/// The default bound on the CE loss the SAE recovers: the shipped default SAE recovers 0.977
/// of what zero-ablating its hook costs the default model on the prompt tokens of the shipped
/// `harmful_eval` set (0.19 of 8.3 nats lost; docs/lab/lineage.md), 0.987 on its held-out
/// text. Below 0.9, splicing the SAE in costs over four times that share.
pub const DEFAULT_MIN_CE_RECOVERED: f64 = 0.9;

#[derive(Debug, Clone)]
pub enum Baseline {
    LastPass,
    /// A previous run's JSON result.
    File {
        path: PathBuf,
        rel: String,
    },
}

/// A validated drift check.
#[derive(Debug, Clone)]
pub struct Drift {
    pub sae: String,
    pub prompts: String,
    pub baseline: Baseline,
    pub max_rate_change: f64,
    pub max_fvu: f64,
    pub min_ce_recovered: f64,
}

impl Kind for Drift {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self> {
        let s = v.required(id, "sae", &spec.sae)?;
        let sae = v.named("SAE", s, n.saes)?;
        let p = v.required(id, "prompts", &spec.prompts)?;
        let prompts = v.set(p, n.prompts)?;
        let b = v.required(id, "baseline", &spec.baseline)?;
        let baseline = if b.get_ref() == "last-pass" {
            Baseline::LastPass
        } else {
            let full = v.confined(b)?;
            v.read(b, "baseline")?;
            Baseline::File {
                path: full,
                rel: b.get_ref().clone(),
            }
        };
        let max_rate_change = v.required(id, "max_rate_change", &spec.max_rate_change)?;
        let max_rate_change = *max_rate_change.get_ref();
        if !(0.0..=1.0).contains(&max_rate_change) {
            if let Some(at) = &spec.max_rate_change {
                v.err(
                    at,
                    format!("`max_rate_change` {max_rate_change} is a change in firing rate, within [0, 1]"),
                );
            }
        }
        let max_fvu = spec
            .max_fvu
            .as_ref()
            .map_or(DEFAULT_MAX_FVU, |x| *x.get_ref());
        if !(max_fvu.is_finite() && max_fvu > 0.0) {
            if let Some(at) = &spec.max_fvu {
                v.err(
                    at,
                    format!("`max_fvu` {max_fvu} is a fraction of variance, above 0"),
                );
            }
        }
        let min_ce_recovered = spec
            .min_ce_recovered
            .as_ref()
            .map_or(DEFAULT_MIN_CE_RECOVERED, |x| *x.get_ref());
        // Below 0 is worse than zero-ablating the hook; above 1 no SAE can reach.
        if !(min_ce_recovered.is_finite() && min_ce_recovered <= 1.0) {
            if let Some(at) = &spec.min_ce_recovered {
                v.err(
                    at,
                    format!("`min_ce_recovered` {min_ce_recovered} is a share of the CE loss, at most 1"),
                );
            }
        }
        Some(Drift {
            sae,
            prompts,
            baseline,
            max_rate_change,
            max_fvu,
            min_ce_recovered,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        plan(self, p)
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        evaluate(self, cx)
    }
}

fn plan(k: &Drift, p: &mut Planner<'_, '_>) {
    let Drift { sae, prompts, .. } = k;
    if let Some(s) = p.instruments.sae_if_resolved(p.policy, sae) {
        p.want(prompts, s.hook);
    }
}

fn evaluate(k: &Drift, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
    let Drift {
        sae: sae_name,
        prompts,
        baseline,
        max_rate_change: max_change,
        max_fvu,
        min_ce_recovered,
    } = k;
    let max_change = *max_change;
    let (p, severity, check_id) = (cx.policy, cx.check.severity, cx.check.id.as_str());
    let s = cx.instruments.sae(p, sae_name)?;
    let t = cx.session.set_tokens(p, prompts)?;
    let rows = cx.session.sparse(&t, &s)?;
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
    let fvu = {
        let acts = cx.session.acts(&t, s.hook)?;
        fvu(&s.sae, &acts, t.prefix)?
    };
    let ce = ce_recovered(cx, &s, &t)?;
    let fit = vec![
        Metric {
            name: format!("SAE FVU on `{prompts}`"),
            value: round(fvu),
            bound: format!("<= {max_fvu}"),
        },
        Metric {
            name: format!("SAE CE loss recovered on `{prompts}`"),
            value: round(ce),
            bound: format!(">= {min_ce_recovered}"),
        },
    ];
    let mut misfits = Vec::new();
    if !at_most(&format!("the SAE's FVU on `{prompts}`"), fvu, *max_fvu)? {
        misfits.push(format!(
            "it leaves {fvu:.3} of the variance on `{prompts}` unexplained (bound {max_fvu})"
        ));
    }
    if !at_least(
        &format!("the CE loss the SAE recovers on `{prompts}`"),
        ce,
        *min_ce_recovered,
    )? {
        misfits.push(format!(
            "spliced in, it recovers {ce:.3} of the next-token CE loss that zero-ablating its \
             hook costs on `{prompts}` (bound {min_ce_recovered})"
        ));
    }
    if !misfits.is_empty() {
        let evidence = Evidence {
            firing_rates: rates,
            ..Evidence::default()
        };
        return Ok(Finding::new(
            violated(severity),
            format!(
                "the SAE `{sae_name}` no longer reconstructs this checkpoint: {}, so its firing \
                 rates are not comparable with the baseline's",
                misfits.join("; ")
            ),
            fit,
            evidence,
        ));
    }
    let sae_digest = s.sae.manifest.root();
    let mut evidence = Evidence {
        firing_rates: rates.clone(),
        ..Evidence::default()
    };
    let loaded;
    let base: Option<&RunResult> = match baseline {
        Baseline::LastPass => cx.last_pass,
        Baseline::File { path, rel } => {
            let text = probes::files::read_text_file(path)
                .map_err(|e| CheckError::Baseline(format!("baseline `{rel}`: {e}")))?;
            loaded = serde_json::from_slice::<RunResult>(&text).map_err(|e| {
                CheckError::Baseline(format!(
                    "baseline `{rel}` is not a mechwatch JSON result: {e}"
                ))
            })?;
            Some(&loaded)
        }
    };
    let Some(base) = base else {
        let mut metrics = vec![Metric {
            name: "latents firing".into(),
            value: rates.len() as f64,
            bound: String::new(),
        }];
        metrics.extend(fit);
        return Ok(Finding::new(Status::Warn, "no earlier passing audit of this model lineage to compare with; this run's firing rates are recorded as the baseline".into(), metrics, evidence));
    };
    let old = base
        .policies
        .iter()
        .filter(|bp| bp.name == p.name)
        .flat_map(|bp| bp.findings.iter())
        .find(|f| f.check == check_id)
        .ok_or_else(|| CheckError::Baseline("the baseline has no result for this check".into()))?;
    let base_sae = base
        .inputs
        .iter()
        .find(|i| i.policy == p.name && i.kind == "sae" && i.sha256 == sae_digest);
    if base_sae.is_none() {
        return Err(CheckError::Baseline(format!("the baseline was computed with a different SAE than `{sae_name}` ({sae_digest}); drift is only comparable with the same SAE")));
    }
    let old_rates: BTreeMap<u32, f64> = old.evidence.firing_rates.iter().copied().collect();
    let new_rates: BTreeMap<u32, f64> = rates.iter().copied().collect();
    let all: BTreeSet<u32> = old_rates.keys().chain(new_rates.keys()).copied().collect();
    let moved: Vec<(u32, f64, f64)> = all
        .into_iter()
        .map(|l| {
            (
                l,
                old_rates.get(&l).copied().unwrap_or(0.0),
                new_rates.get(&l).copied().unwrap_or(0.0),
            )
        })
        .collect::<Vec<_>>();
    let mut beyond = Vec::new();
    for m in moved {
        let what = format!("the change in latent {}'s firing rate", m.0);
        if !at_most(&what, (m.2 - m.1).abs(), max_change)? {
            beyond.push(m);
        }
    }
    let mut moved = beyond;
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
            label: cx.session.label(&s, l, &sets),
            value: round(n - o),
            effect: None,
            measure: format!("change in firing rate on `{prompts}` ({o:.4} -> {n:.4})"),
        });
    }
    let mut metrics = vec![
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
    metrics.extend(fit);
    let (status, explanation) = if moved.is_empty() {
        (Status::Pass, format!("no latent's firing rate on `{prompts}` moved by more than {max_change} from the baseline"))
    } else {
        (violated(severity), format!("{} latents' firing rates on `{prompts}` moved by more than {max_change} from the baseline (largest {max_seen:.4})", moved.len()))
    };
    Ok(Finding::new(status, explanation, metrics, evidence))
}

/// The share of the next-token CE loss on the prompts of `t` that zero-ablating the SAE's
/// hook costs and splicing its reconstruction in wins back, as `mechwatch sae eval` measures
/// it ([`probes::sae::eval::evaluate_captured`]). Like the FVU, on the prompts' own tokens: the
/// chat template's preamble is left as it is and unscored (and so is the first token), so a
/// prompt needs two tokens past it to count.
fn ce_recovered(
    cx: &mut Cx<'_, '_>,
    s: &crate::session::ResolvedSae,
    t: &crate::session::Tokens,
) -> Result<f64, CheckError> {
    let from = t.prefix.max(1);
    // The session's pass over the set captured the hook already: the clean pass starts there.
    let acts = cx.session.acts(t, s.hook)?;
    let (windows, captured): (Vec<Vec<u32>>, Vec<candle_core::Tensor>) = t
        .ids
        .iter()
        .zip(acts.iter())
        .filter(|(w, _)| w.len() >= from + 2)
        .map(|(w, a)| (w.clone(), a.clone()))
        .unzip();
    if windows.is_empty() {
        return Err(CheckError::Unmeasurable(format!(
            "no prompt of `{}` has the {} tokens the SAE's CE loss recovered needs",
            t.name,
            from + 2
        )));
    }
    let started = std::time::Instant::now();
    let micro_batch = cx.session.micro_batch().min(8);
    let r = probes::sae::eval::evaluate_captured(
        cx.session.model,
        &s.sae,
        s.hook,
        &windows,
        &captured,
        from,
        micro_batch,
    )?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        "drift CE loss recovered"
    );
    if !(r.ce_zero_ablation > r.ce_clean && r.ce_loss_recovered.is_finite()) {
        return Err(CheckError::Unmeasurable(format!(
            "zero-ablating `{}` does not raise the next-token CE loss on `{}` (clean {:.4}, \
             zero-ablated {:.4}, SAE spliced in {:.4}), so the share of it the SAE recovers is \
             undefined",
            s.hook, t.name, r.ce_clean, r.ce_zero_ablation, r.ce_sae
        )));
    }
    Ok(r.ce_loss_recovered)
}

/// The fraction of the variance of `acts` (per prompt `[len, d]`, after the first `prefix`
/// positions; attention sinks left out as in training) that `sae` leaves unexplained.
fn fvu(
    sae: &probes::sae::Sae,
    acts: &[candle_core::Tensor],
    prefix: usize,
) -> Result<f64, CheckError> {
    let d = sae.d_in;
    let mut rows: Vec<f32> = Vec::new();
    for a in acts {
        let len = a.dim(0)?;
        if len > prefix {
            rows.extend(
                a.narrow(0, prefix, len - prefix)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
    }
    let sinks = probes::sae::sink_rows(&rows, d);
    let kept: Vec<f32> = rows
        .chunks(d)
        .zip(&sinks)
        .filter(|(_, s)| !**s)
        .flat_map(|(r, _)| r.iter().copied())
        .collect();
    let n = kept.len() / d;
    if n == 0 {
        return Err(CheckError::Unmeasurable(
            "no token of the prompt set is left to measure the SAE's fit on".into(),
        ));
    }
    let x = candle_core::Tensor::from_vec(kept, (n, d), &candle_core::Device::Cpu)?;
    let recon = sae.reconstruct(&x)?;
    // Sums over about a million elements: in f64, so that the six digits reported hold.
    let f64 = candle_core::DType::F64;
    let sse = (&x - &recon)?
        .to_dtype(f64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    let x = x.to_dtype(f64)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    let total = centred.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let f = sse / total;
    if !f.is_finite() {
        return Err(CheckError::NonFinite(format!(
            "the SAE's FVU is {f} (unexplained {sse}, total variance {total})"
        )));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};
    use probes::testing;

    use crate::checks::testing::{metric, run_policy, Tiny};
    use crate::result::{Finding, Status};

    const DRIFT: &str = r#"
[[checks]]
id = "drift"
kind = "drift"
severity = "medium"
sae = "s"
prompts = "pos"
baseline = "last-pass"
max_rate_change = 0.0
max_fvu = 1000.0
min_ce_recovered = -1000.0
"#;

    #[test]
    fn without_a_baseline_the_rates_are_recorded_with_a_warning() {
        let tiny = Tiny::new();
        let f = tiny.finding(DRIFT);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(!f.evidence.firing_rates.is_empty());
        assert!(f
            .evidence
            .firing_rates
            .iter()
            .all(|(_, r)| (0.0..=1.0).contains(r)));
    }

    #[test]
    fn the_same_model_does_not_drift_from_its_own_audit() {
        let tiny = Tiny::new();
        let first = tiny.run(DRIFT, None);
        let second = tiny.run(DRIFT, Some(&first));
        let f = &second.policies[0].findings[0];
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert_eq!(metric(f, "latents beyond the bound"), 0.0);
    }

    #[test]
    fn an_sae_that_no_longer_reconstructs_the_checkpoint_fails() {
        let tiny = Tiny::new();
        let f = tiny.finding(&DRIFT.replace("max_fvu = 1000.0", "max_fvu = 1e-9"));
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert!(f.explanation.contains("no longer reconstructs"), "{f:?}");
        assert!(metric(&f, "SAE FVU") > 1e-9);
        let f = tiny.finding(DRIFT);
        assert_eq!(f.status, Status::Warn, "{f:?}");
    }

    /// A tiny model that predicts its prompts: its blocks write nothing and its unembedding
    /// reads each word's embedding as the word two on, so that zero-ablating the residual
    /// stream costs CE loss that an SAE can win back. `blind`: its unembedding is zero, so
    /// that it predicts nothing, zero-ablated or not.
    fn predictive_model(dir: &Path, blind: bool) -> probes::Model {
        let mut tensors = testing::llama_tensors(7);
        let embed = tensors[0].1.clone();
        for (name, t) in &mut tensors {
            if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                *t = t.zeros_like().unwrap();
            }
            if name == "lm_head.weight" {
                // Row k + 2 is word k's embedding.
                let v = testing::VOCAB;
                *t = Tensor::cat(
                    &[
                        embed.narrow(0, v - 2, 2).unwrap(),
                        embed.narrow(0, 0, v - 2).unwrap(),
                    ],
                    0,
                )
                .unwrap();
                if blind {
                    *t = t.zeros_like().unwrap();
                }
            }
        }
        let path = dir.join("predictive");
        testing::write_dir(&path, &testing::llama_config(), &tensors);
        testing::load(&path)
    }

    /// A ReLU SAE at `blocks.0.hook_resid_post` with latents `x+` and `x-` per dimension,
    /// decoded by `decode` (`[D, D]`: the identity reconstructs exactly); its digest.
    fn write_sae(dir: &Path, decode: &Tensor) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let d = testing::D;
        let cfg = serde_json::json!({
            "architecture": "standard", "d_in": d, "d_sae": 2 * d, "dtype": "float32",
            "apply_b_dec_to_input": true, "normalize_activations": "none",
            "metadata": {"hook_name": "blocks.0.hook_resid_post"}
        });
        std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
        let eye = Tensor::eye(d, DType::F32, &Device::Cpu).unwrap();
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let tensors = vec![
            (
                "W_enc".to_string(),
                Tensor::cat(&[&eye, &eye.neg().unwrap()], 1).unwrap(),
            ),
            ("b_enc".to_string(), zeros(2 * d)),
            (
                "W_dec".to_string(),
                Tensor::cat(&[decode, &decode.neg().unwrap()], 0).unwrap(),
            ),
            ("b_dec".to_string(), zeros(d)),
        ];
        probes::safetensors::write(
            &dir.join("sae_weights.safetensors"),
            &tensors,
            &BTreeMap::new(),
        )
        .unwrap();
        probes::sae::load_sae(dir).unwrap().manifest.root()
    }

    /// The drift check of a policy beside `model` reading the SAE at `sae/` (FVU unbounded, so
    /// that only the CE loss recovered can fail it).
    fn ce_finding(dir: &Path, model: &probes::Model, sae_sha: &str) -> Finding {
        let prompts: String = (0..8)
            .map(|i| {
                (0..6)
                    .map(|j| format!("w{}", 10 + i + 2 * j))
                    .collect::<Vec<_>>()
                    .join(" ")
                    + "\n"
            })
            .collect();
        std::fs::write(dir.join("prompts.txt"), prompts).unwrap();
        let policy = format!(
            r#"schema = 1
name = "fit"
version = "1"

[prompts.text]
file = "prompts.txt"
chat = false

[saes.s]
path = "sae"
sha256 = "{sae_sha}"

[[checks]]
id = "drift"
kind = "drift"
severity = "medium"
sae = "s"
prompts = "text"
baseline = "last-pass"
max_rate_change = 1.0
max_fvu = 1000.0
"#
        );
        let path = dir.join("fit.toml");
        std::fs::write(&path, policy).unwrap();
        run_policy(model, &path).policies[0].findings[0].clone()
    }

    #[test]
    fn an_sae_that_recovers_too_little_ce_loss_fails_and_one_that_recovers_it_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let model = predictive_model(tmp.path(), false);
        let d = probes::testing::D;
        let eye = Tensor::eye(d, DType::F32, &Device::Cpu).unwrap();
        let exact = write_sae(&tmp.path().join("sae"), &eye);
        let good = ce_finding(tmp.path(), &model, &exact);
        // No baseline yet: a warning, with the SAE's fit within its bounds.
        assert_eq!(good.status, Status::Warn, "{good:?}");
        let recovered = metric(&good, "SAE CE loss recovered");
        assert!(recovered > 0.99, "{good:?}");
        assert!(recovered >= super::DEFAULT_MIN_CE_RECOVERED);

        // Decoded one dimension over: each latent writes its neighbour's direction.
        let shifted = Tensor::cat(
            &[
                eye.narrow(1, 1, d - 1).unwrap(),
                eye.narrow(1, 0, 1).unwrap(),
            ],
            1,
        )
        .unwrap();
        std::fs::remove_dir_all(tmp.path().join("sae")).unwrap();
        let bad_sha = write_sae(&tmp.path().join("sae"), &shifted);
        let bad = ce_finding(tmp.path(), &model, &bad_sha);
        assert_eq!(bad.status, Status::Fail, "{bad:?}");
        assert!(
            metric(&bad, "SAE CE loss recovered") < super::DEFAULT_MIN_CE_RECOVERED,
            "{bad:?}"
        );
        assert!(
            bad.explanation.contains("no longer reconstructs")
                && bad.explanation.contains("CE loss"),
            "{bad:?}"
        );
    }

    #[test]
    fn ce_loss_recovered_where_zero_ablation_costs_nothing_is_an_error() {
        // A model that predicts nothing: zeroing its residual stream does not raise the CE
        // loss, so no share of it can be recovered, and the check cannot pass.
        let tmp = tempfile::tempdir().unwrap();
        let model = predictive_model(tmp.path(), true);
        let eye = Tensor::eye(probes::testing::D, DType::F32, &Device::Cpu).unwrap();
        let exact = write_sae(&tmp.path().join("sae"), &eye);
        let f = ce_finding(tmp.path(), &model, &exact);
        assert_eq!(f.status, Status::Error, "{f:?}");
        assert!(
            f.explanation
                .contains("does not raise the next-token CE loss on `text`"),
            "{f:?}"
        );
    }

    #[test]
    fn a_ce_bound_above_1_is_an_error_at_its_check() {
        let tiny = Tiny::new();
        let errs = tiny
            .policy(&DRIFT.replace("min_ce_recovered = -1000.0", "min_ce_recovered = 1.5"))
            .unwrap_err();
        let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            all.iter()
                .any(|e| e.contains("tiny.toml:") && e.contains("`min_ce_recovered`")),
            "{all:?}"
        );
    }

    #[test]
    fn two_runs_give_identical_results() {
        let tiny = Tiny::new();
        let a = serde_json::to_string(&tiny.run(DRIFT, None)).unwrap();
        let b = serde_json::to_string(&tiny.run(DRIFT, None)).unwrap();
        assert_eq!(a, b);
    }
}
