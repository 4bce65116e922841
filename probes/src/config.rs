//! The model configuration, read from an HF `config.json` or from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::LoadError;
use crate::gguf::GgufFile;

/// The architecture families mechwatch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, TinyLlama, Mistral-style GQA: RMSNorm, RoPE, gated SiLU MLP.
    Llama,
    /// Qwen2: the Llama block with biases on q, k and v.
    Qwen2,
    /// GPT-2: LayerNorm, learned positions, GELU MLP, Conv1D (transposed) weights.
    Gpt2,
}

pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, GGUF `llama`";

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gpt2 => "gpt2",
        }
    }
}

/// Everything the forward pass needs to know about the shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub norm_eps: f64,
    /// RoPE base; unused by GPT-2.
    pub rope_theta: f64,
    /// Context length (GPT-2's learned position table size).
    pub max_positions: usize,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    // llama / qwen2 / mistral
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    vocab_size: Option<usize>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    // gpt2
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_inner: Option<usize>,
    n_positions: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Parse an HF `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self, LoadError> {
        let err = |detail: String| LoadError::Config {
            path: path.to_path_buf(),
            detail,
        };
        let c: HfConfig = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let arch_name = c
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| c.model_type.clone())
            .ok_or_else(|| err("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral" => Architecture::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            "GPT2LMHeadModel" | "gpt2" => Architecture::Gpt2,
            _ => {
                return Err(LoadError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: arch_name,
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };
        let need = |v: Option<usize>, key: &str| {
            v.filter(|&v| v > 0)
                .ok_or_else(|| err(format!("`{key}` is missing or zero")))
        };
        let cfg = if architecture == Architecture::Gpt2 {
            if let Some(act) = &c.activation_function {
                if !matches!(act.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu") {
                    return Err(err(format!("activation_function `{act}` is not supported")));
                }
            }
            let d_model = need(c.n_embd, "n_embd")?;
            let n_heads = need(c.n_head, "n_head")?;
            ModelConfig {
                architecture,
                n_layers: need(c.n_layer, "n_layer")?,
                d_model,
                n_heads,
                n_kv_heads: n_heads,
                head_dim: d_model / n_heads,
                d_mlp: c.n_inner.unwrap_or(4 * d_model),
                vocab_size: need(c.vocab_size, "vocab_size")?,
                norm_eps: c.layer_norm_epsilon.unwrap_or(1e-5),
                rope_theta: 0.0,
                max_positions: need(c.n_positions, "n_positions")?,
                tie_embeddings: true,
                bos_token_id: token_ids(&c.bos_token_id).first().copied(),
                eos_token_ids: token_ids(&c.eos_token_id),
            }
        } else {
            if let Some(s) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) {
                return Err(err(format!("rope_scaling {s} is not supported")));
            }
            let d_model = need(c.hidden_size, "hidden_size")?;
            let n_heads = need(c.num_attention_heads, "num_attention_heads")?;
            ModelConfig {
                architecture,
                n_layers: need(c.num_hidden_layers, "num_hidden_layers")?,
                d_model,
                n_heads,
                n_kv_heads: c.num_key_value_heads.unwrap_or(n_heads),
                head_dim: c.head_dim.unwrap_or(d_model / n_heads),
                d_mlp: need(c.intermediate_size, "intermediate_size")?,
                vocab_size: need(c.vocab_size, "vocab_size")?,
                norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
                rope_theta: c.rope_theta.unwrap_or(10_000.0),
                max_positions: c.max_position_embeddings.unwrap_or(4096),
                tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
                bos_token_id: token_ids(&c.bos_token_id).first().copied(),
                eos_token_ids: token_ids(&c.eos_token_id),
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Read the configuration of a GGUF file (`general.architecture = llama`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LoadError> {
        let arch = g.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(LoadError::UnsupportedArchitecture {
                path: g.path.clone(),
                arch: arch.to_string(),
                supported: SUPPORTED_ARCHITECTURES,
            });
        }
        let d_model = g.meta_usize("llama.embedding_length")?;
        let n_heads = g.meta_usize("llama.attention.head_count")?;
        let vocab_size = match g.metadata.get("llama.vocab_size") {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => g
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map_or(0, |t| t.len()),
        };
        let eos = g
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let cfg = ModelConfig {
            architecture: Architecture::Llama,
            n_layers: g.meta_usize("llama.block_count")?,
            d_model,
            n_heads,
            n_kv_heads: g
                .meta_usize("llama.attention.head_count_kv")
                .unwrap_or(n_heads),
            head_dim: d_model / n_heads.max(1),
            d_mlp: g.meta_usize("llama.feed_forward_length")?,
            vocab_size,
            norm_eps: g.meta_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: g.meta_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            max_positions: g.meta_usize("llama.context_length").unwrap_or(4096),
            tie_embeddings: g.get("output.weight").is_none(),
            bos_token_id: g
                .metadata
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as u32),
            eos_token_ids: eos.into_iter().collect(),
        };
        cfg.validate(&g.path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), LoadError> {
        let err = |detail: String| LoadError::Config {
            path: path.to_path_buf(),
            detail,
        };
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(err(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim == 0
            || (self.architecture != Architecture::Gpt2 && !self.head_dim.is_multiple_of(2))
        {
            return Err(err(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            )));
        }
        if self.architecture == Architecture::Gpt2 && self.head_dim * self.n_heads != self.d_model {
            return Err(err(format!(
                "n_embd {} is not divisible by n_head {}",
                self.d_model, self.n_heads
            )));
        }
        if self.vocab_size == 0 || self.d_mlp == 0 || self.n_layers == 0 {
            return Err(err(
                "vocab size, MLP width and layer count must be positive".into(),
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(err(format!(
                "normalisation epsilon {} is invalid",
                self.norm_eps
            )));
        }
        Ok(())
    }

    /// Config as HF `config.json` (written by `model convert`).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let arch = match self.architecture {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Gpt2 => "GPT2LMHeadModel",
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": self.architecture.name(),
            "hidden_size": self.d_model,
            "intermediate_size": self.d_mlp,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }
}
