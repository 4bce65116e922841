//! Qwen2/2.5: the Llama block with biases on q, k and v (always, whatever
//! `attention_bias` says).

use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;

use super::gguf_meta;
use super::hf::{self, HfConfig, Honours};
use super::Family;

pub struct Qwen2;

/// Qwen's window applies only from `max_window_layers` on; that split is not implemented.
pub(super) fn refuse_qwen_window(cfg: &ModelConfig) -> Result<(), String> {
    match cfg.sliding_window {
        Some(_) => Err(hf::refuse("use_sliding_window", &true)),
        None => Ok(()),
    }
}

impl Family for Qwen2 {
    fn architecture(&self) -> Architecture {
        Architecture::Qwen2
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["Qwen2ForCausalLM", "qwen2"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        Some("qwen2")
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        let mut cfg = hf::decoder_config(c, Architecture::Qwen2, &Honours::default())?;
        refuse_qwen_window(&cfg)?;
        cfg.qkv_bias = true;
        Ok(cfg)
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        let mut cfg = gguf_meta::decoder_config(g, "qwen2", Architecture::Qwen2, &[])?;
        // llama.cpp requires Qwen2's q/k/v biases.
        cfg.qkv_bias = true;
        Ok(cfg)
    }
}
