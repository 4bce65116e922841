//! Hook points and interventions: no-op hooks change nothing, padding changes nothing,
//! each edit does exactly what it says at exactly the positions it names, and generation
//! with a KV cache agrees with full forward passes.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use probes::{generate, GenerateOptions, HookPoint, Hooks, Padding, Positions, Sampling, Unembed};

fn tiny(tmp: &std::path::Path) -> probes::Model {
    load(&llama_dir(tmp, "LlamaForCausalLM", 11))
}

fn batch() -> Vec<Vec<u32>> {
    let mut r = Rand::new(3);
    vec![r.tokens(9), r.tokens(3), r.tokens(14), r.tokens(1)]
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

#[test]
fn empty_hooks_are_bit_identical_to_a_plain_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let b = batch();
    let plain = m
        .transformer
        .forward(&b, Padding::Left, &Hooks::new(), Unembed::All)
        .unwrap();
    // Hooks registered on another layer's capture and a zero-coefficient edit elsewhere do
    // not touch the logits' path beyond their own points.
    let captured = m
        .transformer
        .forward(
            &b,
            Padding::Left,
            &Hooks::new().capture(HookPoint::ResidPost(1)),
            Unembed::All,
        )
        .unwrap();
    let a: Vec<f32> = plain
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let c: Vec<f32> = captured
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn padded_batches_equal_one_prompt_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    for m in [tiny(tmp.path()), load(&gpt2_dir(tmp.path(), 12))] {
        let b = batch();
        let hooks = Hooks::new().capture(HookPoint::ResidMid(1));
        for padding in [Padding::Left, Padding::Right] {
            let out = m
                .transformer
                .forward(&b, padding, &hooks, Unembed::All)
                .unwrap();
            let logits = out.logits.unwrap();
            let act = &out.captures[&HookPoint::ResidMid(1)];
            for (r, p) in b.iter().enumerate() {
                let single = m
                    .transformer
                    .forward(std::slice::from_ref(p), padding, &hooks, Unembed::All)
                    .unwrap();
                let off = out.layout.offset(r);
                let got = logits.i(r).unwrap().narrow(0, off, p.len()).unwrap();
                let want = single.logits.unwrap().i(0).unwrap();
                assert_eq!(bits(&got), bits(&want), "{padding:?} row {r} logits");
                let got = act.i(r).unwrap().narrow(0, off, p.len()).unwrap();
                let want = single.captures[&HookPoint::ResidMid(1)].i(0).unwrap();
                assert_eq!(bits(&got), bits(&want), "{padding:?} row {r} activation");
            }
        }
    }
}

#[test]
fn every_hook_point_captures_with_its_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let mut hooks = Hooks::new();
    for h in HookPoint::all(LAYERS) {
        hooks = hooks.capture(h);
    }
    let b = batch();
    let out = m
        .transformer
        .forward(&b, Padding::Left, &hooks, Unembed::Last)
        .unwrap();
    assert_eq!(out.captures.len(), HookPoint::all(LAYERS).len());
    for (h, t) in &out.captures {
        let want: Vec<usize> = match h {
            HookPoint::AttnPattern(_) => vec![4, HEADS, 14, 14],
            _ => vec![4, 14, D],
        };
        assert_eq!(t.dims(), want.as_slice(), "{h}");
    }
    // Attention rows are distributions over real keys only.
    let pattern = &out.captures[&HookPoint::AttnPattern(0)];
    let sums = pattern.sum(3).unwrap().i((.., .., 13)).unwrap();
    assert!(rel_err(&sums, &Tensor::ones_like(&sums).unwrap()) < 1e-5);
    let to_padding = pattern.i((3, .., 13, ..13)).unwrap(); // row 3 has one real token
    assert_eq!(max_abs(&to_padding), 0.0);
    // resid_mid = resid_pre + attn_out; resid_post = resid_mid + mlp_out.
    let c = &out.captures;
    let sum = (&c[&HookPoint::ResidPre(1)] + &c[&HookPoint::AttnOut(1)]).unwrap();
    assert!(rel_err(&sum, &c[&HookPoint::ResidMid(1)]) < 1e-6);
    let sum = (&c[&HookPoint::ResidMid(1)] + &c[&HookPoint::MlpOut(1)]).unwrap();
    assert!(rel_err(&sum, &c[&HookPoint::ResidPost(1)]) < 1e-6);
}

#[test]
fn early_exit_captures_the_same_activation_without_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let b = batch();
    let hooks = Hooks::new().capture(HookPoint::ResidPost(0));
    let full = m
        .transformer
        .forward(&b, Padding::Left, &hooks, Unembed::All)
        .unwrap();
    let early = m
        .transformer
        .forward(&b, Padding::Left, &hooks, Unembed::None)
        .unwrap();
    assert!(early.logits.is_none());
    let (a, e) = (
        &full.captures[&HookPoint::ResidPost(0)],
        &early.captures[&HookPoint::ResidPost(0)],
    );
    assert_eq!(max_abs(&(a - e).unwrap()), 0.0);
}

#[test]
fn steering_adds_the_vector_only_at_the_chosen_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let b = batch();
    let v = Rand::new(9).tensor(&[D], 1.0);
    let point = HookPoint::ResidPre(1);
    let base = m
        .transformer
        .forward(
            &b,
            Padding::Left,
            &Hooks::new().capture(point),
            Unembed::None,
        )
        .unwrap();
    for (positions, hit) in [
        (Positions::Last, vec![8usize]),
        (Positions::Indices(vec![0, -2]), vec![0, 7]),
        (Positions::All, (0..9).collect()),
    ] {
        let hooks = Hooks::new()
            .add(point, positions.clone(), v.clone(), 2.5)
            .capture(point);
        let out = m
            .transformer
            .forward(&b, Padding::Left, &hooks, Unembed::None)
            .unwrap();
        let delta = (&out.captures[&point] - &base.captures[&point]).unwrap();
        // Row 0 has 9 real tokens at padded offset 5.
        let off = out.layout.offset(0);
        for j in 0..9 {
            let d = delta.i((0, off + j)).unwrap();
            if hit.contains(&j) {
                let want = (&v * 2.5).unwrap();
                assert!(rel_err(&d, &want) < 1e-5, "{positions:?} position {j}");
            } else {
                assert_eq!(max_abs(&d), 0.0, "{positions:?} touched position {j}");
            }
        }
    }
}

#[test]
fn ablation_removes_the_direction_everywhere_it_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let dir = Rand::new(10).tensor(&[D], 1.0);
    let unit = (&dir
        / dir
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64)
        .unwrap();
    let mut hooks = Hooks::new().ablate_everywhere(LAYERS, &dir);
    for l in 0..LAYERS {
        hooks = hooks
            .capture(HookPoint::ResidPre(l))
            .capture(HookPoint::AttnOut(l))
            .capture(HookPoint::MlpOut(l));
    }
    let out = m
        .transformer
        .forward(&batch(), Padding::Left, &hooks, Unembed::All)
        .unwrap();
    for (h, act) in &out.captures {
        let proj = act.broadcast_mul(&unit).unwrap().sum(2).unwrap(); // [b, t]
        for (r, len) in out.layout.lengths.iter().enumerate() {
            // Padding positions are never edited; real tokens all are.
            let real = proj
                .i(r)
                .unwrap()
                .narrow(0, out.layout.offset(r), *len)
                .unwrap();
            assert!(
                max_abs(&real) < 1e-4,
                "{h} row {r}: component {} left",
                max_abs(&real)
            );
        }
    }
    // ... and it changes the output.
    let plain = m
        .transformer
        .forward(&batch(), Padding::Left, &Hooks::new(), Unembed::All)
        .unwrap();
    assert!(rel_err(&out.logits.unwrap(), &plain.logits.unwrap()) > 1e-3);
}

#[test]
fn replacement_rewrites_activations_and_identity_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let b = batch();
    let plain = m
        .transformer
        .forward(&b, Padding::Left, &Hooks::new(), Unembed::All)
        .unwrap();
    let identity = Hooks::new().replace(
        HookPoint::MlpOut(0),
        Positions::All,
        Arc::new(|x: &Tensor| Ok(x.clone())),
    );
    let same = m
        .transformer
        .forward(&b, Padding::Left, &identity, Unembed::All)
        .unwrap();
    assert_eq!(
        max_abs(&(plain.logits.as_ref().unwrap() - same.logits.unwrap()).unwrap()),
        0.0
    );
    let zero = Hooks::new()
        .replace(
            HookPoint::MlpOut(0),
            Positions::Last,
            Arc::new(|x: &Tensor| x.zeros_like()),
        )
        .capture(HookPoint::MlpOut(0));
    let out = m
        .transformer
        .forward(&b, Padding::Left, &zero, Unembed::All)
        .unwrap();
    let act = &out.captures[&HookPoint::MlpOut(0)];
    assert_eq!(max_abs(&act.i((.., 13)).unwrap()), 0.0);
    assert!(max_abs(&act.i((0, 12)).unwrap()) > 0.0);
    let bad = Hooks::new().replace(
        HookPoint::MlpOut(0),
        Positions::All,
        Arc::new(|x: &Tensor| x.narrow(2, 0, 3)),
    );
    let e = m
        .transformer
        .forward(&b, Padding::Left, &bad, Unembed::All)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocks.0.hook_mlp_out") && e.contains("shape"),
        "{e}"
    );
}

#[test]
fn bad_interventions_are_refused_with_the_hook_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let b = batch();
    let short = Tensor::zeros(D - 1, DType::F32, &Device::Cpu).unwrap();
    let e = m
        .transformer
        .forward(
            &b,
            Padding::Left,
            &Hooks::new().add(HookPoint::ResidPre(0), Positions::All, short, 1.0),
            Unembed::All,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocks.0.hook_resid_pre") && e.contains(&D.to_string()),
        "{e}"
    );
    let nan = Tensor::full(f32::NAN, D, &Device::Cpu).unwrap();
    let e = m
        .transformer
        .forward(
            &b,
            Padding::Left,
            &Hooks::new().add(HookPoint::ResidPre(0), Positions::All, nan, 1.0),
            Unembed::All,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
    let e = m
        .transformer
        .forward(
            &b,
            Padding::Left,
            &Hooks::new().capture(HookPoint::ResidPost(LAYERS)),
            Unembed::All,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown hook") && e.contains("hook_resid_post"),
        "{e}"
    );
    let e = m.hook("blocks.0.hook_nope").unwrap_err().to_string();
    assert!(e.contains("valid hooks are"), "{e}");
}

/// Greedy continuation by repeated full forward passes, no cache.
fn greedy_without_cache(m: &probes::Model, prompt: &[u32], hooks: &Hooks, n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = m
            .transformer
            .forward(&[seq.clone()], Padding::Left, hooks, Unembed::Last)
            .unwrap()
            .logits
            .unwrap();
        let next = probes::generate::greedy_tokens(&logits).unwrap()[0];
        out.push(next);
        seq.push(next);
    }
    out
}

#[test]
fn cached_generation_equals_full_forwards_with_and_without_steering() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let v = Rand::new(13).tensor(&[D], 1.0);
    let opts = GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    };
    for hooks in [
        Hooks::new(),
        Hooks::new().add(HookPoint::ResidPost(0), Positions::All, v.clone(), 3.0),
    ] {
        let b = batch();
        let batched = generate(&m.transformer, &b, &hooks, &opts).unwrap();
        for (r, p) in b.iter().enumerate() {
            assert_eq!(
                batched[r],
                greedy_without_cache(&m, p, &hooks, 12),
                "row {r}"
            );
        }
    }
    let plain = generate(&m.transformer, &batch(), &Hooks::new(), &opts).unwrap();
    let steered = generate(
        &m.transformer,
        &batch(),
        &Hooks::new().add(HookPoint::ResidPost(0), Positions::All, v, 3.0),
        &opts,
    )
    .unwrap();
    assert_ne!(plain, steered, "steering during generation had no effect");
}

#[test]
fn stop_tokens_end_generation_and_sampling_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let p = vec![batch()[0].clone()];
    let free = generate(
        &m.transformer,
        &p,
        &Hooks::new(),
        &GenerateOptions {
            max_tokens: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let stop = free[0][2];
    let stopped = generate(
        &m.transformer,
        &p,
        &Hooks::new(),
        &GenerateOptions {
            max_tokens: 8,
            stop_tokens: vec![stop],
            ..Default::default()
        },
    )
    .unwrap();
    let first = free[0].iter().position(|t| *t == stop).unwrap();
    assert_eq!(stopped[0], free[0][..=first]);
    let sample = |seed| {
        let s = Sampling::Sample {
            temperature: 1.0,
            top_p: 0.9,
            seed,
        };
        generate(
            &m.transformer,
            &p,
            &Hooks::new(),
            &GenerateOptions {
                max_tokens: 16,
                sampling: s,
                ..Default::default()
            },
        )
        .unwrap()
    };
    assert_eq!(sample(1), sample(1));
    assert_ne!(sample(1), sample(2));
}

#[test]
fn quantized_decode_generation_stays_close_to_f32() {
    let gguf = default_model_path();
    let m = probes::Model::load_path(
        &gguf,
        &probes::LoadOptions {
            quantized_decode: true,
        },
    )
    .unwrap();
    let p = m.encode_prompt("The capital of France is", false).unwrap();
    let out = generate(
        &m.transformer,
        &[p],
        &Hooks::new(),
        &GenerateOptions {
            max_tokens: 6,
            ..Default::default()
        },
    )
    .unwrap();
    let text = m.codec.decode(&out[0]).unwrap();
    assert!(text.contains("Paris"), "greedy continuation was {text:?}");
}

#[test]
fn chat_template_renders_and_generation_answers() {
    let m = load(&default_model_path());
    let rendered = m
        .codec
        .apply_chat_template(&[probes::tokenizer::Message::user("Hi")])
        .unwrap();
    assert!(
        rendered.contains("<|im_start|>user\nHi<|im_end|>"),
        "{rendered:?}"
    );
    assert!(
        rendered.ends_with("<|im_start|>assistant\n"),
        "{rendered:?}"
    );
    let ids = m
        .encode_prompt("What is the capital of France?", true)
        .unwrap();
    assert_eq!(
        ids.iter()
            .filter(|&&t| Some(t) == m.codec.token_id("<|im_start|>"))
            .count(),
        3
    );
    let out = generate(
        &m.transformer,
        &[ids],
        &Hooks::new(),
        &GenerateOptions {
            max_tokens: 24,
            stop_tokens: m.stop_tokens(),
            ..Default::default()
        },
    )
    .unwrap();
    let text = m.codec.decode(&out[0]).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}

/// A pass that starts from a captured residual activation runs only the blocks after it and
/// gives the full pass's output bit for bit, with the hooks at its start applied; a hook
/// before the start is refused.
#[test]
fn a_pass_resumed_from_the_residual_stream_equals_the_full_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny(tmp.path());
    let b = batch();
    let d = m.transformer.config.d_model;
    let v = Tensor::ones(d, DType::F32, &Device::Cpu).unwrap();
    for start in [HookPoint::ResidPre(1), HookPoint::ResidPost(0)] {
        let clean = m
            .transformer
            .forward(
                &b,
                Padding::Left,
                &Hooks::new().capture(start),
                Unembed::All,
            )
            .unwrap();
        let x = &clean.captures[&start];
        let edits = Hooks::new()
            .add(start, Positions::All, v.clone(), 0.5)
            .capture(HookPoint::MlpOut(1));
        let full = m
            .transformer
            .forward(&b, Padding::Left, &edits, Unembed::All)
            .unwrap();
        let resumed = m
            .transformer
            .forward_from(&b, Padding::Left, start, x, &edits, Unembed::All)
            .unwrap();
        let (f, r) = (full.logits.unwrap(), resumed.logits.unwrap());
        assert_eq!(bits(&f), bits(&r), "logits from `{start}`");
        let h = HookPoint::MlpOut(1);
        assert_eq!(bits(&full.captures[&h]), bits(&resumed.captures[&h]));
        assert!(max_abs(&(&f - &clean.logits.unwrap()).unwrap()) > 0.0);
    }
    let x = Tensor::zeros((b.len(), 14, d), DType::F32, &Device::Cpu).unwrap();
    let early = Hooks::new().capture(HookPoint::ResidPre(0));
    let e = m
        .transformer
        .forward_from(
            &b,
            Padding::Left,
            HookPoint::ResidPost(0),
            &x,
            &early,
            Unembed::Last,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("comes before `blocks.0.hook_resid_post`"), "{e}");
    let wrong = Tensor::zeros((b.len(), 3, d), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .transformer
        .forward_from(
            &b,
            Padding::Left,
            HookPoint::ResidPost(0),
            &wrong,
            &Hooks::new(),
            Unembed::Last,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("not [4, 14"), "{e}");
}
