//! The model configuration: shapes plus the behaviour fields that the forward pass reads.
//!
//! Each family module under [`crate::family`] maps its HF `config.json` or GGUF metadata onto
//! one [`ModelConfig`]; the forward pass never compares architecture names. Every field that
//! changes the computation is either honoured or refused with an error naming it; none is
//! dropped silently. Counts are bounded here (no product overflows, a plausible context
//! length) and against the checkpoint's tensors when the weights are built.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::LoadError;
use crate::family::{self, hf::HfConfig};
use crate::gguf::GgufFile;

/// The model families mechwatch runs, one module each under [`crate::family`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3/3.1/3.2, SmolLM2, TinyLlama: RMSNorm, RoPE, gated SiLU MLP.
    Llama,
    /// Mistral: the Llama block with a sliding attention window.
    Mistral,
    /// Qwen2/2.5: the Llama block with biases on q, k and v.
    Qwen2,
    /// Qwen3: the Llama block with per-head RMSNorm on q and k.
    Qwen3,
    /// Gemma 2: sandwich norms, soft-capping, alternating sliding windows, GeGLU.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 plus q/k norms and a local RoPE base.
    Gemma3,
    /// Phi-3: the Llama block with fused qkv and gate_up projections.
    Phi3,
    /// GPT-2: LayerNorm, learned positions, GELU MLP, Conv1D (transposed) weights.
    Gpt2,
}

pub const SUPPORTED_ARCHITECTURES: &str = "LlamaForCausalLM, MistralForCausalLM, \
     Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, \
     Phi3ForCausalLM, GPT2LMHeadModel, GGUF `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, \
     `phi3`";

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
            Architecture::Phi3 => "phi3",
            Architecture::Gpt2 => "gpt2",
        }
    }
}

/// The MLP's activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu` (Llama family, gated).
    #[default]
    Silu,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`; Gemma's GeGLU).
    GeluTanh,
    /// Exact GELU with erf (`gelu`).
    GeluErf,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEncoding {
    /// Rotary embeddings on q and k (half-split layout).
    #[default]
    Rotary,
    /// A learned position table added to the embedding (GPT-2).
    Learned,
}

/// How RoPE's frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling: long wavelengths divided by `factor`, short ones kept,
    /// a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency, as llama.cpp stores Llama 3.1's in `rope_freqs.weight`.
    Divisors(Vec<f64>),
}

impl RopeScaling {
    /// Frequency `i` (`inv_freq`) after scaling.
    pub fn scale(&self, i: usize, inv_freq: f64) -> f64 {
        match self {
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < old / high_freq_factor {
                    inv_freq
                } else if wavelen > old / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
            RopeScaling::Divisors(d) => inv_freq / d.get(i).copied().unwrap_or(1.0),
        }
    }
}

/// Longest context accepted: beyond this a configuration is more likely corrupt than real.
pub const MAX_CONTEXT: usize = 1 << 24;

/// Everything the forward pass needs: shapes, then behaviour fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The family (for names and records only: the forward pass reads the fields below).
    pub architecture: Architecture,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub norm_eps: f64,
    /// RoPE base; unused with learned positions.
    pub rope_theta: f64,
    /// Context length (GPT-2's learned position table size).
    pub max_positions: usize,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Biases on the q, k and v projections (Qwen2, or Llama with `attention_bias`).
    #[serde(default)]
    pub qkv_bias: bool,
    /// A bias on the attention output projection (Llama with `attention_bias`).
    #[serde(default)]
    pub o_bias: bool,
    /// Biases on the gated MLP's projections (Llama with `mlp_bias`; GPT-2 always has them).
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub activation: Activation,
    /// Rotary or learned positions.
    #[serde(default)]
    pub positions: PositionEncoding,
    /// RoPE frequency rescaling (global layers only when `rope_local_theta` is set).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// RoPE base of the sliding-window layers, unscaled (Gemma 3's 10k local base).
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// RMSNorms multiply by `norm_offset + w` (Gemma: 1).
    #[serde(default)]
    pub norm_offset: f64,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Norms on the attention and MLP outputs before they join the residual (Gemma 2/3).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// Attention scores become `cap * tanh(scores / cap)` before masking (Gemma 2).
    #[serde(default)]
    pub attn_softcap: Option<f64>,
    /// Logits become `cap * tanh(logits / cap)` (Gemma 2).
    #[serde(default)]
    pub final_softcap: Option<f64>,
    /// Keys at most this many positions back (the query's own included) are attended.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// With a window: layer `l` is global when `(l + 1) % pattern == 0`, sliding otherwise
    /// (Gemma 2: 2, Gemma 3: 6); without a pattern every layer slides.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// The embedding is multiplied by this (Gemma: `sqrt(d_model)`).
    #[serde(default)]
    pub embed_scale: Option<f64>,
    /// Attention scores are scaled by `1 / sqrt(this)` instead of `1 / sqrt(head_dim)`
    /// (Gemma's `query_pre_attn_scalar`).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
}

impl ModelConfig {
    /// A configuration with the given shapes and every behaviour field at the plain
    /// Llama block's setting; family modules change what their block does differently.
    pub(crate) fn plain(architecture: Architecture) -> Self {
        Self {
            architecture,
            n_layers: 0,
            d_model: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim: 0,
            d_mlp: 0,
            vocab_size: 0,
            norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_positions: 4096,
            tie_embeddings: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            activation: Activation::Silu,
            positions: PositionEncoding::Rotary,
            rope_scaling: None,
            rope_local_theta: None,
            norm_offset: 0.0,
            qk_norm: false,
            sandwich_norms: false,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            sliding_window_pattern: None,
            embed_scale: None,
            query_pre_attn_scalar: None,
        }
    }
}

impl ModelConfig {
    /// Parse an HF `config.json`: the family named by `architectures` (or `model_type`) maps
    /// it (see [`crate::family`]).
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self, LoadError> {
        let err = |detail: String| LoadError::Config {
            path: path.to_path_buf(),
            detail,
        };
        let mut c: HfConfig = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) {
            c.keys = map.keys().cloned().collect();
        }
        let arch_name = c
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| c.model_type.clone())
            .ok_or_else(|| err("neither `architectures` nor `model_type` is set".into()))?;
        let family =
            family::by_hf_name(&arch_name).ok_or_else(|| LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.clone(),
                supported: SUPPORTED_ARCHITECTURES,
            })?;
        let cfg = family.config_from_hf(&c).map_err(err)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Read the configuration of a GGUF file: the family named by `general.architecture`
    /// maps its metadata (see [`crate::family`]).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LoadError> {
        let arch = g.meta_str("general.architecture")?;
        let family =
            family::by_gguf_arch(arch).ok_or_else(|| LoadError::UnsupportedArchitecture {
                path: g.path.clone(),
                arch: arch.to_string(),
                supported: SUPPORTED_ARCHITECTURES,
            })?;
        let cfg = family.config_from_gguf(g)?;
        cfg.validate(&g.path)?;
        Ok(cfg)
    }

    /// Whether layer `layer` attends through the sliding window.
    pub fn layer_is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some()
            && self
                .sliding_window_pattern
                .is_none_or(|p| !(layer + 1).is_multiple_of(p))
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them (empty for learned positions), of
    /// the global layers or (`sliding`) of the sliding-window ones, which use the local base
    /// unscaled when the model has one.
    pub fn rope_inv_freqs(&self, sliding: bool) -> Vec<f64> {
        if self.positions == PositionEncoding::Learned {
            return Vec::new();
        }
        let local = self.rope_local_theta.filter(|_| sliding);
        let theta = local.unwrap_or(self.rope_theta);
        let d = self.head_dim as f64;
        let base = (0..self.head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / d));
        match (&self.rope_scaling, local) {
            (Some(s), None) => base.enumerate().map(|(i, f)| s.scale(i, f)).collect(),
            _ => base.collect(),
        }
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
            || (self.positions == PositionEncoding::Rotary && !self.head_dim.is_multiple_of(2))
        {
            return Err(err(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            )));
        }
        if self.positions == PositionEncoding::Learned
            && self.head_dim * self.n_heads != self.d_model
        {
            return Err(err(format!(
                "n_embd {} is not divisible by n_head {}",
                self.d_model, self.n_heads
            )));
        }
        if self.vocab_size == 0 || self.d_mlp == 0 || self.n_layers == 0 || self.d_model == 0 {
            return Err(err(
                "vocab size, model width, MLP width and layer count must be positive".into(),
            ));
        }
        // The forward pass multiplies these; none of the products may wrap.
        let products = [
            ("attention heads x head_dim", self.n_heads, self.head_dim),
            (
                "attention heads x key/value heads",
                self.n_heads,
                self.n_kv_heads,
            ),
            ("vocab size x model width", self.vocab_size, self.d_model),
            ("MLP width x model width", self.d_mlp, self.d_model),
            ("context x model width", self.max_positions, self.d_model),
            ("layers x model width", self.n_layers, self.d_model),
        ];
        for (what, a, b) in products {
            let big = a
                .checked_mul(b)
                .and_then(|p| p.checked_mul(4 * 3))
                .is_none_or(|p| p > isize::MAX as usize);
            if big {
                return Err(err(format!("{what} ({a} x {b}) overflows")));
            }
        }
        if self.max_positions == 0 || self.max_positions > MAX_CONTEXT {
            return Err(err(format!(
                "context length {} is outside 1..={MAX_CONTEXT}",
                self.max_positions
            )));
        }
        let special = [
            ("bos_token_id", self.bos_token_id.as_slice()),
            ("eos_token_id", &self.eos_token_ids),
        ];
        for (key, ids) in special {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(err(format!(
                    "{key} {id} is outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        // Passes compute in f32: a value must be positive and finite as one, not only as f64.
        let positive =
            |v: f64| v > 0.0 && v.is_finite() && (v as f32) > 0.0 && (v as f32).is_finite();
        let behaviour = [
            ("attention soft-cap", self.attn_softcap),
            ("final logit soft-cap", self.final_softcap),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("embedding scale", self.embed_scale),
            ("local RoPE base", self.rope_local_theta),
        ];
        for (what, v) in behaviour {
            if let Some(v) = v.filter(|&v| !positive(v)) {
                return Err(err(format!("{what} {v:e} must be positive and finite")));
            }
        }
        if self.positions == PositionEncoding::Rotary && !positive(self.rope_theta) {
            return Err(err(format!(
                "rope_theta {} must be positive and finite",
                self.rope_theta
            )));
        }
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !positive(*factor) => {
                return Err(err(format!(
                    "rope_scaling factor {factor} must be positive"
                )));
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: old,
            }) if ![*factor, *lo, *hi, *old].into_iter().all(positive) || hi <= lo => {
                return Err(err(format!(
                    "rope_scaling llama3 needs positive factor ({factor}), \
                     original_max_position_embeddings ({old}) and low_freq_factor ({lo}) < \
                     high_freq_factor ({hi})"
                )));
            }
            Some(RopeScaling::Divisors(d))
                if d.len() != self.head_dim / 2 || !d.iter().copied().all(positive) =>
            {
                return Err(err(format!(
                    "{} RoPE frequency divisors for head_dim {}, or one is not positive",
                    d.len(),
                    self.head_dim
                )));
            }
            _ => {}
        }
        if self.sliding_window == Some(0) || self.sliding_window_pattern == Some(0) {
            return Err(err(
                "a sliding window and its layer pattern must be positive".into(),
            ));
        }
        if !(self.norm_offset == 0.0 || self.norm_offset == 1.0) {
            return Err(err(format!(
                "norm offset {} is neither 0 nor 1",
                self.norm_offset
            )));
        }
        if !positive(self.norm_eps) {
            return Err(err(format!(
                "normalisation epsilon {:e} must be positive and finite as an f32",
                self.norm_eps
            )));
        }
        Ok(())
    }

    /// Config as HF `config.json` (written by `model convert`), for the families whose
    /// block is the plain Llama one (`llama`, `qwen2`); `None` for the others.
    pub fn to_hf_json(&self) -> Option<serde_json::Value> {
        let arch = match self.architecture {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            _ => return None,
        };
        if self.rope_scaling.is_some() || self.sliding_window.is_some() {
            return None;
        }
        Some(serde_json::json!({
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
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        }))
    }
}
