//! Llama 2/3/3.1/3.2 (and SmolLM2, TinyLlama): the plain RoPE decoder. Llama 3.1's
//! `rope_scaling` (type `llama3`) is read from `config.json`; llama.cpp stores the same
//! scaling as per-frequency divisors in the `rope_freqs.weight` tensor.

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::LoadError;
use crate::gguf::GgufFile;

use super::gguf_meta::{self, config_err};
use super::hf::{self, HfConfig, Honours};
use super::Family;

pub struct Llama;

impl Family for Llama {
    fn architecture(&self) -> Architecture {
        Architecture::Llama
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["LlamaForCausalLM", "llama"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        Some("llama")
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        // transformers' Llama attends to the whole context whatever `sliding_window` says, so
        // a window here is refused rather than applied or dropped.
        if let Some(w) = hf::window(c)?.filter(|_| c.use_sliding_window != Some(false)) {
            return Err(format!(
                "{}: Llama attends to the whole context (transformers ignores the key for \
                 Llama); remove it, or name the family that applies it (e.g. \
                 MistralForCausalLM)",
                hf::refuse("sliding_window", &w)
            ));
        }
        hf::decoder_config(c, Architecture::Llama, &Honours::default())
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        let mut cfg = gguf_meta::decoder_config(g, "llama", Architecture::Llama, &[])?;
        if let Some(info) = g.get("rope_freqs.weight") {
            if cfg.rope_scaling.is_some() || info.dims.len() != 1 {
                return Err(config_err(
                    g,
                    "tensor `rope_freqs.weight` is not one vector of RoPE frequency divisors, \
                     or comes with another RoPE scaling"
                        .into(),
                ));
            }
            let divisors: Vec<f32> =
                g.load_f32(info)?
                    .to_vec1()
                    .map_err(|source| LoadError::Candle {
                        path: g.path.clone(),
                        context: "reading `rope_freqs.weight`".into(),
                        source: Box::new(source),
                    })?;
            cfg.rope_scaling = Some(RopeScaling::Divisors(
                divisors.into_iter().map(f64::from).collect(),
            ));
        }
        Ok(cfg)
    }
    fn gguf_permutes_qk(&self) -> bool {
        true
    }
}
