//! An audit must not depend on how its prompts are batched (issue 18): a prompt's
//! activations, logits and greedy generation are the same bits whether it runs alone or
//! padded into a batch with other prompts, of any lengths, in any order, with or without
//! interventions. Checked on the real default model, in its audited precision (f32 prompt
//! passes, Q8_0 decode steps).

mod common;

use candle_core::{IndexOp, Tensor};
use common::{bits, default_model_path};
use probes::{
    generate, generate_until, GenerateOptions, HookPoint, Hooks, Padding, Positions, Unembed,
};

/// Chat-templated and raw prompts of very different lengths, down to a single token.
const PROMPTS: &[(&str, bool)] = &[
    ("What is the capital of France?", true),
    ("Hi", false),
    ("x", false),
    (
        "Write a function that parses an ISO 8601 date, explain each step, and list three \
         edge cases that a careful reviewer would test before merging it.",
        true,
    ),
    ("1, 2, 3, 4, 5,", false),
    ("How do I open a locked door without its key?", true),
];

fn model() -> probes::Model {
    probes::Model::load_path(&default_model_path(), &probes::LoadOptions::default()).unwrap()
}

fn prompts(m: &probes::Model) -> Vec<Vec<u32>> {
    PROMPTS
        .iter()
        .map(|(text, chat)| m.encode_prompt(text, *chat).unwrap())
        .collect()
}

/// Batches that put each prompt among different neighbours and at different rows.
fn batchings(n: usize) -> Vec<Vec<usize>> {
    let all: Vec<usize> = (0..n).collect();
    let reversed: Vec<usize> = (0..n).rev().collect();
    vec![all, reversed, vec![3, 1], vec![2, 0, 5], vec![4, 3]]
}

fn steering(m: &probes::Model) -> Hooks {
    let d = m.transformer.config.d_model;
    let v: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
    let v = Tensor::from_vec(v, d, m.transformer.device()).unwrap();
    Hooks::new()
        .add(HookPoint::ResidPost(6), Positions::All, v.clone(), 1.0)
        .ablate(HookPoint::MlpOut(12), Positions::All, v)
}

#[test]
fn prompt_pass_outputs_do_not_depend_on_the_batch() {
    let m = model();
    let ids = prompts(&m);
    let hook = HookPoint::ResidPost(15);
    for hooks in [Hooks::new(), steering(&m)] {
        let hooks = hooks.capture(hook).capture(HookPoint::AttnOut(3));
        let alone: Vec<_> = ids
            .iter()
            .map(|p| {
                m.transformer
                    .forward(
                        std::slice::from_ref(p),
                        Padding::Right,
                        &hooks,
                        Unembed::All,
                    )
                    .unwrap()
            })
            .collect();
        for padding in [Padding::Right, Padding::Left] {
            for rows in batchings(ids.len()) {
                let batch: Vec<Vec<u32>> = rows.iter().map(|&i| ids[i].clone()).collect();
                let out = m
                    .transformer
                    .forward(&batch, padding, &hooks, Unembed::All)
                    .unwrap();
                for (r, &i) in rows.iter().enumerate() {
                    let (off, len) = (out.layout.offset(r), ids[i].len());
                    let cut = |t: &Tensor| t.i(r).unwrap().narrow(0, off, len).unwrap();
                    let what = format!("prompt {i} at row {r} of {rows:?} ({padding:?})");
                    let logits = cut(out.logits.as_ref().unwrap());
                    assert_eq!(
                        bits(&logits),
                        bits(&alone[i].logits.as_ref().unwrap().i(0).unwrap()),
                        "{what}: logits differ from the prompt alone"
                    );
                    for h in [hook, HookPoint::AttnOut(3)] {
                        assert_eq!(
                            bits(&cut(&out.captures[&h])),
                            bits(&alone[i].captures[&h].i(0).unwrap()),
                            "{what}: `{h}` differs from the prompt alone"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn generations_do_not_depend_on_the_batch() {
    let m = model();
    let ids = prompts(&m);
    // Both decode precisions: Q8_0 (interactive generation) and f32 (audits).
    for (hooks, f32_decode) in [
        (Hooks::new(), false),
        (steering(&m), false),
        (Hooks::new(), true),
        (steering(&m), true),
    ] {
        let opts = GenerateOptions {
            max_tokens: 16,
            f32_decode,
            ..Default::default()
        };
        let alone: Vec<Vec<u32>> = ids
            .iter()
            .map(|p| {
                generate(&m.transformer, std::slice::from_ref(p), &hooks, &opts)
                    .unwrap()
                    .remove(0)
            })
            .collect();
        for rows in batchings(ids.len()).into_iter().take(3) {
            let batch: Vec<Vec<u32>> = rows.iter().map(|&i| ids[i].clone()).collect();
            let out = generate(&m.transformer, &batch, &hooks, &opts).unwrap();
            for (r, &i) in rows.iter().enumerate() {
                assert_eq!(
                    out[r], alone[i],
                    "prompt {i} at row {r} of {rows:?}: its generation differs from the \
                     prompt alone"
                );
            }
        }
    }
}

#[test]
fn rows_that_end_early_leave_the_others_unchanged() {
    let m = model();
    let ids = prompts(&m);
    for f32_decode in [false, true] {
        let opts = GenerateOptions {
            max_tokens: 16,
            f32_decode,
            ..Default::default()
        };
        let full = generate(&m.transformer, &ids, &Hooks::new(), &opts).unwrap();
        // Rows end after a number of tokens that differs per row (row 1 after its first), so
        // the batch shrinks step by step while the other rows go on.
        let limit = |r: usize| 1 + (r * 5) % 16;
        let ended = generate_until(&m.transformer, &ids, &Hooks::new(), &opts, |r, t| {
            t.len() >= limit(r)
        })
        .unwrap();
        for (r, (e, f)) in ended.iter().zip(&full).enumerate() {
            let n = limit(r).min(f.len());
            assert_eq!(
                e[..],
                f[..n],
                "row {r}: ended after {n} tokens, it must be the full generation's first {n}"
            );
        }
        assert!(
            ended.iter().zip(&full).any(|(e, f)| e.len() < f.len()),
            "no row ended early, so nothing was tested"
        );
    }
}
