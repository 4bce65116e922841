//! TopK SAE training (Gao et al. 2024), or BatchTopK (Bussmann et al. 2024), on activations
//! streamed from the model.
//!
//! Loss: normalised MSE plus AuxK on dead latents (`k_aux = d_in / 2`, coefficient 1/32);
//! decoder rows kept at unit norm (the parallel gradient component removed, rows renormalised
//! after each step); `b_dec` initialised at the data mean; `W_enc` initialised as `W_decᵀ`.
//! Inputs are scaled by one constant so their mean norm is `sqrt(d_in)`; the constant is folded
//! into the saved weights, so the SAELens file needs no normalisation. Attention-sink tokens
//! (residual norm over [`super::SINK_NORM_RATIO`] times the batch median) are skipped: one of
//! them would outweigh the thousands of ordinary tokens in its step.
//!
//! The backward pass is written out by hand: everything but the encoder matmul is sparse in
//! the `k` active latents, so each latent's rows are updated in one parallel pass over the
//! parameters (see [`step`]).
//! Training is seeded and deterministic, and resumes from its last checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::{candle, SaeError};
use crate::error::CandleContext;
use crate::hooks::{HookPoint, Hooks};
use crate::model::Model;
use crate::transformer::{Padding, Unembed};

/// How the active latents are chosen while training.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sparsity {
    /// The `k` largest latents of every token (Gao et al. 2024); saved as `topk`.
    #[default]
    TopK,
    /// The `k x tokens` largest latents of the whole batch (Bussmann et al. 2024), so a token
    /// takes as many as it needs and `k` holds on average; saved as `jumprelu` with one
    /// threshold: the mean over the last fifth of training (the learning-rate decay, when the
    /// weights are close to final) of the smallest activation each batch kept.
    BatchTopK,
}

/// Settings of one training run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainConfig {
    pub hook: String,
    pub latents: usize,
    pub k: usize,
    #[serde(default)]
    pub sparsity: Sparsity,
    /// Training tokens (the corpus repeats if it is shorter).
    pub tokens: u64,
    /// Tokens per window; the first token of each window is skipped (its norm is atypical).
    pub context: usize,
    /// Windows per forward pass; one SAE step per forward pass.
    pub windows_per_step: usize,
    pub lr: f64,
    pub seed: u64,
    /// A latent that has not fired for this many tokens is dead (and gets the AuxK loss).
    pub dead_after_tokens: u64,
    pub checkpoint_every_steps: u64,
    /// Alignments of the window grid over the token stream. With 2, the grid is laid a second
    /// time half a window later, so every token is also seen at another position in its window,
    /// after a different amount of context.
    #[serde(default = "one")]
    pub window_shifts: usize,
    /// Visit the windows in a new seeded order in every epoch after the first.
    #[serde(default)]
    pub reshuffle_epochs: bool,
}

fn one() -> usize {
    1
}

/// The most windows one training step may batch: far above any useful batch, far below an
/// allocation that overflows.
pub const MAX_WINDOWS_PER_STEP: usize = 1 << 16;

impl TrainConfig {
    pub fn validate(&self, d_in: usize) -> Result<(), SaeError> {
        let bad = |field: &str, detail: String| SaeError::Config {
            path: PathBuf::from("<train>"),
            field: field.into(),
            detail,
        };
        if self.k == 0 || self.k > self.latents {
            return Err(bad(
                "k",
                format!(
                    "k = {} must be between 1 and the {} latents",
                    self.k, self.latents
                ),
            ));
        }
        if self.latents < d_in / 2 {
            return Err(bad(
                "latents",
                format!("{} latents is too few for d_in = {d_in}", self.latents),
            ));
        }
        if self.context < 2 || self.windows_per_step == 0 || self.tokens == 0 {
            return Err(bad(
                "tokens",
                "context >= 2, windows per step >= 1 and tokens >= 1 are needed".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "lr",
                format!("learning rate {} must be positive and finite", self.lr),
            ));
        }
        // Weights, their gradients and two optimiser moments, each d_in x latents twice.
        let need = (d_in as u128) * (self.latents as u128) * 4 * 8;
        let have = u128::from(crate::files::physical_memory());
        if need > have {
            return Err(bad(
                "latents",
                format!(
                    "{} latents of width {d_in} need about {} MB for weights, gradients and \
                     optimiser state, more than this machine's {} MB",
                    self.latents,
                    need >> 20,
                    have >> 20
                ),
            ));
        }
        if self.windows_per_step > MAX_WINDOWS_PER_STEP {
            return Err(bad(
                "windows_per_step",
                format!(
                    "{} windows per step: at most {MAX_WINDOWS_PER_STEP} are allowed",
                    self.windows_per_step
                ),
            ));
        }
        if self.window_shifts == 0 || self.window_shifts > self.context {
            return Err(bad(
                "window_shifts",
                format!(
                    "{} window shifts: between 1 and the context of {} tokens are allowed",
                    self.window_shifts, self.context
                ),
            ));
        }
        Ok(())
    }
}

/// Progress of a run, passed to the caller after every step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// While the corpus's activations are computed once, before the first step (windows
    /// done, windows in all); the other fields then describe the run's start.
    pub caching: Option<(usize, usize)>,
    pub step: u64,
    pub tokens: u64,
    pub total_tokens: u64,
    pub fvu: f32,
    pub l0: f32,
    pub dead: usize,
    pub tokens_per_sec: f64,
    pub eta_secs: f64,
}

/// The trainer's state: parameters in scaled space, Adam moments and counters.
struct State {
    d: usize,
    n: usize,
    /// Encoder rows `[n][d]` (SAELens' W_enc transposed).
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    /// Decoder rows `[n][d]`, unit norm.
    w_dec: Vec<f32>,
    b_dec: Vec<f32>,
    /// Adam moments of `w_enc`, `b_enc`, `w_dec`, `b_dec`.
    m: [Vec<f32>; 4],
    v: [Vec<f32>; 4],
    step: u64,
    tokens: u64,
    /// Tokens since each latent last fired.
    since_fired: Vec<u64>,
    scale: f32,
    /// BatchTopK: the smallest activation the last batch kept, and the sum and count of those
    /// cuts over the learning-rate decay (the saved threshold is their mean).
    last_cut: f32,
    cut_sum: f64,
    cut_count: u64,
}

const ADAM_B1: f32 = 0.9;
const ADAM_B2: f32 = 0.999;
const ADAM_EPS: f32 = 1e-8;
const AUX_COEFF: f32 = 1.0 / 32.0;

impl State {
    fn new(d: usize, n: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut w_dec: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        for row in w_dec.chunks_mut(d) {
            normalize(row);
        }
        let w_enc = w_dec.clone();
        let sizes = [n * d, n, n * d, d];
        Self {
            d,
            n,
            w_enc,
            b_enc: vec![0.0; n],
            w_dec,
            b_dec: vec![0.0; d],
            m: sizes.map(|s| vec![0.0; s]),
            v: sizes.map(|s| vec![0.0; s]),
            step: 0,
            tokens: 0,
            since_fired: vec![0; n],
            scale: 0.0,
            last_cut: 0.0,
            cut_sum: 0.0,
            cut_count: 0,
        }
    }
}

fn normalize(row: &mut [f32]) {
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    row.iter_mut().for_each(|v| *v /= norm);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// Top `k` of `(index, value)` by value, ties by index.
fn top(
    values: impl Iterator<Item = (u32, f32)>,
    k: usize,
    scratch: &mut Vec<(u32, f32)>,
) -> Vec<(u32, f32)> {
    scratch.clear();
    scratch.extend(values);
    let k = k.min(scratch.len());
    if k == 0 {
        return vec![];
    }
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    scratch[..k]
        .iter()
        .filter(|(_, v)| *v > 0.0)
        .copied()
        .collect()
}

/// Tokens per parallel work item in the AuxK selection (each item keeps its own scratch).
const ROWS_PER_TASK: usize = 16;

/// The active latents of each row of `pre` (`[b][n]` pre-activations): the per-row top `k`,
/// or for BatchTopK the top `k x b` of the batch (taken from each row's top `4k`), updating
/// the batch's cut.
fn select(s: &mut State, pre: &[f32], n: usize, cfg: &TrainConfig) -> Vec<Vec<(u32, f32)>> {
    let per_row = match cfg.sparsity {
        Sparsity::TopK => cfg.k,
        Sparsity::BatchTopK => 4 * cfg.k,
    };
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(n)
        .map(|p| super::select_top_biased(p, None, per_row))
        .collect();
    if cfg.sparsity == Sparsity::TopK {
        return rows;
    }
    let mut all: Vec<f32> = rows.iter().flatten().map(|(_, v)| *v).collect();
    let keep = (cfg.k * rows.len()).min(all.len());
    if keep == 0 {
        return rows;
    }
    let (_, cut, _) = all.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a));
    let cut = *cut;
    s.last_cut = cut;
    // Ties at the cut may keep a few more than `keep`; the result is still deterministic.
    rows.into_iter()
        .map(|row| row.into_iter().filter(|(_, v)| *v >= cut).collect())
        .collect()
}

/// One active latent's part in one token's loss: its activation, and the gradient of the loss
/// with respect to that activation. `source` indexes the token's gradient with respect to its
/// reconstruction (`[0, b)`: the main loss; `[b, 2b)`: AuxK).
#[derive(Clone, Copy)]
struct Entry {
    latent: u32,
    token: u32,
    source: u32,
    act: f32,
    dact: f32,
}

/// For each token `r`, its active latents' entries given `g[r]` = dL/d(reconstruction).
fn entries_for(
    s: &State,
    acts: &[Vec<(u32, f32)>],
    g: &[f32],
    source_offset: usize,
) -> Vec<Vec<Entry>> {
    let d = s.d;
    acts.par_iter()
        .enumerate()
        .map(|(r, act)| {
            let gr = &g[r * d..(r + 1) * d];
            act.iter()
                .map(|&(j, a)| Entry {
                    latent: j,
                    token: r as u32,
                    source: (source_offset + r) as u32,
                    act: a,
                    dact: dot(gr, &s.w_dec[j as usize * d..(j as usize + 1) * d]),
                })
                .collect()
        })
        .collect()
}

/// One optimisation step on `x` (`[b][d]`, scaled). Returns (FVU, L0).
///
/// Everything after the dense encoder matmul is sparse in the active latents: each token's
/// gradient reaches only their rows. The step therefore collects, per token, each active
/// latent's activation and gradient, groups them by latent, and then updates every latent's
/// rows (gradient, radial projection, Adam, renormalisation) in one parallel pass. Sums run in
/// token order within each latent, so the result does not depend on the thread count.
fn step(s: &mut State, x: &[f32], cfg: &TrainConfig, lr: f32) -> Result<(f32, f32), SaeError> {
    let (d, n) = (s.d, s.n);
    let b = x.len() / d;
    let xc: Vec<f32> = x
        .chunks(d)
        .flat_map(|r| r.iter().zip(&s.b_dec).map(|(a, c)| a - c))
        .collect();
    // Dense encoder pre-activations: [b, n] = xc [b, d] @ w_encᵀ + b_enc.
    let pre = {
        let xt = Tensor::from_slice(&xc, (b, d), &Device::Cpu).map_err(candle("encoder"))?;
        let wt = Tensor::from_slice(&s.w_enc, (n, d), &Device::Cpu).map_err(candle("encoder"))?;
        let bt = Tensor::from_slice(&s.b_enc, n, &Device::Cpu).map_err(candle("encoder"))?;
        xt.matmul(&wt.t().map_err(candle("encoder"))?)
            .and_then(|p| p.broadcast_add(&bt))
            .and_then(|p| p.flatten_all())
            .and_then(|p| p.to_vec1::<f32>())
            .map_err(candle("encoder"))?
    };
    let dead: Vec<bool> = s
        .since_fired
        .iter()
        .map(|&t| t > cfg.dead_after_tokens)
        .collect();
    let any_dead = dead.contains(&true);
    let k_aux = d / 2;
    let denom = centred_sum_sq(x, d, b);

    // The main loss: reconstruct each token from its active latents.
    let acts = select(s, &pre, n, cfg);
    let (w_dec, b_dec) = (&s.w_dec, &s.b_dec);
    let recon_of = |act: &[(u32, f32)], base: &[f32]| -> Vec<f32> {
        let mut y = base.to_vec();
        for &(j, a) in act {
            axpy(&mut y, a, &w_dec[j as usize * d..(j as usize + 1) * d]);
        }
        y
    };
    // Per token: residual x - recon, then g = dL/d recon = 2 (recon - x) / denom.
    let resid: Vec<f32> = acts
        .par_iter()
        .enumerate()
        .flat_map_iter(|(r, act)| {
            let y = recon_of(act, b_dec);
            let xr = &x[r * d..(r + 1) * d];
            xr.iter().zip(y).map(|(t, y)| t - y).collect::<Vec<_>>()
        })
        .collect();
    let sse: f32 = resid.iter().map(|e| e * e).sum();
    let mut g: Vec<f32> = resid.iter().map(|e| -2.0 * e / denom).collect();
    let mut per_token = entries_for(s, &acts, &g, 0);

    // AuxK: dead latents reconstruct the residual the live ones left.
    if any_dead {
        let aux_acts: Vec<Vec<(u32, f32)>> = pre
            .par_chunks(n * ROWS_PER_TASK)
            .flat_map_iter(|block| {
                let mut scratch = Vec::with_capacity(n);
                block
                    .chunks(n)
                    .map(|p| {
                        let dead_values = p
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| dead[*i])
                            .map(|(i, &v)| (i as u32, v));
                        top(dead_values, k_aux, &mut scratch)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let aux_denom = centred_sum_sq(&resid, d, b);
        let zero = vec![0.0f32; d];
        let g_aux: Vec<f32> = aux_acts
            .par_iter()
            .enumerate()
            .flat_map_iter(|(r, aux)| {
                let e = recon_of(aux, &zero);
                let res = &resid[r * d..(r + 1) * d];
                e.into_iter()
                    .zip(res)
                    .map(|(y, t)| AUX_COEFF * 2.0 * (y - t) / aux_denom)
                    .collect::<Vec<_>>()
            })
            .collect();
        let aux_entries = entries_for(s, &aux_acts, &g_aux, b);
        per_token
            .iter_mut()
            .zip(aux_entries)
            .for_each(|(main, aux)| main.extend(aux));
        g.extend(g_aux);
    }

    // Group the entries by latent, in token order.
    let mut starts = vec![0usize; n + 1];
    for e in per_token.iter().flatten() {
        starts[e.latent as usize + 1] += 1;
    }
    for j in 0..n {
        starts[j + 1] += starts[j];
    }
    let mut by_latent = vec![
        Entry {
            latent: 0,
            token: 0,
            source: 0,
            act: 0.0,
            dact: 0.0
        };
        starts[n]
    ];
    let mut fill = starts.clone();
    for e in per_token.iter().flatten() {
        let j = e.latent as usize;
        by_latent[fill[j]] = *e;
        fill[j] += 1;
    }
    let mut fired = vec![false; n];
    for (j, _) in acts.iter().flatten() {
        fired[*j as usize] = true;
    }

    // dL/d b_dec = Σ_t g_t - Σ_j (dL/d b_enc[j]) w_enc[j], with the pre-step w_enc.
    let g_b_enc: Vec<f32> = (0..n)
        .map(|j| {
            by_latent[starts[j]..starts[j + 1]]
                .iter()
                .map(|e| e.dact)
                .sum()
        })
        .collect();
    let mut g_b_dec = vec![0.0f32; d];
    for gr in g[..b * d].chunks(d) {
        axpy(&mut g_b_dec, 1.0, gr);
    }
    for (j, gb) in g_b_enc.iter().enumerate() {
        if *gb != 0.0 {
            axpy(&mut g_b_dec, -gb, &s.w_enc[j * d..(j + 1) * d]);
        }
    }

    s.step += 1;
    let adam = Adam::at(s.step, lr);
    let [m_we, m_be, m_wd, m_bd] = &mut s.m;
    let [v_we, v_be, v_wd, v_bd] = &mut s.v;
    let rows = s
        .w_enc
        .par_chunks_mut(d)
        .zip(m_we.par_chunks_mut(d))
        .zip(v_we.par_chunks_mut(d))
        .zip(s.w_dec.par_chunks_mut(d))
        .zip(m_wd.par_chunks_mut(d))
        .zip(v_wd.par_chunks_mut(d));
    rows.enumerate().for_each_init(
        || (vec![0.0f32; d], vec![0.0f32; d]),
        |(ge, gd), (j, (((((we, mwe), vwe), wd), mwd), vwd))| {
            ge.fill(0.0);
            gd.fill(0.0);
            for e in &by_latent[starts[j]..starts[j + 1]] {
                let t = e.token as usize;
                let src = e.source as usize;
                axpy(gd, e.act, &g[src * d..(src + 1) * d]);
                axpy(ge, e.dact, &xc[t * d..(t + 1) * d]);
            }
            // Keep decoder rows on the unit sphere: drop the radial gradient component.
            let radial = dot(gd, wd);
            if radial != 0.0 {
                axpy(gd, -radial, wd);
            }
            adam.update(we, mwe, vwe, ge);
            adam.update(wd, mwd, vwd, gd);
            normalize(wd);
        },
    );
    adam.update(&mut s.b_enc, m_be, v_be, &g_b_enc);
    adam.update(&mut s.b_dec, m_bd, v_bd, &g_b_dec);

    for (j, f) in fired.iter().enumerate() {
        s.since_fired[j] = if *f { 0 } else { s.since_fired[j] + b as u64 };
    }
    s.tokens += b as u64;
    let active_total: usize = acts.iter().map(Vec::len).sum();
    Ok((sse / denom, active_total as f32 / b as f32))
}

/// Σ over rows of `||row - mean||²` for `b` rows of width `d` (at least 1e-12).
fn centred_sum_sq(rows: &[f32], d: usize, b: usize) -> f32 {
    let mut mean = vec![0.0f32; d];
    for r in rows.chunks(d) {
        axpy(&mut mean, 1.0, r);
    }
    mean.iter_mut().for_each(|m| *m /= b as f32);
    rows.chunks(d)
        .map(|r| {
            r.iter()
                .zip(&mean)
                .map(|(a, m)| (a - m) * (a - m))
                .sum::<f32>()
        })
        .sum::<f32>()
        .max(1e-12)
}

/// Adam with bias correction at one step.
#[derive(Clone, Copy)]
struct Adam {
    lr: f32,
    c1: f32,
    c2: f32,
}

impl Adam {
    fn at(step: u64, lr: f32) -> Self {
        let t = step as i32;
        Self {
            lr,
            c1: 1.0 - ADAM_B1.powi(t),
            c2: 1.0 - ADAM_B2.powi(t),
        }
    }

    fn update(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for q in 0..p.len() {
            m[q] = ADAM_B1 * m[q] + (1.0 - ADAM_B1) * g[q];
            v[q] = ADAM_B2 * v[q] + (1.0 - ADAM_B2) * g[q] * g[q];
            p[q] -= self.lr * (m[q] / self.c1) / ((v[q] / self.c2).sqrt() + ADAM_EPS);
        }
    }
}

/// Token windows of `context` tokens cut from the corpus, in a seeded order. Documents are
/// concatenated (separated by the end-of-text token when the model has one), as SAELens does,
/// so short documents still contribute.
pub fn windows(
    model: &Model,
    docs: &[String],
    context: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, SaeError> {
    shifted_windows(model, docs, context, 1, seed)
}

/// [`windows`] over `shifts` alignments of the window grid (offsets `j * context / shifts`),
/// shuffled together.
fn shifted_windows(
    model: &Model,
    docs: &[String],
    context: usize,
    shifts: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, SaeError> {
    if context < 2 {
        return Err(SaeError::Config {
            path: PathBuf::from("<windows>"),
            field: "context".into(),
            detail: format!("a window of {context} tokens predicts nothing: at least 2 are needed"),
        });
    }
    let sep = model.config().eos_token_ids.first().copied();
    let mut stream = Vec::new();
    for d in docs {
        let ids = model.codec.encode(d).map_err(|e| SaeError::Format {
            path: PathBuf::from("<corpus>"),
            detail: e.to_string(),
        })?;
        stream.extend(ids);
        stream.extend(sep);
    }
    let mut out = window_grid(&stream, context, shifts);
    if out.is_empty() {
        return Err(SaeError::Format {
            path: PathBuf::from("<corpus>"),
            detail: format!(
                "the corpus holds {} tokens, less than one window of {context} (is it empty?)",
                stream.len()
            ),
        });
    }
    out.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    Ok(out)
}

/// Whole windows of `context` tokens cut from `stream` on `shifts` grids, the `j`-th starting
/// at token `j * context / shifts`, grid after grid.
fn window_grid(stream: &[u32], context: usize, shifts: usize) -> Vec<Vec<u32>> {
    let shifts = shifts.max(1);
    (0..shifts)
        .flat_map(|j| {
            let offset = (j * context / shifts).min(stream.len());
            stream[offset..].chunks_exact(context).map(<[u32]>::to_vec)
        })
        .collect()
}

/// The windows visited at global positions `range` (step x windows per step + i): epoch by
/// epoch through all `n` windows, in stored order in the first epoch and, with `reshuffle`, in
/// a seeded order of its own in each later one (shuffled once per epoch that `range` touches).
fn windows_visited(
    range: std::ops::Range<usize>,
    n: usize,
    reshuffle: bool,
    seed: u64,
) -> Vec<usize> {
    let mut order: Option<(usize, Vec<usize>)> = None;
    range
        .map(|at| {
            let (epoch, i) = (at / n, at % n);
            if !reshuffle || epoch == 0 {
                return i;
            }
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut o: Vec<usize> = (0..n).collect();
                let epoch_seed = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                o.shuffle(&mut rand::rngs::StdRng::seed_from_u64(epoch_seed));
                order = Some((epoch, o));
            }
            order.as_ref().expect("set above").1[i]
        })
        .collect()
}

/// `x` (`[n][d]`) without its attention-sink rows ([`super::SINK_NORM_RATIO`]).
fn drop_sinks(x: Vec<f32>, d: usize) -> Vec<f32> {
    let sinks = super::sink_rows(&x, d);
    if !sinks.contains(&true) {
        return x;
    }
    x.chunks(d)
        .zip(&sinks)
        .filter(|(_, sink)| !**sink)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

/// Activations at `hook` for a batch of windows, first token of each dropped: `[b * (t-1)][d]`.
pub fn activations(
    model: &Model,
    hook: HookPoint,
    windows: &[Vec<u32>],
) -> Result<Vec<f32>, SaeError> {
    let hooks = Hooks::new().capture(hook);
    let mut x = Vec::new();
    model
        .transformer
        .forward_chunked(
            windows,
            // Two passes of half the windows each run in parallel (`forward_chunked`); the
            // split depends on the batch alone, never on the thread count.
            (windows.len() / 2).max(4),
            Padding::Right,
            &hooks,
            Unembed::None,
            |_, out| {
                // The first position of every window is skipped (see the module docs).
                let act = &out.captures[&hook];
                let rows = act
                    .dim(1)
                    .and_then(|t| act.narrow(1, 1, t - 1))
                    .and_then(|a| a.flatten_all()?.to_vec1::<f32>())
                    .run_ctx("activations")?;
                x.extend(rows);
                Ok(())
            },
        )
        .map_err(|e| SaeError::Format {
            path: PathBuf::from("<model>"),
            detail: e.to_string(),
        })?;
    Ok(x)
}

fn ckpt_paths(out: &Path) -> (PathBuf, PathBuf) {
    (
        out.join("checkpoint.safetensors"),
        out.join("checkpoint.json"),
    )
}

/// Delete `out`'s resumable checkpoint, if any: a finished SAE does not need it (for the
/// default SAE's size it is three times the SAE).
pub fn remove_checkpoint(out: &Path) -> Result<(), SaeError> {
    let (st, js) = ckpt_paths(out);
    for path in [js, st] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(SaeError::Io { path, source: e });
            }
            _ => {}
        }
    }
    Ok(())
}

fn save_checkpoint(out: &Path, s: &State, cfg: &TrainConfig) -> Result<(), SaeError> {
    let (st, js) = ckpt_paths(out);
    let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu).map_err(candle("checkpoint"));
    let mut tensors = vec![
        ("w_enc".to_string(), t(&s.w_enc)?),
        ("b_enc".to_string(), t(&s.b_enc)?),
        ("w_dec".to_string(), t(&s.w_dec)?),
        ("b_dec".to_string(), t(&s.b_dec)?),
    ];
    for i in 0..4 {
        tensors.push((format!("m{i}"), t(&s.m[i])?));
        tensors.push((format!("v{i}"), t(&s.v[i])?));
    }
    let since: Vec<f32> = s.since_fired.iter().map(|&x| x as f32).collect();
    tensors.push(("since_fired".into(), t(&since)?));
    crate::safetensors::write(&st, &tensors, &BTreeMap::new()).map_err(|e| SaeError::Format {
        path: st.clone(),
        detail: e.to_string(),
    })?;
    let meta = serde_json::json!({"config": cfg, "step": s.step, "tokens": s.tokens, "scale": s.scale,
            "last_cut": s.last_cut, "cut_sum": s.cut_sum, "cut_count": s.cut_count});
    let tmp = js.with_extension("json.partial");
    std::fs::write(&tmp, meta.to_string())
        .and_then(|()| std::fs::rename(&tmp, &js))
        .map_err(|source| SaeError::Io { path: js, source })
}

fn load_checkpoint(out: &Path, cfg: &TrainConfig, d: usize) -> Result<Option<State>, SaeError> {
    let (st, js) = ckpt_paths(out);
    if !js.exists() || !st.exists() {
        return Ok(None);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&js).map_err(|source| SaeError::Io {
            path: js.clone(),
            source,
        })?)
        .map_err(|e| SaeError::Format {
            path: js.clone(),
            detail: e.to_string(),
        })?;
    let saved: TrainConfig =
        serde_json::from_value(meta["config"].clone()).map_err(|e| SaeError::Format {
            path: js.clone(),
            detail: e.to_string(),
        })?;
    if saved != *cfg {
        return Err(SaeError::Format {
            path: js,
            detail: "a checkpoint of a run with different settings is here; use another --out or delete it".into(),
        });
    }
    let f = crate::safetensors::SafetensorsFile::read(&st).map_err(|e| SaeError::Format {
        path: st.clone(),
        detail: e.to_string(),
    })?;
    let get = |name: &str| -> Result<Vec<f32>, SaeError> {
        let info = f.get(name).ok_or_else(|| SaeError::Tensor {
            path: st.clone(),
            tensor: name.into(),
            detail: "missing".into(),
        })?;
        f.load_f32(info, &Device::Cpu)
            .map_err(|e| SaeError::Tensor {
                path: st.clone(),
                tensor: name.into(),
                detail: e.to_string(),
            })?
            .to_vec1()
            .map_err(candle("checkpoint"))
    };
    let mut s = State::new(d, cfg.latents, cfg.seed);
    s.w_enc = get("w_enc")?;
    s.b_enc = get("b_enc")?;
    s.w_dec = get("w_dec")?;
    s.b_dec = get("b_dec")?;
    for i in 0..4 {
        s.m[i] = get(&format!("m{i}"))?;
        s.v[i] = get(&format!("v{i}"))?;
    }
    s.since_fired = get("since_fired")?.iter().map(|&x| x as u64).collect();
    s.step = meta["step"].as_u64().unwrap_or(0);
    s.tokens = meta["tokens"].as_u64().unwrap_or(0);
    s.scale = meta["scale"].as_f64().unwrap_or(1.0) as f32;
    s.last_cut = meta["last_cut"].as_f64().unwrap_or(0.0) as f32;
    s.cut_sum = meta["cut_sum"].as_f64().unwrap_or(0.0);
    s.cut_count = meta["cut_count"].as_u64().unwrap_or(0);
    Ok(Some(s))
}

/// Save the trained SAE in SAELens v6 format (scaling folded into the weights).
fn save_saelens(out: &Path, s: &State, cfg: &TrainConfig, model: &Model) -> Result<(), SaeError> {
    let (d, n, f) = (s.d, s.n, s.scale);
    // Scaled space: x_s = f x. Folded: W_enc' = f W_enc, b_dec' = b_dec / f, W_dec' = W_dec / f.
    let w_enc = Tensor::from_vec(
        s.w_enc.iter().map(|v| v * f).collect::<Vec<_>>(),
        (n, d),
        &Device::Cpu,
    )
    .and_then(|t| t.t()?.contiguous())
    .map_err(candle("saving"))?;
    let w_dec = Tensor::from_vec(
        s.w_dec.iter().map(|v| v / f).collect::<Vec<_>>(),
        (n, d),
        &Device::Cpu,
    )
    .map_err(candle("saving"))?;
    let b_dec = Tensor::from_vec(
        s.b_dec.iter().map(|v| v / f).collect::<Vec<_>>(),
        d,
        &Device::Cpu,
    )
    .map_err(candle("saving"))?;
    let b_enc = Tensor::from_slice(&s.b_enc, n, &Device::Cpu).map_err(candle("saving"))?;
    let path = out.join("sae_weights.safetensors");
    let mut tensors = vec![
        ("W_enc".to_string(), w_enc),
        ("b_enc".to_string(), b_enc),
        ("W_dec".to_string(), w_dec),
        ("b_dec".to_string(), b_dec),
    ];
    // Pre-activations are the same in scaled and original space, so the threshold is too.
    let architecture = match cfg.sparsity {
        Sparsity::TopK => "topk",
        Sparsity::BatchTopK => {
            let threshold = if s.cut_count > 0 {
                (s.cut_sum / s.cut_count as f64) as f32
            } else {
                s.last_cut
            };
            let th =
                Tensor::from_vec(vec![threshold; n], n, &Device::Cpu).map_err(candle("saving"))?;
            tensors.push(("threshold".to_string(), th));
            "jumprelu"
        }
    };
    crate::safetensors::write(&path, &tensors, &BTreeMap::new()).map_err(|e| SaeError::Format {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let mut cfg_json = serde_json::json!({
        "architecture": architecture,
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": true,
        "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": false,
        "reshape_activations": "none",
        "metadata": {
            "model_name": model.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "model_digest": model.manifest.root(),
            "hook_name": cfg.hook,
            "hook_head_index": null,
            "context_size": cfg.context,
            "prepend_bos": false,
            "dataset_path": "local corpus (see training.json)",
            "sae_lens_training_version": null,
            "activation_scale_folded": f,
            "trained_sparsity": cfg.sparsity,
            "trained_k": cfg.k,
        }
    });
    if cfg.sparsity == Sparsity::TopK {
        cfg_json["k"] = cfg.k.into();
    }
    let p = out.join("cfg.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg_json).expect("json"))
        .map_err(|source| SaeError::Io { path: p, source })
}

/// Corpora whose activations fit in this many bytes (as f16) are run through the model once
/// and trained on from memory for every later epoch; larger ones stream, one forward per step
/// ([`train`]; [`train_within`] takes another bound).
pub const ACTIVATION_CACHE_BYTES: usize = 1 << 30;

/// The activations of every window, in window order and rounded to f16, when training sees the
/// corpus more than once and they fit in `limit_bytes`. f16 keeps 11 significant
/// bits, far finer than an SAE's reconstruction error, and holds twice the corpus of f32; a
/// value beyond its range becomes infinite and its token is dropped as an attention sink. They
/// are computed in fixed batches of `windows_per_step` windows, so a resumed run rebuilds
/// exactly the same values.
fn activation_cache(
    model: &Model,
    hook: HookPoint,
    wins: &[Vec<u32>],
    cfg: &TrainConfig,
    d: usize,
    limit_bytes: usize,
    mut note: impl FnMut(usize) -> std::ops::ControlFlow<()>,
) -> Result<Option<Vec<half::f16>>, SaeError> {
    let per_window = (cfg.context - 1) * d;
    let corpus_tokens = (wins.len() * (cfg.context - 1)) as u64;
    let bytes = wins.len() * per_window * std::mem::size_of::<half::f16>();
    if cfg.tokens <= corpus_tokens || bytes > limit_bytes {
        return Ok(None);
    }
    let mut all = Vec::with_capacity(wins.len() * per_window);
    for batch in wins.chunks(cfg.windows_per_step) {
        all.extend(training_activations(model, hook, batch)?);
        if note(all.len() / per_window).is_break() {
            return Err(SaeError::Interrupted { step: 0 });
        }
    }
    Ok(Some(all))
}

/// [`activations`] rounded to f16, as training sees them whether they are kept in memory or
/// not, so that a memory bound never changes what training learns.
fn training_activations(
    model: &Model,
    hook: HookPoint,
    windows: &[Vec<u32>],
) -> Result<Vec<half::f16>, SaeError> {
    Ok(activations(model, hook, windows)?
        .into_iter()
        .map(half::f16::from_f32)
        .collect())
}

/// Train a TopK SAE at `cfg.hook` on `docs`, writing SAELens files and checkpoints to `out`,
/// keeping at most [`ACTIVATION_CACHE_BYTES`] of activations in memory.
pub fn train(
    model: &Model,
    docs: &[String],
    cfg: &TrainConfig,
    out: &Path,
    progress: impl FnMut(&Progress) -> std::ops::ControlFlow<()>,
) -> Result<Progress, SaeError> {
    train_within(model, docs, cfg, out, ACTIVATION_CACHE_BYTES, progress)
}

/// [`train`], keeping at most `cache_bytes` of activations in memory (0: stream every step).
/// The bound changes only time and memory: the weights are the same byte for byte.
pub fn train_within(
    model: &Model,
    docs: &[String],
    cfg: &TrainConfig,
    out: &Path,
    cache_bytes: usize,
    mut progress: impl FnMut(&Progress) -> std::ops::ControlFlow<()>,
) -> Result<Progress, SaeError> {
    let c = model.config();
    let hook = HookPoint::parse(&cfg.hook, c.n_layers).map_err(|e| SaeError::Mismatch {
        path: out.to_path_buf(),
        detail: e.to_string(),
    })?;
    if !hook.is_residual_width() {
        return Err(SaeError::Mismatch {
            path: out.to_path_buf(),
            detail: format!("`{}` is not a residual-width hook", cfg.hook),
        });
    }
    let d = c.d_model;
    cfg.validate(d)?;
    std::fs::create_dir_all(out).map_err(|source| SaeError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let wins = shifted_windows(model, docs, cfg.context, cfg.window_shifts, cfg.seed)?;
    let per_step = cfg.windows_per_step;
    let mut state = match load_checkpoint(out, cfg, d)? {
        Some(s) => {
            tracing::info!(
                step = s.step,
                tokens = s.tokens,
                "resuming SAE training from checkpoint"
            );
            s
        }
        None => {
            let mut s = State::new(d, cfg.latents, cfg.seed);
            // Scale and b_dec from the first batch: mean norm -> sqrt(d), b_dec = data mean.
            let first: Vec<Vec<u32>> = (0..per_step)
                .map(|i| wins[i % wins.len()].clone())
                .collect();
            let x = drop_sinks(activations(model, hook, &first)?, d);
            let rows = x.len() / d;
            let mean_norm = x
                .chunks(d)
                .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
                .sum::<f32>()
                / rows as f32;
            s.scale = (d as f32).sqrt() / mean_norm.max(1e-12);
            for i in 0..d {
                s.b_dec[i] = x.chunks(d).map(|r| r[i]).sum::<f32>() / rows as f32 * s.scale;
            }
            s
        }
    };
    let start_tokens = state.tokens;
    let tokens_per_step = (per_step * (cfg.context - 1)) as u64;
    let total_steps = cfg.tokens.div_ceil(tokens_per_step);
    let mut last = Progress {
        caching: None,
        step: state.step,
        tokens: state.tokens,
        total_tokens: cfg.tokens,
        fvu: f32::NAN,
        l0: 0.0,
        dead: 0,
        tokens_per_sec: 0.0,
        eta_secs: 0.0,
    };
    let cache = activation_cache(model, hook, &wins, cfg, d, cache_bytes, |done| {
        progress(&Progress {
            caching: Some((done, wins.len())),
            ..last.clone()
        })
    })
    .map_err(|e| match e {
        SaeError::Interrupted { .. } => SaeError::Interrupted { step: state.step },
        e => e,
    })?;
    // The rate and ETA count training steps only, not the pass above.
    let start = Instant::now();
    // The activations of step s + 1 are fetched while the SAE learns from those of step s:
    // the same data in the same order as one after the other, on both cores at once.
    let fetch = |step: u64| -> Result<Vec<f32>, SaeError> {
        let at = step as usize * per_step;
        let ids = windows_visited(
            at..at + per_step,
            wins.len(),
            cfg.reshuffle_epochs,
            cfg.seed,
        )
        .into_iter();
        match &cache {
            Some(cache) => {
                let row = (cfg.context - 1) * d;
                Ok(ids
                    .flat_map(|w| &cache[w * row..(w + 1) * row])
                    .map(|v| v.to_f32())
                    .collect())
            }
            None => {
                let batch: Vec<Vec<u32>> = ids.map(|w| wins[w].clone()).collect();
                Ok(training_activations(model, hook, &batch)?
                    .into_iter()
                    .map(half::f16::to_f32)
                    .collect())
            }
        }
    };
    let mut next = (state.step < total_steps)
        .then(|| fetch(state.step))
        .transpose()?;
    while let Some(x) = next.take() {
        let mut x = drop_sinks(x, d);
        x.iter_mut().for_each(|v| *v *= state.scale);
        // Linear decay over the last fifth of training.
        let frac = state.step as f64 / total_steps as f64;
        let lr = if frac > 0.8 {
            cfg.lr * (1.0 - frac) / 0.2
        } else {
            cfg.lr
        };
        let following = state.step + 1;
        let (stepped, fetched) = rayon::join(
            || step(&mut state, &x, cfg, lr as f32),
            || (following < total_steps).then(|| fetch(following)),
        );
        let (fvu, l0) = stepped?;
        if frac > 0.8 && cfg.sparsity == Sparsity::BatchTopK {
            state.cut_sum += f64::from(state.last_cut);
            state.cut_count += 1;
        }
        next = fetched.transpose()?;
        let elapsed = start.elapsed().as_secs_f64().max(1e-9);
        let rate = (state.tokens - start_tokens) as f64 / elapsed;
        last = Progress {
            caching: None,
            step: state.step,
            tokens: state.tokens,
            total_tokens: total_steps * tokens_per_step,
            fvu,
            l0,
            dead: state
                .since_fired
                .iter()
                .filter(|&&t| t > cfg.dead_after_tokens)
                .count(),
            tokens_per_sec: rate,
            eta_secs: (total_steps - state.step) as f64 * tokens_per_step as f64 / rate.max(1e-9),
        };
        let stop = progress(&last).is_break();
        if stop || state.step % cfg.checkpoint_every_steps == 0 || state.step == total_steps {
            save_checkpoint(out, &state, cfg)?;
        }
        if stop {
            return Err(SaeError::Interrupted { step: state.step });
        }
    }
    save_saelens(out, &state, cfg, model)?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_grids_show_each_token_after_other_context() {
        let stream: Vec<u32> = (0..100).collect();
        let one = window_grid(&stream, 16, 1);
        assert_eq!(one.len(), 6);
        assert_eq!(one[1], (16..32).collect::<Vec<u32>>());
        let two = window_grid(&stream, 16, 2);
        assert_eq!(two.len(), 6 + 5);
        assert_eq!(&two[..6], &one[..]);
        assert_eq!(two[6], (8..24).collect::<Vec<u32>>());
        // Token 20 sits at position 4 of one window and position 12 of another.
        let at: Vec<usize> = two
            .iter()
            .filter_map(|w| w.iter().position(|&t| t == 20))
            .collect();
        assert_eq!(at, vec![4, 12]);
        // A stream too short for the shifted grid gives it no windows, and no panic.
        assert_eq!(window_grid(&stream[..20], 16, 2).len(), 1);
    }

    #[test]
    fn every_epoch_visits_every_window_once() {
        let n = 50;
        let epoch = |e: usize, reshuffle| -> Vec<usize> {
            windows_visited(e * n..(e + 1) * n, n, reshuffle, 7)
        };
        let identity: Vec<usize> = (0..n).collect();
        assert_eq!(
            epoch(0, true),
            identity,
            "the first epoch keeps the stored order"
        );
        assert_eq!(epoch(3, false), identity);
        let (e1, e2) = (epoch(1, true), epoch(2, true));
        for e in [&e1, &e2] {
            let mut sorted = e.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, identity, "an epoch skipped or repeated a window");
        }
        assert_ne!(e1, identity);
        assert_ne!(e1, e2, "two epochs in the same order");
        assert_eq!(e1, epoch(1, true), "the order is not seeded");
    }
}
