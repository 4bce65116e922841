//! GPT-2: LayerNorm, learned positions, a plain (ungated) GELU MLP, Conv1D weights stored
//! `[in, out]`, tied embeddings.

use candle_core::Device;

use crate::config::{Activation, Architecture, ModelConfig, PositionEncoding};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::transformer::{Block, Linear, Mlp, Transformer};
use crate::weights::Loader;

use super::hf::{need, refuse, token_ids, HfConfig};
use super::Family;

pub struct Gpt2;

impl Family for Gpt2 {
    fn architecture(&self) -> Architecture {
        Architecture::Gpt2
    }
    fn hf_names(&self) -> &'static [&'static str] {
        &["GPT2LMHeadModel", "gpt2"]
    }
    fn gguf_arch(&self) -> Option<&'static str> {
        None
    }
    fn config_from_hf(&self, c: &HfConfig) -> Result<ModelConfig, String> {
        let act = c.activation_function.as_deref().unwrap_or("gelu_new");
        let activation = match act {
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            _ => return Err(refuse("activation_function", &act)),
        };
        if c.scale_attn_weights == Some(false) {
            return Err(refuse("scale_attn_weights", &false));
        }
        if c.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err(refuse("scale_attn_by_inverse_layer_idx", &true));
        }
        if c.add_cross_attention == Some(true) {
            return Err(refuse("add_cross_attention", &true));
        }
        let d_model = need(c.n_embd, "n_embd")?;
        let n_heads = need(c.n_head, "n_head")?;
        let mut cfg = ModelConfig::plain(Architecture::Gpt2);
        cfg.n_layers = need(c.n_layer, "n_layer")?;
        cfg.d_model = d_model;
        cfg.n_heads = n_heads;
        cfg.n_kv_heads = n_heads;
        cfg.head_dim = d_model / n_heads;
        cfg.d_mlp = match c.n_inner {
            Some(n) => n,
            None => d_model
                .checked_mul(4)
                .ok_or_else(|| format!("`n_embd` = {d_model} overflows 4 * n_embd"))?,
        };
        cfg.vocab_size = need(c.vocab_size, "vocab_size")?;
        cfg.norm_eps = c.layer_norm_epsilon.unwrap_or(1e-5);
        cfg.rope_theta = 0.0;
        cfg.positions = PositionEncoding::Learned;
        cfg.max_positions = need(c.n_positions, "n_positions")?;
        cfg.tie_embeddings = true;
        cfg.bos_token_id = token_ids(&c.bos_token_id, "bos_token_id")?.first().copied();
        cfg.eos_token_ids = token_ids(&c.eos_token_id, "eos_token_id")?;
        cfg.qkv_bias = true;
        cfg.o_bias = true;
        cfg.mlp_bias = true;
        cfg.activation = activation;
        Ok(cfg)
    }
    fn config_from_gguf(&self, g: &GgufFile) -> Result<ModelConfig, LoadError> {
        Err(LoadError::Config {
            path: g.path.clone(),
            detail: "GPT-2 GGUFs are not supported".into(),
        })
    }
    fn build(&self, l: &Loader) -> Result<Transformer, LoadError> {
        let c = l.cfg;
        let d = c.d_model;
        // Checkpoints come with and without the `transformer.` prefix.
        let root = if l.src.has("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let embed = l.get(&format!("{root}wte.weight"), &[c.vocab_size, d])?;
        let pos = l.get(&format!("{root}wpe.weight"), &[c.max_positions, d])?;
        let mut blocks = Vec::with_capacity(c.n_layers);
        for layer in 0..c.n_layers {
            let p = format!("{root}h.{layer}");
            blocks.push(Block {
                ln1: l.layer_norm(&format!("{p}.ln_1"))?,
                qkv: l.conv1d(&format!("{p}.attn.c_attn"), d, 3 * d)?,
                q_norm: None,
                k_norm: None,
                o: l.conv1d(&format!("{p}.attn.c_proj"), d, d)?,
                post_attn_norm: None,
                ln2: l.layer_norm(&format!("{p}.ln_2"))?,
                mlp: Mlp::Plain {
                    fc: l.conv1d(&format!("{p}.mlp.c_fc"), d, c.d_mlp)?,
                    proj: l.conv1d(&format!("{p}.mlp.c_proj"), c.d_mlp, d)?,
                    activation: c.activation,
                },
                post_mlp_norm: None,
            });
            l.causal_mask_buffers(&p)?;
        }
        l.tied_copy("lm_head.weight", &embed)?;
        Ok(Transformer {
            config: c.clone(),
            unembed: Linear::new(embed.clone(), None),
            embed,
            pos_embed: Some(pos),
            blocks,
            ln_final: l.layer_norm(&format!("{root}ln_f"))?,
            device: Device::Cpu,
            quantized_decode: false,
        })
    }
}
