//! `attribution_patching` on the real default model, end to end: on pairs that swap the
//! country of a capital, the top 20 components' attribution estimates correlate with real
//! activation patching at >= 0.8 (the figure is printed and recorded in
//! docs/lab/attribution-patching.md), two runs are byte-identical whatever the thread count,
//! and a metric token that is not one token is an `error` finding naming the policy file, line
//! and check. With the default SAE named, its latents are components too, patched by their
//! decoder contribution.

use e2e::*;

const CLEAN: &str =
    "The capital of France is\nThe capital city of France is\nFrance has its capital in\n";
const CORRUPTED: &str =
    "The capital of Italy is\nThe capital city of Italy is\nItaly has its capital in\n";

fn write_policy(dir: &std::path::Path, tokens: &str) -> String {
    write_policy_with(dir, tokens, "")
}

/// The capitals policy, with `fields` added to its check.
fn write_policy_with(dir: &std::path::Path, tokens: &str, fields: &str) -> String {
    std::fs::write(dir.join("clean.txt"), CLEAN).unwrap();
    std::fs::write(dir.join("corrupted.txt"), CORRUPTED).unwrap();
    let path = dir.join("capitals.toml");
    std::fs::write(
        &path,
        format!(
            "schema = 1\nname = \"capitals\"\nversion = \"1\"\n\n[prompts.clean]\nfile = \"clean.txt\"\nchat = false\n\n[prompts.corrupted]\nfile = \"corrupted.txt\"\nchat = false\n\n[[checks]]\nid = \"paris\"\nkind = \"attribution_patching\"\nseverity = \"high\"\nclean = \"clean\"\ncorrupted = \"corrupted\"\nmetric = \"logit_diff\"\ntokens = {tokens}\ntop_k = 20\nmin_correlation = 0.8\nmin_top_effect = 0.5\n{fields}"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn attribution_estimates_track_real_patching_on_the_default_model() {
    let model = default_model();
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = write_policy(tmp.path(), "[\" Paris\", \" Rome\"]");
    let run = || {
        mechwatch(&[
            "check", "--model", model, "--policy", &policy, "--format", "json", "-q",
        ])
    };
    let first = run();
    let r: serde_json::Value = serde_json::from_slice(&first.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&first)));
    let f = &r["policies"][0]["findings"][0];
    let metric = |prefix: &str| {
        f["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no metric {prefix} in {f}"))["value"]
            .as_f64()
            .unwrap()
    };
    let pearson = metric("pearson");
    eprintln!(
        "default model, top-20 Pearson {pearson}, Spearman {}, logit diff clean {} corrupted {}",
        metric("spearman"),
        metric("logit difference on clean"),
        metric("logit difference on corrupted")
    );
    assert_eq!(first.status.code(), Some(0), "{f}");
    assert_eq!(f["status"], "pass", "{f}");
    assert!(pearson >= 0.8, "{f}");
    // The clean prompts prefer Paris far more than the corrupted ones.
    assert!(
        metric("logit difference on clean") > metric("logit difference on corrupted") + 1.0,
        "{f}"
    );
    let components = f["evidence"]["components"].as_array().unwrap();
    assert_eq!(components.len(), 20, "{f}");
    let map = &f["evidence"]["attribution_map"];
    assert_eq!(map["rows"].as_array().unwrap().len(), 30, "{f}");
    // Byte-identical whatever the thread count: the second run uses one thread.
    let second = mechwatch_with_env(
        &[
            "check", "--model", model, "--policy", &policy, "--format", "json", "-q",
        ],
        &[("RAYON_NUM_THREADS", "1")],
    );
    assert!(
        first.stdout == second.stdout,
        "a run on one thread differs from a run on every core"
    );

    let policy = write_policy(tmp.path(), "[\" Paris France\", \" Rome\"]");
    let o = mechwatch(&[
        "check", "--model", model, "--policy", &policy, "--format", "json", "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = &r["policies"][0]["findings"][0];
    assert_eq!(f["status"], "error", "{f}");
    let e = f["explanation"].as_str().unwrap();
    assert!(
        e.contains("capitals.toml:20:")
            && e.contains("check `paris`")
            && e.contains("\" Paris France\" is"),
        "{e}"
    );
}

#[test]
fn sae_latents_are_components_patched_by_their_decoder_contribution() {
    let model = default_model();
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let policy = write_policy_with(
        tmp.path(),
        "[\" Paris\", \" Rome\"]",
        "components = [\"mlp\"]\nsae = \"default\"\n\n[saes.default]\nbuiltin = \"default\"\n",
    );
    let o = mechwatch(&[
        "check", "--model", model, "--policy", &policy, "--format", "json", "-q",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&o)));
    let f = &r["policies"][0]["findings"][0];
    assert_eq!(f["status"], "pass", "{f}");
    let components = f["evidence"]["components"].as_array().unwrap();
    let latents: Vec<&serde_json::Value> = components
        .iter()
        .filter(|c| {
            c["component"]
                .as_str()
                .unwrap()
                .starts_with("blocks.11.hook_resid_post.hook_sae_acts_post[")
        })
        .collect();
    eprintln!(
        "default model, MLPs and default-SAE latents: {} latents in the top 20; {}",
        latents.len(),
        f["explanation"]
    );
    assert!(!latents.is_empty(), "{f}");
    // Patching a latent moves the logit difference: its decoder contribution is real.
    assert!(
        latents
            .iter()
            .any(|c| c["effect"].as_f64().unwrap().abs() > 0.1),
        "{f}"
    );
}
