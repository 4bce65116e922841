//! Every model family against candle-transformers' own implementation of it (issue 18): a
//! tiny random checkpoint per family, written here in HF form (safetensors + config.json) and
//! in GGUF form (as llama.cpp's converter writes it: its tensor names, q/k rows interleaved
//! for `llama`, Gemma norms stored as `1 + w`, Llama 3.1 scaling as `rope_freqs.weight`),
//! whose hooked last-position logits (no hooks, and capturing every residual hook) equal
//! candle's to 1e-4 relative.
//!
//! Where candle's model differs from transformers the test says how it compensates:
//! candle's Mistral window admits one key more than transformers' (so candle runs with
//! `window - 1`), candle's Gemma 3 runs token by token (it cannot prefill through a global
//! layer), candle's Gemma 2 applies its window to every layer instead of every
//! other one (so the window there is longer than any prompt, and the alternating pattern is
//! checked through Gemma 3's path, which is the same code), and candle's Gemma 2/3 scale
//! attention by `head_dim` whatever `query_pre_attn_scalar` says (checked here by an
//! equivalence instead: scaling q's weights by `sqrt(head_dim / s)` is the same model).

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Activation as CAct, VarBuilder};
use candle_transformers::models::{gemma2, gemma3, llama, mistral, phi3, qwen3};
use common::*;
use probes::{HookPoint, Hooks, Padding, Unembed};

const TOL: f32 = 1e-4;
/// The sliding window of the tests that use one (shorter than the longer prompts).
const WINDOW: usize = 8;

fn prompts() -> Vec<Vec<u32>> {
    let mut r = Rand::new(23);
    vec![r.tokens(1), r.tokens(5), r.tokens(17), r.tokens(40)]
}

/// Our last-position logits with no hooks, and with every residual hook capturing; both
/// must be the same.
fn ours_last(model: &probes::Model, prompt: &[u32]) -> Tensor {
    let run = |hooks: &Hooks| {
        let out = model
            .transformer
            .forward(&[prompt.to_vec()], Padding::Left, hooks, Unembed::Last)
            .unwrap();
        out.logits.unwrap().i(0).unwrap()
    };
    let plain = run(&Hooks::new());
    let mut hooks = Hooks::new();
    for l in 0..model.config().n_layers {
        for h in [
            HookPoint::ResidPre(l),
            HookPoint::ResidMid(l),
            HookPoint::ResidPost(l),
        ] {
            hooks = hooks.capture(h);
        }
    }
    let hooked = run(&hooks);
    assert_eq!(
        rel_err(&hooked, &plain),
        0.0,
        "capturing changed the logits"
    );
    plain
}

/// What a tiny checkpoint of one family holds.
#[derive(Clone, Copy, Default)]
struct Parts {
    layers: usize,
    qkv_bias: bool,
    qk_norm: bool,
    /// Gemma: sandwich norms under Gemma's names, norms stored as offsets from 1.
    gemma: bool,
    /// Phi-3: fused `qkv_proj` and `gate_up_proj`.
    fused: bool,
    tied: bool,
}

/// A norm weight: around 1, or for Gemma (`1 + w`) around 0.
fn norm(r: &mut Rand, n: usize, gemma: bool) -> Tensor {
    if gemma {
        r.tensor(&[n], 0.2)
    } else {
        r.norm(n)
    }
}

/// HF-named tensors of a tiny decoder with `parts`.
fn tensors(seed: u64, p: Parts) -> Vec<(String, Tensor)> {
    let mut r = Rand::new(seed);
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        r.tensor(&[VOCAB, D], 1.0),
    )];
    for l in 0..p.layers {
        let b = format!("model.layers.{l}");
        let mut push = |name: &str, x: Tensor| t.push((format!("{b}.{name}"), x));
        push("input_layernorm.weight", norm(&mut r, D, p.gemma));
        if p.fused {
            push(
                "self_attn.qkv_proj.weight",
                r.tensor(&[q + 2 * kv, D], 0.25),
            );
        } else {
            push("self_attn.q_proj.weight", r.tensor(&[q, D], 0.25));
            push("self_attn.k_proj.weight", r.tensor(&[kv, D], 0.25));
            push("self_attn.v_proj.weight", r.tensor(&[kv, D], 0.25));
        }
        if p.qkv_bias {
            push("self_attn.q_proj.bias", r.tensor(&[q], 0.2));
            push("self_attn.k_proj.bias", r.tensor(&[kv], 0.2));
            push("self_attn.v_proj.bias", r.tensor(&[kv], 0.2));
        }
        if p.qk_norm {
            push("self_attn.q_norm.weight", norm(&mut r, HEAD_DIM, p.gemma));
            push("self_attn.k_norm.weight", norm(&mut r, HEAD_DIM, p.gemma));
        }
        push("self_attn.o_proj.weight", r.tensor(&[D, q], 0.15));
        if p.gemma {
            push("post_attention_layernorm.weight", norm(&mut r, D, true));
            push("pre_feedforward_layernorm.weight", norm(&mut r, D, true));
            push("post_feedforward_layernorm.weight", norm(&mut r, D, true));
        } else {
            push("post_attention_layernorm.weight", norm(&mut r, D, false));
        }
        if p.fused {
            push("mlp.gate_up_proj.weight", r.tensor(&[2 * D_MLP, D], 0.2));
        } else {
            push("mlp.gate_proj.weight", r.tensor(&[D_MLP, D], 0.2));
            push("mlp.up_proj.weight", r.tensor(&[D_MLP, D], 0.2));
        }
        push("mlp.down_proj.weight", r.tensor(&[D, D_MLP], 0.15));
    }
    t.push(("model.norm.weight".into(), norm(&mut r, D, p.gemma)));
    if !p.tied {
        t.push(("lm_head.weight".into(), r.tensor(&[VOCAB, D], 0.3)));
    }
    t
}

/// The shapes every tiny config shares.
fn base_config(arch: &str, layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": [arch],
        "hidden_size": D, "intermediate_size": D_MLP, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2
    })
}

fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    for (k, v) in b.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

/// llama.cpp's name for one of our HF tensors, written independently of the loader's map.
fn gguf_name(hf: &str, gemma: bool) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, tail) = rest.split_once('.').unwrap();
    let (module, kind) = tail.rsplit_once('.').unwrap();
    let g = match (module, gemma) {
        ("input_layernorm", _) => "attn_norm",
        ("post_attention_layernorm", false) => "ffn_norm",
        ("post_attention_layernorm", true) => "post_attention_norm",
        ("pre_feedforward_layernorm", true) => "ffn_norm",
        ("post_feedforward_layernorm", true) => "post_ffw_norm",
        ("self_attn.q_proj", _) => "attn_q",
        ("self_attn.k_proj", _) => "attn_k",
        ("self_attn.v_proj", _) => "attn_v",
        ("self_attn.qkv_proj", _) => "attn_qkv",
        ("self_attn.o_proj", _) => "attn_output",
        ("self_attn.q_norm", _) => "attn_q_norm",
        ("self_attn.k_norm", _) => "attn_k_norm",
        ("mlp.gate_proj", _) => "ffn_gate",
        ("mlp.up_proj", _) | ("mlp.gate_up_proj", _) => "ffn_up",
        ("mlp.down_proj", _) => "ffn_down",
        _ => unreachable!("{hf}"),
    };
    format!("blk.{l}.{g}.{kind}")
}

/// A GGUF as llama.cpp's converter writes `tensors` for `arch`, with `meta` added to the
/// shared keys and `extra` tensors appended.
fn write_family_gguf(
    path: &std::path::Path,
    arch: &str,
    layers: usize,
    tensors: &[(String, Tensor)],
    meta: Vec<(String, gguf_file::Value)>,
    extra: Vec<(String, Tensor)>,
) {
    use gguf_file::Value as V;
    let gemma = arch.starts_with("gemma");
    let mut q = Vec::new();
    for (name, t) in tensors {
        let t = if arch == "llama" && name.ends_with("q_proj.weight") {
            permute_for_gguf(t, HEADS)
        } else if arch == "llama" && name.ends_with("k_proj.weight") {
            permute_for_gguf(t, KV_HEADS)
        } else if gemma && name.ends_with("norm.weight") {
            (t + 1.0).unwrap()
        } else {
            t.clone()
        };
        q.push((
            gguf_name(name, gemma),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    for (name, t) in extra {
        q.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let mut all: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (key("block_count"), V::U32(layers as u32)),
        (key("embedding_length"), V::U32(D as u32)),
        (key("feed_forward_length"), V::U32(D_MLP as u32)),
        (key("attention.head_count"), V::U32(HEADS as u32)),
        (key("attention.head_count_kv"), V::U32(KV_HEADS as u32)),
        (key("attention.key_length"), V::U32(HEAD_DIM as u32)),
        (key("attention.value_length"), V::U32(HEAD_DIM as u32)),
        (key("rope.freq_base"), V::F32(10000.0)),
        (key("attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
        (key("context_length"), V::U32(POSITIONS as u32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("qwen2".into())),
    ];
    for (k, v) in meta {
        match all.iter_mut().find(|(a, _)| *a == k) {
            Some(slot) => slot.1 = v,
            None => all.push((k, v)),
        }
    }
    let tokens: Vec<V> = (0..VOCAB).map(|i| V::String(format!("w{i}"))).collect();
    let types: Vec<V> = (0..VOCAB).map(|_| V::I32(1)).collect();
    all.extend([
        ("tokenizer.ggml.tokens".into(), V::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
    ]);
    let meta_refs: Vec<(&str, &V)> = all.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &q_refs).unwrap();
}

fn varbuilder(dir: &std::path::Path) -> VarBuilder<'static> {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

fn ids(prompt: &[u32]) -> Tensor {
    Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// candle's `[1, 1, vocab]` last-position logits as `[vocab]`.
fn last(t: Tensor) -> Tensor {
    t.squeeze(0).unwrap().i(0).unwrap()
}

/// Our HF directory and GGUF file (when given) against `reference` on every prompt.
fn check(
    family: &str,
    dir: &std::path::Path,
    gguf: Option<&std::path::Path>,
    mut reference: impl FnMut(&[u32]) -> Tensor,
) {
    let hf = load(dir);
    let gg = gguf.map(load);
    // Moving the weights to a device carries every one to its place: the copy (to the CPU
    // here) computes the same bits. On a GPU, `mechwatch bench forward --device cuda`
    // compares the copy's logits with the CPU's.
    let moved = hf.transformer.on_device(&Device::Cpu).unwrap();
    for p in prompts() {
        let want = reference(&p);
        let last = |t: &probes::Transformer| {
            let out = t.forward(
                std::slice::from_ref(&p),
                Padding::Left,
                &Hooks::new(),
                Unembed::Last,
            );
            out.unwrap().logits.unwrap()
        };
        assert_eq!(
            bits(&last(&moved)),
            bits(&last(&hf.transformer)),
            "{family}: the moved copy"
        );
        let e = rel_err(&ours_last(&hf, &p), &want);
        assert!(
            e < TOL,
            "{family} HF, {} tokens: relative error {e}",
            p.len()
        );
        if let Some(gg) = &gg {
            let e = rel_err(&ours_last(gg, &p), &want);
            assert!(
                e < TOL,
                "{family} GGUF, {} tokens: relative error {e}",
                p.len()
            );
        }
    }
}

#[test]
fn llama_3_1_rope_scaling_matches_candle_llama_from_hf_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        ..Parts::default()
    };
    let t = tensors(31, parts);
    // Wavelengths of head_dim 16 at base 10k span 6 to 20k positions: with these factors
    // some frequencies are kept, one is blended and one is divided by `factor`.
    let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
    let config = merge(
        base_config("LlamaForCausalLM", LAYERS),
        serde_json::json!({"rope_scaling": {
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": old as u64
        }}),
    );
    let dir = tmp.path().join("llama31");
    write_dir(&dir, &config, &t);
    // llama.cpp's converter: one divisor per frequency.
    let divisors: Vec<f32> = (0..HEAD_DIM / 2)
        .map(|i| {
            let freq = 1.0 / 10000f64.powf(2.0 * i as f64 / HEAD_DIM as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let d = if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            d as f32
        })
        .collect();
    assert!(divisors.contains(&1.0) && divisors.contains(&8.0));
    assert!(divisors.iter().any(|&d| d > 1.0 && d < 8.0));
    let gguf = tmp.path().join("llama31.gguf");
    let rope_freqs = Tensor::from_vec(divisors, HEAD_DIM / 2, &Device::Cpu).unwrap();
    write_family_gguf(
        &gguf,
        "llama",
        LAYERS,
        &t,
        vec![],
        vec![("rope_freqs.weight".into(), rope_freqs)],
    );
    let cfg: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let model = llama::Llama::load(varbuilder(&dir), &cfg).unwrap();
    check("llama 3.1", &dir, Some(&gguf), |p| {
        let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
        model.forward(&ids(p), 0, &mut cache).unwrap().i(0).unwrap()
    });
    // Without the scaling the same weights give other logits: the test can fail.
    let plain = tmp.path().join("plain");
    write_dir(&plain, &base_config("LlamaForCausalLM", LAYERS), &t);
    let p = &prompts()[3];
    assert!(rel_err(&ours_last(&load(&plain), p), &ours_last(&load(&dir), p)) > 1e-3);
}

#[test]
fn mistral_sliding_window_matches_candle_mistral() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        ..Parts::default()
    };
    let t = tensors(32, parts);
    let dir = tmp.path().join("mistral");
    let config = merge(
        base_config("MistralForCausalLM", LAYERS),
        serde_json::json!({"sliding_window": WINDOW}),
    );
    write_dir(&dir, &config, &t);
    let m = load(&dir);
    assert_eq!(m.config().architecture, probes::Architecture::Mistral);
    assert_eq!(m.config().sliding_window, Some(WINDOW));
    assert_eq!(m.config().max_positions, POSITIONS);
    let cfg = mistral::Config {
        vocab_size: VOCAB,
        hidden_size: D,
        intermediate_size: D_MLP,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        head_dim: Some(HEAD_DIM),
        num_key_value_heads: KV_HEADS,
        hidden_act: CAct::Silu,
        max_position_embeddings: POSITIONS,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        // candle admits keys up to `window` back, transformers fewer than `window`.
        sliding_window: Some(WINDOW - 1),
        use_flash_attn: false,
    };
    let mut model = mistral::Model::new(&cfg, varbuilder(&dir)).unwrap();
    check("mistral", &dir, None, |p| {
        model.clear_kv_cache();
        last(model.forward(&ids(p), 0).unwrap())
    });
}

#[test]
fn qwen3_qk_norm_matches_candle_qwen3_from_hf_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        qk_norm: true,
        ..Parts::default()
    };
    let t = tensors(33, parts);
    let dir = tmp.path().join("qwen3");
    write_dir(&dir, &base_config("Qwen3ForCausalLM", LAYERS), &t);
    let gguf = tmp.path().join("qwen3.gguf");
    write_family_gguf(&gguf, "qwen3", LAYERS, &t, vec![], vec![]);
    let cfg = qwen3::Config {
        vocab_size: VOCAB,
        hidden_size: D,
        intermediate_size: D_MLP,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        head_dim: HEAD_DIM,
        attention_bias: false,
        num_key_value_heads: KV_HEADS,
        max_position_embeddings: POSITIONS,
        sliding_window: None,
        max_window_layers: LAYERS,
        tie_word_embeddings: false,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        use_sliding_window: false,
        hidden_act: CAct::Silu,
    };
    let mut model = qwen3::ModelForCausalLM::new(&cfg, varbuilder(&dir)).unwrap();
    check("qwen3", &dir, Some(&gguf), |p| {
        model.clear_kv_cache();
        last(model.forward(&ids(p), 0).unwrap())
    });
}

#[test]
fn phi3_fused_projections_match_candle_phi3_from_hf_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        fused: true,
        ..Parts::default()
    };
    let t = tensors(34, parts);
    let dir = tmp.path().join("phi3");
    write_dir(&dir, &base_config("Phi3ForCausalLM", LAYERS), &t);
    let gguf = tmp.path().join("phi3.gguf");
    write_family_gguf(&gguf, "phi3", LAYERS, &t, vec![], vec![]);
    let cfg = phi3::Config {
        vocab_size: VOCAB,
        hidden_act: CAct::Silu,
        hidden_size: D,
        intermediate_size: D_MLP,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        num_key_value_heads: KV_HEADS,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        rope_scaling: None,
        max_position_embeddings: POSITIONS,
        original_max_position_embeddings: None,
        partial_rotary_factor: None,
        tie_word_embeddings: false,
    };
    let mut model = phi3::Model::new(&cfg, varbuilder(&dir)).unwrap();
    check("phi3", &dir, Some(&gguf), |p| {
        model.clear_kv_cache();
        last(model.forward(&ids(p), 0).unwrap())
    });
}

/// Gemma 2's config: soft-caps small enough to bite on tiny random weights.
fn gemma2_config(window: usize, query_pre_attn_scalar: usize) -> serde_json::Value {
    merge(
        base_config("Gemma2ForCausalLM", LAYERS),
        serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
            "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": query_pre_attn_scalar, "sliding_window": window
        }),
    )
}

#[test]
fn gemma2_matches_candle_gemma2_from_hf_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        gemma: true,
        tied: true,
        ..Parts::default()
    };
    let t = tensors(35, parts);
    let dir = tmp.path().join("gemma2");
    // candle's window covers every layer: longer than any prompt here, it changes nothing.
    write_dir(&dir, &gemma2_config(POSITIONS, HEAD_DIM), &t);
    let m = load(&dir);
    let c = m.config();
    assert!(c.sandwich_norms && c.norm_offset == 1.0 && c.embed_scale.is_some());
    assert!(c.layer_is_sliding(0) && !c.layer_is_sliding(1));
    let gguf = tmp.path().join("gemma2.gguf");
    use gguf_file::Value as V;
    let meta = vec![
        ("gemma2.attn_logit_softcapping".into(), V::F32(2.0)),
        ("gemma2.final_logit_softcapping".into(), V::F32(3.0)),
        (
            "gemma2.attention.sliding_window".into(),
            V::U32(POSITIONS as u32),
        ),
    ];
    write_family_gguf(&gguf, "gemma2", LAYERS, &t, meta, vec![]);
    let cfg = gemma2::Config {
        attention_bias: false,
        head_dim: HEAD_DIM,
        hidden_activation: CAct::GeluPytorchTanh,
        hidden_size: D,
        intermediate_size: D_MLP,
        num_attention_heads: HEADS,
        num_hidden_layers: LAYERS,
        num_key_value_heads: KV_HEADS,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        vocab_size: VOCAB,
        final_logit_softcapping: Some(3.0),
        attn_logit_softcapping: Some(2.0),
        query_pre_attn_scalar: HEAD_DIM,
        sliding_window: Some(POSITIONS),
        max_position_embeddings: POSITIONS,
    };
    let mut model = gemma2::Model::new(false, &cfg, varbuilder(&dir)).unwrap();
    check("gemma2", &dir, Some(&gguf), |p| {
        model.clear_kv_cache();
        last(model.forward(&ids(p), 0).unwrap())
    });
    // The soft-caps act: without them the logits differ.
    let uncapped = tmp.path().join("uncapped");
    let mut config = gemma2_config(POSITIONS, HEAD_DIM);
    config["attn_logit_softcapping"] = serde_json::Value::Null;
    config["final_logit_softcapping"] = serde_json::Value::Null;
    write_dir(&uncapped, &config, &t);
    let p = &prompts()[3];
    assert!(rel_err(&ours_last(&load(&uncapped), p), &ours_last(&m, p)) > 1e-3);
}

/// `query_pre_attn_scalar` = s scales scores by `1/sqrt(s)`: the same as `head_dim` with q's
/// weights multiplied by `sqrt(head_dim / s)` (Gemma 2 has no q norm).
#[test]
fn gemma2_query_pre_attn_scalar_scales_the_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        gemma: true,
        tied: true,
        ..Parts::default()
    };
    let t = tensors(36, parts);
    let s = 4 * HEAD_DIM;
    let dir = tmp.path().join("scalar");
    write_dir(&dir, &gemma2_config(WINDOW, s), &t);
    let alpha = (HEAD_DIM as f64 / s as f64).sqrt();
    let scaled: Vec<(String, Tensor)> = t
        .iter()
        .map(|(n, x)| {
            let x = if n.ends_with("q_proj.weight") {
                (x * alpha).unwrap()
            } else {
                x.clone()
            };
            (n.clone(), x)
        })
        .collect();
    let same = tmp.path().join("same");
    write_dir(&same, &gemma2_config(WINDOW, HEAD_DIM), &scaled);
    let (a, b) = (load(&dir), load(&same));
    for p in prompts() {
        let e = rel_err(&ours_last(&a, &p), &ours_last(&b, &p));
        assert!(e < TOL, "{} tokens: relative error {e}", p.len());
    }
    let plain = tmp.path().join("plain");
    write_dir(&plain, &gemma2_config(WINDOW, HEAD_DIM), &t);
    let p = &prompts()[3];
    assert!(rel_err(&ours_last(&load(&plain), p), &ours_last(&a, p)) > 1e-3);
}

/// The logit lens reads Gemma 2's residuals as its last layer does: the final norm's `1 + w`,
/// the tied unembedding and the final soft-cap, here written out by hand in f64; its last
/// layer is the model's own prediction.
#[test]
fn gemma2_logit_lens_applies_the_norm_offset_and_final_softcap() {
    use probes::lens::{logit_lens, LensOptions};
    let tmp = tempfile::tempdir().unwrap();
    let parts = Parts {
        layers: LAYERS,
        gemma: true,
        tied: true,
        ..Parts::default()
    };
    let t = tensors(38, parts);
    let dir = tmp.path().join("gemma2-lens");
    write_dir(&dir, &gemma2_config(WINDOW, HEAD_DIM), &t);
    let m = load(&dir);
    let get = |name: &str| t.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let norm: Vec<f32> = get("model.norm.weight").to_vec1().unwrap();
    let embed: Vec<Vec<f32>> = get("model.embed_tokens.weight").to_vec2().unwrap();
    let prompt = prompts()[2].clone();
    let position = 11;
    let opts = LensOptions {
        position: position as i64,
        top: VOCAB,
        token: None,
    };
    let lens = logit_lens(&m.transformer, &prompt, &opts).unwrap();
    let softmax = |l: Vec<f64>| {
        let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = l.iter().map(|v| (v - max).exp()).sum();
        l.iter().map(|v| (v - max).exp() / z).collect::<Vec<f64>>()
    };
    for layer in &lens.layers {
        let out = m
            .transformer
            .forward(
                std::slice::from_ref(&prompt),
                Padding::Right,
                &Hooks::new().capture(layer.hook),
                Unembed::None,
            )
            .unwrap();
        let x: Vec<f32> = out.captures[&layer.hook]
            .i((0, position))
            .unwrap()
            .to_vec1()
            .unwrap();
        let ms = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64;
        let h: Vec<f64> = x
            .iter()
            .zip(&norm)
            .map(|(v, w)| f64::from(*v) / (ms + 1e-5).sqrt() * (1.0 + f64::from(*w)))
            .collect();
        let logits: Vec<f64> = embed
            .iter()
            .map(|row| {
                let l: f64 = row.iter().zip(&h).map(|(a, b)| f64::from(*a) * b).sum();
                3.0 * (l / 3.0).tanh()
            })
            .collect();
        let probs = softmax(logits);
        for r in &layer.top {
            let want = probs[r.id as usize];
            assert!(
                (r.prob - want).abs() < 1e-5,
                "{}: {r:?} vs {want}",
                layer.hook
            );
        }
    }
    let own = m
        .transformer
        .forward(
            std::slice::from_ref(&prompt),
            Padding::Right,
            &Hooks::new(),
            Unembed::All,
        )
        .unwrap()
        .logits
        .unwrap();
    let own: Vec<f32> = own.i((0, position)).unwrap().to_vec1().unwrap();
    let probs = softmax(own.iter().map(|v| f64::from(*v)).collect());
    for r in &lens.layers.last().unwrap().top {
        assert!((r.prob - probs[r.id as usize]).abs() < 1e-5, "{r:?}");
    }
}

#[test]
fn gemma3_matches_candle_gemma3_from_hf_and_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    // Six layers: five sliding (local RoPE base), the sixth global.
    let layers = 6;
    let parts = Parts {
        layers,
        gemma: true,
        qk_norm: true,
        tied: true,
        ..Parts::default()
    };
    let t = tensors(37, parts);
    let dir = tmp.path().join("gemma3");
    let config = merge(
        base_config("Gemma3ForCausalLM", layers),
        serde_json::json!({
            "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": true, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "final_logit_softcapping": 3.0,
            "attn_logit_softcapping": null, "query_pre_attn_scalar": HEAD_DIM,
            "sliding_window": WINDOW, "sliding_window_pattern": 6
        }),
    );
    write_dir(&dir, &config, &t);
    let m = load(&dir);
    assert!((0..5).all(|l| m.config().layer_is_sliding(l)) && !m.config().layer_is_sliding(5));
    let gguf = tmp.path().join("gemma3.gguf");
    use gguf_file::Value as V;
    let meta = vec![
        ("gemma3.rope.freq_base".into(), V::F32(1_000_000.0)),
        ("gemma3.final_logit_softcapping".into(), V::F32(3.0)),
        (
            "gemma3.attention.sliding_window".into(),
            V::U32(WINDOW as u32),
        ),
    ];
    write_family_gguf(&gguf, "gemma3", layers, &t, meta, vec![]);
    let cfg = gemma3::Config {
        attention_bias: false,
        head_dim: HEAD_DIM,
        hidden_activation: CAct::GeluPytorchTanh,
        hidden_size: D,
        intermediate_size: D_MLP,
        num_attention_heads: HEADS,
        num_hidden_layers: layers,
        num_key_value_heads: KV_HEADS,
        rms_norm_eps: 1e-5,
        rope_theta: 1_000_000.0,
        rope_local_base_freq: 10000.0,
        vocab_size: VOCAB,
        final_logit_softcapping: Some(3.0),
        attn_logit_softcapping: None,
        query_pre_attn_scalar: HEAD_DIM,
        sliding_window: WINDOW,
        sliding_window_pattern: 6,
        max_position_embeddings: POSITIONS,
    };
    // candle's Gemma 3 cannot prefill several tokens through a global layer (its cache
    // needs a contiguous value tensor), so it decodes one token at a time: its rotating
    // cache then holds the last `sliding_window` keys, the query's own included, which is
    // transformers' window.
    let vb = varbuilder(&dir);
    check("gemma3", &dir, Some(&gguf), |p| {
        let mut model = gemma3::Model::new(false, &cfg, vb.clone()).unwrap();
        let mut out = None;
        for (i, &tok) in p.iter().enumerate() {
            out = Some(last(model.forward(&ids(&[tok]), i).unwrap()));
        }
        out.unwrap()
    });
}

/// A six-block Gemma 3 with a sliding window of [`WINDOW`] and its own RoPE base for the
/// sliding layers, written under `root`.
fn gemma3_with_local_rope(root: &std::path::Path, seed: u64) -> probes::Model {
    let layers = 6;
    let parts = Parts {
        layers,
        gemma: true,
        qk_norm: true,
        tied: true,
        ..Parts::default()
    };
    let dir = root.join("gemma3");
    let config = merge(
        base_config("Gemma3ForCausalLM", layers),
        serde_json::json!({
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": HEAD_DIM, "sliding_window": WINDOW,
            "tie_word_embeddings": true
        }),
    );
    write_dir(&dir, &config, &tensors(seed, parts));
    load(&dir)
}

/// Sliding windows and per-layer RoPE bases hold in cached generation too: greedy tokens
/// with the KV cache equal those of full forwards, past the window.
#[test]
fn gemma3_cached_generation_equals_full_forwards_past_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gemma3_with_local_rope(tmp.path(), 38);
    let prompts = vec![Rand::new(5).tokens(3), Rand::new(6).tokens(6)];
    let opts = probes::GenerateOptions {
        max_tokens: 2 * WINDOW,
        ..Default::default()
    };
    let cached = probes::generate(&m.transformer, &prompts, &Hooks::new(), &opts).unwrap();
    for (prompt, got) in prompts.iter().zip(&cached) {
        assert_eq!(got.len(), 2 * WINDOW);
        let mut seq = prompt.clone();
        for &tok in got {
            let logits = ours_last(&m, &seq);
            let want = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(tok, want, "after {} tokens", seq.len());
            seq.push(tok);
        }
    }
}

/// Padding shifts no window: a left- and a right-padded batch of prompts longer than the
/// window give each prompt's logits alone, at every position.
#[test]
fn sliding_windows_in_padded_batches_equal_one_prompt_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = 6;
    let parts = Parts {
        layers,
        gemma: true,
        qk_norm: true,
        tied: true,
        ..Parts::default()
    };
    let dir = tmp.path().join("gemma3");
    let config = merge(
        base_config("Gemma3ForCausalLM", layers),
        serde_json::json!({
            "rope_theta": 1000000.0, "query_pre_attn_scalar": HEAD_DIM,
            "sliding_window": WINDOW, "tie_word_embeddings": true
        }),
    );
    write_dir(&dir, &config, &tensors(39, parts));
    let m = load(&dir);
    let mut r = Rand::new(9);
    let batch = vec![r.tokens(3), r.tokens(2 * WINDOW + 3), r.tokens(WINDOW + 1)];
    for padding in [Padding::Left, Padding::Right] {
        let out = m
            .transformer
            .forward(&batch, padding, &Hooks::new(), Unembed::All)
            .unwrap();
        let logits = out.logits.unwrap();
        for (row, p) in batch.iter().enumerate() {
            let alone = m
                .transformer
                .forward(
                    std::slice::from_ref(p),
                    padding,
                    &Hooks::new(),
                    Unembed::All,
                )
                .unwrap()
                .logits
                .unwrap()
                .i(0)
                .unwrap();
            let off = out.layout.offset(row);
            let got = logits.i(row).unwrap().narrow(0, off, p.len()).unwrap();
            let e = rel_err(&got, &alone);
            assert!(e < TOL, "{padding:?}, row {row}: relative error {e}");
        }
    }
}

/// Every tensor type candle can dequantize is read as weights, to the values candle's own
/// dequantization gives; Q8_1 and Q8_K (llama.cpp's activation types, which candle cannot
/// load) are refused naming the tensor.
#[test]
fn every_dequantizable_gguf_tensor_type_is_read() {
    use candle_core::quantized::GgmlDType as T;
    let tmp = tempfile::tempdir().unwrap();
    let write = |path: &std::path::Path, q: &[(String, QTensor)]| {
        let meta = gguf_file::Value::String("llama".into());
        let q_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &meta)], &q_refs).unwrap();
    };
    let types = [
        T::F32,
        T::F16,
        T::BF16,
        T::Q4_0,
        T::Q4_1,
        T::Q5_0,
        T::Q5_1,
        T::Q8_0,
        T::Q2K,
        T::Q3K,
        T::Q4K,
        T::Q5K,
        T::Q6K,
    ];
    let x = Rand::new(41).tensor(&[2, 256], 1.0);
    let q: Vec<(String, QTensor)> = types
        .iter()
        .map(|&t| (format!("{t:?}"), QTensor::quantize(&x, t).unwrap()))
        .collect();
    let path = tmp.path().join("types.gguf");
    write(&path, &q);
    let g = probes::gguf::GgufFile::read(&path).unwrap();
    for (name, qt) in &q {
        let info = g.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(info.dtype, qt.dtype());
        let ours = g.load_f32(info).unwrap();
        let want = qt.dequantize(&Device::Cpu).unwrap();
        assert_eq!(rel_err(&ours, &want), 0.0, "{name}");
        // And close to what was quantized: the type really is read as weights.
        assert!(rel_err(&ours, &x) < 0.5, "{name}");
    }
    for t in [T::Q8_1, T::Q8K] {
        let path = tmp.path().join(format!("{t:?}.gguf"));
        write(&path, &[("w".into(), QTensor::quantize(&x, t).unwrap())]);
        let e = probes::gguf::GgufFile::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("`w`") && e.contains("unsupported ggml type"),
            "{e}"
        );
    }
}

/// A shared start computed once gives each prompt's full-pass logits where sliding windows
/// and per-layer RoPE bases reach back into it: a start longer than the window.
#[test]
fn a_shared_start_longer_than_the_window_gives_the_full_passs_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gemma3_with_local_rope(tmp.path(), 40);
    let mut r = Rand::new(11);
    let start = r.tokens(WINDOW + 2);
    let prompts: Vec<Vec<u32>> = [1, WINDOW + 3, 4]
        .iter()
        .map(|&n| [start.clone(), r.tokens(n)].concat())
        .collect();
    let hooks = Hooks::new().capture(HookPoint::ResidPost(3));
    let full = m
        .transformer
        .forward(&prompts, Padding::Right, &hooks, Unembed::All)
        .unwrap();
    let shared = m
        .transformer
        .forward_shared(&prompts, start.len(), &hooks, Unembed::All)
        .unwrap();
    assert_eq!(shared.layout, full.layout);
    for (row, p) in prompts.iter().enumerate() {
        let cut = |t: &Tensor| t.i(row).unwrap().narrow(0, 0, p.len()).unwrap();
        let (a, b) = (
            full.logits.as_ref().unwrap(),
            shared.logits.as_ref().unwrap(),
        );
        let e = rel_err(&cut(b), &cut(a));
        assert!(e < TOL, "row {row}: logits' relative error {e}");
        let h = HookPoint::ResidPost(3);
        let e = rel_err(&cut(&shared.captures[&h]), &cut(&full.captures[&h]));
        assert!(e < TOL, "row {row}: capture's relative error {e}");
    }
}

/// A generation that prefills a shared start once, longer than the window, decodes the
/// greedy tokens of full forwards: the left-aligned cache keeps every key's position.
#[test]
fn a_shared_start_prefilled_once_decodes_as_full_forwards() {
    let tmp = tempfile::tempdir().unwrap();
    let m = gemma3_with_local_rope(tmp.path(), 41);
    let mut r = Rand::new(12);
    let start = r.tokens(WINDOW + 2);
    let prompts: Vec<Vec<u32>> = [1, WINDOW + 3, 4]
        .iter()
        .map(|&n| [start.clone(), r.tokens(n)].concat())
        .collect();
    let opts = probes::GenerateOptions {
        max_tokens: WINDOW + 2,
        f32_decode: true,
        shared_start: start.len(),
        ..Default::default()
    };
    let cached = probes::generate(&m.transformer, &prompts, &Hooks::new(), &opts).unwrap();
    for (prompt, got) in prompts.iter().zip(&cached) {
        assert_eq!(got.len(), WINDOW + 2);
        let mut seq = prompt.clone();
        for &tok in got {
            let want = ours_last(&m, &seq).argmax(0).unwrap();
            assert_eq!(
                tok,
                want.to_scalar::<u32>().unwrap(),
                "after {} tokens",
                seq.len()
            );
            seq.push(tok);
        }
    }
}
