//! SAE training on a tiny model: it learns, it is deterministic, it resumes to the same
//! weights, its SAELens output loads and evaluates, and bad settings are refused.

mod common;

use std::sync::Arc;

use common::*;
use probes::sae::train::{train, train_within, windows, Sparsity, TrainConfig};

fn corpus() -> Vec<String> {
    let mut r = Rand::new(17);
    (0..40)
        .map(|_| {
            r.tokens(70)
                .iter()
                .map(|t| format!("w{t}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn config(tokens: u64) -> TrainConfig {
    TrainConfig {
        hook: "blocks.1.hook_resid_post".into(),
        latents: 256,
        k: 8,
        sparsity: Sparsity::TopK,
        tokens,
        context: 16,
        windows_per_step: 8,
        lr: 4e-3,
        seed: 3,
        dead_after_tokens: 2_000,
        checkpoint_every_steps: 5,
        window_shifts: 1,
        reshuffle_epochs: false,
    }
}

/// A progress callback that stops training after `step`.
fn interrupt_at(
    step: u64,
) -> impl FnMut(&probes::sae::train::Progress) -> std::ops::ControlFlow<()> {
    move |p| {
        if p.step == step {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    }
}

fn weights(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("sae_weights.safetensors")).unwrap()
}

#[test]
fn training_learns_saves_saelens_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 31));
    let out = tmp.path().join("sae");
    let (mut fvus, mut cached) = (Vec::new(), Vec::new());
    let last = train(&m, &corpus(), &config(6_000), &out, |p| {
        match p.caching {
            Some(done_of) => cached.push(done_of),
            None => fvus.push(p.fvu),
        }
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    // The corpus is shorter than the run, so its activations were computed once, first,
    // and the progress said so before any step.
    let (done, total) = *cached
        .last()
        .expect("no progress while caching activations");
    assert_eq!(done, total);
    assert!(cached.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(
        fvus[0] > last.fvu * 1.5,
        "FVU went from {} to {}",
        fvus[0],
        last.fvu
    );
    assert!((last.l0 - 8.0).abs() < 1e-6);
    let sae = Arc::new(probes::sae::load_sae(&out).unwrap());
    assert_eq!(
        (sae.d_in, sae.d_sae, sae.hook.as_deref()),
        (D, 256, Some("blocks.1.hook_resid_post"))
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "topk");
    assert_eq!(cfg["k"], 8);
    let hook = sae
        .check_fits("blocks.1.hook_resid_post", LAYERS, D)
        .unwrap();
    let wins = windows(&m, &corpus(), 16, 99).unwrap();
    let r = probes::sae::eval::evaluate(&m, &sae, hook, &wins[..16], 4).unwrap();
    // The saved (scale-folded) SAE reconstructs as well as training reported.
    assert!(
        (r.fvu - f64::from(last.fvu)).abs() < 0.25,
        "eval FVU {} vs training {}",
        r.fvu,
        last.fvu
    );
    assert!(r.l0 <= 8.0 + 1e-9);
    assert!(r.ce_loss_recovered.is_finite() && r.kl_sae >= 0.0);
    assert!(r.ce_zero_ablation.is_finite() && r.ce_clean.is_finite());

    // Windows of different lengths share padded micro-batches: the padding must not leak
    // into any figure, whatever the batching (one window per batch has none).
    let mixed: Vec<Vec<u32>> = wins[..12]
        .iter()
        .enumerate()
        .map(|(i, w)| w[..w.len() - i % 5].to_vec())
        .collect();
    let together = probes::sae::eval::evaluate_from(&m, &sae, hook, &mixed, 2, 6).unwrap();
    let alone = probes::sae::eval::evaluate_from(&m, &sae, hook, &mixed, 2, 1).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-3);
    assert_eq!(
        (together.tokens, together.sink_tokens, together.dead_latents),
        (alone.tokens, alone.sink_tokens, alone.dead_latents)
    );
    for (what, a, b) in [
        ("l0", together.l0, alone.l0),
        ("fvu", together.fvu, alone.fvu),
        ("ce clean", together.ce_clean, alone.ce_clean),
        ("ce sae", together.ce_sae, alone.ce_sae),
        ("ce zero", together.ce_zero_ablation, alone.ce_zero_ablation),
        ("kl", together.kl_sae, alone.kl_sae),
    ] {
        assert!(
            close(a, b),
            "{what}: {a} in padded batches, {b} one window at a time"
        );
    }

    // Given the windows' activations at the hook, the clean pass starts there: the same
    // report, figure for figure.
    let acts: Vec<candle_core::Tensor> = mixed
        .iter()
        .map(|w| {
            let hooks = probes::Hooks::new().capture(hook);
            let out = m
                .transformer
                .forward(
                    std::slice::from_ref(w),
                    probes::Padding::Right,
                    &hooks,
                    probes::Unembed::None,
                )
                .unwrap();
            out.captures[&hook].get(0).unwrap()
        })
        .collect();
    let resumed =
        probes::sae::eval::evaluate_captured(&m, &sae, hook, &mixed, &acts, 2, 6).unwrap();
    assert_eq!(
        serde_json::to_string(&resumed).unwrap(),
        serde_json::to_string(&together).unwrap()
    );
    let e = probes::sae::eval::evaluate_captured(&m, &sae, hook, &mixed, &acts[1..], 2, 6);
    assert!(e.unwrap_err().to_string().contains("captured activations"));
}

#[test]
fn batchtopk_trains_and_saves_a_jumprelu_sae_with_k_active_on_average() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 34));
    let out = tmp.path().join("sae");
    let cfg = TrainConfig {
        sparsity: Sparsity::BatchTopK,
        ..config(6_000)
    };
    let mut fvus = Vec::new();
    let last = train(&m, &corpus(), &cfg, &out, |p| {
        if p.caching.is_none() {
            fvus.push(p.fvu);
        }
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert!(fvus[0] > last.fvu * 1.5, "FVU {} -> {}", fvus[0], last.fvu);
    // The batch keeps k per token on average (ties at the cut aside).
    assert!((last.l0 - 8.0).abs() < 0.1, "training L0 {}", last.l0);
    let cfg_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architecture"], "jumprelu");
    assert!(cfg_json.get("k").is_none(), "jumprelu configs carry no k");
    assert_eq!(cfg_json["metadata"]["trained_sparsity"], "batchtopk");
    let sae = Arc::new(probes::sae::load_sae(&out).unwrap());
    let th = sae.threshold.as_ref().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(th.len(), 256);
    assert!(
        th[0] > 0.0 && th.iter().all(|t| *t == th[0]),
        "one threshold"
    );
    // Inference thresholds at the running cut: about k active per token on new windows.
    let hook = sae
        .check_fits("blocks.1.hook_resid_post", LAYERS, D)
        .unwrap();
    let wins = windows(&m, &corpus(), 16, 99).unwrap();
    let r = probes::sae::eval::evaluate(&m, &sae, hook, &wins[..16], 4).unwrap();
    assert!((4.0..=16.0).contains(&r.l0), "eval L0 {}", r.l0);
    assert!(
        (r.fvu - f64::from(last.fvu)).abs() < 0.25,
        "eval FVU {} vs training {}",
        r.fvu,
        last.fvu
    );
}

/// A training step splits its work across threads; the sums run in a fixed order, so the
/// weights do not depend on how many threads there are.
#[test]
fn training_gives_the_same_weights_on_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 35));
    let go = |_: &probes::sae::train::Progress| std::ops::ControlFlow::Continue(());
    let run = |threads: usize, sparsity: Sparsity, dir: &str| {
        let out = tmp.path().join(dir);
        let cfg = TrainConfig {
            sparsity,
            ..config(2_400)
        };
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| train(&m, &corpus(), &cfg, &out, go).unwrap());
        weights(&out)
    };
    for sparsity in [Sparsity::TopK, Sparsity::BatchTopK] {
        assert_eq!(
            run(1, sparsity, &format!("{sparsity:?}-1")),
            run(3, sparsity, &format!("{sparsity:?}-3")),
            "{sparsity:?}: 1 and 3 threads trained different weights"
        );
    }
}

#[test]
fn training_is_deterministic_and_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 32));
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let go = |_: &probes::sae::train::Progress| std::ops::ControlFlow::Continue(());
    train(&m, &corpus(), &config(2_400), &a, go).unwrap();
    train(&m, &corpus(), &config(2_400), &b, go).unwrap();
    assert_eq!(weights(&a), weights(&b), "same seed, different weights");

    // Interrupt at step 7 (a checkpoint is written), then resume to the end.
    let c = tmp.path().join("c");
    let e = train(&m, &corpus(), &config(2_400), &c, interrupt_at(7)).unwrap_err();
    assert!(e.to_string().contains("interrupted at step 7"), "{e}");
    assert!(!c.join("sae_weights.safetensors").exists());
    let mut first_step = None;
    train(&m, &corpus(), &config(2_400), &c, |p| {
        first_step.get_or_insert(p.step);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(first_step, Some(8), "did not resume from the checkpoint");
    assert_eq!(
        weights(&a),
        weights(&c),
        "resumed run differs from an uninterrupted one"
    );

    // Several epochs over the corpus train from activations computed once and kept in
    // memory; a run resumed in a later epoch rebuilds them and ends with the same weights,
    // with two window grids and a new order in each epoch.
    let epochs = TrainConfig {
        window_shifts: 2,
        reshuffle_epochs: true,
        ..config(8_000)
    };
    let (f, g) = (tmp.path().join("f"), tmp.path().join("g"));
    train(&m, &corpus(), &epochs, &f, go).unwrap();
    let e = train(&m, &corpus(), &epochs, &g, interrupt_at(40)).unwrap_err();
    assert!(e.to_string().contains("interrupted at step 40"), "{e}");
    train(&m, &corpus(), &epochs, &g, go).unwrap();
    assert_eq!(
        weights(&f),
        weights(&g),
        "a run resumed after its first epoch differs from an uninterrupted one"
    );
    // With no memory for the activations, every step runs the model again: slower, but the
    // same weights, so a memory bound never changes what is learned.
    let h = tmp.path().join("h");
    train_within(&m, &corpus(), &epochs, &h, 0, go).unwrap();
    assert_eq!(
        weights(&f),
        weights(&h),
        "streaming the activations learned other weights than keeping them in memory"
    );

    // A different configuration refuses the old checkpoint.
    let other = TrainConfig {
        k: 4,
        ..config(2_400)
    };
    let e = train(&m, &corpus(), &other, &c, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("different settings"), "{e}");
}

#[test]
fn bad_training_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load(&llama_dir(tmp.path(), "LlamaForCausalLM", 33));
    let go = |_: &probes::sae::train::Progress| std::ops::ControlFlow::Continue(());
    let e = train(&m, &[], &config(100), &tmp.path().join("x"), go).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = train(
        &m,
        &corpus(),
        &TrainConfig {
            k: 300,
            ..config(100)
        },
        &tmp.path().join("y"),
        go,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = train(
        &m,
        &corpus(),
        &TrainConfig {
            hook: "blocks.9.hook_resid_post".into(),
            ..config(100)
        },
        &tmp.path().join("z"),
        go,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown hook"), "{e}");
    let e = train(
        &m,
        &corpus(),
        &TrainConfig {
            window_shifts: 0,
            ..config(100)
        },
        &tmp.path().join("w"),
        go,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`window_shifts`"), "{e}");
    // A red team's: a NaN or infinite learning rate saved an SAE of NaN and reported its
    // fit; a terabyte of latents or 2^64 windows per step aborted or panicked.
    for (cfg, field) in [
        (
            TrainConfig {
                lr: f64::NAN,
                ..config(100)
            },
            "`lr`",
        ),
        (
            TrainConfig {
                lr: f64::INFINITY,
                ..config(100)
            },
            "`lr`",
        ),
        (
            TrainConfig {
                latents: 1 << 40,
                ..config(100)
            },
            "`latents`",
        ),
        (
            TrainConfig {
                windows_per_step: usize::MAX,
                ..config(100)
            },
            "`windows_per_step`",
        ),
    ] {
        let out = tmp.path().join("v");
        let e = train(&m, &corpus(), &cfg, &out, go).unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
        assert!(!out.exists(), "{field}: nothing is written");
    }
    let e = probes::sae::train::windows(&m, &corpus(), 0, 0).unwrap_err();
    assert!(e.to_string().contains("`context`"), "{e}");
}

/// SmolLM2's layer-15 residual has attention sinks besides a sequence's first token: after
/// "\n\n" at the start, the second newline's norm is over a hundred times an ordinary
/// token's. Training skips such rows and evaluation leaves them unscored; this checks the
/// detector finds exactly them on the real model.
#[test]
fn attention_sinks_of_the_default_model_are_detected() {
    use probes::{HookPoint, Hooks, Padding, Unembed};
    let m = load(&default_model_path());
    let hook = HookPoint::ResidPost(15);
    let text = "The harbour was quiet before sunrise, and gulls stood on the wet stones.";
    let plain = m.codec.encode(text).unwrap();
    let newlines = m.codec.encode(&format!("\n\n{text}")).unwrap();
    assert_eq!(newlines.len(), plain.len() + 2, "{newlines:?}");
    let out = m
        .transformer
        .forward(
            &[plain.clone(), newlines[..plain.len()].to_vec()],
            Padding::Right,
            &Hooks::new().capture(hook),
            Unembed::None,
        )
        .unwrap();
    let d = m.config().d_model;
    let rows = |r: usize| -> Vec<f32> {
        // Every position but the first, which is always a sink (and always skipped).
        let act = out.captures[&hook].get(r).unwrap();
        act.narrow(0, 1, plain.len() - 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let sinks = probes::sae::sink_rows(&rows(0), d);
    assert!(!sinks.contains(&true), "ordinary text has no sinks");
    let sinks = probes::sae::sink_rows(&rows(1), d);
    let found: Vec<usize> = (0..sinks.len())
        .filter(|&i| sinks[i])
        .map(|i| i + 1)
        .collect();
    assert_eq!(
        found,
        [1],
        "the second newline (position 1) is the only sink"
    );
}
