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
    /// transformers 5 writes `rope_theta` and the scaling here instead of at the top level.
    pub rope_parameters: Option<serde_json::Value>,
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

/// `rope_theta` and the RoPE scaling, from the top-level keys or from transformers 5's
/// `rope_parameters` (`rope_type`, `rope_theta` and the scaling's own keys); both places
/// saying different things is an error.
pub fn rope(c: &HfConfig) -> Result<(Option<f64>, Option<RopeScaling>), String> {
    let top = (c.rope_theta, rope_scaling(&c.rope_scaling)?);
    let Some(p) = c.rope_parameters.as_ref().filter(|p| !p.is_null()) else {
        return Ok(top);
    };
    let obj = p
        .as_object()
        .ok_or_else(|| format!("`rope_parameters` = {p} is not a table"))?;
    if obj.contains_key("full_attention") || obj.contains_key("sliding_attention") {
        return Err(refuse(
            "rope_parameters",
            &"per-layer-type RoPE parameters (write `rope_theta` and the scaling at the top \
              level)",
        ));
    }
    if let Some(f) = obj
        .get("partial_rotary_factor")
        .filter(|f| f.as_f64() != Some(1.0))
    {
        return Err(refuse("rope_parameters.partial_rotary_factor", f));
    }
    let theta = match obj.get("rope_theta") {
        None | Some(serde_json::Value::Null) => None,
        Some(t) => Some(
            t.as_f64()
                .ok_or_else(|| format!("`rope_parameters.rope_theta` = {t} is not a number"))?,
        ),
    };
    let mut scaling = p.clone();
    if scaling.get("rope_type").is_none() && scaling.get("type").is_none() {
        scaling["rope_type"] = "default".into();
    }
    let scaling =
        rope_scaling(&Some(scaling)).map_err(|e| e.replace("`rope_scaling", "`rope_parameters"))?;
    let conflict = |key: &str| {
        format!("`rope_parameters` and the top-level `{key}` say different things; give one")
    };
    if top.0.is_some() && theta.is_some() && top.0 != theta {
        return Err(conflict("rope_theta"));
    }
    if top.1.is_some() && top.1 != scaling {
        return Err(conflict("rope_scaling"));
    }
    Ok((theta.or(top.0), scaling.or(top.1)))
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
    // Gemma reads `hidden_activation`; every other family reads `hidden_act` (transformers'
    // Llama builds its MLP from `hidden_act` whatever `hidden_activation` says).
    let (act_key, act) = match (&c.hidden_activation, &c.hidden_act) {
        (Some(a), _) if honours.gemma_keys => ("hidden_activation", a.as_str()),
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "`hidden_activation` = {a:?} contradicts `hidden_act` = {b:?}; this family \
                 reads `hidden_act`"
            ))
        }
        (Some(a), None) => {
            return Err(format!(
                "`hidden_activation` = {a:?} is not read by this family, which takes its \
                 activation from `hidden_act`"
            ))
        }
        (_, Some(b)) => ("hidden_act", b.as_str()),
        (_, None) => ("hidden_act", "silu"),
    };
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
    let (theta, scaling) = rope(c)?;
    cfg.rope_theta = theta.unwrap_or(10_000.0);
    cfg.rope_scaling = scaling;
    cfg.max_positions = c.max_position_embeddings.unwrap_or(4096);
    cfg.tie_embeddings = c.tie_word_embeddings.unwrap_or(false);
    // Only the first BOS id is used, but every id listed must be a token.
    if let Some(id) = bos.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(format!(
            "`bos_token_id` lists {id}, outside the vocabulary of {}",
            cfg.vocab_size
        ));
    }
    cfg.bos_token_id = bos.first().copied();
    cfg.eos_token_ids = token_ids(&c.eos_token_id, "eos_token_id")?;
    cfg.qkv_bias = attention_bias;
    cfg.o_bias = attention_bias;
    cfg.mlp_bias = c.mlp_bias.unwrap_or(false);
    cfg.activation = activation(act_key, act)?;
    cfg.sliding_window = sliding_window;
    Ok(cfg)
}
