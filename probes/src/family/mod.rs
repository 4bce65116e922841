//! Model families: one module each, mapping a family's HF `config.json`, its GGUF metadata and
//! its tensor names onto one [`ModelConfig`] and one block layout. The forward pass
//! ([`crate::transformer`]) reads only the configuration's behaviour fields.
//!
//! Adding a family: write `family/NAME.rs` implementing [`Family`] (usually a few lines over
//! [`hf::decoder_config`], [`gguf_meta::decoder_config`] and [`decoder::build`]), add it to
//! [`FAMILIES`] and an [`Architecture`] variant. Only if its block does something no
//! behaviour field describes, add one field to [`ModelConfig`] and read it in the forward
//! pass. See `docs/architecture.md`.

pub mod decoder;
pub mod gemma2;
pub mod gemma3;
pub mod gguf_meta;
pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

use crate::config::{Architecture, ModelConfig};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::transformer::Transformer;
use crate::weights::Loader;

use decoder::GgufTensor;
use hf::HfConfig;

/// What a family module provides.
pub trait Family: Sync {
    fn architecture(&self) -> Architecture;
    /// HF `architectures` entries and `model_type`s that name this family.
    fn hf_names(&self) -> &'static [&'static str];
    /// llama.cpp's `general.architecture` for it, if llama.cpp has one of its own.
    fn gguf_arch(&self) -> Option<&'static str>;
    /// Map a `config.json`.
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String>;
    /// Map GGUF metadata (called only for files whose architecture is [`Family::gguf_arch`]).
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError>;
    /// The GGUF tensor holding an HF-named one.
    fn gguf_tensor(&self, hf: &str) -> Option<GgufTensor> {
        decoder::gguf_tensor(hf, decoder::llama_block_norm)
    }
    /// Whether llama.cpp's converter interleaves q/k rows for its "normal" RoPE (only its
    /// `llama` architecture; the others use the NeoX layout that HF uses).
    fn gguf_permutes_qk(&self) -> bool {
        false
    }
    /// Whether llama.cpp's converter stored RMSNorm weights with the `1 + w` offset added.
    fn gguf_norms_hold_offset(&self) -> bool {
        false
    }
    /// Build the transformer from HF-named tensors.
    fn build(&self, l: &Loader) -> Result<Transformer, LoadError> {
        decoder::build(l, &decoder::LLAMA_TENSORS)
    }
}

/// Every family, in one place.
pub static FAMILIES: &[&dyn Family] = &[
    &llama::Llama,
    &mistral::Mistral,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
    &gemma2::Gemma2,
    &gemma3::Gemma3,
    &phi3::Phi3,
    &gpt2::Gpt2,
];

/// The names of every family as records, `model info` and policies' `[models]` give them.
pub fn architecture_names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.architecture().name()).collect()
}

/// The family an HF `architectures` entry or `model_type` names.
pub fn by_hf_name(name: &str) -> Option<&'static dyn Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.hf_names().contains(&name))
}

/// The family of a GGUF `general.architecture`.
pub fn by_gguf_arch(arch: &str) -> Option<&'static dyn Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.gguf_arch() == Some(arch))
}

/// The module of a configuration's family.
pub fn of(architecture: Architecture) -> &'static dyn Family {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.architecture() == architecture)
        .expect("every architecture has a family module")
}
