//! Gradients at hook points against central finite differences: on tiny random Qwen2 (RoPE,
//! RMSNorm, grouped-query attention, q/k/v biases) and GPT-2 (LayerNorm, learned positions)
//! models converted to f64, every hook's gradient equals, element by element, the finite
//! difference of the metric to 1e-3 relative. Per-head contributions sum to the attention
//! output, and the differentiable pass computes the same logits as the fast one.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor, D};
use common::*;
use probes::{BatchLayout, HookPoint, Hooks, Padding, Positions, Transformer, Unembed};

/// Left-padded prompts of two lengths, so that padding is exercised.
fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 17, 42, 5, 63], vec![1, 88, 9]]
}

/// A logit difference plus a log-probability at each prompt's last token: linear and
/// non-linear in the logits.
fn metric(last: &Tensor, _: &BatchLayout) -> candle_core::Result<Tensor> {
    let diff = (last.i((.., 7))? - last.i((.., 11))?)?;
    let logp = candle_nn::ops::log_softmax(last, D::Minus1)?.i((.., 7))?;
    (diff + (logp * 0.5)?)?.sum_all()
}

fn metric_at(t: &Transformer, hooks: &Hooks) -> f64 {
    t.gradients(&prompts(), hooks, &BTreeSet::new(), &metric)
        .unwrap()
        .metric
}

/// Every hook's gradient, element by element, against `(M(x + h e) - M(x - h e)) / 2h`.
fn check_every_hook(t: &Transformer) {
    let points: BTreeSet<HookPoint> = HookPoint::all(t.config.n_layers).into_iter().collect();
    let g = t
        .gradients(&prompts(), &Hooks::new(), &points, &metric)
        .unwrap();
    assert_eq!(g.grads.len(), points.len());
    let h = 1e-5;
    for (point, grad) in &g.grads {
        let shape = grad.dims().to_vec();
        let flat: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        assert!(flat.iter().any(|v| *v != 0.0), "{point}: gradient all zero");
        // Every fifth element (coprime with every width here, so every position and every
        // feature is reached) keeps the test to seconds.
        for (i, &gi) in flat.iter().enumerate().step_by(5) {
            let nudged = |sign: f64| {
                let mut e = vec![0f64; flat.len()];
                e[i] = sign * h;
                let e = Tensor::from_vec(e, shape.as_slice(), t.device()).unwrap();
                let f: probes::hooks::ReplaceFn = Arc::new(move |x: &Tensor| x + &e);
                metric_at(t, &Hooks::new().replace(*point, Positions::All, f))
            };
            let fd = (nudged(1.0) - nudged(-1.0)) / (2.0 * h);
            assert!(
                (fd - gi).abs() <= 1e-3 * gi.abs().max(fd.abs()) + 1e-9,
                "{point} element {i}: gradient {gi}, finite difference {fd}"
            );
        }
    }
}

#[test]
fn every_hook_gradient_equals_finite_differences_qwen2() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "Qwen2ForCausalLM", 71));
    check_every_hook(&m.transformer.to_dtype(DType::F64).unwrap());
}

#[test]
fn every_hook_gradient_equals_finite_differences_gpt2() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&gpt2_dir(tmp.path(), 72));
    check_every_hook(&m.transformer.to_dtype(DType::F64).unwrap());
}

#[test]
fn differentiable_pass_computes_the_fast_pass_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "Qwen2ForCausalLM", 73));
    let t = &m.transformer;
    let fast = t
        .forward(&prompts(), Padding::Left, &Hooks::new(), Unembed::Last)
        .unwrap()
        .logits
        .unwrap();
    let g = t
        .gradients(&prompts(), &Hooks::new(), &BTreeSet::new(), &metric)
        .unwrap();
    assert!(
        rel_err(&fast, &g.logits) < 1e-5,
        "{}",
        rel_err(&fast, &g.logits)
    );
}

#[test]
fn head_results_sum_to_the_attention_output() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "Qwen2ForCausalLM", 74));
    let t = &m.transformer;
    for l in 0..LAYERS {
        let hooks = Hooks::new()
            .capture(HookPoint::ResidPre(l))
            .capture(HookPoint::AttnPattern(l))
            .capture(HookPoint::AttnOut(l));
        let out = t
            .forward(&prompts(), Padding::Left, &hooks, Unembed::None)
            .unwrap();
        let c = |h| out.captures[&h].clone();
        let heads = t
            .head_results(l, &c(HookPoint::ResidPre(l)), &c(HookPoint::AttnPattern(l)))
            .unwrap();
        assert_eq!(heads.dims(), [2, 5, HEADS, D]);
        // The output projection has no bias in these checkpoints.
        let summed = heads.sum(2).unwrap();
        let err = rel_err(&summed, &c(HookPoint::AttnOut(l)));
        assert!(err < 1e-5, "layer {l}: {err}");
    }
}
