//! Prompt passes that compute the chat template's shared preamble once give the outputs of
//! the full pass (issue 19): captures and logits at every position, under hooks that leave the
//! preamble alone or do the same to every row's (steering, directional ablation), to 1e-5
//! relative; hooks that could change it row by row fall back to the full pass.
//! On the real default model, in its audited precision (f32 prompt passes).

mod common;

use candle_core::{Tensor, D};
use common::{bits, default_model_path};
use probes::{generate, GenerateOptions, HookPoint, Hooks, Positions, Unembed};

const TOL: f32 = 1e-5;

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Hi",
    "Write a function that parses an ISO 8601 date, and list three edge cases to test.",
    "How do I open a locked door without its key?",
    "Name a prime number larger than 100.",
];

fn model() -> probes::Model {
    probes::Model::load_path(&default_model_path(), &probes::LoadOptions::default()).unwrap()
}

/// The chat-templated prompts and the number of tokens they all start with.
fn prompts(m: &probes::Model) -> (Vec<Vec<u32>>, usize) {
    let ids: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| m.encode_prompt(p, true).unwrap())
        .collect();
    let shared = (0..)
        .take_while(|&i| ids.iter().all(|p| p.len() > i && p[i] == ids[0][i]))
        .count();
    (ids, shared)
}

/// Every micro-batch's output, each prompt's rows cut to its length: per prompt, the captures
/// in hook order, then the logits.
fn outputs(
    m: &probes::Model,
    ids: &[Vec<u32>],
    shared: usize,
    hooks: &Hooks,
    unembed: Unembed,
) -> Vec<Vec<Tensor>> {
    let mut out = Vec::new();
    let consume = |_, o: probes::ForwardOutput| {
        for (r, len) in o.layout.lengths.iter().enumerate() {
            let mut parts: Vec<Tensor> = o
                .captures
                .values()
                .map(|c| {
                    // `[pos, d]`, or `[heads, pos, keys]` for attention patterns.
                    let c = c.get(r).unwrap();
                    c.narrow(c.rank() - 2, 0, *len).unwrap()
                })
                .collect();
            if let Some(l) = &o.logits {
                let l = l.get(r).unwrap();
                parts.push(match unembed {
                    Unembed::All => l.narrow(0, 0, *len).unwrap(),
                    Unembed::From(n) => l.narrow(0, 0, len - n).unwrap(),
                    _ => l,
                });
            }
            out.push(parts);
        }
        Ok(())
    };
    m.transformer
        .forward_chunked_shared(ids, shared, 2, hooks, unembed, consume)
        .unwrap();
    out
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(D::Minus1)
        .unwrap();
    let scale = b.abs().unwrap().max_keepdim(D::Minus1).unwrap();
    let r: Vec<f32> = (diff / (scale + 1e-6).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    r.into_iter().fold(0.0, f32::max)
}

#[test]
fn a_shared_preamble_gives_the_full_passs_outputs() {
    let m = model();
    let (ids, shared) = prompts(&m);
    assert!(shared > 10, "the chat template shares {shared} tokens");
    let d = m.transformer.config.d_model;
    let v: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
    let v = Tensor::from_vec(v, d, m.transformer.device()).unwrap();
    let captures = Hooks::new()
        .capture(HookPoint::ResidPre(0))
        .capture(HookPoint::ResidPost(12))
        .capture(HookPoint::MlpOut(20));
    let own_tokens: Vec<i64> = (shared as i64..shared as i64 + 40).collect();
    let cases = [
        ("captures", captures.clone(), Unembed::All),
        ("captures, last logits", captures.clone(), Unembed::Last),
        (
            "logits after the preamble",
            Hooks::new(),
            Unembed::From(shared + 1),
        ),
        (
            "logits from inside the preamble",
            Hooks::new(),
            Unembed::From(shared - 3),
        ),
        (
            "steering the last token",
            captures
                .clone()
                .add(HookPoint::ResidPost(6), Positions::Last, v.clone(), 2.0),
            Unembed::All,
        ),
        (
            "ablating the prompts' own tokens",
            captures.clone().ablate(
                HookPoint::ResidMid(9),
                Positions::Indices(own_tokens),
                v.clone(),
            ),
            Unembed::All,
        ),
        ("a capture with early exit", captures.clone(), Unembed::None),
        (
            "steering every position",
            captures
                .clone()
                .add(HookPoint::ResidPost(6), Positions::All, v.clone(), 2.0),
            Unembed::Last,
        ),
        (
            "ablating a direction everywhere",
            Hooks::new().ablate_everywhere(m.transformer.config.n_layers, &v),
            Unembed::All,
        ),
        (
            "steering every position, early exit",
            Hooks::new()
                .add(HookPoint::ResidPost(6), Positions::All, v.clone(), 2.0)
                .capture(HookPoint::ResidPost(12)),
            Unembed::None,
        ),
    ];
    for (what, hooks, unembed) in cases {
        let full = outputs(&m, &ids, 0, &hooks, unembed);
        let split = outputs(&m, &ids, shared, &hooks, unembed);
        assert_eq!(full.len(), ids.len());
        let worst = full
            .iter()
            .zip(&split)
            .flat_map(|(f, s)| f.iter().zip(s).map(|(a, b)| rel_err(b, a)))
            .fold(0.0, f32::max);
        println!("{what}: largest relative error {worst:e}");
        for (p, (f, s)) in full.iter().zip(&split).enumerate() {
            assert_eq!(
                f.len(),
                s.len(),
                "{what}: prompt {p}: outputs differ in number"
            );
            for (i, (a, b)) in s.iter().zip(f).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{what}: prompt {p}, output {i}");
                let e = rel_err(a, b);
                assert!(
                    e <= TOL,
                    "{what}: prompt {p}, output {i}: relative error {e}"
                );
            }
        }
    }
}

/// Hooks that may change the preamble differently from row to row (a replacement at every
/// position, an edit at an index inside it) run the full pass: the same bits.
#[test]
fn hooks_that_change_the_preamble_run_the_full_pass() {
    let m = model();
    let (ids, shared) = prompts(&m);
    let d = m.transformer.config.d_model;
    let v = Tensor::ones(d, candle_core::DType::F32, m.transformer.device()).unwrap();
    let shift: probes::hooks::ReplaceFn = std::sync::Arc::new(|x: &Tensor| x + 1.0);
    for hooks in [
        Hooks::new().replace(HookPoint::ResidPost(3), Positions::All, shift),
        Hooks::new().add(
            HookPoint::ResidPost(3),
            Positions::Indices(vec![2]),
            v.clone(),
            1.0,
        ),
        Hooks::new().capture(HookPoint::AttnPattern(4)),
    ] {
        let full = outputs(&m, &ids, 0, &hooks, Unembed::All);
        let split = outputs(&m, &ids, shared, &hooks, Unembed::All);
        for (f, s) in full.iter().zip(&split) {
            for (a, b) in f.iter().zip(s) {
                assert_eq!(bits(a), bits(b));
            }
        }
    }
    // A padded batch of prompts that share nothing runs as before.
    let mixed = vec![ids[0].clone(), vec![1, 2, 3]];
    let a = outputs(&m, &mixed, shared, &Hooks::new(), Unembed::All);
    let b = outputs(&m, &mixed, 0, &Hooks::new(), Unembed::All);
    assert_eq!(bits(&a[1][0]), bits(&b[1][0]));
}

/// A generation whose prefill computes the preamble once (`GenerateOptions::shared_start`)
/// gives the greedy tokens of the full prefill, under hooks or none, and they do not depend on
/// the batch: each prompt alone gives the same bits as in the batch, in any order.
#[test]
fn a_generation_prefilled_after_a_shared_preamble_equals_the_full_prefill() {
    let m = model();
    let (ids, shared) = prompts(&m);
    let d = m.transformer.config.d_model;
    let v: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
    let v = Tensor::from_vec(v, d, m.transformer.device()).unwrap();
    let cases = [
        ("no hooks", Hooks::new()),
        (
            "steering every position",
            Hooks::new().add(HookPoint::ResidPost(6), Positions::All, v.clone(), 1.0),
        ),
        (
            "ablating a direction everywhere",
            Hooks::new().ablate_everywhere(m.transformer.config.n_layers, &v),
        ),
    ];
    let opts = |shared_start| GenerateOptions {
        max_tokens: 16,
        f32_decode: true,
        stop_tokens: m.stop_tokens(),
        shared_start,
        ..Default::default()
    };
    for (what, hooks) in cases {
        let full = generate(&m.transformer, &ids, &hooks, &opts(0)).unwrap();
        let split = generate(&m.transformer, &ids, &hooks, &opts(shared)).unwrap();
        assert_eq!(
            split, full,
            "{what}: the shared prefill changed a generation"
        );
        assert!(full.iter().all(|g| !g.is_empty()));
        let reversed: Vec<Vec<u32>> = ids.iter().rev().cloned().collect();
        let mut back = generate(&m.transformer, &reversed, &hooks, &opts(shared)).unwrap();
        back.reverse();
        assert_eq!(back, split, "{what}: the batch reversed");
        for (i, p) in ids.iter().enumerate() {
            let alone = generate(
                &m.transformer,
                std::slice::from_ref(p),
                &hooks,
                &opts(shared),
            )
            .unwrap();
            assert_eq!(alone[0], split[i], "{what}: prompt {i} alone");
        }
    }
}

/// A generation that captures hooks in its prefill hands back the same bits a capture pass
/// over the prompts gives (which the audit then does not run), with the shared preamble or
/// without, and generates what it generates without capturing.
#[test]
fn a_generations_prefill_captures_what_a_prompt_pass_captures() {
    let m = model();
    let (ids, shared) = prompts(&m);
    let points = [HookPoint::ResidPost(3), HookPoint::ResidPost(15)];
    let capture = points.iter().fold(Hooks::new(), |h, p| h.capture(*p));
    for shared_start in [shared, 0] {
        let pass = outputs(&m, &ids, shared_start, &capture, Unembed::None);
        let opts = GenerateOptions {
            max_tokens: 8,
            f32_decode: true,
            shared_start,
            ..Default::default()
        };
        let plain = generate(&m.transformer, &ids, &Hooks::new(), &opts).unwrap();
        let (tokens, captured) = probes::generate_capturing(
            &m.transformer,
            &ids,
            &Hooks::new(),
            &opts,
            |_, _| false,
            &points,
        )
        .unwrap();
        assert_eq!(tokens, plain, "shared start {shared_start}");
        for (k, point) in points.iter().enumerate() {
            for (i, prompt) in pass.iter().enumerate() {
                assert!(
                    bits(&captured[point][i]) == bits(&prompt[k]),
                    "`{point}`, prompt {i}, shared start {shared_start}: the prefill's capture \
                     differs from the prompt pass's"
                );
            }
        }
    }
}

/// A pass resumed at a residual hook from the full pass's activation, with the preamble
/// computed once (`forward_shared_from`), gives the shared pass's outputs: the SAE
/// evaluation's spliced and zero-ablated passes on the prompts' own tokens.
#[test]
fn a_shared_pass_resumed_at_a_hook_equals_the_shared_pass() {
    let m = model();
    let (ids, shared) = prompts(&m);
    let longest = ids.iter().map(Vec::len).max().unwrap();
    let own: Vec<i64> = (shared as i64..longest as i64).collect();
    let zero: probes::hooks::ReplaceFn = std::sync::Arc::new(|x: &Tensor| x.zeros_like());
    for start in [HookPoint::ResidPost(11), HookPoint::ResidPre(20)] {
        let clean = m
            .transformer
            .forward_shared(&ids, shared, &Hooks::new().capture(start), Unembed::All)
            .unwrap();
        let edits = Hooks::new()
            .replace(start, Positions::Indices(own.clone()), zero.clone())
            .capture(HookPoint::ResidPost(25));
        let unembed = Unembed::From(shared);
        let whole = m
            .transformer
            .forward_shared(&ids, shared, &edits, unembed)
            .unwrap();
        let resumed = m
            .transformer
            .forward_shared_from(
                &ids,
                shared,
                start,
                &clean.captures[&start],
                &edits,
                unembed,
            )
            .unwrap();
        assert_eq!(whole.layout, resumed.layout);
        let h = HookPoint::ResidPost(25);
        for (r, len) in whole.layout.lengths.iter().enumerate() {
            let cut = |t: &Tensor, n| t.get(r).unwrap().narrow(0, 0, n).unwrap();
            let (a, b) = (
                whole.logits.as_ref().unwrap(),
                resumed.logits.as_ref().unwrap(),
            );
            let e = rel_err(&cut(b, len - shared), &cut(a, len - shared));
            assert!(
                e <= TOL,
                "from `{start}`, prompt {r}: logits' relative error {e}"
            );
            let e = rel_err(
                &cut(&resumed.captures[&h], *len),
                &cut(&whole.captures[&h], *len),
            );
            assert!(
                e <= TOL,
                "from `{start}`, prompt {r}: capture's relative error {e}"
            );
        }
        let moved = rel_err(
            &clean.logits.as_ref().unwrap().narrow(1, shared, 1).unwrap(),
            &resumed.logits.as_ref().unwrap().narrow(1, 0, 1).unwrap(),
        );
        assert!(moved > 1e-3, "zeroing `{start}` changed nothing ({moved})");
    }
}

/// A start computed once for many micro-batches gives each the bits the shared pass gives
/// them, at the start's positions and their own: under edits of every position (an ablated
/// direction, a replacement of each position alone), and resumed at a hook after a start
/// computed without the edits that leave it alone. A start does not run prompts it does not
/// begin, nor edits of every position it was computed without.
#[test]
fn a_start_computed_once_gives_each_micro_batch_the_shared_passs_bits() {
    let m = model();
    let t = &m.transformer;
    let (ids, shared) = prompts(&m);
    let d = t.config.d_model;
    let dir = Tensor::ones(d, candle_core::DType::F32, t.device()).unwrap();
    let halve: probes::hooks::ReplaceFn = std::sync::Arc::new(|x: &Tensor| x * 0.5);
    let edits = Hooks::new()
        .ablate(HookPoint::ResidPost(3), Positions::All, dir)
        .replace_each(HookPoint::MlpOut(7), Positions::All, halve.clone());
    assert!(t.can_share(&ids, shared, &edits));
    let whole_batch_fn = Hooks::new().replace(HookPoint::MlpOut(7), Positions::All, halve);
    assert!(!t.can_share(&ids, shared, &whole_batch_fn));

    let start = t
        .shared_start(&ids, shared, &edits, Unembed::All)
        .unwrap()
        .expect("the prompts share their preamble");
    assert_eq!(start.len(), shared);
    let chunk = &ids[1..4];
    let after = t
        .forward_after(&start, chunk, &edits, Unembed::All)
        .unwrap();
    let whole = t
        .forward_shared(chunk, shared, &edits, Unembed::All)
        .unwrap();
    let (a, w) = (after.logits.unwrap(), whole.logits.unwrap());
    for (r, p) in chunk.iter().enumerate() {
        let own = p.len() - shared;
        let row = w.get(r).unwrap();
        assert_eq!(
            bits(&a.get(r).unwrap().narrow(0, 0, own).unwrap()),
            bits(&row.narrow(0, shared, own).unwrap()),
            "prompt {r}: own positions"
        );
        assert_eq!(
            bits(&start.logits().unwrap().get(0).unwrap()),
            bits(&row.narrow(0, 0, shared).unwrap()),
            "prompt {r}: the start's positions"
        );
    }

    // Resumed at a hook, after a start computed without the edits, which leave it alone.
    let at = HookPoint::ResidPost(11);
    let longest = ids.iter().map(Vec::len).max().unwrap();
    let own: Vec<i64> = (shared as i64..longest as i64).collect();
    let zero: probes::hooks::ReplaceFn = std::sync::Arc::new(|x: &Tensor| x.zeros_like());
    let later = Hooks::new().replace(at, Positions::Indices(own), zero);
    let unembed = Unembed::From(shared);
    let clean = t
        .forward_shared(&ids, shared, &Hooks::new().capture(at), Unembed::All)
        .unwrap();
    let x = &clean.captures[&at];
    let plain = t
        .shared_start(&ids, shared, &Hooks::new(), unembed)
        .unwrap()
        .unwrap();
    let resumed = t
        .forward_from_after(&plain, &ids, at, x, &later, unembed)
        .unwrap();
    let reference = t
        .forward_shared_from(&ids, shared, at, x, &later, unembed)
        .unwrap();
    assert_eq!(
        bits(resumed.logits.as_ref().unwrap()),
        bits(reference.logits.as_ref().unwrap())
    );

    assert!(t.forward_after(&plain, &ids, &edits, Unembed::All).is_err());
    let other = vec![vec![1u32; shared + 3]];
    assert!(t
        .forward_after(&plain, &other, &Hooks::new(), unembed)
        .is_err());
}
