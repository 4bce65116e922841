//! The model configuration, read from an HF `config.json` or from GGUF metadata.
//!
//! Every field that changes the computation is either honoured (biases, activation, sliding
//! window as a context bound) or refused with an error naming it; none is dropped silently.
//! Counts are bounded here (no product overflows, a plausible context length) and against the
//! checkpoint's tensors when the weights are built.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::LoadError;
use crate::gguf::{GgufFile, GgufValue};

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
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, GGUF `llama`, \
     GGUF `qwen2`";

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
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
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU with erf (`gelu`).
    GeluErf,
}

/// Longest context accepted: beyond this a configuration is more likely corrupt than real.
pub const MAX_CONTEXT: usize = 1 << 24;

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
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
    // behaviour fields of the Llama family
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    partial_rotary_factor: Option<f64>,
    attn_logit_softcapping: Option<serde_json::Value>,
    final_logit_softcapping: Option<serde_json::Value>,
    use_qk_norm: Option<bool>,
}

/// `bos_token_id` / `eos_token_id`: null, an id, or a list of ids.
fn token_ids(v: &Option<serde_json::Value>, key: &str) -> Result<Vec<u32>, String> {
    let id = |n: &serde_json::Value| {
        n.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("`{key}` holds {n}, not a token id"))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(a)) => a.iter().map(id).collect(),
        Some(n) => Ok(vec![id(n)?]),
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
        let refuse = |key: &str, value: &dyn std::fmt::Display| {
            Err(err(format!(
                "`{key}` = {value} changes the computation in a way mechwatch does not \
                 implement"
            )))
        };
        let bos = token_ids(&c.bos_token_id, "bos_token_id").map_err(err)?;
        let eos = token_ids(&c.eos_token_id, "eos_token_id").map_err(err)?;
        let cfg = if architecture == Architecture::Gpt2 {
            let act = c.activation_function.as_deref().unwrap_or("gelu_new");
            let activation = match act {
                "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
                "gelu" => Activation::GeluErf,
                _ => return refuse("activation_function", &act),
            };
            if c.scale_attn_weights == Some(false) {
                return refuse("scale_attn_weights", &false);
            }
            if c.scale_attn_by_inverse_layer_idx == Some(true) {
                return refuse("scale_attn_by_inverse_layer_idx", &true);
            }
            if c.add_cross_attention == Some(true) {
                return refuse("add_cross_attention", &true);
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
                d_mlp: match c.n_inner {
                    Some(n) => n,
                    None => d_model
                        .checked_mul(4)
                        .ok_or_else(|| err(format!("`n_embd` = {d_model} overflows 4 * n_embd")))?,
                },
                vocab_size: need(c.vocab_size, "vocab_size")?,
                norm_eps: c.layer_norm_epsilon.unwrap_or(1e-5),
                rope_theta: 0.0,
                max_positions: need(c.n_positions, "n_positions")?,
                tie_embeddings: true,
                bos_token_id: bos.first().copied(),
                eos_token_ids: eos,
                qkv_bias: true,
                o_bias: true,
                mlp_bias: true,
                activation,
            }
        } else {
            if let Some(s) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) {
                return refuse("rope_scaling", s);
            }
            let act = c.hidden_act.as_deref().unwrap_or("silu");
            if !matches!(act, "silu" | "swish") {
                return refuse("hidden_act", &format!("{act:?}"));
            }
            if let Some(f) = c.partial_rotary_factor.filter(|&f| f != 1.0) {
                return refuse("partial_rotary_factor", &f);
            }
            for (key, v) in [
                ("attn_logit_softcapping", &c.attn_logit_softcapping),
                ("final_logit_softcapping", &c.final_logit_softcapping),
            ] {
                if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
                    return refuse(key, v);
                }
            }
            if c.use_qk_norm == Some(true) {
                return refuse("use_qk_norm", &true);
            }
            let d_model = need(c.hidden_size, "hidden_size")?;
            let n_heads = need(c.num_attention_heads, "num_attention_heads")?;
            let head_dim = match c.head_dim {
                Some(h) => h,
                None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
                None => {
                    return Err(err(format!(
                        "`hidden_size` {d_model} is not divisible by `num_attention_heads` \
                         {n_heads} (and `head_dim` is not set)"
                    )))
                }
            };
            let mut max_positions = c.max_position_embeddings.unwrap_or(4096);
            // Mistral's window is on unless null; Qwen2's only with `use_sliding_window`.
            let window_on = c
                .use_sliding_window
                .unwrap_or(architecture != Architecture::Qwen2);
            match c.sliding_window.as_ref() {
                None | Some(serde_json::Value::Null) => {}
                Some(_) if !window_on => {}
                Some(w) => {
                    let w = w
                        .as_u64()
                        .and_then(|w| usize::try_from(w).ok())
                        .filter(|&w| w > 0)
                        .ok_or_else(|| err(format!("`sliding_window` = {w} is not a length")))?;
                    // Within the window, sliding-window attention is full causal attention:
                    // honour it by bounding the context.
                    max_positions = max_positions.min(w);
                }
            }
            let attention_bias = c.attention_bias.unwrap_or(false);
            ModelConfig {
                architecture,
                n_layers: need(c.num_hidden_layers, "num_hidden_layers")?,
                d_model,
                n_heads,
                n_kv_heads: c.num_key_value_heads.unwrap_or(n_heads),
                head_dim,
                d_mlp: need(c.intermediate_size, "intermediate_size")?,
                vocab_size: need(c.vocab_size, "vocab_size")?,
                norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
                rope_theta: c.rope_theta.unwrap_or(10_000.0),
                max_positions,
                tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
                bos_token_id: bos.first().copied(),
                eos_token_ids: eos,
                qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
                o_bias: attention_bias,
                mlp_bias: c.mlp_bias.unwrap_or(false),
                activation: Activation::Silu,
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Read the configuration of a GGUF file (`general.architecture` `llama` or `qwen2`).
    ///
    /// Both families share llama.cpp's key layout under their own prefix (`qwen2.block_count`,
    /// ...); the differences are behaviour fields: Qwen2 always has q/k/v biases, a Llama GGUF
    /// has them when its tensors do.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LoadError> {
        let arch = g.meta_str("general.architecture")?;
        let architecture = match arch {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(LoadError::UnsupportedArchitecture {
                    path: g.path.clone(),
                    arch: arch.to_string(),
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let err = |detail: String| LoadError::Config {
            path: g.path.clone(),
            detail,
        };
        let opt_usize = |key: &str| g.metadata.get(key).map(|_| g.meta_usize(key)).transpose();
        let opt_f64 = |key: &str| g.metadata.get(key).map(|_| g.meta_f64(key)).transpose();
        let refuse = |key: &str, v: &GgufValue| {
            Err(err(format!(
                "GGUF metadata `{key}` = {v:?} changes the computation in a way mechwatch \
                 does not implement"
            )))
        };
        for k in [
            "attention.clamp_kqv",
            "attention.scale",
            "attention.layer_norm_epsilon",
            "logit_scale",
            "embedding_scale",
            "residual_scale",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "use_parallel_residual",
            "rope.scaling.original_context_length",
        ] {
            if let Some(v) = g.metadata.get(&key(k)) {
                return refuse(&key(k), v);
            }
        }
        if let Some(v) = g.metadata.get(&key("rope.scaling.type")) {
            if v.as_str() != Some("none") {
                return refuse(&key("rope.scaling.type"), v);
            }
        }
        for k in ["rope.scaling.factor", "rope.scale_linear"] {
            if let Some(f) = opt_f64(&key(k))? {
                if f != 1.0 && f != 0.0 {
                    return refuse(&key(k), &GgufValue::F64(f));
                }
            }
        }
        if let Some(n) = opt_usize(&key("expert_count"))?.filter(|&n| n > 0) {
            return refuse(&key("expert_count"), &GgufValue::U64(n as u64));
        }
        let d_model = g.meta_usize(&key("embedding_length"))?;
        let n_heads = g.meta_usize(&key("attention.head_count"))?;
        if n_heads == 0 {
            return Err(err(format!(
                "GGUF metadata `{arch}.attention.head_count` is zero"
            )));
        }
        let head_dim = match opt_usize(&key("attention.key_length"))? {
            Some(k) => k,
            None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
            None => {
                return Err(err(format!(
                    "GGUF metadata `{arch}.embedding_length` {d_model} is not divisible by \
                     `{arch}.attention.head_count` {n_heads}"
                )))
            }
        };
        if let Some(v) = opt_usize(&key("attention.value_length"))?.filter(|&v| v != head_dim) {
            return Err(err(format!(
                "GGUF metadata `{arch}.attention.value_length` {v} differs from the key length \
                 {head_dim}, which mechwatch does not implement"
            )));
        }
        if let Some(r) = opt_usize(&key("rope.dimension_count"))?.filter(|&r| r != head_dim) {
            return Err(err(format!(
                "GGUF metadata `{arch}.rope.dimension_count` {r} differs from the head \
                 dimension {head_dim} (partial rotary embeddings are not implemented)"
            )));
        }
        let vocab_size = match opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => g
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map_or(0, |t| t.len()),
        };
        let token_id = |key: &str| -> Result<Option<u32>, LoadError> {
            opt_usize(key)?
                .map(|v| {
                    u32::try_from(v)
                        .map_err(|_| err(format!("GGUF metadata `{key}` = {v} is not a token id")))
                })
                .transpose()
        };
        let mut max_positions = opt_usize(&key("context_length"))?.unwrap_or(4096);
        if let Some(w) = opt_usize(&key("attention.sliding_window"))? {
            max_positions = max_positions.min(w);
        }
        let cfg = ModelConfig {
            architecture,
            n_layers: g.meta_usize(&key("block_count"))?,
            d_model,
            n_heads,
            n_kv_heads: opt_usize(&key("attention.head_count_kv"))?.unwrap_or(n_heads),
            head_dim,
            d_mlp: g.meta_usize(&key("feed_forward_length"))?,
            vocab_size,
            norm_eps: g.meta_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            max_positions,
            tie_embeddings: g.get("output.weight").is_none(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            // llama.cpp requires Qwen2's q/k/v biases; a Llama GGUF may carry them (HF
            // `attention_bias`), and then carries an output bias too.
            qkv_bias: architecture == Architecture::Qwen2 || g.get("blk.0.attn_q.bias").is_some(),
            o_bias: g.get("blk.0.attn_output.bias").is_some(),
            mlp_bias: g.get("blk.0.ffn_up.bias").is_some(),
            activation: Activation::Silu,
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
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        })
    }
}
