//! `mechwatch lens` on the default model: the table, `--json` (byte-identical across runs,
//! ending in the model's own prediction), and bad input refused with exit 2 and a message
//! that says what is wrong.

use e2e::*;

fn lens(args: &[&str]) -> std::process::Output {
    let model = default_model();
    let mut all = vec!["lens", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    mechwatch(&all)
}

#[test]
fn the_table_shows_every_layer_with_its_top_tokens_and_the_target() {
    let o = lens(&[
        "--prompt",
        "The capital of France is",
        "--raw",
        "--top",
        "3",
        "--token",
        " Paris",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("position 4 of 5") && lines[0].contains("\" is\""),
        "{out}"
    );
    assert!(
        lines[1].starts_with("layer") && lines[1].contains("#3"),
        "{out}"
    );
    assert!(lines[1].contains("\" Paris\" rank, p"), "{out}");
    // The embedding, then the default model's 30 blocks.
    assert_eq!(lines.len(), 2 + 31, "{out}");
    assert!(lines[2].starts_with("embed "), "{out}");
    assert!(lines[32].starts_with("29 "), "{out}");
    // SmolLM2 predicts " Paris" at the last layer: rank 1 there.
    assert!(
        lines[32].contains("\" Paris\" ") && lines[32].trim_end().contains(" 1 "),
        "{out}"
    );
}

#[test]
fn json_is_byte_identical_across_runs_and_ends_in_the_models_prediction() {
    let args = ["--prompt", "How do I pick a lock?", "--top", "4", "--json"];
    let a = lens(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = lens(&args);
    assert_eq!(a.stdout, b.stdout, "two runs differ");
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    assert_eq!(v["chat"], true);
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(v["position"], tokens.len() - 1);
    assert!(
        tokens.iter().any(|t| t == "<|im_start|>"),
        "templated: {tokens:?}"
    );
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 31);
    assert_eq!(layers[0]["hook"], "blocks.0.hook_resid_pre");
    assert_eq!(layers[30]["hook"], "blocks.29.hook_resid_post");
    for l in layers {
        let top = l["top"].as_array().unwrap();
        assert_eq!(top.len(), 4);
        let probs: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
        assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
    }
    // The last layer's top token is the greedy continuation of the prompt.
    let first = layers[30]["top"][0]["token"].as_str().unwrap().to_string();
    let g = mechwatch(&[
        "generate",
        "--model",
        default_model().to_str().unwrap(),
        "--chat",
        "--prompt",
        "How do I pick a lock?",
        "--max-tokens",
        "1",
    ]);
    assert!(g.status.success(), "{}", stderr(&g));
    assert_eq!(
        stdout(&g).trim_end_matches('\n'),
        first.trim_end_matches('\n')
    );
}

#[test]
fn bad_lens_input_is_refused_with_exit_2_and_a_clear_message() {
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--prompt", "Hello", "--raw", "--position", "40"],
            &["position 40", "tokens"],
        ),
        (
            &["--prompt", "Hello", "--position", "-1000"],
            &["position -1000"],
        ),
        (&["--prompt", ""], &["--prompt is empty"]),
        (
            &["--prompt", "Hello", "--token", "xq zzv unfindable"],
            &["--token", "not one token"],
        ),
        (&["--prompt", "Hello", "--top", "0"], &["--top 0"]),
    ];
    for (args, needles) in cases {
        let o = lens(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(o.stdout.is_empty(), "{args:?} printed: {}", stdout(&o));
    }
}
