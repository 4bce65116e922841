//! Mistral: the Llama block whose attention sees the last `sliding_window` positions (on
//! unless `sliding_window` is null). llama.cpp converts Mistral to its `llama`
//! architecture, so a Mistral GGUF loads through [`super::llama`].

use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;

use super::hf::{self, HfConfig, Honours};
use super::Family;

pub struct Mistral;

impl Family for Mistral {
    fn architecture(&self) -> Architecture {
        Architecture::Mistral
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["MistralForCausalLM", "mistral"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        None
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        let honours = Honours {
            window_by_default: true,
            ..Honours::default()
        };
        hf::decoder_config(c, Architecture::Mistral, &honours)
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        Err(LoadError::Config {
            path: g.path.clone(),
            detail: "Mistral GGUFs use the `llama` architecture".into(),
        })
    }
}
