//! SAE evaluation on held-out text: L0, explained variance / FVU, dead latents, and the cost
//! of splicing the SAE in: CE loss recovered `(CE_zero - CE_sae) / (CE_zero - CE_clean)` and
//! the KL divergence from the clean next-token distribution.
//!
//! The first token of each window is left untouched and unscored (its residual norm is
//! atypical, and training skips it too); [`evaluate_from`] leaves a longer start alone. So are the attention sinks elsewhere in a window
//! ([`super::SINK_NORM_RATIO`]): they are counted in `sink_tokens`, kept out of L0 and FVU,
//! and neither spliced nor zeroed.

use std::sync::Arc;

use candle_core::{Tensor, D};
use serde::Serialize;

use super::{candle, keep_sinks, sink_rows, Sae, SaeError};
use crate::hooks::{HookPoint, Hooks, Positions};
use crate::model::Model;
use crate::transformer::{Padding, Unembed};

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub hook: String,
    pub tokens: u64,
    /// Attention-sink tokens left out of L0 and FVU (and left untouched when splicing).
    pub sink_tokens: u64,
    pub l0: f64,
    pub fvu: f64,
    pub explained_variance: f64,
    pub dead_latents: usize,
    pub d_sae: usize,
    pub ce_clean: f64,
    pub ce_sae: f64,
    pub ce_zero_ablation: f64,
    pub ce_loss_recovered: f64,
    pub kl_sae: f64,
}

fn run_err(e: crate::error::RunError) -> SaeError {
    SaeError::Format {
        path: "<model>".into(),
        detail: e.to_string(),
    }
}

/// Per-token next-token CE `[b, t-1]` and log-probs `[b, t-1, vocab]` from logits `[b, t, v]`.
fn next_token_ce(logits: &Tensor, windows: &[Vec<u32>]) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t, _) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let targets: Vec<u32> = windows
        .iter()
        .flat_map(|w| w[1..].iter().copied())
        .collect();
    let targets = Tensor::from_vec(targets, (b, t - 1, 1), logits.device())?;
    let ce = logp.gather(&targets, 2)?.squeeze(2)?.neg()?;
    Ok((ce, logp))
}

/// Evaluate `sae` at `hook` on `windows` (token ids; each at least 3 long, of any lengths:
/// windows of one length run together, so no batch needs padding).
pub fn evaluate(
    model: &Model,
    sae: &Arc<Sae>,
    hook: HookPoint,
    windows: &[Vec<u32>],
    micro_batch: usize,
) -> Result<EvalReport, SaeError> {
    evaluate_from(model, sae, hook, windows, 1, micro_batch)
}

/// [`evaluate`] with the first `from` tokens of every window (at least 1; a chat template's
/// preamble, say) left untouched and unscored: each window needs `from + 2` tokens.
pub fn evaluate_from(
    model: &Model,
    sae: &Arc<Sae>,
    hook: HookPoint,
    windows: &[Vec<u32>],
    from: usize,
    micro_batch: usize,
) -> Result<EvalReport, SaeError> {
    let bad = |detail: String| SaeError::Format {
        path: "<evaluation windows>".into(),
        detail,
    };
    let from = from.max(1);
    if windows.is_empty() {
        return Err(bad("no windows to evaluate on".into()));
    }
    if let Some(i) = windows.iter().position(|w| w.len() < from + 2) {
        return Err(bad(format!(
            "window {} has {} tokens; predictions are scored from token {} on, so a window \
             needs at least {}",
            i + 1,
            windows[i].len(),
            from + 1,
            from + 2
        )));
    }
    let mut lengths: Vec<usize> = windows.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let (mut tokens, mut sink_tokens, mut l0_sum, mut sse) = (0u64, 0u64, 0f64, 0f64);
    let (mut sum_x, mut sum_sq) = (vec![0f64; sae.d_in], 0f64);
    let mut fired = vec![false; sae.d_sae];
    let (mut ce_clean, mut ce_sae, mut ce_zero, mut kl) = (0f64, 0f64, 0f64, 0f64);
    let mut scored = 0usize;
    for t in lengths {
        let group: Vec<Vec<u32>> = windows.iter().filter(|w| w.len() == t).cloned().collect();
        scored += group.len() * (t - 1 - from);
        let later: Vec<i64> = (from as i64..t as i64).collect();
        let capture = Hooks::new().capture(hook);
        let spliced = Hooks::new().replace(
            hook,
            Positions::Indices(later.clone()),
            keep_sinks(sae.splice(vec![], false), sae.d_in),
        );
        let zeroed = Hooks::new().replace(
            hook,
            Positions::Indices(later),
            keep_sinks(Arc::new(|x: &Tensor| x.zeros_like()), sae.d_in),
        );
        for chunk in group.chunks(micro_batch.max(1)) {
            let clean = model
                .transformer
                .forward(chunk, Padding::Right, &capture, Unembed::All)
                .map_err(run_err)?;
            let act = &clean.captures[&hook];
            let x = act
                .narrow(1, from, t - from)
                .and_then(|a| a.reshape(((), sae.d_in)))
                .map_err(candle("activations"))?;
            let (acts, recon) = sae.encode_and_reconstruct(&x)?;
            let rows = |t: &Tensor, what| -> Result<Vec<f32>, SaeError> {
                t.flatten_all()
                    .and_then(|a| a.to_vec1())
                    .map_err(candle(what))
            };
            let (a, xv) = (rows(&acts, "latents")?, rows(&x, "fvu")?);
            let err = rows(&(&recon - &x).map_err(candle("fvu"))?, "fvu")?;
            let sinks = sink_rows(&xv, sae.d_in);
            let scored = a
                .chunks(sae.d_sae)
                .zip(xv.chunks(sae.d_in))
                .zip(err.chunks(sae.d_in))
                .zip(&sinks)
                .filter(|(_, sink)| !**sink);
            for ((latents, row), e) in scored.map(|(r, _)| r) {
                for (j, v) in latents.iter().enumerate() {
                    if *v > 0.0 {
                        l0_sum += 1.0;
                        fired[j] = true;
                    }
                }
                for (i, v) in row.iter().enumerate() {
                    sum_x[i] += f64::from(*v);
                    sum_sq += f64::from(v * v);
                }
                sse += e.iter().map(|v| f64::from(v * v)).sum::<f64>();
                tokens += 1;
            }
            sink_tokens += sinks.iter().filter(|s| **s).count() as u64;

            let (ce_c, logp_c) = next_token_ce(clean.logits.as_ref().expect("logits"), chunk)
                .map_err(candle("ce"))?;
            let s_out = model
                .transformer
                .forward(chunk, Padding::Right, &spliced, Unembed::All)
                .map_err(run_err)?;
            let (ce_s, logp_s) = next_token_ce(s_out.logits.as_ref().expect("logits"), chunk)
                .map_err(candle("ce"))?;
            let z_out = model
                .transformer
                .forward(chunk, Padding::Right, &zeroed, Unembed::All)
                .map_err(run_err)?;
            let (ce_z, _) = next_token_ce(z_out.logits.as_ref().expect("logits"), chunk)
                .map_err(candle("ce"))?;
            // Score the predictions made at the spliced positions (`from..t-1` predict the
            // tokens after them).
            let tail = |c: &Tensor| -> Result<f64, SaeError> {
                c.narrow(1, from, t - 1 - from)
                    .and_then(|c| c.sum_all()?.to_scalar::<f32>())
                    .map(f64::from)
                    .map_err(candle("ce"))
            };
            ce_clean += tail(&ce_c)?;
            ce_sae += tail(&ce_s)?;
            ce_zero += tail(&ce_z)?;
            let p_c = logp_c.exp().map_err(candle("kl"))?;
            let kl_tok = (p_c * (&logp_c - &logp_s).map_err(candle("kl"))?)
                .and_then(|k| k.sum(D::Minus1))
                .map_err(candle("kl"))?;
            kl += tail(&kl_tok)?;
        }
    }
    let n = tokens as f64;
    let total_var = sum_sq - sum_x.iter().map(|s| s * s).sum::<f64>() / n;
    let fvu = sse / total_var.max(1e-12);
    let scored = scored as f64;
    let (ce_clean, ce_sae, ce_zero) = (ce_clean / scored, ce_sae / scored, ce_zero / scored);
    Ok(EvalReport {
        hook: hook.to_string(),
        tokens,
        sink_tokens,
        l0: l0_sum / n,
        fvu,
        explained_variance: 1.0 - fvu,
        dead_latents: fired.iter().filter(|f| !**f).count(),
        d_sae: sae.d_sae,
        ce_clean,
        ce_sae,
        ce_zero_ablation: ce_zero,
        ce_loss_recovered: (ce_zero - ce_sae) / (ce_zero - ce_clean),
        kl_sae: kl / scored,
    })
}
