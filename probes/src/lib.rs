//! The mechwatch model runtime: real checkpoints (HF safetensors directories and GGUF files)
//! run with TransformerLens-named hook points at which activations are captured or changed
//! (steering, directional ablation, replacement), plus generation with a KV cache.

mod ablation;
pub mod config;
mod decode_attention;
pub mod device;
pub mod digest;
pub mod error;
mod family;
pub mod fetch;
pub mod files;
mod frozen;
pub mod generate;
pub mod gguf;
pub mod grad;
pub mod hooks;
pub mod kquant;
pub mod lens;
pub mod model;
pub mod progress;
pub mod sae;
pub mod safetensors;
mod shared_prefix;
pub use shared_prefix::SharedStart;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod tokenizer;
pub mod transformer;
mod weights;

pub use config::{Architecture, ModelConfig};
pub use device::device_named;
pub use error::{LoadError, RunError};
pub use family::architecture_names;
pub use generate::{
    generate, generate_capturing, generate_until, GenerateOptions, PromptActivations, Sampling,
};
pub use grad::Gradients;
pub use hooks::{Block, Edit, HookName, HookPoint, Hooks, Intervention, Positions};
pub use lens::{logit_lens, Lens, LensLayer, LensOptions, TokenRank};
pub use model::{convert_gguf, LoadOptions, Model, ModelInfo};
pub use transformer::{BatchLayout, ForwardOutput, Padding, Transformer, Unembed};
