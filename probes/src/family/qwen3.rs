//! Qwen3: the Llama block with a per-head RMSNorm on q and k before RoPE, and no q/k/v
//! biases unless `attention_bias` says so.

use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;

use super::gguf_meta;
use super::hf::{self, HfConfig, Honours};
use super::Family;

pub struct Qwen3;

impl Family for Qwen3 {
    fn architecture(&self) -> Architecture {
        Architecture::Qwen3
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["Qwen3ForCausalLM", "qwen3"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        Some("qwen3")
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        let mut cfg = hf::decoder_config(c, Architecture::Qwen3, &Honours::default())?;
        super::qwen2::refuse_qwen_window(&cfg)?;
        cfg.qk_norm = true;
        Ok(cfg)
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        let mut cfg = gguf_meta::decoder_config(g, "qwen3", Architecture::Qwen3, &[])?;
        cfg.qk_norm = true;
        Ok(cfg)
    }
}
