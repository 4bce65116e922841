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
use rayon::prelude::*;
use serde::Serialize;

use super::{candle, keep_sinks, sink_rows, Sae, SaeError};
use crate::hooks::{HookPoint, Hooks, Positions};
use crate::model::Model;
use crate::transformer::Unembed;

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

/// Next-token CE `[n]` and log-probs `[n, vocab]` of `logits` `[n, vocab]` (predictions at
/// consecutive positions) against the `n` tokens that follow them.
fn next_token_ce(logits: &Tensor, targets: &[u32]) -> candle_core::Result<(Tensor, Tensor)> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), logits.device())?;
    let ce = logp.gather(&targets, 1)?.squeeze(1)?.neg()?;
    Ok((ce, logp))
}

/// Evaluate `sae` at `hook` on `windows` (token ids; each at least 3 long, of any lengths).
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
    evaluate_windows(model, sae, hook, windows, None, from, micro_batch)
}

/// [`evaluate_from`] given each window's activations at `hook` (`[len, d_in]`, as a pass
/// over the windows captured them): where `hook` is in the residual stream, the clean pass
/// then runs only the blocks after it.
pub fn evaluate_captured(
    model: &Model,
    sae: &Arc<Sae>,
    hook: HookPoint,
    windows: &[Vec<u32>],
    acts: &[Tensor],
    from: usize,
    micro_batch: usize,
) -> Result<EvalReport, SaeError> {
    evaluate_windows(model, sae, hook, windows, Some(acts), from, micro_batch)
}

fn evaluate_windows(
    model: &Model,
    sae: &Arc<Sae>,
    hook: HookPoint,
    windows: &[Vec<u32>],
    acts: Option<&[Tensor]>,
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
    // Micro-batches run one per thread; each sums its own windows, and the sums are added in
    // a fixed order, so the report does not depend on the thread count. Windows of like
    // length share a micro-batch (by length, then position), so little of a pass is padding.
    if let Some(a) = acts {
        let d = sae.d_in;
        let fits = |(w, x): (&Vec<u32>, &Tensor)| x.dims() == [w.len(), d];
        if a.len() != windows.len() || !windows.iter().zip(a).all(fits) {
            return Err(bad(format!(
                "the captured activations do not match the {} windows (each `[tokens, {d}]`)",
                windows.len()
            )));
        }
    }
    // Where every window starts with the same `from` tokens, they are computed once for all
    // the passes: no pass edits them.
    let start = model
        .transformer
        .shared_start(windows, from, &Hooks::new(), Unembed::From(from))
        .map_err(run_err)?;
    let mut order: Vec<usize> = (0..windows.len()).collect();
    order.sort_by_key(|&i| windows[i].len());
    let sums = order
        .chunks(micro_batch.max(1))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|rows| {
            let chunk: Vec<Vec<u32>> = rows.iter().map(|&i| windows[i].clone()).collect();
            let captured: Option<Vec<Tensor>> =
                acts.map(|a| rows.iter().map(|&i| a[i].clone()).collect());
            chunk_sums(
                model,
                sae,
                hook,
                &chunk,
                captured.as_deref(),
                from,
                start.as_ref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut total = Sums::new(sae);
    for s in sums {
        total.add(s);
    }
    let Sums {
        tokens,
        sink_tokens,
        l0_sum,
        sse,
        sum_x,
        sum_sq,
        fired,
        ce_clean,
        ce_sae,
        ce_zero,
        kl,
        scored,
    } = total;
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

/// What one micro-batch of windows adds to an evaluation.
struct Sums {
    tokens: u64,
    sink_tokens: u64,
    l0_sum: f64,
    sse: f64,
    sum_x: Vec<f64>,
    sum_sq: f64,
    fired: Vec<bool>,
    ce_clean: f64,
    ce_sae: f64,
    ce_zero: f64,
    kl: f64,
    /// Predictions scored.
    scored: usize,
}

impl Sums {
    fn new(sae: &Sae) -> Self {
        Self {
            tokens: 0,
            sink_tokens: 0,
            l0_sum: 0.0,
            sse: 0.0,
            sum_x: vec![0.0; sae.d_in],
            sum_sq: 0.0,
            fired: vec![false; sae.d_sae],
            ce_clean: 0.0,
            ce_sae: 0.0,
            ce_zero: 0.0,
            kl: 0.0,
            scored: 0,
        }
    }

    fn add(&mut self, o: Sums) {
        self.tokens += o.tokens;
        self.sink_tokens += o.sink_tokens;
        self.l0_sum += o.l0_sum;
        self.sse += o.sse;
        for (a, b) in self.sum_x.iter_mut().zip(o.sum_x) {
            *a += b;
        }
        self.sum_sq += o.sum_sq;
        for (a, b) in self.fired.iter_mut().zip(o.fired) {
            *a |= b;
        }
        self.ce_clean += o.ce_clean;
        self.ce_sae += o.ce_sae;
        self.ce_zero += o.ce_zero;
        self.kl += o.kl;
        self.scored += o.scored;
    }
}

/// The sums of one micro-batch of windows (right-padded together): SAE statistics on the
/// activations from `from` on, and next-token CE and KL of the predictions made there, clean,
/// with the SAE spliced in and with the hook zeroed. The preamble before `from` is neither
/// changed nor unembedded, and where the windows share it (`start`), it is computed once.
fn chunk_sums(
    model: &Model,
    sae: &Arc<Sae>,
    hook: HookPoint,
    chunk: &[Vec<u32>],
    captured: Option<&[Tensor]>,
    from: usize,
    start: Option<&crate::SharedStart>,
) -> Result<Sums, SaeError> {
    let mut s = Sums::new(sae);
    let t = chunk.iter().map(Vec::len).max().unwrap_or(0);
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
    let m = &model.transformer;
    let pass = |hooks: &Hooks| {
        match start {
            Some(s) => m.forward_after(s, chunk, hooks, Unembed::From(from)),
            None => m.forward_shared(chunk, from, hooks, Unembed::From(from)),
        }
        .map_err(run_err)
    };
    let pass_from = |x: &Tensor, hooks: &Hooks| {
        match start {
            Some(s) => m.forward_from_after(s, chunk, hook, x, hooks, Unembed::From(from)),
            None => m.forward_shared_from(chunk, from, hook, x, hooks, Unembed::From(from)),
        }
        .map_err(run_err)
    };
    // The clean pass: from the captured activations where they are given and the hook is in
    // the residual stream, else whole.
    let (clean_logits, act) = match captured {
        Some(rows) if hook.is_residual_stream() => {
            let act = right_padded(rows, t).map_err(candle("captured activations"))?;
            let out = pass_from(&act, &Hooks::new())?;
            (out.logits, act)
        }
        _ => {
            // Stitched to every position: the activations are read from `from` on.
            let mut out = m
                .forward_shared(chunk, from, &capture, Unembed::From(from))
                .map_err(run_err)?;
            let act = out.captures.remove(&hook).expect("captured");
            (out.logits, act)
        }
    };
    let act = &act;
    let x = chunk
        .iter()
        .enumerate()
        .map(|(r, w)| act.get(r)?.narrow(0, from, w.len() - from))
        .collect::<candle_core::Result<Vec<_>>>()
        .and_then(|rows| Tensor::cat(&rows, 0))
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
    let kept = a
        .chunks(sae.d_sae)
        .zip(xv.chunks(sae.d_in))
        .zip(err.chunks(sae.d_in))
        .zip(&sinks)
        .filter(|(_, sink)| !**sink);
    for ((latents, row), e) in kept.map(|(r, _)| r) {
        for (j, v) in latents.iter().enumerate() {
            if *v > 0.0 {
                s.l0_sum += 1.0;
                s.fired[j] = true;
            }
        }
        for (i, v) in row.iter().enumerate() {
            s.sum_x[i] += f64::from(*v);
            s.sum_sq += f64::from(v * v);
        }
        s.sse += e.iter().map(|v| f64::from(v * v)).sum::<f64>();
        s.tokens += 1;
    }
    s.sink_tokens += sinks.iter().filter(|s| **s).count() as u64;

    // The edited passes share the clean one's blocks before the hook: in the residual stream,
    // they start there from its activation.
    let edited = |hooks: &Hooks| {
        if hook.is_residual_stream() {
            pass_from(act, hooks)
        } else {
            pass(hooks)
        }
    };
    let clean = clean_logits.expect("unembedded");
    let with_sae = edited(&spliced)?.logits.expect("unembedded");
    let zero = edited(&zeroed)?.logits.expect("unembedded");
    for (r, w) in chunk.iter().enumerate() {
        // Positions `from..len-1` predict the tokens after them.
        let n = w.len() - 1 - from;
        let targets = &w[from + 1..];
        let row = |l: &Tensor| l.get(r).and_then(|l| l.narrow(0, 0, n));
        let (ce_c, logp_c) = row(&clean)
            .and_then(|l| next_token_ce(&l, targets))
            .map_err(candle("ce"))?;
        let (ce_s, logp_s) = row(&with_sae)
            .and_then(|l| next_token_ce(&l, targets))
            .map_err(candle("ce"))?;
        let (ce_z, _) = row(&zero)
            .and_then(|l| next_token_ce(&l, targets))
            .map_err(candle("ce"))?;
        let kl_tok = logp_c
            .exp()
            .and_then(|p| p * (&logp_c - &logp_s)?)
            .and_then(|k| k.sum(D::Minus1))
            .map_err(candle("kl"))?;
        let sum = |c: &Tensor| -> Result<f64, SaeError> {
            c.sum_all()
                .and_then(|c| c.to_scalar::<f32>())
                .map(f64::from)
                .map_err(candle("ce"))
        };
        s.ce_clean += sum(&ce_c)?;
        s.ce_sae += sum(&ce_s)?;
        s.ce_zero += sum(&ce_z)?;
        s.kl += sum(&kl_tok)?;
        s.scored += n;
    }
    Ok(s)
}

/// Per-row activations `[len, d]` as one right-padded `[rows, t, d]` batch.
fn right_padded(rows: &[Tensor], t: usize) -> candle_core::Result<Tensor> {
    let padded = rows
        .iter()
        .map(|x| {
            let len = x.dim(0)?;
            x.pad_with_zeros(0, 0, t - len)?.unsqueeze(0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&padded, 0)
}
