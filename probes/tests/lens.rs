//! The logit lens against references computed here: its last layer is the model's own
//! prediction (tiny random Llama and the default model), and every layer equals the residual
//! captured at that layer put through an RMSNorm and an unembedding written out by hand.
//! Gemma 2's norm offset and final soft-cap are covered in `families.rs`.

mod common;

use candle_core::{IndexOp, Tensor};
use common::*;
use probes::lens::{logit_lens, LensOptions};
use probes::{HookPoint, Hooks, Padding, Unembed};

/// Softmax in f64.
fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = logits.iter().map(|v| (v - max).exp()).sum();
    logits.iter().map(|v| (v - max).exp() / z).collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Token ids by decreasing probability (ties: lower id first).
fn ranked(probs: &[f64]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..probs.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        probs[b as usize]
            .total_cmp(&probs[a as usize])
            .then(a.cmp(&b))
    });
    ids
}

/// The model's own next-token probabilities at `position` of `prompt`.
fn model_probs(m: &probes::Model, prompt: &[u32], position: usize) -> Vec<f64> {
    let out = m
        .transformer
        .forward(
            &[prompt.to_vec()],
            Padding::Right,
            &Hooks::new(),
            Unembed::All,
        )
        .unwrap();
    softmax(&f64s(&out.logits.unwrap().i((0, position)).unwrap()))
}

fn tensor<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap().1
}

/// `W rmsnorm(x) ⊙ w`, by hand in f64.
fn by_hand(x: &[f64], norm: &[f64], unembed: &Tensor, eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let h: Vec<f64> = x
        .iter()
        .zip(norm)
        .map(|(v, w)| v / (ms + eps).sqrt() * w)
        .collect();
    let w: Vec<Vec<f32>> = unembed.to_vec2().unwrap();
    w.iter()
        .map(|row| row.iter().zip(&h).map(|(a, b)| f64::from(*a) * b).sum())
        .collect()
}

#[test]
fn the_last_layer_of_the_lens_is_the_models_prediction() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 61));
    let prompt = Rand::new(5).tokens(9);
    for position in [0i64, 4, -1] {
        let opts = LensOptions {
            position,
            top: 10,
            token: Some(17),
        };
        let lens = logit_lens(&m.transformer, &prompt, &opts).unwrap();
        let at = if position < 0 { 8 } else { position as usize };
        assert_eq!(lens.position, at);
        assert_eq!(lens.layers.len(), LAYERS + 1);
        assert_eq!(lens.layers[0].hook, HookPoint::ResidPre(0));
        let last = lens.layers.last().unwrap();
        assert_eq!(last.hook, HookPoint::ResidPost(LAYERS - 1));
        let probs = model_probs(&m, &prompt, at);
        let expected = ranked(&probs);
        let got: Vec<u32> = last.top.iter().map(|t| t.id).collect();
        assert_eq!(got, expected[..10], "position {position}");
        for t in &last.top {
            assert!((t.prob - probs[t.id as usize]).abs() < 1e-5, "{t:?}");
        }
        let tok = last.token.unwrap();
        let rank = 1 + expected.iter().position(|&i| i == 17).unwrap();
        assert_eq!(tok.rank, rank);
        assert!((tok.prob - probs[17]).abs() < 1e-5);
    }
}

#[test]
fn every_layer_equals_the_captured_residual_normed_and_unembedded_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = llama_dir(tmp.path(), "LlamaForCausalLM", 62);
    let m = load(&dir);
    let tensors = llama_tensors(62, false);
    let norm = f64s(tensor(&tensors, "model.norm.weight"));
    let unembed = tensor(&tensors, "lm_head.weight");
    let prompt = Rand::new(6).tokens(7);
    let position = 3;
    let lens = logit_lens(
        &m.transformer,
        &prompt,
        &LensOptions {
            position: position as i64,
            top: VOCAB,
            token: None,
        },
    )
    .unwrap();
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
        let x = f64s(&out.captures[&layer.hook].i((0, position)).unwrap());
        let probs = softmax(&by_hand(&x, &norm, unembed, 1e-5));
        assert_eq!(layer.top.len(), VOCAB);
        for t in &layer.top {
            assert!(
                (t.prob - probs[t.id as usize]).abs() < 1e-5,
                "{}: token {} lens {} by hand {}",
                layer.hook,
                t.id,
                t.prob,
                probs[t.id as usize]
            );
        }
        let order: Vec<u32> = layer.top.iter().map(|t| t.id).collect();
        let expected = ranked(&probs);
        // Near-equal probabilities may swap between two f32 paths: compare what is clearly
        // ordered.
        for (i, (a, b)) in order.iter().zip(&expected).enumerate() {
            if a != b {
                let gap = (probs[*a as usize] - probs[*b as usize]).abs();
                assert!(gap < 1e-6, "{}: rank {i}: {a} vs {b}", layer.hook);
            }
        }
    }
}

#[test]
fn bad_lens_requests_are_errors_that_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 63));
    let prompt = vec![3, 4, 5];
    let run = |position, top, token| {
        logit_lens(
            &m.transformer,
            &prompt,
            &LensOptions {
                position,
                top,
                token,
            },
        )
        .unwrap_err()
        .to_string()
    };
    let e = run(3, 5, None);
    assert!(e.contains("position 3") && e.contains("3 tokens"), "{e}");
    let e = run(-4, 5, None);
    assert!(e.contains("position -4"), "{e}");
    let e = run(0, 0, None);
    assert!(e.contains("top") && e.contains(&VOCAB.to_string()), "{e}");
    let e = run(0, 5, Some(VOCAB as u32));
    assert!(e.contains(&format!("token id {VOCAB}")), "{e}");
    let e = logit_lens(&m.transformer, &[], &LensOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tokens"), "{e}");
}

#[test]
fn the_default_models_lens_ends_in_its_own_prediction_and_is_deterministic() {
    let m = load(&default_model_path());
    let prompt = m.encode_prompt("The capital of France is", false).unwrap();
    let paris = m.codec.encode(" Paris").unwrap()[0];
    let opts = LensOptions {
        position: -1,
        top: 10,
        token: Some(paris),
    };
    let lens = logit_lens(&m.transformer, &prompt, &opts).unwrap();
    assert_eq!(lens.layers.len(), m.config().n_layers + 1);
    let probs = model_probs(&m, &prompt, prompt.len() - 1);
    let last = lens.layers.last().unwrap();
    let got: Vec<u32> = last.top.iter().map(|t| t.id).collect();
    assert_eq!(got, ranked(&probs)[..10]);
    for t in &last.top {
        assert!((t.prob - probs[t.id as usize]).abs() < 1e-5, "{t:?}");
    }
    assert_eq!(last.token.unwrap().rank, last.top[0].rank);
    // The same reading twice, bit for bit.
    assert_eq!(logit_lens(&m.transformer, &prompt, &opts).unwrap(), lens);
}
