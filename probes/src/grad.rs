//! Gradients of a scalar metric at hook points, for attribution patching (Nanda 2023; Syed,
//! Rager and Conmy 2023): one forward pass in plain differentiable ops with a zero leaf added
//! at every asked hook, one backward pass, and each leaf's gradient is the metric's gradient
//! with respect to that hook's activation. The normal forward keeps its fused kernels (they
//! record no backward in candle); only this pass swaps them for plain ops.
//!
//! Attention heads: a head's contribution to the residual stream is its `z` times its slice
//! of `W_O`, recomputed here from the captured block input and pattern. It is separable only
//! when nothing acts on the summed attention output before the residual add (no sandwich
//! norm); otherwise heads cannot be attributed and the error says so.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};

use crate::error::{CandleContext, RunError};
use crate::hooks::{HookPoint, Hooks};
use crate::transformer::{BatchLayout, Block, Transformer};

/// What a gradient pass returns.
#[derive(Debug)]
pub struct Gradients {
    /// Each prompt's next-token logits, `[batch, vocab]`.
    pub logits: Tensor,
    /// The metric's value.
    pub metric: f64,
    /// The activation at each asked hook and each hook `hooks` captures, detached.
    pub acts: BTreeMap<HookPoint, Tensor>,
    /// The metric's gradient at each asked hook, the activation's shape.
    pub grads: BTreeMap<HookPoint, Tensor>,
    pub layout: BatchLayout,
}

impl Transformer {
    /// The gradient of `metric` (a scalar computed from the next-token logits `[batch, vocab]`
    /// at each prompt's last token; `prompts` are left-padded) at every hook of `points`, with
    /// `hooks` active. Only the last positions are unembedded: every metric reads them, and
    /// the whole sequence's logits would cost a fifth of the forward pass and as much again
    /// backward.
    pub fn gradients(
        &self,
        prompts: &[Vec<u32>],
        hooks: &Hooks,
        points: &BTreeSet<HookPoint>,
        metric: &dyn Fn(&Tensor, &BatchLayout) -> candle_core::Result<Tensor>,
    ) -> Result<Gradients, RunError> {
        let mut hooks = hooks.clone();
        hooks.capture.extend(points.iter().copied());
        let (out, leaves) = self.forward_leaves(prompts, &hooks, points)?;
        let logits = out
            .logits
            .ok_or_else(|| RunError::Gradient("the pass produced no logits".into()))?;
        let m = metric(&logits, &out.layout).run_ctx("metric")?;
        if m.elem_count() != 1 {
            return Err(RunError::Gradient(format!(
                "the metric must be a scalar, it has shape {:?}",
                m.dims()
            )));
        }
        let value = m
            .flatten_all()
            .and_then(|v| v.to_dtype(DType::F64))
            .and_then(|v| v.to_vec1::<f64>())
            .run_ctx("metric")?[0];
        let store = m.backward().run_ctx("backward pass")?;
        let mut grads = BTreeMap::new();
        for (point, leaf) in &leaves {
            let g = match store.get(leaf.as_tensor()) {
                Some(g) => g.clone(),
                // The metric does not depend on this hook (e.g. positions after the last).
                None => leaf.as_tensor().zeros_like().run_ctx("zero gradient")?,
            };
            grads.insert(*point, g);
        }
        let acts = out.captures.iter().map(|(p, a)| (*p, a.detach())).collect();
        Ok(Gradients {
            logits: logits.detach(),
            metric: value,
            acts,
            grads,
            layout: out.layout,
        })
    }

    /// Each head's contribution to block `layer`'s attention output, `[batch, pos, head,
    /// d_model]` (the output bias left out), from the block input `resid_pre` `[batch, pos,
    /// d_model]` and the attention pattern `[batch, head, pos, pos]` of the same pass. Summed
    /// over heads plus the bias, it is `hook_attn_out`.
    pub fn head_results(
        &self,
        layer: usize,
        resid_pre: &Tensor,
        pattern: &Tensor,
    ) -> Result<Tensor, RunError> {
        let c = &self.config;
        let block = self.blocks.get(layer).ok_or_else(|| {
            RunError::Gradient(format!(
                "layer {layer} is outside the model's {}",
                c.n_layers
            ))
        })?;
        if !self.heads_separable() {
            return Err(RunError::Gradient(
                "the model normalises each attention output before the residual add (sandwich \
                 norms): single heads' contributions cannot be captured"
                    .into(),
            ));
        }
        head_results(c, block, resid_pre, pattern).run_ctx("head results")
    }

    /// Whether each head's contribution to the residual stream can be captured: nothing acts
    /// on the summed attention output before the residual add.
    pub fn heads_separable(&self) -> bool {
        self.blocks.iter().all(|b| b.post_attn_norm.is_none())
    }

    /// This model with every weight in `dtype`: f64 for finite-difference checks of
    /// gradients, which f32 rounding would swamp.
    pub fn to_dtype(&self, dtype: DType) -> Result<Transformer, RunError> {
        self.map_weights(|t| t.to_dtype(dtype), self.device(), false)
            .run_ctx("weight dtype")
    }
}

/// See [`Transformer::head_results`].
fn head_results(
    c: &crate::ModelConfig,
    block: &Block,
    resid_pre: &Tensor,
    pattern: &Tensor,
) -> candle_core::Result<Tensor> {
    let hd = c.head_dim;
    let (b, t, d) = resid_pre.dims3()?;
    let dtype = resid_pre.dtype();
    let groups = c.n_heads / c.n_kv_heads;
    let h = block.ln1.apply(resid_pre, true)?;
    let wv = block
        .qkv
        .w
        .narrow(0, (c.n_heads + c.n_kv_heads) * hd, c.n_kv_heads * hd)?;
    let mut v = h.reshape((b * t, d))?.matmul(&wv.t()?.to_dtype(dtype)?)?;
    if let Some(bias) = &block.qkv.b {
        let bv = bias.narrow(0, (c.n_heads + c.n_kv_heads) * hd, c.n_kv_heads * hd)?;
        v = v.broadcast_add(&bv.to_dtype(dtype)?)?;
    }
    // [b, kv, t, hd]
    let v = v
        .reshape((b, t, c.n_kv_heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    // [b, kv, groups * t, keys] @ [b, kv, keys, hd] -> [b, h, t, hd]
    let keys = pattern.dim(3)?;
    let z = pattern
        .to_dtype(dtype)?
        .reshape((b, c.n_kv_heads, groups * t, keys))?
        .matmul(&v)?
        .reshape((b, c.n_heads, t, hd))?;
    let wo = block.o.w.to_dtype(dtype)?; // [d, h * hd]
    let mut out = Vec::with_capacity(c.n_heads);
    for head in 0..c.n_heads {
        let zh = z.narrow(1, head, 1)?.squeeze(1)?.reshape((b * t, hd))?;
        let w = wo.narrow(1, head * hd, hd)?; // [d, hd]
        out.push(zh.matmul(&w.t()?)?.reshape((b, t, 1, d))?);
    }
    Tensor::cat(&out, 2)
}
