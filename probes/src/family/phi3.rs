//! Phi-3: the Llama block with q, k and v fused in `qkv_proj` and gate and up in
//! `gate_up_proj` (gate first); its `sliding_window` applies to every layer.

use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::transformer::Transformer;
use crate::weights::Loader;

use super::decoder::{self, DecoderTensors, LLAMA_TENSORS};
use super::gguf_meta;
use super::hf::{self, HfConfig, Honours};
use super::Family;

pub struct Phi3;

const PHI3_TENSORS: DecoderTensors = DecoderTensors {
    fused_qkv: true,
    fused_gate_up: true,
    ..LLAMA_TENSORS
};

impl Family for Phi3 {
    fn architecture(&self) -> Architecture {
        Architecture::Phi3
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["Phi3ForCausalLM", "phi3"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        Some("phi3")
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        let honours = Honours {
            window_by_default: true,
            ..Honours::default()
        };
        hf::decoder_config(c, Architecture::Phi3, &honours)
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        gguf_meta::decoder_config(g, "phi3", Architecture::Phi3, &[])
    }
    fn build(&self, l: &Loader) -> Result<Transformer, LoadError> {
        decoder::build(l, &PHI3_TENSORS)
    }
}
