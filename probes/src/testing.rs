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

/// Blocks of the [`planted_dir`] model.
pub const PLANTED_LAYERS: usize = 8;
/// The block whose attention writes the planted direction.
pub const PLANTED_AT: usize = 2;
/// Words whose embedding carries the planted direction ("harmful" words).
pub const TRIGGERS: std::ops::Range<usize> = 10..20;

/// A tiny Llama `root/planted-llama` of [`PLANTED_LAYERS`] blocks with a refusal direction `u`
/// built in, and `u` `[D]` (unit length). The chat template wraps a message as `w1 MESSAGE
/// w2 w3 w4` (three post-instruction tokens); the words `a` and `b` (ids 94 and 95) exist so
/// that the template's prefix and suffix can be found. Only the [`TRIGGERS`] words' embeddings
/// have a component along `u`, and no block writes along `u` but block [`PLANTED_AT`], whose
/// attention is uniform over earlier tokens and moves their mean `u` component to every
/// position. The unembedding of `w0` (the unknown word, so every refusal token) reads `u`:
/// ablating `u` lowers the refusal score of prompts with triggers, adding it raises it.
pub fn planted_dir(root: &Path) -> (PathBuf, Vec<f32>) {
    let mut r = Rand::new(21);
    let u = r.tensor(&[D], 1.0);
    let u = (&u
        / u.sqr()
            .and_then(|x| x.sum_all())
            .and_then(|x| x.to_scalar::<f32>())
            .expect("norm")
            .sqrt() as f64)
        .expect("unit");
    let uv: Vec<f32> = u.to_vec1().expect("vector");
    // `x` `[rows, D]` with `u` projected out of every row.
    let without_u = |x: Tensor| -> Tensor {
        let along = x
            .matmul(&u.unsqueeze(1).expect("column"))
            .expect("projection");
        (&x - along
            .broadcast_mul(&u.unsqueeze(0).expect("row"))
            .expect("outer"))
        .expect("difference")
    };
    // `w` `[D, cols]` writing into the residual stream, with `u` projected out of its output.
    let writes_without_u = |w: Tensor| without_u(w.t().expect("t")).t().expect("t");
    let mut tensors = Vec::new();
    for (name, x) in llama_tensors_deep(22, PLANTED_LAYERS) {
        let x = if name == "model.embed_tokens.weight" {
            let mut rows: Vec<Vec<f32>> = without_u(x).to_vec2().expect("rows");
            for row in &mut rows[TRIGGERS] {
                for (v, uj) in row.iter_mut().zip(&uv) {
                    *v += 3.0 * uj;
                }
            }
            Tensor::new(rows, &Device::Cpu).expect("embedding")
        } else if name == "lm_head.weight" {
            let mut rows: Vec<Vec<f32>> = without_u(x).to_vec2().expect("rows");
            rows[0] = uv.iter().map(|v| 12.0 * v).collect();
            Tensor::new(rows, &Device::Cpu).expect("unembedding")
        } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            let planted = name == format!("model.layers.{PLANTED_AT}.self_attn.o_proj.weight");
            if planted {
                // Head 0's first value dimension, written along `u`.
                let mut cols = vec![vec![0f32; HEADS * HEAD_DIM]; D];
                for (j, row) in cols.iter_mut().enumerate() {
                    row[0] = 8.0 * uv[j];
                }
                Tensor::new(cols, &Device::Cpu).expect("o_proj")
            } else {
                // Quieter than the planted block, so that `u` dominates the difference.
                (writes_without_u(x) * 0.3).expect("scaled")
            }
        } else if name.starts_with(&format!("model.layers.{PLANTED_AT}.self_attn.")) {
            let shape = x.dims().to_vec();
            if name.ends_with("v_proj.weight") {
                // The first value dimension of kv head 0 reads `u`.
                let mut rows = vec![vec![0f32; D]; shape[0]];
                rows[0].clone_from(&uv);
                Tensor::new(rows, &Device::Cpu).expect("v_proj")
            } else {
                // Zero queries and keys: uniform attention over earlier tokens.
                Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).expect("zeros")
            }
        } else {
            x
        };
        tensors.push((name, x));
    }
    let dir = root.join("planted-llama");
    let mut config = llama_config();
    config["num_hidden_layers"] = serde_json::json!(PLANTED_LAYERS);
    write_dir(&dir, &config, &tensors);
    let mut tok: serde_json::Value = serde_json::from_str(&tokenizer_json()).expect("json");
    let vocab = tok["model"]["vocab"].as_object_mut().expect("vocab");
    vocab.remove("w94");
    vocab.remove("w95");
    vocab.insert("a".into(), serde_json::json!(94));
    vocab.insert("b".into(), serde_json::json!(95));
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write tokenizer.json");
    std::fs::write(
        dir.join("chat_template.jinja"),
        "w1 {{ messages[0].content }} w2 w3 w4",
    )
    .expect("write chat_template.jinja");
    (dir, uv)
}
