//! Tiny random checkpoints for tests in any crate (feature `test-util`): a Llama-shaped HF
//! directory (config, safetensors, a word-level tokenizer over `w0 .. w95`) small enough to
//! run in milliseconds. Written by the test itself, so every error path can be exercised
//! without the real default model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

pub const VOCAB: usize = 96;
pub const D: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = 16;
pub const D_MLP: usize = 128;
pub const LAYERS: usize = 2;
pub const POSITIONS: usize = 64;

/// Seeded uniform tensors.
pub struct Rand(rand::rngs::StdRng);

impl Rand {
    pub fn new(seed: u64) -> Self {
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }

    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.0.gen_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches")
    }

    pub fn norm(&mut self, n: usize) -> Tensor {
        let v: Vec<f32> = (0..n).map(|_| 1.0 + self.0.gen_range(-0.2..0.2)).collect();
        Tensor::from_vec(v, n, &Device::Cpu).expect("shape matches")
    }
}

/// A word-level tokenizer over `w0 .. w{VOCAB-1}`.
pub fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
    .to_string()
}

pub fn llama_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": D, "intermediate_size": D_MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2
    })
}

/// HF-named tensors of a Llama model.
pub fn llama_tensors(seed: u64) -> Vec<(String, Tensor)> {
    llama_tensors_deep(seed, LAYERS)
}

/// HF-named tensors of a Llama model with `layers` blocks.
pub fn llama_tensors_deep(seed: u64, layers: usize) -> Vec<(String, Tensor)> {
    let mut r = Rand::new(seed);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        r.tensor(&[VOCAB, D], 1.0),
    )];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let mut push = |name: &str, x: Tensor| t.push((format!("{p}.{name}"), x));
        push("input_layernorm.weight", r.norm(D));
        push(
            "self_attn.q_proj.weight",
            r.tensor(&[HEADS * HEAD_DIM, D], 0.25),
        );
        push(
            "self_attn.k_proj.weight",
            r.tensor(&[KV_HEADS * HEAD_DIM, D], 0.25),
        );
        push(
            "self_attn.v_proj.weight",
            r.tensor(&[KV_HEADS * HEAD_DIM, D], 0.25),
        );
        push(
            "self_attn.o_proj.weight",
            r.tensor(&[D, HEADS * HEAD_DIM], 0.15),
        );
        push("post_attention_layernorm.weight", r.norm(D));
        push("mlp.gate_proj.weight", r.tensor(&[D_MLP, D], 0.2));
        push("mlp.up_proj.weight", r.tensor(&[D_MLP, D], 0.2));
        push("mlp.down_proj.weight", r.tensor(&[D, D_MLP], 0.15));
    }
    t.push(("model.norm.weight".into(), r.norm(D)));
    t.push(("lm_head.weight".into(), r.tensor(&[VOCAB, D], 0.3)));
    t
}

/// Write an HF directory: `config.json`, `tokenizer.json` and `model.safetensors`.
pub fn write_dir(dir: &Path, config: &serde_json::Value, tensors: &[(String, Tensor)]) {
    std::fs::create_dir_all(dir).expect("create the model folder");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config.json");
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).expect("write tokenizer.json");
    crate::safetensors::write(&dir.join("model.safetensors"), tensors, &BTreeMap::new())
        .expect("write model.safetensors");
}

/// A tiny Llama HF directory `root/tiny-llama` with weights drawn from `seed`.
pub fn llama_dir(root: &Path, seed: u64) -> PathBuf {
    let dir = root.join("tiny-llama");
    write_dir(&dir, &llama_config(), &llama_tensors(seed));
    dir
}

/// A tiny Llama HF directory `root/NAME` with `layers` blocks, for tests of depth.
pub fn llama_dir_deep(root: &Path, name: &str, seed: u64, layers: usize) -> PathBuf {
    let dir = root.join(name);
    let mut config = llama_config();
    config["num_hidden_layers"] = layers.into();
    write_dir(&dir, &config, &llama_tensors_deep(seed, layers));
    dir
}

/// Load a checkpoint written by this module.
pub fn load(path: &Path) -> crate::Model {
    crate::Model::load_path(
        path,
        &crate::LoadOptions {
            quantized_decode: false,
        },
    )
    .expect("a tiny checkpoint loads")
}
