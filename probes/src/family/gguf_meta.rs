//! Reading GGUF metadata: the `{arch}.*` keys llama.cpp writes for every decoder family. A
//! family's module reads its own keys (listed in `honoured`); any other key that changes the
//! computation is refused, naming it.

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::LoadError;
use crate::gguf::{GgufFile, GgufValue};

/// Keys (after the `{arch}.` prefix) that change the computation; each is refused unless the
/// family honours it.
const BEHAVIOUR_KEYS: &[&str] = &[
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
    "attention.sliding_window_pattern",
];

/// An optional unsigned metadata value.
pub fn opt_usize(g: &GgufFile, key: &str) -> Result<Option<usize>, LoadError> {
    g.metadata.get(key).map(|_| g.meta_usize(key)).transpose()
}

/// An optional numeric metadata value.
pub fn opt_f64(g: &GgufFile, key: &str) -> Result<Option<f64>, LoadError> {
    g.metadata.get(key).map(|_| g.meta_f64(key)).transpose()
}

pub fn config_err(g: &GgufFile, detail: String) -> LoadError {
    LoadError::Config {
        path: g.path.clone(),
        detail,
    }
}

/// The configuration of a RoPE decoder stored under `arch`'s keys; `honoured` lists the
/// behaviour keys the calling family reads itself.
pub fn decoder_config(
    g: &GgufFile,
    arch: &str,
    architecture: Architecture,
    honoured: &[&str],
) -> Result<ModelConfig, LoadError> {
    let key = |k: &str| format!("{arch}.{k}");
    let err = |detail: String| config_err(g, detail);
    let refuse = |key: &str, v: &GgufValue| {
        Err(err(format!(
            "GGUF metadata `{key}` = {v:?} changes the computation in a way mechwatch does not \
             implement"
        )))
    };
    for k in BEHAVIOUR_KEYS.iter().filter(|k| !honoured.contains(k)) {
        if let Some(v) = g.metadata.get(&key(k)) {
            return refuse(&key(k), v);
        }
    }
    // Keys whose one value is what mechwatch computes; any other value is refused.
    if let Some(v) = g.metadata.get(&key("attention.causal")) {
        if !matches!(v, GgufValue::Bool(true)) {
            return refuse(&key("attention.causal"), v);
        }
    }
    if let Some(f) = opt_f64(g, &key("rope.scaling.attn_factor"))? {
        if f != 1.0 {
            return refuse(&key("rope.scaling.attn_factor"), &GgufValue::F64(f));
        }
    }
    let scaling_type = g
        .metadata
        .get(&key("rope.scaling.type"))
        .map(|v| (v.as_str(), v));
    let mut rope_scaling = None;
    match scaling_type {
        None | Some((Some("none"), _)) => {
            for k in ["rope.scaling.factor", "rope.scale_linear"] {
                if let Some(f) = opt_f64(g, &key(k))? {
                    if f != 1.0 && f != 0.0 {
                        return refuse(&key(k), &GgufValue::F64(f));
                    }
                }
            }
        }
        Some((Some("linear"), _)) => {
            let factor = opt_f64(g, &key("rope.scaling.factor"))?.ok_or_else(|| {
                err(format!(
                    "GGUF metadata `{arch}.rope.scaling.type` is linear but \
                     `{arch}.rope.scaling.factor` is missing"
                ))
            })?;
            rope_scaling = Some(RopeScaling::Linear { factor });
        }
        Some((_, v)) => return refuse(&key("rope.scaling.type"), v),
    }
    if let Some(n) = opt_usize(g, &key("expert_count"))?.filter(|&n| n > 0) {
        return refuse(&key("expert_count"), &GgufValue::U64(n as u64));
    }
    let d_model = g.meta_usize(&key("embedding_length"))?;
    let n_heads = g.meta_usize(&key("attention.head_count"))?;
    if n_heads == 0 {
        return Err(err(format!(
            "GGUF metadata `{arch}.attention.head_count` is zero"
        )));
    }
    let head_dim = match opt_usize(g, &key("attention.key_length"))? {
        Some(k) => k,
        None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
        None => {
            return Err(err(format!(
                "GGUF metadata `{arch}.embedding_length` {d_model} is not divisible by \
                 `{arch}.attention.head_count` {n_heads}"
            )))
        }
    };
    if let Some(v) = opt_usize(g, &key("attention.value_length"))?.filter(|&v| v != head_dim) {
        return Err(err(format!(
            "GGUF metadata `{arch}.attention.value_length` {v} differs from the key length \
             {head_dim}, which mechwatch does not implement"
        )));
    }
    if let Some(r) = opt_usize(g, &key("rope.dimension_count"))?.filter(|&r| r != head_dim) {
        return Err(err(format!(
            "GGUF metadata `{arch}.rope.dimension_count` {r} differs from the head dimension \
             {head_dim} (partial rotary embeddings are not implemented)"
        )));
    }
    let vocab_size = match opt_usize(g, &key("vocab_size"))? {
        Some(v) => v,
        None => g
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.as_array())
            .map_or(0, |t| t.len()),
    };
    let token_id = |key: &str| -> Result<Option<u32>, LoadError> {
        opt_usize(g, key)?
            .map(|v| {
                u32::try_from(v)
                    .map_err(|_| err(format!("GGUF metadata `{key}` = {v} is not a token id")))
            })
            .transpose()
    };
    let mut cfg = ModelConfig::plain(architecture);
    cfg.n_layers = g.meta_usize(&key("block_count"))?;
    cfg.d_model = d_model;
    cfg.n_heads = n_heads;
    cfg.n_kv_heads = opt_usize(g, &key("attention.head_count_kv"))?.unwrap_or(n_heads);
    cfg.head_dim = head_dim;
    cfg.d_mlp = g.meta_usize(&key("feed_forward_length"))?;
    cfg.vocab_size = vocab_size;
    cfg.norm_eps = g.meta_f64(&key("attention.layer_norm_rms_epsilon"))?;
    cfg.rope_theta = opt_f64(g, &key("rope.freq_base"))?.unwrap_or(10_000.0);
    cfg.rope_scaling = rope_scaling;
    cfg.max_positions = opt_usize(g, &key("context_length"))?.unwrap_or(4096);
    cfg.tie_embeddings = g.get("output.weight").is_none();
    cfg.bos_token_id = token_id("tokenizer.ggml.bos_token_id")?;
    cfg.eos_token_ids = token_id("tokenizer.ggml.eos_token_id")?
        .into_iter()
        .collect();
    // A checkpoint may carry biases (HF `attention_bias`, `mlp_bias`): they are used when
    // present.
    cfg.qkv_bias = g.get("blk.0.attn_q.bias").is_some() || g.get("blk.0.attn_qkv.bias").is_some();
    cfg.o_bias = g.get("blk.0.attn_output.bias").is_some();
    cfg.mlp_bias = g.get("blk.0.ffn_up.bias").is_some();
    cfg.sliding_window = opt_usize(g, &key("attention.sliding_window"))?;
    Ok(cfg)
}

/// llama.cpp's attention scale for Gemma 2/3 GGUFs, which store no `query_pre_attn_scalar`:
/// `d_model / n_heads` for the 27B models (recognised, as llama.cpp does, by their layer
/// count), `head_dim` otherwise.
pub fn gemma_query_pre_attn_scalar(cfg: &ModelConfig, layers_27b: usize) -> f64 {
    if cfg.n_layers == layers_27b {
        (cfg.d_model / cfg.n_heads) as f64
    } else {
        cfg.head_dim as f64
    }
}
