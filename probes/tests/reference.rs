//! Hooked logits against independent references on the same weights: candle-transformers'
//! own Llama, Qwen2 and quantized Llama, and a plain GPT-2 written here. Tolerance 1e-4
//! relative.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, quantized_llama, qwen2};
use common::*;
use probes::{HookPoint, Hooks, Padding, Unembed};

const TOL: f32 = 1e-4;

fn ours_last(model: &probes::Model, prompt: &[u32]) -> Tensor {
    // A capture hook on the way, so the comparison covers the hooked path.
    let hooks = Hooks::new().capture(HookPoint::ResidPost(0));
    let out = model
        .transformer
        .forward(&[prompt.to_vec()], Padding::Left, &hooks, Unembed::Last)
        .unwrap();
    out.logits.unwrap().i(0).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    let mut r = Rand::new(7);
    vec![r.tokens(1), r.tokens(5), r.tokens(17), r.tokens(40)]
}

fn candle_llama_last(dir: &std::path::Path, prompt: &[u32]) -> Tensor {
    let cfg: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe_free_varbuilder(&dir.join("model.safetensors"));
    let model = llama::Llama::load(vb, &cfg).unwrap();
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&x, 0, &mut cache).unwrap().i(0).unwrap()
}

/// A VarBuilder over tensors read with candle's own safetensors loader (no mmap).
fn unsafe_free_varbuilder(path: &std::path::Path) -> VarBuilder<'static> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

#[test]
fn llama_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = llama_dir(tmp.path(), "LlamaForCausalLM", 1);
    let model = load(&dir);
    for p in prompts() {
        let e = rel_err(&ours_last(&model, &p), &candle_llama_last(&dir, &p));
        assert!(e < TOL, "prompt of {} tokens: relative error {e}", p.len());
    }
}

#[test]
fn mistral_without_a_window_runs_as_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = llama_dir(tmp.path(), "MistralForCausalLM", 2);
    let model = load(&dir);
    assert_eq!(model.config().architecture, probes::Architecture::Mistral);
    assert_eq!(model.config().sliding_window, None);
    let p = &prompts()[2];
    assert!(rel_err(&ours_last(&model, p), &candle_llama_last(&dir, p)) < TOL);
}

#[test]
fn qwen2_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = llama_dir(tmp.path(), "Qwen2ForCausalLM", 3);
    let model = load(&dir);
    let cfg = qwen2::Config {
        vocab_size: VOCAB,
        hidden_size: D,
        intermediate_size: D_MLP,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        num_key_value_heads: KV_HEADS,
        max_position_embeddings: POSITIONS,
        sliding_window: POSITIONS,
        max_window_layers: LAYERS,
        tie_word_embeddings: false,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    for p in prompts() {
        let vb = unsafe_free_varbuilder(&dir.join("model.safetensors"));
        let mut reference = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
        let x = Tensor::new(p.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference
            .forward(&x, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .i(0)
            .unwrap();
        let e = rel_err(&ours_last(&model, &p), &want);
        assert!(e < TOL, "prompt of {} tokens: relative error {e}", p.len());
    }
}

fn quantized_reference_last(path: &std::path::Path, prompt: &[u32]) -> Tensor {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut m = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&x, 0).unwrap().i(0).unwrap()
}

#[test]
fn quantized_llama_gguf_matches_candle_transformers() {
    // Candle's quantized matmul quantizes activations to 8 bits; with dequantized weights
    // the reference computes in f32 on exactly the weights we load.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
    ] {
        let path = tmp.path().join(format!("tiny-{dtype:?}.gguf"));
        llama_gguf(&path, 4, dtype);
        let model = load(&path);
        for p in prompts() {
            let e = rel_err(&ours_last(&model, &p), &quantized_reference_last(&path, &p));
            assert!(
                e < TOL,
                "{dtype:?}, prompt of {} tokens: relative error {e}",
                p.len()
            );
        }
    }
}

/// GPT-2 written out plainly, one prompt at a time, straight from the HF tensors.
fn gpt2_reference(tensors: &[(String, Tensor)], prompt: &[u32]) -> Tensor {
    let get = |n: &str| tensors.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let ln = |x: &Tensor, p: &str| -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(&get(&format!("{p}.weight")))
            .unwrap()
            .broadcast_add(&get(&format!("{p}.bias")))
            .unwrap()
    };
    let conv1d = |x: &Tensor, p: &str| -> Tensor {
        x.matmul(&get(&format!("{p}.weight")))
            .unwrap()
            .broadcast_add(&get(&format!("{p}.bias")))
            .unwrap()
    };
    let t = prompt.len();
    let ids = Tensor::new(prompt, &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap();
    let mut x = (get("transformer.wte.weight").index_select(&ids, 0).unwrap()
        + get("transformer.wpe.weight").index_select(&pos, 0).unwrap())
    .unwrap(); // [t, d]
    let causal: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t <= i / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let causal = Tensor::from_vec(causal, (t, t), &Device::Cpu).unwrap();
    for l in 0..LAYERS {
        let p = format!("transformer.h.{l}");
        let qkv = conv1d(&ln(&x, &format!("{p}.ln_1")), &format!("{p}.attn.c_attn"));
        let mut heads = Vec::new();
        for h in 0..HEADS {
            let q = qkv.narrow(1, h * HEAD_DIM, HEAD_DIM).unwrap();
            let k = qkv.narrow(1, D + h * HEAD_DIM, HEAD_DIM).unwrap();
            let v = qkv.narrow(1, 2 * D + h * HEAD_DIM, HEAD_DIM).unwrap();
            let s = (q.matmul(&k.t().unwrap()).unwrap() / (HEAD_DIM as f64).sqrt()).unwrap();
            let s = (s + &causal).unwrap();
            let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
            heads.push(p.matmul(&v).unwrap());
        }
        let attn = conv1d(
            &Tensor::cat(&heads, 1).unwrap(),
            &format!("{p}.attn.c_proj"),
        );
        x = (x + attn).unwrap();
        let h = conv1d(&ln(&x, &format!("{p}.ln_2")), &format!("{p}.mlp.c_fc"));
        // gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        let inner = ((&h + (h.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap()
            * (2.0f64 / std::f64::consts::PI).sqrt())
        .unwrap();
        let g = ((inner.tanh().unwrap() + 1.0).unwrap() * &h).unwrap() * 0.5;
        x = (x + conv1d(&g.unwrap(), &format!("{p}.mlp.c_proj"))).unwrap();
    }
    let x = ln(&x, "transformer.ln_f");
    x.matmul(&get("transformer.wte.weight").t().unwrap())
        .unwrap()
        .i(t - 1)
        .unwrap()
}

#[test]
fn gpt2_matches_a_plain_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gpt2_dir(tmp.path(), 5);
    let model = load(&dir);
    let tensors = gpt2_tensors(5);
    for p in prompts() {
        let e = rel_err(&ours_last(&model, &p), &gpt2_reference(&tensors, &p));
        assert!(e < TOL, "prompt of {} tokens: relative error {e}", p.len());
    }
}

#[test]
fn gpt2_without_transformer_prefix_loads_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gpt2-bare");
    let bare: Vec<(String, Tensor)> = gpt2_tensors(5)
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
        .collect();
    write_dir(&dir, &gpt2_config(), &bare);
    let model = load(&dir);
    let p = &prompts()[2];
    assert!(rel_err(&ours_last(&model, p), &gpt2_reference(&gpt2_tensors(5), p)) < TOL);
}

#[test]
fn default_model_matches_candle_quantized_llama_and_its_hf_conversion() {
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let gguf = default_model_path();
    let model = load(&gguf);
    let prompt = model
        .encode_prompt("The capital of France is", false)
        .unwrap();
    assert_eq!(
        prompt,
        [504, 3575, 282, 4649, 314],
        "tokenizer ids differ from llama.cpp's"
    );
    let ours = ours_last(&model, &prompt);
    let e = rel_err(&ours, &quantized_reference_last(&gguf, &prompt));
    assert!(
        e < TOL,
        "GGUF vs candle quantized_llama: relative error {e}"
    );

    // The converted HF directory runs through candle's f32 Llama: q/k un-permuted correctly.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2-hf");
    probes::convert_gguf(&gguf, &dir).unwrap();
    let converted = load(&dir);
    assert_eq!(
        converted
            .encode_prompt("The capital of France is", false)
            .unwrap(),
        prompt
    );
    let e = rel_err(
        &ours_last(&converted, &prompt),
        &candle_llama_last(&dir, &prompt),
    );
    assert!(
        e < TOL,
        "converted HF dir vs candle llama: relative error {e}"
    );
    let e = rel_err(&ours_last(&converted, &prompt), &ours);
    assert!(e < TOL, "converted HF dir vs GGUF: relative error {e}");
}
