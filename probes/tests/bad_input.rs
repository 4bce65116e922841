//! Bad checkpoints get typed errors that name the file and tensor; none panics, none loads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file::Value as V, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use probes::{LoadError, LoadOptions, Model};

fn load_err(path: &Path) -> LoadError {
    match Model::load_path(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

fn tiny(root: &Path) -> std::path::PathBuf {
    llama_dir(root, "LlamaForCausalLM", 21)
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for cut in [0, 5, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&st, &bytes[..cut]).unwrap();
        let e = load_err(&dir);
        assert!(
            matches!(e, LoadError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }
}

#[test]
fn lying_and_duplicate_headers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    let data = &bytes[8 + n..];
    let write = |h: &str, data: &[u8]| {
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(data);
        std::fs::write(&st, v).unwrap();
    };
    // Trailing bytes (a polyglot file).
    let mut more = data.to_vec();
    more.extend_from_slice(b"<html>");
    write(&header, &more);
    assert!(load_err(&dir).to_string().contains("trailing bytes"));
    // Offsets that disagree with the shape.
    let v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let first = v
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let mut lying = v.clone();
    lying[&first]["shape"] = serde_json::json!([3, 3]);
    write(&lying.to_string(), data);
    let e = load_err(&dir).to_string();
    assert!(e.contains(&first), "{e}");
    // A duplicate key: serde_json would silently keep the last one.
    let dup = header.replacen('{', &format!("{{\"{first}\":{},", v[&first]), 1);
    write(&dup, data);
    let e = load_err(&dir).to_string();
    assert!(e.contains("duplicate key"), "{e}");
}

#[test]
fn shapes_that_disagree_with_config_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let mut t = llama_tensors(1, false);
    t[3].1 = Tensor::zeros(
        (HEADS * HEAD_DIM + 1, D),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let name = t[3].0.clone();
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir);
    assert!(matches!(e, LoadError::Shape { .. }), "{e}");
    assert!(
        e.to_string().contains(&name) && e.to_string().contains("config.json"),
        "{e}"
    );
}

#[test]
fn missing_tensors_unknown_architectures_and_missing_tokenizers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("missing");
    let mut t = llama_tensors(1, false);
    let gone = t.remove(5).0;
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir).to_string();
    assert!(e.contains("missing tensor") && e.contains(&gone), "{e}");

    let dir = tiny(tmp.path());
    std::fs::write(
        dir.join("config.json"),
        llama_config("MambaForCausalLM").to_string(),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, LoadError::UnsupportedArchitecture { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("MambaForCausalLM"));

    let dir = tmp.path().join("notok");
    write_dir(
        &dir,
        &llama_config("LlamaForCausalLM"),
        &llama_tensors(1, false),
    );
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, LoadError::Tokenizer { .. }) && e.to_string().contains("tokenizer.json"),
        "{e}"
    );

    let dir = tmp.path().join("noconfig");
    write_dir(
        &dir,
        &llama_config("LlamaForCausalLM"),
        &llama_tensors(1, false),
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}

#[test]
fn non_finite_weights_are_reported_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    let mut t = llama_tensors(1, false);
    let mut v: Vec<f32> = t[2].1.flatten_all().unwrap().to_vec1().unwrap();
    v[7] = f32::NAN;
    v[9] = f32::INFINITY;
    t[2].1 = Tensor::from_vec(v, t[2].1.dims(), &Device::Cpu).unwrap();
    let name = t[2].0.clone();
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir);
    assert!(matches!(e, LoadError::NonFinite { count: 2, .. }), "{e}");
    assert!(e.to_string().contains(&name));
}

#[test]
fn sharded_checkpoints_load_through_the_index_and_lying_indexes_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tiny(tmp.path());
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(single.join(f), dir.join(f)).unwrap();
    }
    let t = llama_tensors(21, false);
    let (a, b) = t.split_at(t.len() / 2);
    probes::safetensors::write(
        &dir.join("model-00001-of-00002.safetensors"),
        a,
        &BTreeMap::new(),
    )
    .unwrap();
    probes::safetensors::write(
        &dir.join("model-00002-of-00002.safetensors"),
        b,
        &BTreeMap::new(),
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for (k, _) in a {
        map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (k, _) in b {
        map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let p = Rand::new(1).tokens(9);
    let run = |m: &Model| {
        m.transformer
            .forward(
                std::slice::from_ref(&p),
                probes::Padding::Left,
                &probes::Hooks::new(),
                probes::Unembed::Last,
            )
            .unwrap()
            .logits
            .unwrap()
    };
    let sharded = load(&dir);
    assert_eq!(rel_err(&run(&sharded), &run(&load(&single))), 0.0);
    assert_eq!(sharded.manifest.files.len(), 5);

    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "../../etc/passwd".into();
    std::fs::write(dir.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    assert!(load_err(&dir)
        .to_string()
        .contains("not a file in this directory"));
}

#[test]
fn truncated_and_corrupted_gguf_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    llama_gguf(&path, 3, candle_core::quantized::GgmlDType::Q4_1);
    let bytes = std::fs::read(&path).unwrap();
    for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = load_err(&path);
        assert!(e.to_string().contains("tiny.gguf"), "cut at {cut}: {e}");
    }
    // Byte flips in the header: an error or a model, never a panic.
    let mut rng = Rand::new(5);
    for i in 0..300 {
        let mut b = bytes.clone();
        let at = (rng.tokens(1)[0] as usize * 131 + i * 17) % 2048.min(b.len());
        b[at] ^= 0x5a;
        std::fs::write(&path, &b).unwrap();
        let _ = Model::load_path(&path, &LoadOptions::default());
    }
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

#[test]
fn a_fifo_as_a_weight_tokenizer_or_config_file_is_refused_without_blocking() {
    for name in ["model.safetensors", "tokenizer.json", "config.json"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tiny(tmp.path());
        std::fs::remove_file(dir.join(name)).unwrap();
        mkfifo(&dir.join(name));
        let e = load_err(&dir);
        assert!(
            e.to_string().contains(name) && e.to_string().contains("FIFO"),
            "{name}: {e}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("model.gguf");
    mkfifo(&gguf);
    let e = load_err(&gguf);
    assert!(e.to_string().contains("FIFO"), "{e}");
}

fn logits(m: &Model, prompt: &[u32]) -> Tensor {
    m.transformer
        .forward(
            &[prompt.to_vec()],
            probes::Padding::Left,
            &probes::Hooks::new(),
            probes::Unembed::Last,
        )
        .unwrap()
        .logits
        .unwrap()
}

fn with_config(root: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = root.join(name);
    let mut cfg = llama_config("LlamaForCausalLM");
    edit(&mut cfg);
    write_dir(&dir, &cfg, &llama_tensors(3, false));
    dir
}

fn gguf_with(
    root: &Path,
    name: &str,
    edit: impl FnOnce(&mut GgufMeta, &mut GgufTensors),
) -> PathBuf {
    let path = root.join(name);
    llama_gguf_with(&path, 3, GgmlDType::Q8_0, edit);
    path
}

/// A layer count of 2^40 aborted the process on `Vec::with_capacity` (and the daemon on every
/// restart); other counts wrapped or were trusted the same way.
#[test]
fn a_layer_count_of_2_pow_40_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = 1u64 << 40;
    for (key, value, expect) in [
        ("num_hidden_layers", huge, "layers need at least"),
        ("hidden_size", huge, "hidden_size"),
        ("vocab_size", huge, "implies"),
        ("intermediate_size", huge, "implies"),
        (
            "num_attention_heads",
            3,
            "not divisible by `num_attention_heads`",
        ),
        ("max_position_embeddings", huge, "context length"),
        ("eos_token_id", 1000, "outside the vocabulary"),
    ] {
        let dir = with_config(tmp.path(), key, |c| c[key] = value.into());
        let e = load_err(&dir);
        assert!(matches!(e, LoadError::Config { .. }), "{key}: {e}");
        let e = e.to_string();
        assert!(
            e.contains("config.json") && e.contains(expect),
            "{key}: {e}"
        );
    }
    for (key, value, expect) in [
        ("llama.block_count", V::U64(huge), "layers need at least"),
        (
            "llama.embedding_length",
            V::U64(huge),
            "head dimension 274877906944",
        ),
        ("llama.vocab_size", V::U64(huge), "implies"),
        ("llama.attention.head_count", V::U32(3), "not divisible"),
        ("llama.context_length", V::U64(huge), "context length"),
        // A wrong type used to fall back to the default silently.
        (
            "llama.attention.head_count_kv",
            V::String("2".into()),
            "head_count_kv",
        ),
        ("tokenizer.ggml.eos_token_id", V::U32(5000), "eos_token_id"),
    ] {
        let path = gguf_with(tmp.path(), "m.gguf", |m, _| set_meta(m, key, value));
        let e = load_err(&path).to_string();
        assert!(e.contains("m.gguf") && e.contains(expect), "{key}: {e}");
    }
    // The tokenizer's ids must fit the embedding.
    let dir = with_config(tmp.path(), "small_vocab", |c| c["vocab_size"] = 50.into());
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("outside the model's vocabulary of 50"),
        "{e}"
    );
}

/// `hidden_act: "relu"` ran SiLU; other behaviour fields were dropped the same way.
#[test]
fn hidden_act_relu_is_refused_not_run_as_silu() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("hidden_act", serde_json::json!("relu")),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 2.0}),
        ),
        ("partial_rotary_factor", serde_json::json!(0.5)),
        ("final_logit_softcapping", serde_json::json!(30.0)),
    ] {
        let dir = with_config(tmp.path(), key, |c| c[key] = value.clone());
        let e = load_err(&dir).to_string();
        assert!(
            e.contains("config.json") && e.contains(&format!("`{key}`")),
            "{key}: {e}"
        );
    }
    for (key, value) in [
        ("llama.rope.scaling.type", V::String("linear".into())),
        ("llama.expert_count", V::U32(8)),
        ("llama.rope.dimension_count", V::U32(8)),
        ("llama.attention.layer_norm_epsilon", V::F32(1e-5)),
    ] {
        let path = gguf_with(tmp.path(), "m.gguf", |m, _| set_meta(m, key, value));
        let e = load_err(&path).to_string();
        assert!(e.contains("m.gguf") && e.contains(key), "{key}: {e}");
    }
    let mut gpt2 = gpt2_config();
    gpt2["scale_attn_weights"] = false.into();
    let dir = tmp.path().join("gpt2");
    write_dir(&dir, &gpt2, &gpt2_tensors(1));
    assert!(load_err(&dir).to_string().contains("`scale_attn_weights`"));
}

/// GPT-2's `activation_function: "gelu"` is exact GELU; it ran the tanh approximation.
#[test]
fn gpt2_activation_gelu_runs_exact_gelu_not_the_tanh_approximation() {
    let tmp = tempfile::tempdir().unwrap();
    let tanh = gpt2_dir(tmp.path(), 4);
    let erf = tmp.path().join("erf");
    let mut cfg = gpt2_config();
    cfg["activation_function"] = "gelu".into();
    write_dir(&erf, &cfg, &gpt2_tensors(4));
    let p = Rand::new(2).tokens(12);
    let e = rel_err(&logits(&load(&erf), &p), &logits(&load(&tanh), &p));
    assert!(e > 1e-6 && e < 0.05, "relative difference {e}");
}

fn with_attention_bias(t: &mut Vec<(String, Tensor)>, o_scale: f32) {
    let mut r = Rand::new(9);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.self_attn");
        t.push((
            format!("{p}.q_proj.bias"),
            r.tensor(&[HEADS * HEAD_DIM], 0.2),
        ));
        t.push((
            format!("{p}.k_proj.bias"),
            r.tensor(&[KV_HEADS * HEAD_DIM], 0.2),
        ));
        t.push((
            format!("{p}.v_proj.bias"),
            r.tensor(&[KV_HEADS * HEAD_DIM], 0.2),
        ));
        let o = (r.tensor(&[D], 1.0) * f64::from(o_scale)).unwrap();
        t.push((format!("{p}.o_proj.bias"), o));
    }
}

/// `attention_bias: true` with bias tensors ran without them.
#[test]
fn attention_bias_true_runs_with_the_bias_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = llama_config("LlamaForCausalLM");
    cfg["attention_bias"] = true.into();
    // With a zero o_proj bias, Llama with attention_bias is Qwen2 (q, k, v biases).
    let mut t = llama_tensors(5, false);
    with_attention_bias(&mut t, 0.0);
    let llama = tmp.path().join("llama");
    write_dir(&llama, &cfg, &t);
    let qwen = tmp.path().join("qwen");
    let no_o: Vec<_> = t
        .iter()
        .filter(|(n, _)| !n.contains("o_proj.bias"))
        .cloned()
        .collect();
    write_dir(&qwen, &llama_config("Qwen2ForCausalLM"), &no_o);
    let p = Rand::new(3).tokens(10);
    assert!(rel_err(&logits(&load(&llama), &p), &logits(&load(&qwen), &p)) < 1e-5);
    // A non-zero o_proj bias changes the output.
    let mut t2 = llama_tensors(5, false);
    with_attention_bias(&mut t2, 1.0);
    write_dir(&llama, &cfg, &t2);
    assert!(rel_err(&logits(&load(&llama), &p), &logits(&load(&qwen), &p)) > 1e-3);
    // Bias tensors without `attention_bias` are not dropped: they are refused.
    write_dir(&llama, &llama_config("LlamaForCausalLM"), &t2);
    let e = load_err(&llama).to_string();
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.bias") && e.contains("not used"),
        "{e}"
    );
}

/// `num_hidden_layers: 1` with tensors for two layers ran one layer; extra tensors and
/// integer-typed weights were accepted.
#[test]
fn fewer_layers_than_tensors_extra_tensors_and_integer_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_config(tmp.path(), "layers", |c| c["num_hidden_layers"] = 1.into());
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("model.layers.1.") && e.contains("not used"),
        "{e}"
    );

    let dir = tmp.path().join("extra");
    let mut t = llama_tensors(3, false);
    t.push(("model.extra_scale".into(), Rand::new(1).tensor(&[D], 1.0)));
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("`model.extra_scale`") && e.contains("not used"),
        "{e}"
    );

    let dir = tmp.path().join("int");
    let mut t = llama_tensors(3, false);
    t[1].1 = Tensor::ones(D, candle_core::DType::U32, &Device::Cpu).unwrap();
    let name = t[1].0.clone();
    write_dir(&dir, &llama_config("LlamaForCausalLM"), &t);
    let e = load_err(&dir).to_string();
    assert!(e.contains(&name) && e.contains("U32"), "{e}");

    // A tied unembedding that is not the embedding.
    let dir = with_config(tmp.path(), "tied", |c| {
        c["tie_word_embeddings"] = true.into()
    });
    let e = load_err(&dir).to_string();
    assert!(e.contains("`lm_head.weight`") && e.contains("tie"), "{e}");

    // GGUF: a block count below the blocks present, and a tensor no block reads.
    let path = gguf_with(tmp.path(), "layers.gguf", |m, _| {
        set_meta(m, "llama.block_count", V::U32(1))
    });
    let e = load_err(&path).to_string();
    assert!(e.contains("blk.1.") && e.contains("not used"), "{e}");
    let path = gguf_with(tmp.path(), "extra.gguf", |_, t| {
        let f = Tensor::ones(HEAD_DIM / 2, candle_core::DType::F32, &Device::Cpu).unwrap();
        t.push((
            "rope_factors_long.weight".into(),
            QTensor::quantize(&f, GgmlDType::F32).unwrap(),
        ));
    });
    let e = load_err(&path).to_string();
    assert!(
        e.contains("`rope_factors_long.weight`") && e.contains("not used"),
        "{e}"
    );
}

/// Mistral's sliding window was ignored; it is honoured now (see `families.rs` for the
/// comparison with candle's Mistral): the context stays whole and a prompt longer than the
/// window runs, differently from the same weights without a window.
#[test]
fn mistral_sliding_window_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_config(tmp.path(), "mistral", |c| {
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        c["sliding_window"] = 16.into();
    });
    let plain = with_config(tmp.path(), "plain", |c| {
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    });
    let (m, plain) = (load(&dir), load(&plain));
    assert_eq!(m.config().sliding_window, Some(16));
    assert_eq!(m.config().max_positions, POSITIONS);
    let short = Rand::new(1).tokens(16);
    assert_eq!(rel_err(&logits(&m, &short), &logits(&plain, &short)), 0.0);
    let long = Rand::new(1).tokens(17);
    assert!(rel_err(&logits(&m, &long), &logits(&plain, &long)) > 1e-4);
}

/// A prompt longer than the context allocated gigabytes of attention buffers.
#[test]
fn a_prompt_longer_than_the_context_is_refused_naming_its_index() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&tiny(tmp.path()));
    let mut r = Rand::new(1);
    let prompts = vec![r.tokens(3), r.tokens(POSITIONS), r.tokens(POSITIONS + 1)];
    let hooks = probes::Hooks::new();
    let e = m
        .transformer
        .forward(
            &prompts,
            probes::Padding::Left,
            &hooks,
            probes::Unembed::Last,
        )
        .unwrap_err()
        .to_string();
    let want = format!(
        "prompt 2 has {} tokens, more than the model's context length of {POSITIONS}",
        POSITIONS + 1
    );
    assert!(e.contains(&want), "{e}");
    // Micro-batches of one still name the prompt's index in the whole set.
    let e = m
        .transformer
        .forward_chunked(
            &prompts,
            1,
            probes::Padding::Left,
            &hooks,
            probes::Unembed::Last,
            |_, _| Ok(()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains(&want), "{e}");
    let e = probes::generate(
        &m.transformer,
        &prompts[2..],
        &hooks,
        &probes::GenerateOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("prompt 0 has"), "{e}");
    assert!(m.transformer.check_prompts(&prompts[..2]).is_ok());
}

/// A chat template that loops (`range(9999)` nested) ran for minutes; one that prints a huge
/// string filled memory.
#[test]
fn a_chat_template_that_loops_is_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let set = |template: &str| {
        let tc = serde_json::json!({"chat_template": template});
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        load(&dir)
    };
    let msg = [probes::tokenizer::Message::user("w3 w4")];
    let m = set("{% for i in range(9999) %}{% for j in range(9999) %}{% set x = j %}{% endfor %}{% endfor %}");
    let e = m.codec.apply_chat_template(&msg).unwrap_err().to_string();
    assert!(e.contains("chat template ran more than"), "{e}");
    let m = set("{{ 'w1 ' * 20000000 }}");
    let e = m.codec.apply_chat_template(&msg).unwrap_err().to_string();
    assert!(e.contains("chat template output exceeds"), "{e}");
    // Forty doublings of a string ask for a terabyte in a few hundred instructions: the
    // render's memory is capped, and the process lives to say so.
    let m = set("{% set ns = namespace(s='w1') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s[:4] }}");
    let e = m.codec.apply_chat_template(&msg).unwrap_err().to_string();
    assert!(
        e.contains("chat template") && e.contains("MiB of memory"),
        "{e}"
    );
    let e = m
        .encode_prompts(&["w3", "w4"], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MiB of memory"), "{e}");
    // An ordinary template still renders, alone and in a batch.
    let m = set("{% for m in messages %}{{ m.role }} {{ m.content }}{% endfor %}");
    assert_eq!(m.codec.apply_chat_template(&msg).unwrap(), "user w3 w4");
    let batch = m.encode_prompts(&["w3 w4", "w5"], true).unwrap();
    let one = m.encode_prompt("w5", true).unwrap();
    assert_eq!(batch[1].as_ref().unwrap(), &one);
}

/// Two `"shape"`s inside one tensor's entry were accepted (serde_json keeps the last),
/// although duplicate keys are documented as refused.
#[test]
fn a_duplicate_key_inside_one_tensor_entry_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let entry = "\"model.norm.weight\":{";
    assert!(header.contains(entry));
    let dup = header.replacen(entry, &format!("{entry}\"shape\":[1,{D}],"), 1);
    let mut v = (dup.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(dup.as_bytes());
    v.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&st, v).unwrap();
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("model.safetensors")
            && e.contains("tensor `model.norm.weight`")
            && e.contains("duplicate key `shape`"),
        "{e}"
    );
}

const RLIMIT_CHILD: &str = "MECHWATCH_BAD_INPUT_RLIMIT_CHILD";

/// A GGUF holding one `u8` metadata array of `n` elements, built by hand.
fn one_array_gguf(n: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    b.extend(3u64.to_le_bytes());
    b.extend(b"big");
    b.extend(9u32.to_le_bytes()); // array
    b.extend(0u32.to_le_bytes()); // of u8
    b.extend((n as u64).to_le_bytes());
    b.resize(b.len() + n, 1);
    b
}

/// A 100 MB GGUF holding one metadata array cost 3 GB of RAM (32 bytes per one-byte element).
/// The parse runs in a child process whose address space is limited to 1 GiB: 48 MiB of
/// elements fit if they cost their own size, and abort the child if they cost 32 bytes each.
#[test]
fn one_huge_gguf_metadata_array_costs_memory_proportional_to_the_file() {
    let n = 48 << 20;
    if std::env::var_os(RLIMIT_CHILD).is_some() {
        let g = probes::gguf::GgufFile::parse(Path::new("huge.gguf"), one_array_gguf(n)).unwrap();
        assert_eq!(g.metadata["big"].as_array().map(|a| a.len()), Some(n));
        return;
    }
    let name = "one_huge_gguf_metadata_array_costs_memory_proportional_to_the_file";
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 1048576 && exec "$0" --exact "$1" --test-threads=1"#)
        .arg(std::env::current_exe().unwrap())
        .arg(name)
        .env(RLIMIT_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GGUF's `tokenizer.ggml.add_bos_token` was ignored: plain-text prompts ran without the BOS
/// token the model was trained with, and `model convert` dropped the flag too.
#[test]
fn gguf_add_bos_token_is_honoured_and_survives_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = gguf_with(tmp.path(), "plain.gguf", |_, _| {});
    assert_eq!(
        load(&plain).encode_prompt("", false).unwrap(),
        Vec::<u32>::new()
    );
    let path = gguf_with(tmp.path(), "bos.gguf", |m, _| {
        set_meta(m, "tokenizer.ggml.add_bos_token", V::Bool(true));
        set_meta(m, "tokenizer.ggml.add_eos_token", V::Bool(true));
    });
    let m = load(&path);
    assert_eq!(m.encode_prompt("", false).unwrap(), vec![1, 2]);
    // Rendered chats carry their own special tokens.
    assert_eq!(m.codec.encode("").unwrap(), Vec::<u32>::new());
    let out = tmp.path().join("converted");
    probes::convert_gguf(&path, &out).unwrap();
    assert_eq!(load(&out).encode_prompt("", false).unwrap(), vec![1, 2]);
    let path = gguf_with(tmp.path(), "bad.gguf", |m, _| {
        set_meta(m, "tokenizer.ggml.add_bos_token", V::U8(1));
    });
    let e = load_err(&path).to_string();
    assert!(e.contains("bad.gguf") && e.contains("add_bos_token"), "{e}");
}

/// Keys a red team found dropped or misread: each is now refused, naming it, or honoured.
#[test]
fn keys_that_change_the_computation_are_honoured_or_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, edit, expect) in [
        (
            "act_conflict",
            serde_json::json!({"hidden_act": "relu", "hidden_activation": "silu"}),
            "`hidden_activation` = \"silu\" contradicts `hidden_act`",
        ),
        (
            "act_unread",
            serde_json::json!({"hidden_activation": "gelu"}),
            "is not read by this family",
        ),
        (
            "llama_window",
            serde_json::json!({"sliding_window": 1}),
            "`sliding_window` = 1",
        ),
        (
            "rope_yarn",
            serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}),
            "`rope_parameters`",
        ),
        (
            "rope_conflict",
            serde_json::json!({"rope_theta": 10000.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
            "say different things",
        ),
        (
            "bos_list",
            serde_json::json!({"bos_token_id": [1, 5000]}),
            "`bos_token_id` lists 5000",
        ),
        (
            "eps_f32",
            serde_json::json!({"rms_norm_eps": 1e300}),
            "as an f32",
        ),
    ] {
        let dir = with_config(tmp.path(), name, |c| {
            for (k, v) in edit.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        let e = load_err(&dir).to_string();
        assert!(
            e.contains("config.json") && e.contains(expect),
            "{name}: {e}"
        );
    }
    // transformers 5 writes `rope_theta` inside `rope_parameters`: it is read from there.
    let nested = with_config(tmp.path(), "nested", |c| {
        c.as_object_mut().unwrap().remove("rope_theta");
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
    });
    let top = with_config(tmp.path(), "top", |c| c["rope_theta"] = 500000.0.into());
    let base = with_config(tmp.path(), "base", |_| {});
    let p = Rand::new(5).tokens(12);
    let (nested, top, base) = (load(&nested), load(&top), load(&base));
    assert_eq!(nested.config().rope_theta, 500000.0);
    assert_eq!(bits(&logits(&nested, &p)), bits(&logits(&top, &p)));
    assert!(rel_err(&logits(&nested, &p), &logits(&base, &p)) > 1e-6);

    for (key, value, expect) in [
        (
            "llama.attention.causal",
            V::Bool(false),
            "llama.attention.causal",
        ),
        (
            "llama.rope.scaling.attn_factor",
            V::F32(2.0),
            "llama.rope.scaling.attn_factor",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            V::F64(1e300),
            "as an f32",
        ),
        (
            "tokenizer.ggml.unknown_token_id",
            V::U32(5000),
            "tokenizer.ggml.unknown_token_id",
        ),
        (
            "tokenizer.ggml.padding_token_id",
            V::U32(5000),
            "tokenizer.ggml.padding_token_id",
        ),
    ] {
        let path = gguf_with(tmp.path(), "m.gguf", |m, _| set_meta(m, key, value));
        let e = load_err(&path).to_string();
        assert!(e.contains("m.gguf") && e.contains(expect), "{key}: {e}");
    }
    // The causal flag at its one honoured value loads.
    let path = gguf_with(tmp.path(), "causal.gguf", |m, _| {
        set_meta(m, "llama.attention.causal", V::Bool(true))
    });
    Model::load_path(&path, &LoadOptions::default()).unwrap();
    // A token string twice leaves one id unreachable.
    let path = gguf_with(tmp.path(), "dup.gguf", |m, _| {
        let tokens = m
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .unwrap();
        let V::Array(list) = &mut tokens.1 else {
            panic!("tokens are an array")
        };
        list[7] = list[6].clone();
    });
    let e = load_err(&path).to_string();
    assert!(
        e.contains("tokenizer.ggml.tokens[7]") && e.contains("repeats tokenizer.ggml.tokens[6]"),
        "{e}"
    );
}

/// A normalizer that multiplies text made a 6 GB string of a prompt; a list of named chat
/// templates was read as no template at all.
#[test]
fn multiplying_normalizers_are_refused_and_named_chat_templates_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = with_config(tmp.path(), "norm", |_| {});
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let step = serde_json::json!({"type": "Replace", "pattern": {"String": "l"},
        "content": "l".repeat(1000)});
    tok["normalizer"] = serde_json::json!({"type": "Sequence",
        "normalizers": [step.clone(), step.clone(), step]});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("1000000000-fold"),
        "{e}"
    );

    let dir = with_config(tmp.path(), "named", |_| {});
    let cfg = dir.join("tokenizer_config.json");
    let named = serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}<{{ m.content }}>{% endfor %}"},
    ]});
    std::fs::write(&cfg, named.to_string()).unwrap();
    let m = load(&dir);
    let text = m
        .codec
        .apply_chat_template(&[probes::tokenizer::Message::user("hi")])
        .unwrap();
    assert_eq!(text, "<hi>");
    std::fs::write(&cfg, r#"{"chat_template": 7}"#).unwrap();
    let e = load_err(&dir).to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("`chat_template` is 7"),
        "{e}"
    );
}

/// A red team's: a NaN temperature sampled garbage, a negative one fell back to greedy, a
/// nucleus of 5 or NaN was taken, 2^64 new tokens ran on; `model convert` into a folder
/// holding an old shard index mixed the two checkpoints.
#[test]
fn samplers_that_sample_nothing_and_conversions_into_full_folders_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&tiny(tmp.path()));
    let sample = |temperature: f64, top_p: f64| probes::GenerateOptions {
        sampling: probes::Sampling::Sample {
            temperature,
            top_p,
            seed: 1,
        },
        ..Default::default()
    };
    let prompt = vec![vec![3u32, 4, 5]];
    for (opts, expect) in [
        (sample(f64::NAN, 0.9), "temperature NaN"),
        (sample(-1.0, 0.9), "temperature -1"),
        (sample(f64::INFINITY, 0.9), "temperature inf"),
        (sample(1.0, 5.0), "top-p 5"),
        (sample(1.0, f64::NAN), "top-p NaN"),
        (
            probes::GenerateOptions {
                max_tokens: usize::MAX,
                ..Default::default()
            },
            "more than the model's context",
        ),
    ] {
        let e = probes::generate(&m.transformer, &prompt, &probes::Hooks::new(), &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect), "{expect}: {e}");
    }
    probes::generate(
        &m.transformer,
        &prompt,
        &probes::Hooks::new(),
        &sample(0.7, 0.9),
    )
    .unwrap();

    let gguf = gguf_with(tmp.path(), "c.gguf", |_, _| {});
    let out = tmp.path().join("full");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("model.safetensors.index.json"), "{}").unwrap();
    let e = probes::convert_gguf(&gguf, &out).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}
