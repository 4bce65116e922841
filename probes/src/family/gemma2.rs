//! Gemma 2: RMSNorm with `1 + w`, pre and post ("sandwich") norms around attention and MLP,
//! GeGLU (tanh GELU) MLP, embedding scaled by `sqrt(d_model)`, attention and final logits
//! soft-capped, every other layer (0, 2, ...) attending through a sliding window, attention
//! scaled by `query_pre_attn_scalar`. Tied embeddings.

use crate::config::{Activation, Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::transformer::Transformer;
use crate::weights::Loader;

use super::decoder::{self, DecoderTensors, GgufTensor};
use super::gguf_meta::{self, opt_f64};
use super::hf::{self, HfConfig, Honours};
use super::Family;

pub struct Gemma2;

/// Gemma's block: `post_attention_layernorm` is the norm on the attention output.
pub(super) const GEMMA_TENSORS: DecoderTensors = DecoderTensors {
    fused_qkv: false,
    fused_gate_up: false,
    pre_mlp_norm: "pre_feedforward_layernorm",
    post_attn_norm: "post_attention_layernorm",
    post_mlp_norm: "post_feedforward_layernorm",
};

/// Gemma's block norms in GGUF.
pub(super) fn gemma_block_norm(hf: &str) -> Option<&'static str> {
    match hf {
        "input_layernorm" => Some("attn_norm"),
        "post_attention_layernorm" => Some("post_attention_norm"),
        "pre_feedforward_layernorm" => Some("ffn_norm"),
        "post_feedforward_layernorm" => Some("post_ffw_norm"),
        _ => None,
    }
}

/// What Gemma 2 and 3 share, over a decoder configuration.
pub(super) fn gemma_block(cfg: &mut ModelConfig) {
    cfg.norm_offset = 1.0;
    cfg.sandwich_norms = true;
    cfg.embed_scale = Some((cfg.d_model as f64).sqrt());
}

/// The HF configuration of Gemma 2 or 3, with the defaults of transformers' config classes
/// for absent keys.
pub(super) fn gemma_hf(
    c: &HfConfig,
    architecture: Architecture,
    pattern: usize,
    softcaps: (Option<f64>, Option<f64>),
) -> Result<ModelConfig, String> {
    let honours = Honours {
        window_by_default: true,
        gemma_keys: true,
    };
    let mut cfg = hf::decoder_config(c, architecture, &honours)?;
    gemma_block(&mut cfg);
    if c.hidden_activation.is_none() && c.hidden_act.is_none() {
        cfg.activation = Activation::GeluTanh;
    }
    cfg.tie_embeddings = c.tie_word_embeddings.unwrap_or(true);
    cfg.attn_softcap = hf::softcap_or(
        c,
        &c.attn_logit_softcapping,
        "attn_logit_softcapping",
        softcaps.0,
    )?;
    cfg.final_softcap = hf::softcap_or(
        c,
        &c.final_logit_softcapping,
        "final_logit_softcapping",
        softcaps.1,
    )?;
    cfg.query_pre_attn_scalar = Some(c.query_pre_attn_scalar.unwrap_or(256.0));
    if !c.keys.contains("sliding_window") {
        cfg.sliding_window = Some(4096);
    }
    cfg.sliding_window_pattern = Some(c.sliding_window_pattern.unwrap_or(pattern));
    hf::check_layer_types(c, &cfg)?;
    Ok(cfg)
}

impl Family for Gemma2 {
    fn architecture(&self) -> Architecture {
        Architecture::Gemma2
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["Gemma2ForCausalLM", "gemma2"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        Some("gemma2")
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        gemma_hf(c, Architecture::Gemma2, 2, (Some(50.0), Some(30.0)))
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        let honoured = ["attn_logit_softcapping", "final_logit_softcapping"];
        let mut cfg = gguf_meta::decoder_config(g, "gemma2", Architecture::Gemma2, &honoured)?;
        gemma_block(&mut cfg);
        cfg.activation = Activation::GeluTanh;
        cfg.attn_softcap = opt_f64(g, "gemma2.attn_logit_softcapping")?;
        cfg.final_softcap = opt_f64(g, "gemma2.final_logit_softcapping")?;
        cfg.sliding_window_pattern = Some(2);
        cfg.query_pre_attn_scalar = Some(gguf_meta::gemma_query_pre_attn_scalar(&cfg, 46));
        Ok(cfg)
    }
    fn gguf_tensor(&self, hf: &str) -> Option<GgufTensor> {
        decoder::gguf_tensor(hf, gemma_block_norm)
    }
    fn gguf_norms_hold_offset(&self) -> bool {
        true
    }
    fn build(&self, l: &Loader) -> Result<Transformer, LoadError> {
        decoder::build(l, &GEMMA_TENSORS)
    }
}
