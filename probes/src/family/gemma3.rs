//! Gemma 3 (text-only `Gemma3ForCausalLM`, `gemma3_text`): Gemma 2's block plus RMSNorm
//! (`1 + w`) on q and k per head, five sliding-window layers to each global one, the sliding
//! layers on a local RoPE base (10k) without the global layers' `rope_scaling`, and no
//! soft-capping unless the config asks for it.

use crate::config::{Activation, Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::transformer::Transformer;
use crate::weights::Loader;

use super::decoder::{self, GgufTensor};
use super::gemma2::{gemma_block, gemma_block_norm, gemma_hf, GEMMA_TENSORS};
use super::gguf_meta::{self, opt_f64};
use super::hf::{self, HfConfig};
use super::Family;

pub struct Gemma3;

/// llama.cpp's fixed Gemma 3 local RoPE base and layer pattern (its GGUFs store neither).
const LOCAL_ROPE_BASE: f64 = 10_000.0;
const PATTERN: usize = 6;

impl Family for Gemma3 {
    fn architecture(&self) -> Architecture {
        Architecture::Gemma3
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["Gemma3ForCausalLM", "gemma3_text"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        Some("gemma3")
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        let mut cfg = gemma_hf(c, Architecture::Gemma3, PATTERN, (None, None))?;
        cfg.qk_norm = true;
        cfg.rope_theta = hf::rope(c)?.0.unwrap_or(1_000_000.0);
        cfg.rope_local_theta = Some(c.rope_local_base_freq.unwrap_or(LOCAL_ROPE_BASE));
        Ok(cfg)
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        let honoured = ["attn_logit_softcapping", "final_logit_softcapping"];
        let mut cfg = gguf_meta::decoder_config(g, "gemma3", Architecture::Gemma3, &honoured)?;
        gemma_block(&mut cfg);
        cfg.activation = Activation::GeluTanh;
        cfg.qk_norm = true;
        cfg.attn_softcap = opt_f64(g, "gemma3.attn_logit_softcapping")?;
        cfg.final_softcap = opt_f64(g, "gemma3.final_logit_softcapping")?;
        cfg.sliding_window_pattern = Some(PATTERN);
        cfg.rope_local_theta = Some(LOCAL_ROPE_BASE);
        cfg.query_pre_attn_scalar = Some(gguf_meta::gemma_query_pre_attn_scalar(&cfg, 62));
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
