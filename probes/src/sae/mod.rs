//! Sparse autoencoders: loading the community's formats (SAELens v6 and earlier, sparsify,
//! Gemma Scope), encoding and decoding in batches, sparse top activations, splicing into a
//! hook, and feature interventions.
//!
//! Every SAE is held in SAELens' convention: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
//! `W_dec [d_sae, d_in]`, `b_dec [d_in]`, with the input normalisation undone on the way out.

pub mod default;
pub mod eval;
mod load;
pub mod npy;
pub mod search;
pub mod shipped;
pub mod train;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

pub use load::load_sae;

use crate::digest::Manifest;
use crate::hooks::{HookPoint, ReplaceFn};

/// An error loading or using an SAE; each names the file and the field or tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaeError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `cfg.json` lacks a key or holds a bad value.
    #[error("{path}: config field `{field}`: {detail}")]
    Config {
        path: PathBuf,
        field: String,
        detail: String,
    },
    /// A weight tensor is missing, misshapen or non-finite.
    #[error("{path}: tensor `{tensor}`: {detail}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    /// The SAE does not fit the model it is used with.
    #[error("SAE {path} does not fit the model: {detail}")]
    Mismatch { path: PathBuf, detail: String },
    /// Not a folder or file in a known SAE format.
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    /// Training stopped on request; a checkpoint was written and the run can resume.
    #[error("interrupted at step {step}; the checkpoint resumes it")]
    Interrupted { step: u64 },
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

pub(crate) fn candle(context: &str) -> impl FnOnce(candle_core::Error) -> SaeError + '_ {
    move |source| SaeError::Candle {
        context: context.to_string(),
        source: Box::new(source),
    }
}

/// A token whose residual norm exceeds this many times the median of its batch is an
/// attention sink ("massive activation"): SmolLM2's layer-15 residual has norm about 170 on
/// ordinary tokens and about 24,000 on a window's first token and on some early newlines. One
/// such token carries as much variance as tens of thousands of ordinary ones, so it would
/// dominate both the training loss and FVU. Training skips them and evaluation leaves them
/// untouched and unscored, as it does a window's first token.
pub const SINK_NORM_RATIO: f32 = 10.0;

/// Per row of `rows` (`[n][d]`), whether it is an attention sink (see [`SINK_NORM_RATIO`]).
pub fn sink_rows(rows: &[f32], d: usize) -> Vec<bool> {
    let norms: Vec<f32> = rows
        .chunks(d)
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
        .collect();
    let mut sorted = norms.clone();
    sorted.sort_by(f32::total_cmp);
    let Some(&median) = sorted.get(sorted.len() / 2) else {
        return vec![];
    };
    norms
        .iter()
        .map(|n| *n > SINK_NORM_RATIO * median)
        .collect()
}

/// Wrap a replacement so that it leaves attention-sink positions (see [`SINK_NORM_RATIO`])
/// as they were.
pub fn keep_sinks(f: ReplaceFn, d: usize) -> ReplaceFn {
    Arc::new(move |x: &Tensor| {
        let replaced = f(x)?;
        let sinks = sink_rows(&x.flatten_all()?.to_vec1::<f32>()?, d);
        if !sinks.contains(&true) {
            return Ok(replaced);
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = 1;
        let keep = Tensor::from_vec(
            sinks.iter().map(|&s| u8::from(s)).collect::<Vec<u8>>(),
            dims,
            x.device(),
        )?;
        keep.broadcast_as(x.shape())?.where_cond(x, &replaced)
    })
}

/// How the latent activations are computed from the pre-activations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    JumpRelu,
    TopK { k: usize },
    Gated,
}

/// The input normalisation (SAELens `normalize_activations`), undone after decoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Normalization {
    None,
    /// `x * factor` in, `/ factor` out (the factor SAELens folds from its release table).
    ExpectedAverageOnlyIn {
        factor: f32,
    },
    /// Each token scaled to norm `sqrt(d_in)`.
    ConstantNormRescale,
    /// Each token standardised (mean 0, variance 1, eps 1e-5).
    LayerNorm,
}

/// A loaded SAE.
#[derive(Debug, Clone)]
pub struct Sae {
    pub d_in: usize,
    pub d_sae: usize,
    pub activation: Activation,
    pub normalization: Normalization,
    pub apply_b_dec_to_input: bool,
    pub rescale_acts_by_decoder_norm: bool,
    /// The hook it was trained on, in TransformerLens naming, if the files say.
    pub hook: Option<String>,
    pub model_name: Option<String>,
    pub format: &'static str,
    pub w_enc: Tensor,
    pub b_enc: Tensor,
    pub w_dec: Tensor,
    pub b_dec: Tensor,
    pub threshold: Option<Tensor>,
    /// Gated SAEs: `b_gate`, `b_mag`, `r_mag`.
    pub gated: Option<(Tensor, Tensor, Tensor)>,
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// Per token, the active latents: `(latent, activation)` sorted by activation, largest first.
pub type SparseRow = Vec<(u32, f32)>;

/// What happens to one latent when splicing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatentEdit {
    /// Set the latent to this value wherever it is computed.
    Clamp { latent: usize, value: f32 },
    /// Multiply the latent by this factor (0 ablates it).
    Scale { latent: usize, factor: f32 },
}

impl Sae {
    /// Normalise `x` `[n, d_in]`; returns the normalised input and the per-row (scale, shift)
    /// needed to undo it.
    fn normalize(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
        Ok(match self.normalization {
            Normalization::None => (x.clone(), None),
            Normalization::ExpectedAverageOnlyIn { factor } => {
                let n = x.dim(0)?;
                let s = Tensor::full(1.0 / factor, (n, 1), x.device())?;
                let z = Tensor::zeros((n, 1), DType::F32, x.device())?;
                ((x * f64::from(factor))?, Some((s, z)))
            }
            Normalization::ConstantNormRescale => {
                let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                let scale = ((norm + 1e-12)?.recip()? * (self.d_in as f64).sqrt())?;
                let n = x.dim(0)?;
                (
                    x.broadcast_mul(&scale)?,
                    Some((
                        scale.recip()?,
                        Tensor::zeros((n, 1), DType::F32, x.device())?,
                    )),
                )
            }
            Normalization::LayerNorm => {
                let mu = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mu)?;
                let std = (xc.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?.sqrt()?;
                (xc.broadcast_div(&std)?, Some((std, mu)))
            }
        })
    }

    fn denormalize(
        &self,
        y: &Tensor,
        undo: &Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        match undo {
            None => Ok(y.clone()),
            Some((scale, shift)) => y.broadcast_mul(scale)?.broadcast_add(shift),
        }
    }

    fn decoder_norms(&self) -> candle_core::Result<Tensor> {
        self.w_dec.sqr()?.sum(1)?.sqrt()
    }

    /// Pre-activations `[n, d_sae]` of normalised input `x`.
    fn pre(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let x = if self.apply_b_dec_to_input {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x.clone()
        };
        x.matmul(&self.w_enc)?.broadcast_add(bias)
    }

    /// Dense latent activations `[n, d_sae]` of `x` `[n, d_in]`, plus the normalisation undo.
    fn encode_inner(&self, x: &Tensor) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (xn, undo) = self.normalize(x)?;
        let acts = match self.activation {
            Activation::Relu => self.pre(&xn, &self.b_enc)?.relu()?,
            Activation::JumpRelu => {
                let h = self.pre(&xn, &self.b_enc)?;
                let th = self.threshold.as_ref().expect("jumprelu has a threshold");
                let keep = h.broadcast_gt(th)?.to_dtype(DType::F32)?;
                (h.relu()? * keep)?
            }
            Activation::TopK { k } => {
                let mut h = self.pre(&xn, &self.b_enc)?;
                if self.rescale_acts_by_decoder_norm {
                    h = h.broadcast_mul(&self.decoder_norms()?)?;
                }
                let rows = topk_rows(&h, k)?;
                let mut dense = vec![0f32; rows.len() * self.d_sae];
                for (r, row) in rows.iter().enumerate() {
                    for &(i, v) in row {
                        dense[r * self.d_sae + i as usize] = v;
                    }
                }
                let mut t = Tensor::from_vec(dense, (rows.len(), self.d_sae), x.device())?;
                if self.rescale_acts_by_decoder_norm {
                    t = t.broadcast_div(&self.decoder_norms()?)?;
                }
                t
            }
            Activation::Gated => {
                let (b_gate, b_mag, r_mag) = self.gated.as_ref().expect("gated weights");
                let x = if self.apply_b_dec_to_input {
                    xn.broadcast_sub(&self.b_dec)?
                } else {
                    xn.clone()
                };
                let gate = x.matmul(&self.w_enc)?.broadcast_add(b_gate)?;
                let active = gate.gt(0.0)?.to_dtype(DType::F32)?;
                let w_mag = self.w_enc.broadcast_mul(&r_mag.exp()?)?;
                let mag = x.matmul(&w_mag)?.broadcast_add(b_mag)?.relu()?;
                (active * mag)?
            }
        };
        Ok((acts, undo))
    }

    /// Dense latent activations `[n, d_sae]`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor, SaeError> {
        self.check_input(x)?;
        self.encode_inner(x)
            .map(|(a, _)| a)
            .map_err(candle("encoding"))
    }

    /// Reconstruction `[n, d_in]` from latents, in the input's original scale.
    fn decode_inner(
        &self,
        acts: &Tensor,
        undo: &Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let y = acts.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?;
        self.denormalize(&y, undo)
    }

    /// Encode then decode: the SAE's reconstruction of `x` `[n, d_in]`.
    pub fn reconstruct(&self, x: &Tensor) -> Result<Tensor, SaeError> {
        self.encode_and_reconstruct(x).map(|(_, y)| y)
    }

    /// Dense latent activations `[n, d_sae]` and the reconstruction `[n, d_in]` of `x`, from
    /// one encoding.
    pub fn encode_and_reconstruct(&self, x: &Tensor) -> Result<(Tensor, Tensor), SaeError> {
        self.check_input(x)?;
        let (a, undo) = self.encode_inner(x).map_err(candle("encoding"))?;
        let y = self.decode_inner(&a, &undo).map_err(candle("decoding"))?;
        Ok((a, y))
    }

    /// Each latent's coefficient on its decoder row in the reconstruction of each row of `x`
    /// `[n, d_in]`: `c` `[n, d_sae]` such that the reconstruction is `c . W_dec` plus a term
    /// that no latent changes (the decoder bias, and the normalisation's shift). So setting
    /// latent `l` of row `r` to zero changes the reconstruction by exactly
    /// `-c[r, l] * W_dec[l]`, and a metric's gradient `g` at the hook gives that latent the
    /// first-order effect `c[r, l] * (W_dec[l] . g[r])`. Attention-sink rows get zeros: the
    /// SAE leaves them alone (see [`keep_sinks`]).
    pub fn contributions(&self, x: &Tensor) -> Result<Tensor, SaeError> {
        self.check_input(x)?;
        let (a, undo) = self.encode_inner(x).map_err(candle("encoding"))?;
        let flat = x
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(candle("encoding"))?;
        let keep: Vec<f32> = sink_rows(&flat, self.d_in)
            .into_iter()
            .map(|sink| if sink { 0.0 } else { 1.0 })
            .collect();
        let n = keep.len();
        let keep = Tensor::from_vec(keep, (n, 1), x.device()).map_err(candle("encoding"))?;
        let scaled = match undo {
            None => a,
            Some((scale, _)) => a.broadcast_mul(&scale).map_err(candle("encoding"))?,
        };
        scaled.broadcast_mul(&keep).map_err(candle("encoding"))
    }

    /// The first-order effect on a metric of each latent's coefficient `c` `[n, d_sae]` (from
    /// [`Sae::contributions`], or a difference of two), given the metric's gradient `grad`
    /// `[n, d_in]` at the hook: `c[r, l] * (W_dec[l] . grad[r])`, `[n, d_sae]`.
    pub fn latent_effects(&self, c: &Tensor, grad: &Tensor) -> Result<Tensor, SaeError> {
        grad.to_dtype(DType::F32)
            .and_then(|g| g.matmul(&self.w_dec.t()?))
            .and_then(|g| c * g)
            .map_err(candle("latent effects"))
    }

    /// Latent `latent`'s part of the reconstruction for coefficients `c` `[n, d_sae]`:
    /// `c[r, latent] * W_dec[latent]`, `[n, d_in]`.
    pub fn decoded_latent(&self, c: &Tensor, latent: usize) -> Result<Tensor, SaeError> {
        self.check_latent(latent)?;
        c.narrow(1, latent, 1)
            .and_then(|col| col.broadcast_mul(&self.w_dec.narrow(0, latent, 1)?))
            .map_err(candle("decoded latent"))
    }

    /// The active latents of each token row of `x` `[n, d_in]` (at most 64 per row for SAEs
    /// without a fixed k), for statistics over tokens. Attention-sink rows ([`SINK_NORM_RATIO`])
    /// get none: their norm is far outside what SAEs are trained on, and what they fire says
    /// nothing about the text.
    pub fn encode_tokens(&self, x: &Tensor) -> Result<Vec<SparseRow>, SaeError> {
        let mut rows = match self.activation {
            Activation::TopK { .. } => self.encode_topk(x)?,
            _ => self.encode_sparse(x, 64)?,
        };
        let flat = x
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(candle("encoding"))?;
        for (row, sink) in rows.iter_mut().zip(sink_rows(&flat, self.d_in)) {
            if sink {
                row.clear();
            }
        }
        Ok(rows)
    }

    /// For each row of `x`, the active latents sorted by activation (at most `max_per_row`).
    pub fn encode_sparse(
        &self,
        x: &Tensor,
        max_per_row: usize,
    ) -> Result<Vec<SparseRow>, SaeError> {
        let dense = self.encode(x)?;
        topk_rows(&dense, max_per_row)
            .map(|rows| {
                rows.into_iter()
                    .map(|r| r.into_iter().filter(|(_, v)| *v > 0.0).collect())
                    .collect()
            })
            .map_err(candle("sparse activations"))
    }

    /// TopK SAEs: the `k` active latents of each row of `x` `[n, d_in]`, without building the
    /// dense activation matrix. Rows are processed in blocks; top-k selection runs in
    /// parallel across cores.
    pub fn encode_topk(&self, x: &Tensor) -> Result<Vec<SparseRow>, SaeError> {
        use rayon::prelude::*;
        self.check_input(x)?;
        let Activation::TopK { k } = self.activation else {
            return self.encode_sparse(x, self.d_sae);
        };
        let (n, _) = x.dims2().map_err(candle("encoding"))?;
        let mut out = Vec::with_capacity(n);
        // Small blocks keep the pre-activations in cache and the allocator's buffers warm.
        const BLOCK: usize = 512;
        let norms = if self.rescale_acts_by_decoder_norm {
            Some(
                self.decoder_norms()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(candle("encoding"))?,
            )
        } else {
            None
        };
        // x' W_enc + b_enc with x' = x - b_dec: fold b_dec into the bias once.
        let bias: Vec<f32> = if self.apply_b_dec_to_input {
            self.b_dec
                .unsqueeze(0)
                .and_then(|b| b.matmul(&self.w_enc))
                .and_then(|bw| self.b_enc.unsqueeze(0)?.sub(&bw))
                .and_then(|b| b.flatten_all()?.to_vec1())
                .map_err(candle("encoding"))?
        } else {
            self.b_enc.to_vec1().map_err(candle("encoding"))?
        };
        // One block per thread at once, each matmul and selection on its own thread: as with
        // the model's micro-batches, independent blocks use a couple of cores better than one
        // block whose matmul and selection are each split between them.
        let encode_block = |start: usize| -> candle_core::Result<Vec<SparseRow>> {
            let rows = BLOCK.min(n - start);
            let (xn, _) = self.normalize(&x.narrow(0, start, rows)?)?;
            let pre_t = xn.matmul(&self.w_enc)?;
            match &norms {
                // Read the matmul's output in place: no copy of the [rows, d_sae] block.
                None => with_cpu_slice(&pre_t, |pre| {
                    pre.chunks(self.d_sae)
                        .map(|row| select_top_biased(row, Some(&bias), k))
                        .collect()
                }),
                Some(norms) => Ok(pre_t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .chunks_mut(self.d_sae)
                    .map(|row| {
                        row.iter_mut()
                            .zip(norms)
                            .zip(&bias)
                            .for_each(|((v, n), b)| *v = (*v + b) * n);
                        let mut top = select_top_biased(row, None, k);
                        top.iter_mut().for_each(|(i, v)| *v /= norms[*i as usize]);
                        top
                    })
                    .collect()),
            }
        };
        let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
        let blocks: Vec<candle_core::Result<Vec<SparseRow>>> =
            starts.par_iter().map(|&s| encode_block(s)).collect();
        for block in blocks {
            out.extend(block.map_err(candle("encoding"))?);
        }
        Ok(out)
    }

    fn check_input(&self, x: &Tensor) -> Result<(), SaeError> {
        match x.dims() {
            [_, d] if *d == self.d_in => Ok(()),
            dims => Err(SaeError::Mismatch {
                path: self.path.clone(),
                detail: format!("input has shape {dims:?}, expected [n, {}]", self.d_in),
            }),
        }
    }

    /// The unit decoder direction of `latent` (for steering along a feature).
    pub fn decoder_direction(&self, latent: usize) -> Result<Tensor, SaeError> {
        self.check_latent(latent)?;
        let row = self.w_dec.get(latent).map_err(candle("decoder row"))?;
        let norm = row
            .sqr()
            .and_then(|r| r.sum_all())
            .and_then(|n| n.sqrt())
            .and_then(|n| n.to_scalar::<f32>())
            .map_err(candle("decoder row"))?;
        (row / f64::from(norm.max(1e-12))).map_err(candle("decoder row"))
    }

    pub fn check_latent(&self, latent: usize) -> Result<(), SaeError> {
        if latent >= self.d_sae {
            return Err(SaeError::Mismatch {
                path: self.path.clone(),
                detail: format!(
                    "latent {latent} is out of range (the SAE has {} latents)",
                    self.d_sae
                ),
            });
        }
        Ok(())
    }

    /// Check the SAE fits a model with `n_layers` blocks of width `d_model` at `hook`.
    pub fn check_fits(
        &self,
        hook: &str,
        n_layers: usize,
        d_model: usize,
    ) -> Result<HookPoint, SaeError> {
        let point = HookPoint::parse(hook, n_layers).map_err(|e| SaeError::Mismatch {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        if !point.is_residual_width() || self.d_in != d_model {
            return Err(SaeError::Mismatch {
                path: self.path.clone(),
                detail: format!("d_in is {} but `{hook}` has width {d_model}", self.d_in),
            });
        }
        if let Some(own) = &self.hook {
            if own != hook {
                return Err(SaeError::Mismatch {
                    path: self.path.clone(),
                    detail: format!("it was trained on `{own}`, not `{hook}`"),
                });
            }
        }
        Ok(point)
    }

    /// A hook replacement that splices the SAE in: the activation becomes the reconstruction
    /// (after `edits` on the latents), plus the SAE's error term when `with_error` is set, so
    /// that only the edits change the output.
    pub fn splice(self: &Arc<Self>, edits: Vec<LatentEdit>, with_error: bool) -> ReplaceFn {
        let sae = Arc::clone(self);
        Arc::new(move |x: &Tensor| {
            let dims = x.dims().to_vec();
            let flat = x.reshape(((), sae.d_in))?;
            let (acts, undo) = sae.encode_inner(&flat)?;
            let recon = sae.decode_inner(&acts, &undo)?;
            let edited = if edits.is_empty() {
                recon.clone()
            } else {
                let mut a: Vec<f32> = acts.flatten_all()?.to_vec1()?;
                for row in a.chunks_mut(sae.d_sae) {
                    for e in &edits {
                        match *e {
                            LatentEdit::Clamp { latent, value } => row[latent] = value,
                            LatentEdit::Scale { latent, factor } => row[latent] *= factor,
                        }
                    }
                }
                let a = Tensor::from_vec(a, acts.shape(), acts.device())?;
                sae.decode_inner(&a, &undo)?
            };
            let out = if with_error {
                (&edited + (&flat - &recon)?)?
            } else {
                edited
            };
            out.reshape(dims)
        })
    }
}

/// The `k` largest entries of `row + bias` (ReLU applied, zeros dropped), largest first.
///
/// One pass with a k-slot buffer: an entry is compared with the buffer's minimum and only the
/// rare winners (about `k ln(n / k)` of them) cost more. Once the buffer is full, entries are
/// read in blocks of [`SELECT_LANES`] and a block none of whose entries beats the minimum (the
/// common case) is skipped after one vectorised comparison.
pub fn select_top_biased(row: &[f32], bias: Option<&[f32]>, k: usize) -> SparseRow {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut buf = TopBuffer {
        vals: vec![f32::NEG_INFINITY; k],
        idx: vec![u32::MAX; k],
        min_v: f32::NEG_INFINITY,
        min_at: 0,
    };
    let value = |i: usize| match bias {
        Some(b) => row[i] + b[i],
        None => row[i],
    };
    let mut i = 0;
    while i < row.len() {
        let end = (i + SELECT_LANES).min(row.len());
        if end - i == SELECT_LANES && buf.is_full() {
            let mut block = [0f32; SELECT_LANES];
            match bias {
                Some(b) => {
                    for ((v, r), b) in block.iter_mut().zip(&row[i..end]).zip(&b[i..end]) {
                        *v = r + b;
                    }
                }
                None => block.copy_from_slice(&row[i..end]),
            }
            let min_v = buf.min_v;
            if block.iter().fold(false, |any, &v| any | (v > min_v)) {
                for (j, &v) in block.iter().enumerate() {
                    buf.offer(i + j, v);
                }
            }
        } else {
            for j in i..end {
                buf.offer(j, value(j));
            }
        }
        i = end;
    }
    let mut top: SparseRow = buf
        .idx
        .into_iter()
        .zip(buf.vals)
        .filter(|(i, v)| *i != u32::MAX && *v > 0.0)
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

/// Entries per block in [`select_top_biased`]'s fast path.
const SELECT_LANES: usize = 16;

/// The k largest entries seen so far, unordered, with the position of their minimum.
struct TopBuffer {
    vals: Vec<f32>,
    idx: Vec<u32>,
    min_v: f32,
    min_at: usize,
}

impl TopBuffer {
    fn is_full(&self) -> bool {
        self.idx[self.min_at] != u32::MAX
    }

    fn offer(&mut self, i: usize, v: f32) {
        // Strictly greater: ties keep the lower index, as a stable sort would.
        if v > self.min_v || (self.min_v == f32::NEG_INFINITY && !self.is_full()) {
            self.vals[self.min_at] = v;
            self.idx[self.min_at] = i as u32;
            self.min_at = 0;
            for j in 1..self.vals.len() {
                let (vj, vm) = (self.vals[j], self.vals[self.min_at]);
                if vj < vm || (vj == vm && self.idx[j] > self.idx[self.min_at]) {
                    self.min_at = j;
                }
            }
            self.min_v = self.vals[self.min_at];
        }
    }
}

/// The `k` largest entries of `row` (ReLU applied, zeros dropped), largest first.
pub fn select_top(row: &[f32], k: usize, _scratch: &mut Vec<(u32, f32)>) -> SparseRow {
    select_top_biased(row, None, k)
}

/// Top `k` entries of each row of `h` `[n, m]`, largest first, with ReLU applied.
pub fn topk_rows(h: &Tensor, k: usize) -> candle_core::Result<Vec<SparseRow>> {
    let (n, m) = h.dims2()?;
    let data: Vec<f32> = h.flatten_all()?.to_vec1()?;
    let k = k.min(m);
    let mut out = Vec::with_capacity(n);
    let mut scratch: Vec<(u32, f32)> = Vec::with_capacity(m);
    for row in data.chunks(m) {
        scratch.clear();
        scratch.extend(row.iter().enumerate().map(|(i, &v)| (i as u32, v)));
        if k < m {
            scratch.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        let mut top: Vec<(u32, f32)> = scratch[..k].iter().map(|&(i, v)| (i, v.max(0.0))).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.push(top);
    }
    Ok(out)
}

/// Run `f` on a contiguous CPU f32 tensor's data without copying it.
fn with_cpu_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("tensor is not contiguous".into()))?;
            Ok(f(&all[start..end]))
        }
        _ => Ok(f(&t.flatten_all()?.to_vec1::<f32>()?)),
    }
}

/// Move an SAE's tensors to `device` (all f32).
pub(crate) fn f32_on(t: Tensor, device: &Device) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_are_rows_far_above_the_median_norm() {
        // Norms 1, 2, 3, 3, 29.9 (ordinary), 100 and 31 (sinks: over 10x the median of 3).
        let rows = [
            1.0f32, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0, 3.0, 29.9, 0.0, 0.0, 100.0, 31.0, 0.0,
        ];
        assert_eq!(
            sink_rows(&rows, 2),
            [false, false, false, false, false, true, true]
        );
        assert!(sink_rows(&[], 2).is_empty());
    }

    #[test]
    fn keep_sinks_leaves_sink_rows_as_they_were() {
        let x = Tensor::from_vec(
            vec![1.0f32, 1.0, 2.0, 0.0, 500.0, 0.0, 0.0, 1.5],
            (1, 4, 2),
            &Device::Cpu,
        )
        .unwrap();
        let zero: ReplaceFn = Arc::new(|x: &Tensor| x.zeros_like());
        let out = keep_sinks(zero, 2)(&x).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.0, 0.0, 0.0, 500.0, 0.0, 0.0, 0.0]
        );
    }
}
