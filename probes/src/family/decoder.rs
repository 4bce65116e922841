//! The RoPE decoder block every family but GPT-2 shares, built from HF-named tensors: which
//! optional parts it has (biases, q/k norms, sandwich norms) comes from the configuration's
//! behaviour fields, how the tensors are named and packed from the family's
//! [`DecoderTensors`].

use candle_core::Device;

use crate::error::LoadError;
use crate::transformer::{Block, Linear, Mlp, Transformer};
use crate::weights::Loader;

/// How a family names and packs its block's tensors (under `model.layers.{l}.`).
pub struct DecoderTensors {
    /// q, k and v in one `self_attn.qkv_proj` (Phi-3) instead of three projections.
    pub fused_qkv: bool,
    /// gate and up in one `mlp.gate_up_proj` (Phi-3) instead of two.
    pub fused_gate_up: bool,
    /// The norm before the MLP (Llama: `post_attention_layernorm`; Gemma:
    /// `pre_feedforward_layernorm`).
    pub pre_mlp_norm: &'static str,
    /// With sandwich norms: the norms on the attention and MLP outputs.
    pub post_attn_norm: &'static str,
    pub post_mlp_norm: &'static str,
}

/// Llama's names, shared by most families.
pub const LLAMA_TENSORS: DecoderTensors = DecoderTensors {
    fused_qkv: false,
    fused_gate_up: false,
    pre_mlp_norm: "post_attention_layernorm",
    post_attn_norm: "",
    post_mlp_norm: "",
};

/// A GGUF tensor that holds an HF-named one.
pub struct GgufTensor {
    pub name: String,
    /// `Some(is_query)` for q/k rows that llama.cpp's `llama` converter interleaves.
    pub rope_rows: Option<bool>,
}

/// llama.cpp's names for the HF tensors of a Llama-style block; `block_norm` maps the block's
/// norm tensors, whose meaning differs between families.
pub fn gguf_tensor(hf: &str, block_norm: fn(&str) -> Option<&'static str>) -> Option<GgufTensor> {
    let plain = |name: &str| {
        Some(GgufTensor {
            name: name.to_string(),
            rope_rows: None,
        })
    };
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        "rope_freqs.weight" => return plain("rope_freqs.weight"),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let (gg, rope_rows) = match module {
        "self_attn.q_proj" => ("attn_q", Some(true)),
        "self_attn.k_proj" => ("attn_k", Some(false)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.qkv_proj" => ("attn_qkv", None),
        "self_attn.o_proj" => ("attn_output", None),
        "self_attn.q_norm" => ("attn_q_norm", None),
        "self_attn.k_norm" => ("attn_k_norm", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" | "mlp.gate_up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        norm => (block_norm(norm)?, None),
    };
    if !matches!(kind, "weight" | "bias") {
        return None;
    }
    Some(GgufTensor {
        name: format!("blk.{layer}.{gg}.{kind}"),
        rope_rows,
    })
}

/// Llama's block norms in GGUF.
pub fn llama_block_norm(hf: &str) -> Option<&'static str> {
    match hf {
        "input_layernorm" => Some("attn_norm"),
        "post_attention_layernorm" => Some("ffn_norm"),
        _ => None,
    }
}

/// Build a RoPE decoder from `l`'s tensors.
pub fn build(l: &Loader, names: &DecoderTensors) -> Result<Transformer, LoadError> {
    let c = l.cfg;
    let d = c.d_model;
    let embed = l.get("model.embed_tokens.weight", &[c.vocab_size, d])?;
    let q_out = c.n_heads * c.head_dim;
    let kv_out = c.n_kv_heads * c.head_dim;
    let mut blocks = Vec::with_capacity(c.n_layers);
    for layer in 0..c.n_layers {
        let p = format!("model.layers.{layer}");
        let attn = format!("{p}.self_attn");
        let qkv = if names.fused_qkv {
            l.linear(
                &format!("{attn}.qkv_proj"),
                q_out + 2 * kv_out,
                d,
                c.qkv_bias,
            )?
        } else {
            let parts = [
                l.linear(&format!("{attn}.q_proj"), q_out, d, c.qkv_bias)?,
                l.linear(&format!("{attn}.k_proj"), kv_out, d, c.qkv_bias)?,
                l.linear(&format!("{attn}.v_proj"), kv_out, d, c.qkv_bias)?,
            ];
            l.fuse(&attn, &parts)?
        };
        let gate_up = if names.fused_gate_up {
            l.linear(&format!("{p}.mlp.gate_up_proj"), 2 * c.d_mlp, d, c.mlp_bias)?
        } else {
            let parts = [
                l.linear(&format!("{p}.mlp.gate_proj"), c.d_mlp, d, c.mlp_bias)?,
                l.linear(&format!("{p}.mlp.up_proj"), c.d_mlp, d, c.mlp_bias)?,
            ];
            l.fuse(&format!("{p}.mlp"), &parts)?
        };
        l.rotary_inv_freq(
            &format!("{attn}.rotary_emb.inv_freq"),
            c.layer_is_sliding(layer),
        )?;
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(l.rms_sized(&format!("{attn}.q_norm.weight"), c.head_dim)?),
                Some(l.rms_sized(&format!("{attn}.k_norm.weight"), c.head_dim)?),
            )
        } else {
            (None, None)
        };
        let (post_attn_norm, post_mlp_norm) = if c.sandwich_norms {
            (
                Some(l.rms(&format!("{p}.{}.weight", names.post_attn_norm))?),
                Some(l.rms(&format!("{p}.{}.weight", names.post_mlp_norm))?),
            )
        } else {
            (None, None)
        };
        blocks.push(Block {
            ln1: l.rms(&format!("{p}.input_layernorm.weight"))?,
            qkv,
            q_norm,
            k_norm,
            o: l.linear(&format!("{attn}.o_proj"), d, q_out, c.o_bias)?,
            post_attn_norm,
            ln2: l.rms(&format!("{p}.{}.weight", names.pre_mlp_norm))?,
            mlp: Mlp::Gated {
                gate_up,
                down: l.linear(&format!("{p}.mlp.down_proj"), d, c.d_mlp, c.mlp_bias)?,
                activation: c.activation,
            },
            post_mlp_norm,
        });
    }
    l.rotary_inv_freq("model.rotary_emb.inv_freq", false)?;
    l.rope_divisors("rope_freqs.weight")?;
    let unembed = if c.tie_embeddings {
        l.tied_copy("lm_head.weight", &embed)?;
        Linear::new(embed.clone(), None)
    } else {
        l.unembedding("lm_head", c.vocab_size, d)?
    };
    Ok(Transformer {
        config: c.clone(),
        embed,
        pos_embed: None,
        blocks,
        ln_final: l.rms("model.norm.weight")?,
        unembed,
        device: Device::Cpu,
        quantized_decode: false,
    })
}
