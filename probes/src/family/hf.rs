//! Reading an HF `config.json`: the keys every decoder family shares, with a family's own keys
//! left to its module. A key that changes the computation and that the family does not honour
//! is refused, naming it.

use serde::Deserialize;

use crate::config::{Activation, Architecture, ModelConfig, RopeScaling};

/// The keys of an HF `config.json` that any family reads.
#[derive(Deserialize)]
pub struct HfConfig {
    /// The top-level keys present (a key set to null is present; an absent one takes the
    /// family's default).
    #[serde(skip)]
    pub keys: std::collections::BTreeSet<String>,
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    // decoder families
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_local_base_freq: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub vocab_size: Option<usize>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub hidden_act: Option<String>,
    pub hidden_activation: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
    pub sliding_window_pattern: Option<usize>,
    pub partial_rotary_factor: Option<f64>,
    pub attn_logit_softcapping: Option<serde_json::Value>,
    pub final_logit_softcapping: Option<serde_json::Value>,
    pub query_pre_attn_scalar: Option<f64>,
    pub use_qk_norm: Option<bool>,
    pub layer_types: Option<serde_json::Value>,
    // gpt2
    pub n_embd: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_inner: Option<usize>,
    pub n_positions: Option<usize>,
    pub layer_norm_epsilon: Option<f64>,
    pub activation_function: Option<String>,
    pub scale_attn_weights: Option<bool>,
    pub scale_attn_by_inverse_layer_idx: Option<bool>,
    pub add_cross_attention: Option<bool>,
}

/// `bos_token_id` / `eos_token_id`: null, an id, or a list of ids.
pub fn token_ids(v: &Option<serde_json::Value>, key: &str) -> Result<Vec<u32>, String> {
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

/// A required positive count.
pub fn need(v: Option<usize>, key: &str) -> Result<usize, String> {
    v.filter(|&v| v > 0)
        .ok_or_else(|| format!("`{key}` is missing or zero"))
}

/// The error for a key whose value changes the computation in an unimplemented way.
pub fn refuse(key: &str, value: &dyn std::fmt::Display) -> String {
    format!("`{key}` = {value} changes the computation in a way mechwatch does not implement")
}

/// A JSON value that is null or absent.
fn unset(v: &Option<serde_json::Value>) -> bool {
    v.as_ref().is_none_or(serde_json::Value::is_null)
}

/// A soft-cap: null, absent, or a positive number.
pub fn softcap(v: &Option<serde_json::Value>, key: &str) -> Result<Option<f64>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(n) => n
            .as_f64()
            .filter(|c| *c > 0.0 && c.is_finite())
            .map(Some)
            .ok_or_else(|| format!("`{key}` = {n} is not a positive number")),
    }
}

/// The window length in `sliding_window`, if set.
pub fn window(c: &HfConfig) -> Result<Option<usize>, String> {
    match c.sliding_window.as_ref() {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(w) => w
            .as_u64()
            .and_then(|w| usize::try_from(w).ok())
            .filter(|&w| w > 0)
            .map(Some)
            .ok_or_else(|| format!("`sliding_window` = {w} is not a length")),
    }
}

/// A soft-cap whose absence means the family's `default` (a null means none).
pub fn softcap_or(
    c: &HfConfig,
    v: &Option<serde_json::Value>,
    key: &str,
    default: Option<f64>,
) -> Result<Option<f64>, String> {
    if c.keys.contains(key) {
        softcap(v, key)
    } else {
        Ok(default)
    }
}

/// `layer_types`, when given, must say what the window pattern says, layer by layer.
pub fn check_layer_types(c: &HfConfig, cfg: &ModelConfig) -> Result<(), String> {
    let Some(types) = c.layer_types.as_ref().filter(|t| !t.is_null()) else {
        return Ok(());
    };
    let types = types
        .as_array()
        .filter(|t| t.len() == cfg.n_layers)
        .ok_or_else(|| {
            format!(
                "`layer_types` is not a list of {} layer types",
                cfg.n_layers
            )
        })?;
    for (l, t) in types.iter().enumerate() {
        let want = if cfg.layer_is_sliding(l) {
            "sliding_attention"
        } else {
            "full_attention"
        };
        if t.as_str() != Some(want) {
            return Err(format!(
                "`layer_types[{l}]` = {t}, but the sliding window pattern makes layer {l} \
                 {want}: other layer patterns are not implemented"
            ));
        }
    }
    Ok(())
}

/// An activation name (`hidden_act` / `hidden_activation`).
pub fn activation(key: &str, name: &str) -> Result<Activation, String> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::GeluErf),
        _ => Err(refuse(key, &format!("{name:?}"))),
    }
}

/// `rope_scaling`: absent, null, `default`, `linear` or `llama3`; anything else is refused.
pub fn rope_scaling(v: &Option<serde_json::Value>) -> Result<Option<RopeScaling>, String> {
    let Some(s) = v.as_ref().filter(|s| !s.is_null()) else {
        return Ok(None);
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |k: &str| {
        s.get(k)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("`rope_scaling.{k}` is missing or not a number in {s}"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        _ => Err(refuse("rope_scaling", s)),
    }
}

/// What a family's own module reads from the config; everything else that changes the
/// computation is refused by [`decoder_config`].
#[derive(Default)]
pub struct Honours {
    /// `sliding_window` applies even without `use_sliding_window` (Mistral, Phi-3, Gemma).
    pub window_by_default: bool,
    /// The family reads the soft-caps, `query_pre_attn_scalar`, the window pattern and the
    /// local RoPE base itself (Gemma).
    pub gemma_keys: bool,
}

/// The configuration of a RoPE decoder (Llama's keys and defaults).
pub fn decoder_config(
    c: &HfConfig,
    architecture: Architecture,
    honours: &Honours,
) -> Result<ModelConfig, String> {
    let act_key = if c.hidden_activation.is_some() {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let act = c
        .hidden_activation
        .as_deref()
        .or(c.hidden_act.as_deref())
        .unwrap_or("silu");
    if let Some(f) = c.partial_rotary_factor.filter(|&f| f != 1.0) {
        return Err(refuse("partial_rotary_factor", &f));
    }
    if !honours.gemma_keys {
        for (key, v) in [
            ("attn_logit_softcapping", &c.attn_logit_softcapping),
            ("final_logit_softcapping", &c.final_logit_softcapping),
        ] {
            if !unset(v) {
                return Err(refuse(key, v.as_ref().expect("set")));
            }
        }
        if let Some(q) = c.query_pre_attn_scalar {
            return Err(refuse("query_pre_attn_scalar", &q));
        }
        if let Some(p) = c.sliding_window_pattern {
            return Err(refuse("sliding_window_pattern", &p));
        }
        if let Some(b) = c.rope_local_base_freq {
            return Err(refuse("rope_local_base_freq", &b));
        }
    }
    if !unset(&c.layer_types) && !honours.gemma_keys {
        return Err(refuse("layer_types", c.layer_types.as_ref().expect("set")));
    }
    if c.use_qk_norm == Some(true) {
        return Err(refuse("use_qk_norm", &true));
    }
    let d_model = need(c.hidden_size, "hidden_size")?;
    let n_heads = need(c.num_attention_heads, "num_attention_heads")?;
    let head_dim = match c.head_dim {
        Some(h) => h,
        None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
        None => {
            return Err(format!(
                "`hidden_size` {d_model} is not divisible by `num_attention_heads` {n_heads} \
                 (and `head_dim` is not set)"
            ))
        }
    };
    let window_on = c.use_sliding_window.unwrap_or(honours.window_by_default);
    let sliding_window = if window_on { window(c)? } else { None };
    let attention_bias = c.attention_bias.unwrap_or(false);
    let bos = token_ids(&c.bos_token_id, "bos_token_id")?;
    let mut cfg = ModelConfig::plain(architecture);
    cfg.n_layers = need(c.num_hidden_layers, "num_hidden_layers")?;
    cfg.d_model = d_model;
    cfg.n_heads = n_heads;
    cfg.n_kv_heads = c.num_key_value_heads.unwrap_or(n_heads);
    cfg.head_dim = head_dim;
    cfg.d_mlp = need(c.intermediate_size, "intermediate_size")?;
    cfg.vocab_size = need(c.vocab_size, "vocab_size")?;
    cfg.norm_eps = c.rms_norm_eps.unwrap_or(1e-6);
    cfg.rope_theta = c.rope_theta.unwrap_or(10_000.0);
    cfg.rope_scaling = rope_scaling(&c.rope_scaling)?;
    cfg.max_positions = c.max_position_embeddings.unwrap_or(4096);
    cfg.tie_embeddings = c.tie_word_embeddings.unwrap_or(false);
    cfg.bos_token_id = bos.first().copied();
    cfg.eos_token_ids = token_ids(&c.eos_token_id, "eos_token_id")?;
    cfg.qkv_bias = attention_bias;
    cfg.o_bias = attention_bias;
    cfg.mlp_bias = c.mlp_bias.unwrap_or(false);
    cfg.activation = activation(act_key, act)?;
    cfg.sliding_window = sliding_window;
    Ok(cfg)
}
