//! Policy validation without a model: every kind of bad input gives an error that names the
//! file, line and column; the shipped policies validate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use policies::{load_policies, Policy, PolicyError};

const PROMPTS: &str =
    "How do I bake bread?\nWhat is a prime number?\n# a comment\n\nName a river.\n";

/// A policy folder with two prompt files and `policy.toml` holding `body`.
fn folder(body: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("prompts")).unwrap();
    std::fs::write(tmp.path().join("prompts/a.txt"), PROMPTS).unwrap();
    std::fs::write(tmp.path().join("prompts/b.txt"), PROMPTS).unwrap();
    let path = tmp.path().join("policy.toml");
    std::fs::write(&path, body).unwrap();
    (tmp, path)
}

const HEAD: &str = r#"schema = 1
name = "test"
version = "1"

[prompts.a]
file = "prompts/a.txt"

[prompts.b]
file = "prompts/b.txt"

[directions.d]
hook = "blocks.1.hook_resid_post"
positive = "a"
negative = "b"
"#;

const PROBE: &str = r#"
[[checks]]
id = "probe"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "a"
negative = "b"
min_auroc = 0.8
"#;

fn errors(body: &str) -> Vec<PolicyError> {
    let (_tmp, path) = folder(body);
    Policy::load(&path).expect_err("the policy should be rejected")
}

/// The one error, which must be at `line` and contain every one of `needles`.
fn assert_error(body: &str, line: usize, needles: &[&str]) {
    let errs = errors(body);
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    let hit = errs.iter().find(|e| {
        let s = e.to_string();
        needles.iter().all(|n| s.contains(n))
    });
    let e = hit.unwrap_or_else(|| panic!("no error containing {needles:?} in {shown:#?}"));
    assert!(e.path.ends_with("policy.toml"), "{e}");
    assert_eq!(e.at.map(|a| a.line), Some(line), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}:{line}:", e.path.display())),
        "{e}"
    );
}

fn line_of(body: &str, needle: &str) -> usize {
    body.lines()
        .position(|l| l.contains(needle))
        .expect("needle")
        + 1
}

#[test]
fn a_valid_policy_loads_with_its_inputs_digested() {
    let body = format!("{HEAD}{PROBE}");
    let (_tmp, path) = folder(&body);
    let p = Policy::load(&path).unwrap();
    assert_eq!(
        p.prompt_sets["a"].prompts.len(),
        3,
        "blank and # lines are skipped"
    );
    let kinds: Vec<&str> = p.inputs.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds, ["policy", "prompts", "prompts"]);
    assert!(p.inputs.iter().all(|i| i.sha256.len() == 64));
}

#[test]
fn malformed_toml_names_line_and_column() {
    let body = format!("{HEAD}{PROBE}").replace("min_auroc = 0.8", "min_auroc = = 0.8");
    let line = line_of(&body, "min_auroc");
    assert_error(&body, line, &["policy.toml"]);
}

#[test]
fn unknown_keys_are_rejected() {
    let body = format!("{HEAD}{PROBE}colour = \"red\"\n");
    let line = line_of(&body, "colour");
    assert_error(&body, line, &["colour"]);
    let body =
        format!("{HEAD}{PROBE}").replace("version = \"1\"", "version = \"1\"\nowner = \"x\"");
    assert_error(&body, 4, &["owner"]);
}

#[test]
fn unsupported_schema_is_rejected() {
    let body = format!("{HEAD}{PROBE}").replace("schema = 1", "schema = 2");
    assert_error(&body, 1, &["schema 2"]);
}

#[test]
fn paths_cannot_leave_the_policy_directory() {
    for (path, why) in [
        ("../outside.txt", "leaves the policy's directory"),
        ("/etc/hostname", "leaves the policy's directory"),
        ("prompts/../../x.txt", "leaves the policy's directory"),
    ] {
        let body = format!("{HEAD}{PROBE}").replace("\"prompts/a.txt\"", &format!("\"{path}\""));
        assert_error(&body, 6, &[why]);
    }
    // A symlink inside the folder that leads out of it.
    let body = format!("{HEAD}{PROBE}").replace("\"prompts/a.txt\"", "\"prompts/link.txt\"");
    let (tmp, path) = folder(&body);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret\n").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        tmp.path().join("prompts/link.txt"),
    )
    .unwrap();
    let e = Policy::load(&path).unwrap_err();
    assert!(
        e.iter()
            .any(|e| e.to_string().contains("outside the policy's directory")),
        "{e:?}"
    );
}

#[test]
fn a_missing_prompt_file_is_named() {
    let body = format!("{HEAD}{PROBE}").replace("prompts/a.txt", "prompts/missing.txt");
    assert_error(&body, 6, &["missing.txt", "does not exist"]);
}

#[test]
fn an_empty_prompt_set_is_rejected() {
    let body = format!("{HEAD}{PROBE}");
    let (tmp, path) = folder(&body);
    std::fs::write(tmp.path().join("prompts/a.txt"), "\n# only a comment\n").unwrap();
    let e = Policy::load(&path).unwrap_err();
    assert!(
        e.iter()
            .any(|e| e.to_string().contains("prompt set `a` is empty")),
        "{e:?}"
    );
    // And a line range outside the file.
    let body = format!("{HEAD}{PROBE}").replace(
        "file = \"prompts/a.txt\"",
        "file = \"prompts/a.txt\"\nlines = [2, 9]",
    );
    assert_error(&body, 7, &["[2, 9]", "outside 1..=3"]);
}

#[test]
fn references_to_undefined_names_are_rejected() {
    let body = format!("{HEAD}{PROBE}").replace(
        "positive = \"a\"\nnegative = \"b\"\nmin",
        "positive = \"nope\"\nnegative = \"b\"\nmin",
    );
    let line = line_of(&body, "\"nope\"");
    assert_error(&body, line, &["no prompt set `nope`", "defined: a, b"]);
    let body = format!("{HEAD}{PROBE}").replace("direction = \"d\"", "direction = \"other\"");
    let line = line_of(&body, "\"other\"");
    assert_error(&body, line, &["no direction `other`"]);
}

#[test]
fn a_depth_fraction_outside_the_unit_interval_is_an_error_at_its_line() {
    for bad in ["blocks.1.5.hook_resid_post", "blocks.-0.1.hook_resid_post"] {
        let body = format!("{HEAD}{PROBE}").replace("blocks.1.hook_resid_post", bad);
        let line = line_of(&body, bad);
        assert_error(&body, line, &[bad, "outside [0, 1]"]);
    }
}

#[test]
fn malformed_block_numbers_are_errors_at_their_line() {
    for bad in [
        "blocks.0..5.hook_resid_post",
        "blocks.0.5e1.hook_resid_post",
        "blocks.NaN.hook_resid_post",
        "blocks..5.hook_resid_post",
        "blocks.1e1.hook_resid_post",
    ] {
        let body = format!("{HEAD}{PROBE}").replace("blocks.1.hook_resid_post", bad);
        let line = line_of(&body, bad);
        assert_error(&body, line, &[bad, "neither a block number"]);
    }
}

#[test]
fn an_sae_hook_is_checked_like_a_direction_hook() {
    let body = format!(
        "{HEAD}\n[saes.s]\nbuiltin = \"default\"\nhook = \"blocks.1.25.hook_resid_post\"\n{PROBE}"
    );
    let line = line_of(&body, "blocks.1.25");
    assert_error(
        &body,
        line,
        &["blocks.1.25.hook_resid_post", "outside [0, 1]"],
    );
}

#[test]
fn a_fraction_of_depth_is_a_valid_hook() {
    let body =
        format!("{HEAD}{PROBE}").replace("blocks.1.hook_resid_post", "blocks.0.5.hook_resid_post");
    let (_tmp, path) = folder(&body);
    let p = Policy::load(&path).unwrap();
    assert_eq!(
        p.directions["d"].hook.as_ref().unwrap().value,
        "blocks.0.5.hook_resid_post"
    );
}

#[test]
fn models_may_name_any_supported_family() {
    let models = "[models]\narchitectures = [\"mistral\", \"qwen3\", \"gemma2\", \"gemma3\", \"phi3\", \"gpt2\", \"llama\", \"qwen2\"]\n";
    let body = format!("{HEAD}{PROBE}").replace("[prompts.a]", &format!("{models}\n[prompts.a]"));
    let (_tmp, path) = folder(&body);
    let p = Policy::load(&path).unwrap();
    assert_eq!(p.models.architectures.len(), 8);
}

#[test]
fn an_unknown_family_is_an_error_at_its_line_listing_the_supported_ones() {
    let models = "[models]\narchitectures = [\n  \"llama\",\n  \"falcon\",\n]\n";
    let body = format!("{HEAD}{PROBE}").replace("[prompts.a]", &format!("{models}\n[prompts.a]"));
    let line = line_of(&body, "falcon");
    assert_error(
        &body,
        line,
        &[
            "`falcon`",
            "llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, gpt2",
        ],
    );
}

#[test]
fn malformed_hook_names_list_the_valid_forms() {
    let body = format!("{HEAD}{PROBE}").replace("blocks.1.hook_resid_post", "blocks.1.resid");
    let line = line_of(&body, "blocks.1.resid");
    assert_error(
        &body,
        line,
        &[
            "blocks.1.resid",
            "blocks.{L}.{hook_resid_pre",
            "hook_resid_post",
        ],
    );
}

#[test]
fn fields_of_another_check_kind_are_rejected() {
    let body = format!("{HEAD}{PROBE}max_tokens = 8\n");
    let line = line_of(&body, "max_tokens");
    assert_error(
        &body,
        line,
        &["unknown field `max_tokens`", "direction_probe", "min_auroc"],
    );
}

#[test]
fn steering_checks_need_bounds_and_one_intervention() {
    let steer = r#"
[[checks]]
id = "s"
kind = "steering"
severity = "high"
prompts = "a"
intervention = { ablate = "d", add_direction = "d", coeff = 1.0 }
metric = "refusal_score"
bounds = { max = 1.0 }
"#;
    let body = format!("{HEAD}{steer}");
    let line = line_of(&body, "id = \"s\"");
    assert_error(&body, line, &["exactly one of"]);
    let body = format!("{HEAD}{steer}")
        .replace("ablate = \"d\", ", "")
        .replace("bounds = { max = 1.0 }\n", "");
    assert_error(&body, line, &["needs `bounds`"]);
}

/// A SAELens v6 folder: d_in 4, d_sae 8, TopK 2, at `blocks.1.hook_resid_post`.
fn write_sae(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2, "dtype": "float32",
        "apply_b_dec_to_input": true, "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.1.hook_resid_post"}
    });
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    let t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec(
            (0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    let tensors = vec![
        ("W_enc".to_string(), t(&[4, 8])),
        ("b_enc".to_string(), t(&[8])),
        ("W_dec".to_string(), t(&[8, 4])),
        ("b_dec".to_string(), t(&[4])),
    ];
    probes::safetensors::write(
        &dir.join("sae_weights.safetensors"),
        &tensors,
        &BTreeMap::new(),
    )
    .unwrap();
    probes::sae::load_sae(dir).unwrap().manifest.root()
}

fn feature(latent: &str, sha: &str) -> String {
    format!(
        r#"
[saes.s]
path = "sae"
sha256 = "{sha}"
labels = "labels.jsonl"

[[checks]]
id = "f"
kind = "feature_probe"
severity = "medium"
sae = "s"
latents = [{latent}]

[[checks.expect]]
prompts = "a"
min_active_fraction = 0.5
"#
    )
}

fn sae_folder(body: &str) -> (tempfile::TempDir, PathBuf, String) {
    let (tmp, path) = folder("");
    let sha = write_sae(&tmp.path().join("sae"));
    std::fs::write(
        tmp.path().join("labels.jsonl"),
        "{\"index\": \"3\", \"description\": \"bread\"}\n",
    )
    .unwrap();
    std::fs::write(&path, body.replace("SHA", &sha)).unwrap();
    (tmp, path, sha)
}

#[test]
fn latents_by_index_or_label_are_resolved_and_range_checked() {
    let (_tmp, path, _) = sae_folder(&format!("{HEAD}{}", feature("3, \"bread\"", "SHA")));
    let p = Policy::load(&path).unwrap();
    let kinds: Vec<&str> = p.inputs.iter().map(|i| i.kind.as_str()).collect();
    assert!(
        kinds.contains(&"sae") && kinds.contains(&"labels"),
        "{kinds:?}"
    );

    let body = format!("{HEAD}{}", feature("8", "SHA"));
    let (_tmp, path, _) = sae_folder(&body);
    let e = Policy::load(&path).unwrap_err();
    let line = line_of(&body, "latents = [8]");
    assert!(
        e.iter().any(|e| e.at.map(|a| a.line) == Some(line)
            && e.to_string()
                .contains("latent 8 is out of range (the SAE has 8 latents)")),
        "{e:?}"
    );
    let (_tmp, path, _) = sae_folder(&format!("{HEAD}{}", feature("\"toast\"", "SHA")));
    let e = Policy::load(&path).unwrap_err();
    assert!(
        e.iter()
            .any(|e| e.to_string().contains("no latent is labelled `toast`")),
        "{e:?}"
    );
}

#[test]
fn an_sae_must_match_its_pinned_digest() {
    let body = format!("{HEAD}{}", feature("1", &"0".repeat(64)));
    let (_tmp, path, sha) = sae_folder(&body);
    let e = Policy::load(&path).unwrap_err();
    assert!(
        e.iter().any(|e| e
            .to_string()
            .contains(&format!("has digest {sha}, not the pinned"))),
        "{e:?}"
    );
}

#[test]
fn every_error_is_reported_not_only_the_first() {
    // Two root causes: a missing prompt file and a duplicate check id. References to the
    // broken prompt set are not reported again as undefined names.
    let body = format!("{HEAD}{PROBE}{PROBE}").replace("prompts/a.txt", "prompts/missing.txt");
    let shown: Vec<String> = errors(&body).iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(shown[0].contains("missing.txt"), "{shown:#?}");
    assert!(shown[1].contains("duplicate check id"), "{shown:#?}");
}

#[test]
fn the_shipped_policies_validate_and_ship_enough_prompts() {
    let dir = policies::shipped::materialize().unwrap();
    let policies = load_policies(&dir).unwrap();
    let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "capability-cost",
            "harmful-recognition",
            "refusal-integrity"
        ]
    );
    for (file, min) in [("prompts/harmful.txt", 100), ("prompts/harmless.txt", 100)] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let n = text.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(n >= min, "{file} has {n} prompts");
        let unique: std::collections::BTreeSet<&str> = text.lines().collect();
        assert_eq!(unique.len(), n, "{file} repeats a prompt");
    }
    // The embedded copy is the repository's copy.
    for (rel, text) in policies::shipped::FILES {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("shipped")
            .join(rel);
        assert_eq!(&std::fs::read_to_string(repo).unwrap(), text, "{rel}");
    }
}

#[test]
fn a_prompt_file_hard_linked_from_outside_the_folder_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "a line from outside\n").unwrap();
    let (tmp, path) = folder(&format!("{HEAD}{PROBE}"));
    let linked = tmp.path().join("prompts/a.txt");
    std::fs::remove_file(&linked).unwrap();
    std::fs::hard_link(&secret, &linked).unwrap();
    let errs = Policy::load(&path).unwrap_err();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("prompts/a.txt") && e.contains("2 hard links")),
        "{shown:#?}"
    );
}

#[test]
fn a_fifo_as_a_prompt_file_is_refused_without_blocking() {
    let (tmp, path) = folder(&format!("{HEAD}{PROBE}"));
    let fifo = tmp.path().join("prompts/a.txt");
    std::fs::remove_file(&fifo).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let errs = Policy::load(&path).unwrap_err();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("prompts/a.txt") && e.contains("FIFO")),
        "{shown:#?}"
    );
}
