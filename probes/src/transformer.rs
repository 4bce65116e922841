//! The hooked transformer: one forward pass for every family's block, driven by the
//! configuration's behaviour fields (norms and their offset, positions, q/k norms, sandwich
//! norms, soft-caps, sliding windows, embedding scale), with TransformerLens hook points at
//! which activations are captured or rewritten. It never looks at the architecture's name.
//!
//! Weights are f32: a block's layers stored `[in, out]` ([`Linear::stored_in_out`]), the
//! unembedding as HF stores it (`[out, in]`). Prompt passes use real f32 matmuls. An
//! interactive generation may read the file's own K-quant blocks in its prefill and decode
//! steps, and a Q8_0 copy of other weights (built on first use) in decode steps, because a
//! matrix-vector product is memory bound and those read a quarter of the bytes or less
//! ([`Weights`]).
//!
//! No output depends on how prompts are batched. Every f32 matmul takes one route through
//! gemm whatever its row count (see [`Linear::forward`]), a decode step's precision does not
//! depend on how many rows it has, and attention runs on each row's own real queries and
//! keys, never on padding. A prompt's activations, logits and generation are therefore the
//! same bits alone as in any batch (`probes/tests/batch_independence.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use rayon::prelude::*;

use crate::config::{Activation, ModelConfig, PositionEncoding};
use crate::decode_attention::{self, Heads, RowKeys};
use crate::error::{CandleContext, RunError};
use crate::hooks::{Block as HookBlock, Edit, HookPoint, Hooks, Positions};
use crate::kquant::KMatrix;

/// A candle result, by default of a tensor.
type TensorResult<T = Tensor> = candle_core::Result<T>;

/// Above this many rows an f32 matmul is computed as `x Wᵀ`, at or below it as `(W xᵀ)ᵀ`.
const SMALL_BATCH_ROWS: usize = 64;

/// A linear layer `y = x W^T + b`.
pub struct Linear {
    /// `[out, in]`; inside blocks a transposed view of contiguous `[in, out]` storage
    /// ([`Linear::stored_in_out`]).
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
    /// The checkpoint's own K-quant blocks, kept for quantized generation (prefill and
    /// decode steps, [`Weights`]) where the file stores them and the CPU runs
    /// [`crate::kquant`]'s kernels.
    pub(crate) blocks: Option<KMatrix>,
    q8: OnceLock<Option<QMatMul>>,
}

impl Linear {
    /// A layer whose weight keeps the layout it comes in, `[out, in]`: the unembedding, which
    /// is often the embedding matrix itself, and whose thousands of outputs gemm reads faster
    /// this way (18.8 against 22.2 ms for 30 rows of SmolLM2's; the example `matmul_layouts`).
    pub(crate) fn new(w: Tensor, b: Option<Tensor>) -> Self {
        Self {
            w,
            b,
            blocks: None,
            q8: OnceLock::new(),
        }
    }

    /// Quantized generation uses these K-quant blocks (the same matrix as `w`): its prefill
    /// instead of `w`, its decode steps instead of a Q8_0 copy.
    pub(crate) fn with_blocks(mut self, blocks: Option<KMatrix>) -> Self {
        self.blocks = blocks;
        self
    }

    /// A layer inside a block, its `[out, in]` weight stored as `[in, out]`: gemm then reads
    /// it as a row-major right operand instead of repacking it on every call: 1.3-1.5x faster
    /// at a decode step's 30 rows, 4.3x at 4 and 1.1-1.5x at a prompt pass's 200, with the
    /// same bits (`cargo run --release -p probes --example matmul_layouts`).
    pub(crate) fn stored_in_out(w: Tensor, b: Option<Tensor>) -> candle_core::Result<Self> {
        let w = w.t()?.contiguous()?.t()?;
        Ok(Self::new(w, b))
    }

    /// The same layer with `f` applied to its weight and bias (its layout kept where `f`
    /// keeps it), and its K-quant blocks where `keep_blocks`.
    fn map(&self, f: &impl Fn(&Tensor) -> TensorResult, keep_blocks: bool) -> TensorResult<Self> {
        let layer = Self::new(f(&self.w)?, self.b.as_ref().map(f).transpose()?);
        Ok(layer.with_blocks(keep_blocks.then(|| self.blocks.clone()).flatten()))
    }

    fn quantized(&self) -> Option<&QMatMul> {
        self.q8
            .get_or_init(|| {
                let (_, d_in) = self.w.dims2().ok()?;
                if d_in % GgmlDType::Q8_0.block_size() != 0 {
                    return None;
                }
                let q = QTensor::quantize(&self.w.contiguous().ok()?, GgmlDType::Q8_0).ok()?;
                QMatMul::from_qtensor(q).ok()
            })
            .as_ref()
    }

    /// `x`: `[batch, pos, in]` -> `[batch, pos, out]` by the arithmetic `weights` names.
    ///
    /// Each output row depends on its own input row only, by the same arithmetic whatever the
    /// number of rows. The K-quant and Q8_0 products dot each row with each weight row. The
    /// f32 product always takes gemm's blocked route (never its matrix-vector or small-matrix
    /// routes, which order the sum differently): there every output is one fused
    /// multiply-add chain over `in`, split at depths that depend on `in` alone. A single row
    /// is therefore computed as two, and whether gemm sees `x Wᵀ`, `W xᵀ` or `x` against the
    /// weight stored `[in, out]` (chosen for speed) does not change a bit.
    fn forward(&self, x: &Tensor, weights: Weights) -> candle_core::Result<Tensor> {
        let y = match (weights, &self.blocks) {
            (Weights::Prefill | Weights::Decode, Some(q)) => kquant_product(q, x)?,
            (Weights::Decode, None) => match self.quantized() {
                Some(q) => q.forward(x)?,
                None => self.forward_f32(x)?,
            },
            _ => self.forward_f32(x)?,
        };
        match &self.b {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    fn forward_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // In a gradient pass: the same product, recording only the input's gradient.
        if x.track_op() && x.device().is_cpu() {
            return x.contiguous()?.apply_op1(crate::frozen::FrozenProduct {
                w: self.w.clone(),
                product: f32_product,
            });
        }
        f32_product(&self.w, x)
    }
}

/// The arithmetic of a pass's matrix products ([`Transformer::precision`] says it in words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Weights {
    /// f32 weights and activations: every prompt pass, and an audit's decode steps.
    F32,
    /// An interactive generation's prefill: the file's K-quant blocks where it stores them
    /// (as its decode steps read them), f32 elsewhere.
    Prefill,
    /// An interactive generation's decode steps: the file's K-quant blocks where it stores
    /// them, a Q8_0 copy elsewhere.
    Decode,
}

/// `x Wᵀ` for `x` `[batch, pos, in]` by the K-quant kernels, row by row.
fn kquant_product(w: &KMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, d_in) = x.dims3()?;
    if d_in != w.cols() {
        candle_core::bail!(
            "K-quant product: input width {d_in}, weight width {}",
            w.cols()
        );
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let y = w.matmul(&xs, b * t);
    Tensor::from_vec(y, (b, t, w.rows()), x.device())
}

/// `x Wᵀ` for `x` `[batch, pos, in]` and `w` `[out, in]`, by gemm's blocked route whatever
/// the row count (see [`Linear::forward`]).
fn f32_product(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, d_in) = x.dims3()?;
    let rows = b * t;
    let out = w.dim(0)?;
    let wt = w.t()?;
    if wt.is_contiguous() {
        // Stored `[in, out]`: one route at every row count, a single row computed as two.
        let x = x.reshape((rows, d_in))?;
        let x = if rows == 1 {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x
        };
        return x.matmul(&wt)?.narrow(0, 0, rows)?.reshape((b, t, out));
    }
    if rows > SMALL_BATCH_ROWS {
        return x
            .reshape((rows, d_in))?
            .matmul(&w.t()?)?
            .reshape((b, t, out));
    }
    // Few rows: compute (W xᵀ)ᵀ so gemm streams the weights as its left operand instead of
    // repacking all of them as the right one on every call.
    let xt = x.reshape((rows, d_in))?.t()?.contiguous()?;
    let xt = if rows == 1 {
        Tensor::cat(&[&xt, &xt], 1)?
    } else {
        xt
    };
    w.matmul(&xt)?
        .narrow(1, 0, rows)?
        .t()?
        .contiguous()?
        .reshape((b, t, out))
}

/// RMSNorm (weight already including any `1 + w` offset) or LayerNorm (GPT-2).
pub struct Norm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) eps: f32,
}

impl Norm {
    fn map(&self, f: &impl Fn(&Tensor) -> TensorResult) -> TensorResult<Self> {
        Ok(Self {
            weight: f(&self.weight)?,
            bias: self.bias.as_ref().map(f).transpose()?,
            eps: self.eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }

    /// `differentiable`: plain ops, because candle's fused norm kernels record no backward.
    pub(crate) fn apply(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        match (&self.bias, differentiable) {
            (Some(b), false) => candle_nn::ops::layer_norm(x, &self.weight, b, self.eps),
            (None, false) => candle_nn::ops::rms_norm(x, &self.weight, self.eps),
            (Some(b), true) => candle_nn::ops::layer_norm_slow(x, &self.weight, b, self.eps),
            (None, true) => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps),
        }
    }
}

pub enum Mlp {
    /// `down(act(gate(x)) * up(x))`, with gate and up fused into one `[2 * d_mlp, d]` matmul.
    Gated {
        gate_up: Linear,
        down: Linear,
        activation: Activation,
    },
    /// `proj(act(fc(x)))`
    Plain {
        fc: Linear,
        proj: Linear,
        activation: Activation,
    },
}

fn activate(x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    match activation {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::GeluTanh => x.gelu(),
        Activation::GeluErf => x.gelu_erf(),
    }
}

pub struct Block {
    pub(crate) ln1: Norm,
    /// q, k and v fused: `[(n_heads + 2 * n_kv_heads) * head_dim, d_model]`.
    pub(crate) qkv: Linear,
    /// Per-head norms on q and k (`qk_norm`).
    pub(crate) q_norm: Option<Norm>,
    pub(crate) k_norm: Option<Norm>,
    pub(crate) o: Linear,
    /// Norm on the attention output before the residual add (`sandwich_norms`).
    pub(crate) post_attn_norm: Option<Norm>,
    pub(crate) ln2: Norm,
    pub(crate) mlp: Mlp,
    /// Norm on the MLP output before the residual add (`sandwich_norms`).
    pub(crate) post_mlp_norm: Option<Norm>,
}

impl Block {
    /// The same block with `f` applied to every weight; see [`Transformer::map_weights`].
    fn map(&self, f: &impl Fn(&Tensor) -> TensorResult, keep_blocks: bool) -> TensorResult<Self> {
        let norm = |n: &Option<Norm>| n.as_ref().map(|n| n.map(f)).transpose();
        let linear = |l: &Linear| l.map(f, keep_blocks);
        let mlp = match &self.mlp {
            Mlp::Gated {
                gate_up,
                down,
                activation,
            } => Mlp::Gated {
                gate_up: linear(gate_up)?,
                down: linear(down)?,
                activation: *activation,
            },
            Mlp::Plain {
                fc,
                proj,
                activation,
            } => Mlp::Plain {
                fc: linear(fc)?,
                proj: linear(proj)?,
                activation: *activation,
            },
        };
        Ok(Self {
            ln1: self.ln1.map(f)?,
            qkv: linear(&self.qkv)?,
            q_norm: norm(&self.q_norm)?,
            k_norm: norm(&self.k_norm)?,
            o: linear(&self.o)?,
            post_attn_norm: norm(&self.post_attn_norm)?,
            ln2: self.ln2.map(f)?,
            mlp,
            post_mlp_norm: norm(&self.post_mlp_norm)?,
        })
    }

    /// Whether quantized generation reads any of this block's weights as the file's K-quant
    /// blocks.
    fn holds_file_blocks(&self) -> bool {
        let mlp = match &self.mlp {
            Mlp::Gated { gate_up, down, .. } => [gate_up, down],
            Mlp::Plain { fc, proj, .. } => [fc, proj],
        };
        [&self.qkv, &self.o]
            .into_iter()
            .chain(mlp)
            .any(|l| l.blocks.is_some())
    }
}

/// The model's weights and configuration.
pub struct Transformer {
    pub config: ModelConfig,
    pub(crate) embed: Tensor,
    /// GPT-2's learned positions `[max_positions, d_model]`.
    pub(crate) pos_embed: Option<Tensor>,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_final: Norm,
    pub(crate) unembed: Linear,
    pub(crate) device: Device,
    /// Interactive generations read the file's K-quant blocks in their prefill and decode
    /// steps, and a Q8_0 copy of the other weights in decode steps ([`Weights`]); prompt
    /// passes stay f32.
    pub quantized_decode: bool,
}

/// Where padding goes when prompts of different lengths share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    #[default]
    Left,
    Right,
}

/// Which logits to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unembed {
    /// `[batch, pos, vocab]`
    All,
    /// `[batch, pos - n, vocab]`: the padded positions from `n` on (a prompt's start that no
    /// one scores, such as a chat template's preamble, is not unembedded).
    From(usize),
    /// `[batch, vocab]` at each prompt's last real token.
    Last,
    /// No logits: the pass stops after the deepest hook it needs.
    None,
}

/// How prompts sit in the padded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLayout {
    pub seq_len: usize,
    pub padding: Padding,
    /// Real tokens per prompt.
    pub lengths: Vec<usize>,
}

impl BatchLayout {
    pub fn new(lengths: Vec<usize>, padding: Padding) -> Self {
        let seq_len = lengths.iter().copied().max().unwrap_or(0);
        Self {
            seq_len,
            padding,
            lengths,
        }
    }

    /// Padded index of prompt `row`'s first real token.
    pub fn offset(&self, row: usize) -> usize {
        match self.padding {
            Padding::Left => self.seq_len - self.lengths[row],
            Padding::Right => 0,
        }
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOutput {
    pub logits: Option<Tensor>,
    /// Captured activations by hook (after any intervention at that hook).
    pub captures: BTreeMap<HookPoint, Tensor>,
    pub layout: BatchLayout,
}

/// Keys and values of past positions, per layer, `[batch, kv_heads, pos, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Per row, whether each cached key position is a real token.
    key_real: Vec<Vec<bool>>,
    /// Per row, real tokens seen so far.
    totals: Vec<usize>,
    /// Prefill and decode steps in f32 even when the model generates with quantized weights.
    pub(crate) f32_decode: bool,
}

impl KvCache {
    pub(crate) fn new(f32_decode: bool) -> Self {
        Self {
            f32_decode,
            ..Self::default()
        }
    }

    /// A cache of `rows` rows, each a copy of this one-row cache's row: a shared start's keys
    /// and values, for a batch of prompts that all begin with it.
    pub(crate) fn repeat_row(&self, rows: usize) -> Result<KvCache, RunError> {
        if self.totals.len() != 1 {
            return Err(RunError::Batch(format!(
                "a shared start's cache has one row, not {}",
                self.totals.len()
            )));
        }
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| -> candle_core::Result<LayerKv> {
                        let copy = |x: &Tensor| x.narrow(2, 0, l.len)?.repeat((rows, 1, 1, 1));
                        Ok(LayerKv {
                            k: copy(&l.k)?,
                            v: copy(&l.v)?,
                            len: l.len,
                        })
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .run_ctx("shared start's cache")?;
        Ok(KvCache {
            layers,
            key_real: vec![self.key_real[0].clone(); rows],
            totals: vec![self.totals[0]; rows],
            f32_decode: self.f32_decode,
        })
    }

    /// Move each row's real keys and values to the end of the cache, in order, and its pads
    /// before them: the layout a left-padded prefill leaves, after which every row's decode
    /// steps append right after its real keys. A row's keys carry their positions (RoPE was
    /// applied per token), so where they sit in the cache changes nothing they compute.
    pub(crate) fn left_align(&mut self) -> Result<(), RunError> {
        let Some(len) = self.key_real.first().map(Vec::len) else {
            return Ok(());
        };
        let orders: Vec<Vec<u32>> = self
            .key_real
            .iter()
            .map(|real| {
                let pads = (0..len).filter(|&k| !real[k]);
                let reals = (0..len).filter(|&k| real[k]);
                pads.chain(reals).map(|k| k as u32).collect()
            })
            .collect();
        let unmoved = |o: &Vec<u32>| o.iter().enumerate().all(|(k, &i)| i as usize == k);
        if orders.iter().all(unmoved) {
            return Ok(());
        }
        for layer in self.layers.iter_mut().flatten() {
            if layer.len != len {
                return Err(RunError::Batch(format!(
                    "a cache layer holds {} positions, not the {len} its rows mark",
                    layer.len
                )));
            }
            let device = layer.k.device().clone();
            let reorder = |x: &Tensor| -> candle_core::Result<Tensor> {
                let rows = orders
                    .iter()
                    .enumerate()
                    .map(|(r, order)| {
                        let idx = Tensor::from_slice(order, len, &device)?;
                        x.narrow(0, r, 1)?
                            .narrow(2, 0, len)?
                            .contiguous()?
                            .index_select(&idx, 2)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            };
            layer.k = reorder(&layer.k).run_ctx("left-aligning the cache")?;
            layer.v = reorder(&layer.v).run_ctx("left-aligning the cache")?;
        }
        for real in &mut self.key_real {
            real.sort();
        }
        Ok(())
    }

    /// Keep only the rows `keep` (indices into the current rows, in order): a generation drops
    /// the rows that have finished, so later decode steps cost nothing for them. Each row's
    /// keys and values are its own, so the rows kept decode the same bits as before.
    pub(crate) fn keep_rows(&mut self, keep: &[usize]) -> Result<(), RunError> {
        if keep.len() == self.totals.len() {
            return Ok(());
        }
        if let Some(&bad) = keep.iter().find(|&&r| r >= self.totals.len()) {
            return Err(RunError::Batch(format!(
                "row {bad} is not in a cache of {} rows",
                self.totals.len()
            )));
        }
        let Some(device) = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|l| l.k.device().clone())
        else {
            return Err(RunError::Batch(
                "cannot drop rows from an empty cache".into(),
            ));
        };
        let idx: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, keep.len(), &device).run_ctx("rows kept")?;
        for layer in self.layers.iter_mut().flatten() {
            layer.k = layer.k.index_select(&idx, 0).run_ctx("kv cache rows")?;
            layer.v = layer.v.index_select(&idx, 0).run_ctx("kv cache rows")?;
        }
        self.key_real = keep.iter().map(|&r| self.key_real[r].clone()).collect();
        self.totals = keep.iter().map(|&r| self.totals[r]).collect();
        Ok(())
    }
}

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]`, of which the first
/// `len` positions are filled. Each decode step writes its position in place; only when the
/// capacity runs out are the buffers reallocated (with room for [`KV_GROWTH`] more), so a
/// step costs no copy of the whole cache.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions added to a layer's key/value buffers whenever they fill up.
const KV_GROWTH: usize = 32;

impl LayerKv {
    /// Append `k`, `v` (`[batch, kv_heads, t, head_dim]`) and return views of every cached
    /// position.
    fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let len = slot.as_ref().map_or(0, |c| c.len);
        let fits = match slot.as_ref() {
            Some(c) => len + t <= c.k.dim(2)?,
            None => false,
        };
        if !fits {
            let (b, h, _, hd) = k.dims4()?;
            let cap = len + t + KV_GROWTH;
            let nk = Tensor::zeros((b, h, cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, cap, hd), v.dtype(), v.device())?;
            if let Some(c) = slot.as_ref() {
                nk.slice_set(&c.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&c.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k.contiguous()?, 2, len)?;
        c.v.slice_set(&v.contiguous()?, 2, len)?;
        c.len = len + t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

/// Run `pass` on `prompts` in micro-batches of at most `micro_batch`, up to one per rayon
/// thread at once, handing each output (with its first prompt's index) to `consume` in order.
/// How a pass runs: plain; with a gradient leaf at each of some hooks; or from a residual
/// activation captured at a hook ([`Transformer::forward_from`]).
#[derive(Clone, Copy)]
pub(crate) enum PassKind<'a> {
    Plain,
    Differentiable(&'a BTreeSet<HookPoint>),
    From(HookPoint, &'a Tensor),
}

pub(crate) fn in_micro_batches(
    prompts: &[Vec<u32>],
    micro_batch: usize,
    pass: impl Fn(&[Vec<u32>]) -> Result<ForwardOutput, RunError> + Sync,
    mut consume: impl FnMut(usize, ForwardOutput) -> Result<(), RunError>,
) -> Result<(), RunError> {
    let micro_batch = micro_batch.max(1);
    let chunks: Vec<&[Vec<u32>]> = prompts.chunks(micro_batch).collect();
    let in_flight = rayon::current_num_threads().max(1);
    for (g, group) in chunks.chunks(in_flight).enumerate() {
        let outs: Vec<Result<ForwardOutput, RunError>> =
            group.par_iter().map(|chunk| pass(chunk)).collect();
        for (j, out) in outs.into_iter().enumerate() {
            consume((g * in_flight + j) * micro_batch, out?)?;
        }
    }
    Ok(())
}

/// Per-pass positional bookkeeping.
struct PassCtx {
    /// `[batch, pos, head_dim/2]` each, for RoPE in the global layers.
    rope: Option<(Tensor, Tensor)>,
    /// The same for the sliding-window layers, when their frequencies differ.
    rope_sliding: Option<(Tensor, Tensor)>,
    /// `[batch, 1, pos, keys]` additive mask of the sliding-window layers.
    sliding_mask: Option<Tensor>,
    /// `[batch, pos]` u32 absolute positions, for learned embeddings.
    pos_ids: Tensor,
    /// `[batch, 1, pos, keys]` additive mask.
    mask: Tensor,
    /// Per row and padded position, the real-token index (None for padding).
    abs: Vec<Vec<Option<usize>>>,
    /// Per row, real tokens including this pass.
    totals: Vec<usize>,
    /// Per row, where its real queries and the keys they see sit in the padded pass.
    spans: Vec<RowSpan>,
    /// In a pass of one position: the attention mask and the sliding-window one, `[batch,
    /// keys]`, for [`decode_attention`].
    host_masks: Option<(Vec<f32>, Option<Vec<f32>>)>,
}

/// One row's real queries (padded positions `query_start..query_start + queries`) and the
/// keys they attend over (padded key positions `key_start..key_start + keys`, all real).
#[derive(Debug, Clone, Copy)]
struct RowSpan {
    query_start: usize,
    queries: usize,
    key_start: usize,
    keys: usize,
}

/// A pass needs a prompt, and every prompt a token.
fn check_nonempty(prompts: &[Vec<u32>]) -> Result<(), RunError> {
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(RunError::Batch(
            "every prompt needs at least one token".into(),
        ));
    }
    Ok(())
}

/// Row `r`'s span in a pass over `queries` real tokens at padded offset `off`, after `past`
/// cached keys; `key_real` marks its real keys, past and present. The real keys a row's
/// queries see are contiguous (left padding puts pads before them, right padding after them,
/// and a cache only ever appends real tokens).
fn row_span(
    key_real: &[bool],
    past: usize,
    off: usize,
    queries: usize,
) -> Result<RowSpan, RunError> {
    let key_end = past + off + queries;
    let key_start = key_real[..key_end]
        .iter()
        .position(|&real| real)
        .unwrap_or(key_end);
    if key_real[key_start..key_end].iter().any(|&real| !real) {
        return Err(RunError::Batch(
            "padding between a prompt's cached tokens (a cache must be filled left-padded)".into(),
        ));
    }
    Ok(RowSpan {
        query_start: off,
        queries,
        key_start,
        keys: key_end - key_start,
    })
}

impl Transformer {
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A copy of this model with every weight on `device` (a GPU with the `cuda` feature).
    /// Off the CPU every pass, decode steps included, is an f32 pass by candle's kernels for
    /// that device: the Q8_0 and K-quant decode kernels are CPU code.
    pub fn on_device(&self, device: &Device) -> Result<Transformer, RunError> {
        self.map_weights(|t| t.to_device(device), device, device.is_cpu())
            .run_ctx("moving the weights")
    }

    /// This model with `f` applied to every weight, on `device`, where `f` puts them. Tied
    /// embeddings stay one tensor. The file's K-quant blocks, and with them quantised decode
    /// steps, go along only where `keep_blocks`.
    pub(crate) fn map_weights(
        &self,
        f: impl Fn(&Tensor) -> TensorResult,
        device: &Device,
        keep_blocks: bool,
    ) -> TensorResult<Transformer> {
        let embed = f(&self.embed)?;
        let unembed = if self.unembed.w.id() == self.embed.id() {
            let b = self.unembed.b.as_ref().map(&f).transpose()?;
            Linear::new(embed.clone(), b)
        } else {
            self.unembed.map(&f, keep_blocks)?
        };
        Ok(Transformer {
            config: self.config.clone(),
            embed,
            pos_embed: self.pos_embed.as_ref().map(&f).transpose()?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.map(&f, keep_blocks))
                .collect::<TensorResult<Vec<_>>>()?,
            ln_final: self.ln_final.map(&f)?,
            unembed,
            device: device.clone(),
            quantized_decode: self.quantized_decode && keep_blocks,
        })
    }

    /// Whether an interactive generation's prefill and decode steps read some of the file's
    /// K-quant blocks.
    pub(crate) fn reads_file_blocks(&self) -> bool {
        self.quantized_decode
            && (self.unembed.blocks.is_some() || self.blocks.iter().any(|b| b.holds_file_blocks()))
    }

    /// The arithmetic of this model's passes, as an audit record states it.
    pub fn precision(&self) -> &'static str {
        if self.device.is_cuda() {
            "f32 by CUDA kernels and cuBLAS (no TF32)"
        } else if !self.quantized_decode {
            "f32"
        } else if self.reads_file_blocks() {
            "f32 prompt passes; a generation's prefill and decode steps the file's Q4_K and \
             Q6_K blocks x Q8_K activations where it stores them, other weights f32 in the \
             prefill and Q8_0 x Q8_0 activations in decode steps"
        } else {
            "f32 prompt passes; decode steps Q8_0 weights x Q8_0 activations"
        }
    }

    /// Check hook names against this model and vectors against the hook widths.
    pub(crate) fn validate(&self, hooks: &Hooks) -> Result<(), RunError> {
        let n = self.config.n_layers;
        let d = self.config.d_model;
        for h in hooks
            .capture
            .iter()
            .chain(hooks.interventions.iter().map(|i| &i.hook))
        {
            if let Some(Err(why)) = h.layer().map(|l| HookBlock::Index(l).resolve(n)) {
                return Err(crate::hooks::beyond_the_model(h.to_string(), why, n));
            }
        }
        for i in &hooks.interventions {
            let vector = match &i.edit {
                Edit::Add { vector, .. } => vector,
                Edit::Ablate { direction } => direction,
                Edit::Replace(_) | Edit::ReplaceEach(_) => continue,
            };
            if !i.hook.is_residual_width() {
                return Err(RunError::Intervention {
                    hook: i.hook.to_string(),
                    detail: "only a replacement can act on an attention pattern".into(),
                });
            }
            if vector.dims() != [d] {
                return Err(RunError::InterventionShape {
                    hook: i.hook.to_string(),
                    expected: d,
                    actual: vector.elem_count(),
                });
            }
            let values: Vec<f32> = vector
                .to_dtype(DType::F32)
                .and_then(|v| v.to_vec1())
                .run_ctx("reading intervention vector")?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err(RunError::Intervention {
                    hook: i.hook.to_string(),
                    detail: "vector holds NaN or Inf".into(),
                });
            }
            if matches!(i.edit, Edit::Ablate { .. }) && values.iter().all(|v| *v == 0.0) {
                return Err(RunError::Intervention {
                    hook: i.hook.to_string(),
                    detail: "ablation direction is zero".into(),
                });
            }
        }
        Ok(())
    }

    /// One batched forward pass over `prompts` (token ids), with `hooks` active.
    pub fn forward(
        &self,
        prompts: &[Vec<u32>],
        padding: Padding,
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<ForwardOutput, RunError> {
        check_nonempty(prompts)?;
        self.validate(hooks)?;
        let layout = BatchLayout::new(prompts.iter().map(Vec::len).collect(), padding);
        self.check_lengths(&layout.lengths)?;
        let mut cache = None;
        self.run(prompts, &layout, hooks, unembed, &mut cache)
    }

    /// [`Transformer::forward`] with a zero leaf added at each hook of `grad`, in plain
    /// differentiable ops: the leaves' gradients are the gradients at those hooks.
    pub(crate) fn forward_leaves(
        &self,
        prompts: &[Vec<u32>],
        hooks: &Hooks,
        grad: &BTreeSet<HookPoint>,
    ) -> Result<(ForwardOutput, BTreeMap<HookPoint, Var>), RunError> {
        check_nonempty(prompts)?;
        self.validate(hooks)?;
        let layout = BatchLayout::new(prompts.iter().map(Vec::len).collect(), Padding::Left);
        self.check_lengths(&layout.lengths)?;
        self.run_pass(
            prompts,
            &layout,
            hooks,
            Unembed::Last,
            &mut None,
            PassKind::Differentiable(grad),
        )
    }

    /// Forward `prompts` in micro-batches of at most `micro_batch` prompts, handing each
    /// batch's output (with its first prompt's index) to `consume` in order.
    ///
    /// Up to one micro-batch per rayon thread runs at once, each on its own thread: on a
    /// couple of cores, independent passes use them far better than one pass whose every
    /// matmul and elementwise op is split between them. Memory stays bounded by that many
    /// micro-batches' logits, whatever the prompt count; the results do not depend on the
    /// thread count, because the micro-batches do not.
    pub fn forward_chunked(
        &self,
        prompts: &[Vec<u32>],
        micro_batch: usize,
        padding: Padding,
        hooks: &Hooks,
        unembed: Unembed,
        consume: impl FnMut(usize, ForwardOutput) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.check_lengths(&lengths)?;
        in_micro_batches(
            prompts,
            micro_batch,
            |chunk| self.forward(chunk, padding, hooks, unembed),
            consume,
        )
    }

    /// Refuse any prompt longer than the model's context, naming its index in `prompts`. Callers
    /// that split a prompt set into batches check the whole set first, so the index is theirs.
    pub fn check_prompts(&self, prompts: &[Vec<u32>]) -> Result<(), RunError> {
        self.check_lengths(&prompts.iter().map(Vec::len).collect::<Vec<_>>())
    }

    /// Refuse any prompt longer than the model's context: beyond it the attention buffers grow
    /// quadratically (gigabytes for a long prompt file) and the positions mean nothing.
    pub(crate) fn check_lengths(&self, lengths: &[usize]) -> Result<(), RunError> {
        let context = self.config.max_positions;
        match lengths.iter().position(|&n| n > context) {
            Some(i) => Err(RunError::Batch(format!(
                "prompt {i} has {} tokens, more than the model's context length of {context}",
                lengths[i]
            ))),
            None => Ok(()),
        }
    }

    /// Start a generation: prefill `prompts` (left-padded) into a fresh cache.
    pub(crate) fn prefill(
        &self,
        prompts: &[Vec<u32>],
        hooks: &Hooks,
        cache: &mut Option<KvCache>,
    ) -> Result<ForwardOutput, RunError> {
        check_nonempty(prompts)?;
        self.validate(hooks)?;
        let layout = BatchLayout::new(prompts.iter().map(Vec::len).collect(), Padding::Left);
        self.check_lengths(&layout.lengths)?;
        let f32_decode = cache.as_ref().is_some_and(|c| c.f32_decode);
        *cache = Some(KvCache::new(f32_decode));
        self.run(prompts, &layout, hooks, Unembed::Last, cache)
    }

    /// One decode step: append one token per row to a prefilled cache.
    pub(crate) fn decode_step(
        &self,
        tokens: &[u32],
        hooks: &Hooks,
        cache: &mut Option<KvCache>,
    ) -> Result<Tensor, RunError> {
        let prompts: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        let layout = BatchLayout::new(vec![1; tokens.len()], Padding::Left);
        if let Some(c) = cache.as_ref() {
            let lengths: Vec<usize> = c.totals.iter().map(|t| t + 1).collect();
            self.check_lengths(&lengths)?;
        }
        let out = self.run(&prompts, &layout, hooks, Unembed::Last, cache)?;
        out.logits
            .ok_or_else(|| RunError::Batch("decode produced no logits".into()))
    }

    fn pass_ctx(
        &self,
        layout: &BatchLayout,
        cache: &mut Option<KvCache>,
    ) -> Result<PassCtx, RunError> {
        let b = layout.lengths.len();
        let t = layout.seq_len;
        let (past_real, past_totals) = match cache.as_ref() {
            Some(c) if !c.key_real.is_empty() => (c.key_real.clone(), c.totals.clone()),
            _ => (vec![Vec::new(); b], vec![0; b]),
        };
        let past = past_real[0].len();
        let keys = past + t;
        let mut abs = vec![vec![None; t]; b];
        let mut pos = vec![0u32; b * t];
        let mut mask = vec![f32::NEG_INFINITY; b * t * keys];
        let window = self.config.sliding_window;
        let mut sliding = window.map(|_| vec![f32::NEG_INFINITY; b * t * keys]);
        let mut totals = Vec::with_capacity(b);
        let mut spans = Vec::with_capacity(b);
        for r in 0..b {
            let off = layout.offset(r);
            let mut key_real = past_real[r].clone();
            for j in 0..t {
                let real = j >= off && j < off + layout.lengths[r];
                if real {
                    let a = past_totals[r] + j - off;
                    abs[r][j] = Some(a);
                    pos[r * t + j] = a as u32;
                }
                key_real.push(real);
            }
            // Each real key's position, for the sliding window.
            let mut key_pos = Vec::with_capacity(key_real.len());
            let mut seen = 0usize;
            for &real in &key_real {
                key_pos.push(seen);
                seen += usize::from(real);
            }
            for (j, &query) in abs[r].iter().enumerate() {
                let rows = (r * t + j) * keys..(r * t + j + 1) * keys;
                let row = &mut mask[rows.clone()];
                for (k, m) in row.iter_mut().enumerate().take(past + j + 1) {
                    if key_real[k] || k == past + j {
                        *m = 0.0;
                    }
                }
                if let (Some(w), Some(sliding)) = (window, sliding.as_mut()) {
                    let row = &mut sliding[rows];
                    for (k, m) in row.iter_mut().enumerate().take(past + j + 1) {
                        let near = match query {
                            // Keys strictly less than `w` positions back, as transformers.
                            Some(q) => key_real[k] && q - key_pos[k] < w,
                            None => false,
                        };
                        if near || k == past + j {
                            *m = 0.0;
                        }
                    }
                }
            }
            spans.push(row_span(&key_real, past, off, layout.lengths[r])?);
            totals.push(past_totals[r] + layout.lengths[r]);
            if let Some(c) = cache.as_mut() {
                if c.key_real.len() < b {
                    c.key_real.resize(b, Vec::new());
                    c.totals.resize(b, 0);
                }
                c.key_real[r] = key_real;
                c.totals[r] = totals[r];
            }
        }
        let dev = &self.device;
        // The weights' dtype: f32, or f64 in a model converted for finite differences.
        let dtype = self.embed.dtype();
        let pos_ids = Tensor::from_vec(pos.clone(), (b, t), dev).run_ctx("positions")?;
        let host_masks = (t == 1).then(|| (mask.clone(), sliding.clone()));
        let mask = Tensor::from_vec(mask, (b, 1, t, keys), dev)
            .and_then(|m| m.to_dtype(dtype))
            .run_ctx("attention mask")?;
        let sliding_mask = sliding
            .map(|m| Tensor::from_vec(m, (b, 1, t, keys), dev).and_then(|m| m.to_dtype(dtype)))
            .transpose()
            .run_ctx("sliding-window mask")?;
        let c = &self.config;
        let (rope, rope_sliding) = if c.positions == PositionEncoding::Learned {
            (None, None)
        } else {
            let global = c.rope_inv_freqs(false);
            let local = c.rope_inv_freqs(true);
            let tables = |inv: &[f64]| -> Result<(Tensor, Tensor), RunError> {
                let half = inv.len();
                let mut cos = Vec::with_capacity(b * t * half);
                let mut sin = Vec::with_capacity(b * t * half);
                for p in &pos {
                    for f in inv {
                        let angle = (*p as f64) * f;
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
                let cos = Tensor::from_vec(cos, (b, t, half), dev)
                    .and_then(|c| c.to_dtype(dtype))
                    .run_ctx("rope")?;
                let sin = Tensor::from_vec(sin, (b, t, half), dev)
                    .and_then(|s| s.to_dtype(dtype))
                    .run_ctx("rope")?;
                Ok((cos, sin))
            };
            let sliding = if local != global {
                Some(tables(&local)?)
            } else {
                None
            };
            (Some(tables(&global)?), sliding)
        };
        Ok(PassCtx {
            rope,
            rope_sliding,
            sliding_mask,
            pos_ids,
            mask,
            abs,
            totals,
            spans,
            host_masks,
        })
    }

    pub(crate) fn run(
        &self,
        prompts: &[Vec<u32>],
        layout: &BatchLayout,
        hooks: &Hooks,
        unembed: Unembed,
        cache: &mut Option<KvCache>,
    ) -> Result<ForwardOutput, RunError> {
        Ok(self
            .run_pass(prompts, layout, hooks, unembed, cache, PassKind::Plain)?
            .0)
    }

    /// The rest of [`Transformer::forward`] from the residual stream at `start`
    /// (`hook_resid_pre` or `hook_resid_post` of a block), whose activation `x` `[b, t, d]`
    /// (before any hook there) a pass over the same prompts and padding captured. The blocks
    /// before `start` are not run: passes that change nothing before it (an edit at or after
    /// it) share them. `hooks` may touch `start` and later points only.
    pub fn forward_from(
        &self,
        prompts: &[Vec<u32>],
        padding: Padding,
        start: HookPoint,
        x: &Tensor,
        hooks: &Hooks,
        unembed: Unembed,
    ) -> Result<ForwardOutput, RunError> {
        check_nonempty(prompts)?;
        let layout = BatchLayout::new(prompts.iter().map(Vec::len).collect(), padding);
        self.check_start(&layout, start, x, hooks)?;
        Ok(self
            .run_pass(
                prompts,
                &layout,
                hooks,
                unembed,
                &mut None,
                PassKind::From(start, x),
            )?
            .0)
    }

    /// Check a pass that starts at `start` from `x`: hooks, lengths, where it starts and the
    /// shape of `x` for `layout`.
    pub(crate) fn check_start(
        &self,
        layout: &BatchLayout,
        start: HookPoint,
        x: &Tensor,
        hooks: &Hooks,
    ) -> Result<(), RunError> {
        self.validate(hooks)?;
        if !start.is_residual_stream() {
            return Err(RunError::BadBlock {
                name: start.to_string(),
                why: "a pass starts in the residual stream (`hook_resid_pre` or `hook_resid_post`)"
                    .into(),
            });
        }
        let early = hooks
            .capture
            .iter()
            .chain(hooks.interventions.iter().map(|i| &i.hook))
            .find(|h| h.order() < start.order());
        if let Some(h) = early {
            return Err(RunError::BadBlock {
                name: h.to_string(),
                why: format!("it comes before `{start}`, where this pass starts"),
            });
        }
        self.check_lengths(&layout.lengths)?;
        let want = [layout.lengths.len(), layout.seq_len, self.config.d_model];
        if x.dims() != want {
            return Err(RunError::Batch(format!(
                "the activation to start from at `{start}` is {:?}, not {want:?}",
                x.dims()
            )));
        }
        Ok(())
    }

    pub(crate) fn run_pass(
        &self,
        prompts: &[Vec<u32>],
        layout: &BatchLayout,
        hooks: &Hooks,
        unembed: Unembed,
        cache: &mut Option<KvCache>,
        how: PassKind<'_>,
    ) -> Result<(ForwardOutput, BTreeMap<HookPoint, Var>), RunError> {
        let (grad, start) = match how {
            PassKind::Plain => (None, None),
            PassKind::Differentiable(grad) => (Some(grad), None),
            PassKind::From(point, x) => (None, Some((point, x))),
        };
        let b = prompts.len();
        let t = layout.seq_len;
        let pad = self.config.bos_token_id.unwrap_or(0);
        let mut ids = vec![pad; b * t];
        for (r, p) in prompts.iter().enumerate() {
            let off = layout.offset(r);
            ids[r * t + off..r * t + off + p.len()].copy_from_slice(p);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(RunError::Batch(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device).run_ctx("token ids")?;
        let ctx = self.pass_ctx(layout, cache)?;
        let stop = match unembed {
            Unembed::None => match hooks.deepest() {
                Some(h) => h.order(),
                None => (0, 0),
            },
            _ => (usize::MAX, usize::MAX),
        };
        let mut pass = Pass {
            hooks,
            ctx: &ctx,
            captures: BTreeMap::new(),
            grad,
            leaves: BTreeMap::new(),
        };
        let diff = grad.is_some();
        let weights = match cache.as_ref() {
            Some(c) if self.quantized_decode && !c.f32_decode => {
                if c.layers.iter().any(Option::is_some) {
                    Weights::Decode
                } else {
                    Weights::Prefill
                }
            }
            _ => Weights::F32,
        };
        let done = |pass: Pass, logits| {
            let out = ForwardOutput {
                logits,
                captures: pass.captures,
                layout: layout.clone(),
            };
            (out, pass.leaves)
        };

        let (first, mut x) = match start {
            None => {
                let mut x = embed(&self.embed, &ids).run_ctx("embedding")?; // [b, t, d]
                if let Some(scale) = self.config.embed_scale {
                    x = (x * scale).run_ctx("embedding scale")?;
                }
                x = pass.hook(HookPoint::Embed, x)?;
                if HookPoint::Embed.order() >= stop {
                    return Ok(done(pass, None));
                }
                if let Some(pe) = &self.pos_embed {
                    let p = embed(pe, &ctx.pos_ids).run_ctx("position embedding")?;
                    x = (x + p).run_ctx("position embedding")?;
                }
                (0, x)
            }
            Some((HookPoint::ResidPost(l), x)) => {
                // The caller's activation may be a strided view (its prompts' own positions).
                let x = x.contiguous().run_ctx("starting activation")?;
                let x = pass.hook(HookPoint::ResidPost(l), x)?;
                if HookPoint::ResidPost(l).order() >= stop {
                    return Ok(done(pass, None));
                }
                (l + 1, x)
            }
            Some((point, x)) => (
                point.layer().unwrap_or(0),
                x.contiguous().run_ctx("starting activation")?,
            ),
        };
        for (l, block) in self.blocks.iter().enumerate().skip(first) {
            x = pass.hook(HookPoint::ResidPre(l), x)?;
            if HookPoint::ResidPre(l).order() >= stop {
                return Ok(done(pass, None));
            }
            let h = block.ln1.apply(&x, diff).run_ctx("ln1")?;
            let layer_cache = cache.as_mut().map(|c| {
                if c.layers.len() < self.blocks.len() {
                    c.layers.resize_with(self.blocks.len(), || None);
                }
                &mut c.layers[l]
            });
            let mut attn = self.attention(block, l, &h, &mut pass, layer_cache, weights)?;
            if HookPoint::AttnPattern(l).order() >= stop {
                return Ok(done(pass, None));
            }
            if let Some(n) = &block.post_attn_norm {
                attn = n.apply(&attn, diff).run_ctx("post-attention norm")?;
            }
            let attn = pass.hook(HookPoint::AttnOut(l), attn)?;
            if HookPoint::AttnOut(l).order() >= stop {
                return Ok(done(pass, None));
            }
            x = (x + attn).run_ctx("residual add")?;
            x = pass.hook(HookPoint::ResidMid(l), x)?;
            if HookPoint::ResidMid(l).order() >= stop {
                return Ok(done(pass, None));
            }
            let h = block.ln2.apply(&x, diff).run_ctx("ln2")?;
            let mut m = mlp(&block.mlp, &h, weights).run_ctx("mlp")?;
            if let Some(n) = &block.post_mlp_norm {
                m = n.apply(&m, diff).run_ctx("post-MLP norm")?;
            }
            let m = pass.hook(HookPoint::MlpOut(l), m)?;
            if HookPoint::MlpOut(l).order() >= stop {
                return Ok(done(pass, None));
            }
            x = (x + m).run_ctx("residual add")?;
            x = pass.hook(HookPoint::ResidPost(l), x)?;
            if HookPoint::ResidPost(l).order() >= stop {
                return Ok(done(pass, None));
            }
        }
        let x = self.ln_final.apply(&x, diff).run_ctx("ln_final")?;
        let x = pass.hook(HookPoint::LnFinal, x)?;
        let logits = match unembed {
            Unembed::None => None,
            Unembed::All => Some(self.unembed.forward(&x, weights).run_ctx("unembed")?),
            Unembed::From(n) => {
                let x = x
                    .narrow(1, n.min(t), t - n.min(t))
                    .run_ctx("positions unembedded")?;
                Some(self.unembed.forward(&x, weights).run_ctx("unembed")?)
            }
            Unembed::Last => {
                let idx: Vec<u32> = (0..b)
                    .map(|r| (r * t + layout.offset(r) + layout.lengths[r] - 1) as u32)
                    .collect();
                let idx = Tensor::from_vec(idx, b, &self.device).run_ctx("last index")?;
                let last = x
                    .reshape((b * t, self.config.d_model))
                    .and_then(|x| x.index_select(&idx, 0))
                    .and_then(|x| x.unsqueeze(1))
                    .run_ctx("last position")?;
                let l = self.unembed.forward(&last, weights).run_ctx("unembed")?;
                Some(l.squeeze(1).run_ctx("unembed")?)
            }
        };
        let logits = match (logits, self.config.final_softcap) {
            (Some(l), Some(cap)) => Some(softcap(&l, cap).run_ctx("final logit soft-cap")?),
            (l, _) => l,
        };
        Ok(done(pass, logits))
    }

    fn attention(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        pass: &mut Pass,
        cache: Option<&mut Option<LayerKv>>,
        weights: Weights,
    ) -> Result<Tensor, RunError> {
        let c = &self.config;
        let (b, t, _) = x.dims3().run_ctx("attention input")?;
        let hd = c.head_dim;
        let qkv = block.qkv.forward(x, weights).run_ctx("qkv projection")?;
        let split = |start: usize, heads: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, start * hd, heads * hd)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let diff = pass.grad.is_some();
        let mut q = split(0, c.n_heads).run_ctx("query projection")?;
        let mut k = split(c.n_heads, c.n_kv_heads).run_ctx("key projection")?;
        let mut v = split(c.n_heads + c.n_kv_heads, c.n_kv_heads).run_ctx("value projection")?;
        if let Some(n) = &block.q_norm {
            q = n.apply(&q, diff).run_ctx("query norm")?;
        }
        if let Some(n) = &block.k_norm {
            k = n.apply(&k, diff).run_ctx("key norm")?;
        }
        let sliding = c.layer_is_sliding(layer);
        let rope = match (&pass.ctx.rope_sliding, sliding) {
            (Some(r), true) => Some(r),
            _ => pass.ctx.rope.as_ref(),
        };
        if let Some((cos, sin)) = rope {
            let rope = if diff {
                rope_plain
            } else {
                candle_nn::rotary_emb::rope
            };
            q = rope(&q, cos, sin).run_ctx("rope")?;
            k = rope(&k, cos, sin).run_ctx("rope")?;
        }
        if let Some(slot) = cache {
            (k, v) = LayerKv::append(slot, &k, &v).run_ctx("kv cache")?;
        }
        let keys = k.dim(2).run_ctx("keys")?;
        let groups = c.n_heads / c.n_kv_heads;
        let scale = 1.0 / c.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
        let point = HookPoint::AttnPattern(layer);
        if let (Some((mask, sliding_mask)), false, false) =
            (&pass.ctx.host_masks, diff, pass.sees(point))
        {
            if decode_attention::applies(&q) {
                let mask = match (sliding_mask, sliding) {
                    (Some(m), true) => m,
                    _ => mask,
                };
                let rows: Vec<RowKeys> = pass
                    .ctx
                    .spans
                    .iter()
                    .map(|s| RowKeys {
                        start: s.key_start,
                        len: s.keys,
                        query: s.queries == 1,
                    })
                    .collect();
                let heads = Heads {
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    scale: scale as f32,
                    softcap: c.attn_softcap.map(|x| x as f32),
                };
                let out = decode_attention::attend(&q, &k, &v, &rows, mask, heads)
                    .run_ctx("decode attention")?;
                return block.o.forward(&out, weights).run_ctx("output projection");
            }
        }
        let mask = match (&pass.ctx.sliding_mask, sliding) {
            (Some(m), true) => m,
            _ => &pass.ctx.mask,
        };
        // Each row on its own real queries and keys: the shapes, and so the arithmetic, are
        // those of the prompt alone, whatever shares its batch and however it is padded.
        let spans = pass.ctx.spans.clone();
        let row = |x: &Tensor, r: usize, start: usize, len: usize| {
            x.narrow(0, r, 1)?.narrow(2, start, len)?.contiguous()
        };
        let mut patterns = Vec::with_capacity(b);
        for (r, s) in spans.iter().enumerate() {
            let q = row(&q, r, s.query_start, s.queries).run_ctx("query rows")?;
            let k = row(&k, r, s.key_start, s.keys).run_ctx("key rows")?;
            let mask = mask
                .narrow(0, r, 1)
                .and_then(|m| m.narrow(2, s.query_start, s.queries))
                .and_then(|m| m.narrow(3, s.key_start, s.keys))
                .run_ctx("attention mask")?;
            // Grouped-query attention without copying k: fold each group's heads into rows.
            let scores = q
                .reshape((1, c.n_kv_heads, groups * s.queries, hd))
                .and_then(|q| q.matmul(&k.t()?))
                .and_then(|s| s * scale)
                .and_then(|s| match c.attn_softcap {
                    Some(cap) => softcap(&s, cap),
                    None => Ok(s),
                })
                .and_then(|x| x.reshape((1, c.n_heads, s.queries, s.keys)))
                .and_then(|x| x.broadcast_add(&mask))
                .run_ctx("attention scores")?;
            let pattern = if diff {
                candle_nn::ops::softmax(&scores, D::Minus1)
            } else {
                candle_nn::ops::softmax_last_dim(&scores)
            }
            .run_ctx("softmax")?;
            patterns.push(pattern);
        }
        if pass.sees(point) {
            // Hooks see the pattern in the padded layout `[batch, heads, pos, keys]`, zero
            // wherever a row has no real query or key.
            let padded = spans
                .iter()
                .zip(&patterns)
                .map(|(s, p)| {
                    p.pad_with_zeros(2, s.query_start, t - s.query_start - s.queries)?
                        .pad_with_zeros(3, s.key_start, keys - s.key_start - s.keys)
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .and_then(|p| Tensor::cat(&p, 0))
                .run_ctx("attention pattern")?;
            let hooked = pass.hook(point, padded)?;
            for (r, s) in spans.iter().enumerate() {
                patterns[r] = row(&hooked, r, s.query_start, s.queries)
                    .and_then(|p| p.narrow(3, s.key_start, s.keys)?.contiguous())
                    .run_ctx("attention pattern")?;
            }
        }
        let mut outs = Vec::with_capacity(b);
        for (r, (s, pattern)) in spans.iter().zip(&patterns).enumerate() {
            let v = row(&v, r, s.key_start, s.keys).run_ctx("value rows")?;
            let out = pattern
                .reshape((1, c.n_kv_heads, groups * s.queries, s.keys))
                .and_then(|p| p.matmul(&v))
                .and_then(|o| o.reshape((1, c.n_heads, s.queries, hd)))
                .and_then(|o| o.transpose(1, 2))
                .and_then(|o| o.reshape((1, s.queries, c.n_heads * hd)))
                .and_then(|o| o.pad_with_zeros(1, s.query_start, t - s.query_start - s.queries))
                .run_ctx("attention output")?;
            outs.push(out);
        }
        let out = Tensor::cat(&outs, 0).run_ctx("attention output")?;
        block.o.forward(&out, weights).run_ctx("output projection")
    }
}

impl Transformer {
    /// Logits of residual-stream rows `[batch, pos, d_model]` read the way the last block's
    /// output is: final norm, unembedding (f32), final soft-cap. The logit lens reads every
    /// layer through this.
    pub fn residual_logits(&self, x: &Tensor) -> Result<Tensor, RunError> {
        let x = self.ln_final.forward(x).run_ctx("ln_final")?;
        let logits = self.unembed.forward(&x, Weights::F32).run_ctx("unembed")?;
        match self.config.final_softcap {
            Some(cap) => softcap(&logits, cap).run_ctx("final logit soft-cap"),
            None => Ok(logits),
        }
    }
}

/// `cap * tanh(x / cap)`.
fn softcap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// RoPE in plain differentiable ops (candle's kernel records no backward): `x`
/// `[b, h, t, head_dim]`, `cos` and `sin` `[b, t, head_dim/2]`, halves rotated as `rope` does.
fn rope_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[
            &x.narrow(D::Minus1, half, half)?.neg()?,
            &x.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Rows of `table` `[n, d]` for `ids` `[b, t]` -> `[b, t, d]`.
fn embed(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let d = table.dim(1)?;
    table
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, d))
}

fn mlp(mlp: &Mlp, x: &Tensor, weights: Weights) -> candle_core::Result<Tensor> {
    match mlp {
        Mlp::Gated {
            gate_up,
            down,
            activation,
        } => {
            let h = gate_up.forward(x, weights)?;
            let half = h.dim(2)? / 2;
            let g = activate(&h.narrow(2, 0, half)?, *activation)?;
            down.forward(&(g * h.narrow(2, half, half)?)?, weights)
        }
        Mlp::Plain {
            fc,
            proj,
            activation,
        } => proj.forward(&activate(&fc.forward(x, weights)?, *activation)?, weights),
    }
}

/// The hook state of one pass.
struct Pass<'a> {
    hooks: &'a Hooks,
    ctx: &'a PassCtx,
    captures: BTreeMap<HookPoint, Tensor>,
    /// A gradient pass: the hooks that get a zero leaf, and the leaves added.
    grad: Option<&'a BTreeSet<HookPoint>>,
    leaves: BTreeMap<HookPoint, Var>,
}

impl Pass<'_> {
    /// Whether anything reads or rewrites `point` in this pass.
    fn sees(&self, point: HookPoint) -> bool {
        self.hooks.touches(point) || self.grad.is_some_and(|g| g.contains(&point))
    }

    /// Apply the interventions registered at `point`, then capture if asked. Untouched hooks
    /// return `x` itself, so a pass with no hooks is bit-identical to a plain forward.
    fn hook(&mut self, point: HookPoint, mut x: Tensor) -> Result<Tensor, RunError> {
        if !self.sees(point) {
            return Ok(x);
        }
        let leaf = self.grad.is_some_and(|g| g.contains(&point));
        let name = point.to_string();
        for i in self.hooks.interventions.iter().filter(|i| i.hook == point) {
            let mask = self.position_mask(&i.positions, point)?;
            x = apply_edit(&x, &i.edit, &mask, self.grad.is_none()).map_err(
                |source: candle_core::Error| RunError::Candle {
                    context: format!("intervention at `{name}`"),
                    source: Box::new(source),
                },
            )?;
        }
        if self.hooks.capture.contains(&point) {
            self.captures.insert(point, x.clone());
        }
        if leaf {
            let zero = Var::zeros(x.shape(), x.dtype(), x.device()).run_ctx("gradient leaf")?;
            x = (x + zero.as_tensor()).run_ctx("gradient leaf")?;
            self.leaves.insert(point, zero);
        }
        Ok(x)
    }

    /// `[batch, pos, 1]` (or `[batch, 1, pos, 1]` for attention patterns) of 0/1.
    fn position_mask(&self, positions: &Positions, point: HookPoint) -> Result<Tensor, RunError> {
        let b = self.ctx.abs.len();
        let t = self.ctx.abs.first().map_or(0, Vec::len);
        let mut m = vec![0u8; b * t];
        for (r, row) in self.ctx.abs.iter().enumerate() {
            let total = self.ctx.totals[r] as i64;
            for (j, a) in row.iter().enumerate() {
                let Some(a) = a.map(|a| a as i64) else {
                    continue;
                };
                let hit = match positions {
                    Positions::All => true,
                    Positions::Last => a == total - 1,
                    Positions::Indices(ix) => {
                        ix.iter()
                            .any(|&i| if i < 0 { a == total + i } else { a == i })
                    }
                };
                m[r * t + j] = u8::from(hit);
            }
        }
        let shape: &[usize] = if point.is_residual_width() {
            &[b, t, 1]
        } else {
            &[b, 1, t, 1]
        };
        Tensor::from_vec(m, shape, self.ctx.mask.device()).run_ctx("position mask")
    }
}

/// `x` after `edit` where `mask` is 1. Outside gradient passes (`fused`), an ablation of CPU
/// f32 activations runs as one kernel ([`crate::ablation`]) with the same bits.
fn apply_edit(x: &Tensor, edit: &Edit, mask: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
    match edit {
        Edit::Add { vector, coeff } => {
            let delta = (vector.to_dtype(x.dtype())? * f64::from(*coeff))?;
            let m = mask.to_dtype(x.dtype())?;
            x.broadcast_add(&m.broadcast_mul(&delta)?)
        }
        Edit::Ablate { direction } => {
            let d = direction.to_dtype(x.dtype())?;
            let d = (&d / d.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
            if fused {
                if let Some(y) = crate::ablation::ablate_rows(x, &d, mask)? {
                    return Ok(y);
                }
            }
            let proj = x.broadcast_mul(&d)?.sum_keepdim(D::Minus1)?; // [b, t, 1]
            let proj = (proj * mask.to_dtype(x.dtype())?)?;
            x - proj.broadcast_mul(&d)?
        }
        Edit::Replace(f) | Edit::ReplaceEach(f) => {
            let y = f(x)?;
            if y.dims() != x.dims() {
                candle_core::bail!(
                    "replacement changed the shape from {:?} to {:?}",
                    x.dims(),
                    y.dims()
                );
            }
            mask.broadcast_as(x.shape())?.where_cond(&y, x)
        }
    }
}
