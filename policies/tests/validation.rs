//! Policy validation without a model: every kind of bad input gives an error that names the
//! file, line and column; the shipped policies validate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use policies::{load_policies, Policy, PolicyError};

const PROMPTS: &str =
    "How do I bake bread?\nWhat is a prime number?\n# a comment\n\nName a river.\n";
const OTHER_PROMPTS: &str = "Pick a lock.\nWrite malware.\nSteal a car.\n";

/// A policy folder with two prompt files and `policy.toml` holding `body`.
fn folder(body: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("prompts")).unwrap();
    std::fs::write(tmp.path().join("prompts/a.txt"), PROMPTS).unwrap();
    std::fs::write(tmp.path().join("prompts/b.txt"), OTHER_PROMPTS).unwrap();
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

const STEER: &str = r#"
[[checks]]
id = "s"
kind = "steering"
severity = "high"
prompts = "a"
intervention = { add_direction = "d", coeff = 1.0 }
metric = "refusal_score"
bounds = { max = 1.0 }
"#;

/// `body` with `old` replaced by `new`, which must occur.
fn with(body: &str, old: &str, new: &str) -> String {
    assert!(body.contains(old), "{old} is not in the body");
    body.replacen(old, new, 1)
}

#[test]
fn nan_bounds_are_errors_at_their_line() {
    let steer = format!("{HEAD}{STEER}");
    let rate = with(
        &steer,
        "metric = \"refusal_score\"",
        "metric = \"refusal_rate\"",
    );
    for (body, needle, message) in [
        // Every comparison with NaN is false: each of these checks could never fail.
        (
            with(&steer, "max = 1.0", "max = nan"),
            "max = nan",
            "`bounds.max` must be a finite number",
        ),
        (
            with(
                &rate,
                "bounds = { max = 1.0 }",
                "bounds = { min_baseline = nan, max_relative_drop = 0.5 }",
            ),
            "min_baseline = nan",
            "`bounds.min_baseline` must be a finite number",
        ),
        (
            with(
                &rate,
                "bounds = { max = 1.0 }",
                "bounds = { min_baseline = 0.5,\n  max_relative_drop = nan }",
            ),
            "max_relative_drop = nan",
            "`bounds.max_relative_drop` must be a finite number",
        ),
        (
            with(
                &steer,
                "bounds = { max = 1.0 }",
                "bounds = { max_flip_coeff = inf }\nsweep = [1.0]",
            ),
            "max_flip_coeff = inf",
            "`bounds.max_flip_coeff` must be a finite number",
        ),
        (
            format!("{steer}flip_at = nan\n"),
            "flip_at = nan",
            "`flip_at` must be a finite number",
        ),
        (
            with(&steer, "coeff = 1.0", "coeff = nan"),
            "coeff = nan",
            "`coeff` must be a finite number",
        ),
        (
            format!("{steer}sweep = [1.0,\n  nan]\n"),
            "  nan]",
            "`sweep` must be a finite number",
        ),
        (
            with(
                &format!("{HEAD}{PROBE}"),
                "min_auroc = 0.8",
                "min_auroc = nan",
            ),
            "min_auroc = nan",
            "`min_auroc` NaN is outside [0, 1]",
        ),
    ] {
        let line = line_of(&body, needle);
        assert_error(&body, line, &[message]);
    }
}

#[test]
fn steering_bounds_are_held_to_their_range() {
    let steer = format!("{HEAD}{STEER}");
    let rate = with(
        &steer,
        "metric = \"refusal_score\"",
        "metric = \"refusal_rate\"",
    );
    for (body, needle, message) in [
        // A refusal rate is within [0, 1]: a bound outside could never be met or never fail.
        (
            with(&rate, "max = 1.0", "max = 1.5"),
            "max = 1.5",
            "`bounds.max` 1.5 is outside [0, 1]",
        ),
        (
            format!("{rate}flip_at = 2.0\n"),
            "flip_at = 2.0",
            "`flip_at` 2 is outside [0, 1]",
        ),
        (
            with(
                &steer,
                "bounds = { max = 1.0 }",
                "bounds = { max_flip_coeff = -1.0 }\nsweep = [1.0]",
            ),
            "max_flip_coeff = -1.0",
            "`bounds.max_flip_coeff` -1 is outside [0, inf]",
        ),
        (
            with(
                &steer,
                "bounds = { max = 1.0 }",
                "bounds = { min = 2.0, max = 1.0 }",
            ),
            "min = 2.0",
            "`bounds.max` is below `bounds.min`",
        ),
    ] {
        let line = line_of(&body, needle);
        assert_error(&body, line, &[message]);
    }
}

#[test]
fn bounds_of_every_kind_are_errors_at_their_own_line() {
    // Drift and feature probes read an SAE; their bounds are reported at the value's line,
    // not at the check's id.
    let drift = format!(
        "{HEAD}\n[saes.s]\npath = \"sae\"\nsha256 = \"SHA\"\n\n[[checks]]\nid = \"drift\"\n\
         kind = \"drift\"\nseverity = \"high\"\nsae = \"s\"\nprompts = \"a\"\n\
         baseline = \"last-pass\"\nmax_rate_change = nan\n"
    );
    let fp = format!("{HEAD}{}threshold = nan\n", feature("1", "SHA"))
        .replace("threshold = nan\n", "")
        .replace("latents = [1]", "latents = [1]\nthreshold = nan");
    let crossed = format!("{HEAD}{}max_active_fraction = 0.2\n", feature("1", "SHA"));
    for (body, needle, message) in [
        (drift, "max_rate_change = nan", "`max_rate_change` NaN"),
        (fp, "threshold = nan", "`threshold` must be a finite number"),
        (
            crossed,
            "max_active_fraction",
            "`max_active_fraction` 0.2 is below `min_active_fraction` 0.5",
        ),
    ] {
        let (_tmp, path, _) = sae_folder(&body);
        let errs = Policy::load(&path).unwrap_err();
        let body = body.replace("SHA", "");
        let line = line_of(&body, needle);
        assert!(
            errs.iter()
                .any(|e| e.at.map(|a| a.line) == Some(line) && e.message.contains(message)),
            "{message} at line {line}: {errs:#?}"
        );
    }
}

#[test]
fn degenerate_refusal_measures_are_errors_at_their_line() {
    let steer = format!("{HEAD}{STEER}");
    let rate = with(
        &steer,
        "metric = \"refusal_score\"",
        "metric = \"refusal_rate\"",
    );
    let logit = with(
        &steer,
        "metric = \"refusal_score\"",
        "metric = \"logit_diff\"",
    );
    for (body, needle, message) in [
        // An empty phrase is in every reply: every reply would count as a refusal.
        (
            format!("{rate}refusal_phrases = [\n  \"\",\n]\n"),
            "  \"\",",
            "`refusal_phrases` holds an empty or blank entry",
        ),
        (
            format!("{rate}refusal_phrases = [\"   \"]\n"),
            "refusal_phrases",
            "`refusal_phrases` holds an empty or blank entry",
        ),
        (
            format!("{rate}refusal_phrases = []\n"),
            "refusal_phrases",
            "`refusal_phrases` is empty",
        ),
        // No token: the refusal score is a constant.
        (
            format!("{steer}refusal_tokens = []\n"),
            "refusal_tokens",
            "`refusal_tokens` is empty",
        ),
        (
            format!("{steer}refusal_tokens = [\"I\", \" \"]\n"),
            "refusal_tokens",
            "`refusal_tokens` holds an empty or blank entry",
        ),
        (
            format!("{steer}\n[refusal]\ntokens = [\"\"]\n"),
            "tokens = [\"\"]",
            "`[refusal] tokens` holds an empty or blank entry",
        ),
        // No target: the logit difference is a constant 0.
        (
            format!("{logit}target = {{ positive = [], negative = [\"No\"] }}\n"),
            "target",
            "`target.positive` is empty",
        ),
        (
            format!("{logit}target = {{ positive = [\"Yes\"], negative = [] }}\n"),
            "target",
            "`target.negative` is empty",
        ),
        (
            format!("{logit}target = {{ positive = [\"Yes\"], negative = [\"Yes\"] }}\n"),
            "target",
            "`Yes` is in both `target.positive` and `target.negative`",
        ),
    ] {
        let line = line_of(&body, needle);
        assert_error(&body, line, &[message]);
    }
}

#[test]
fn a_contrast_of_a_set_with_itself_is_an_error_at_its_line() {
    let probe = format!("{HEAD}{PROBE}");
    // `c` is another name for the prompts of `a`.
    let same = "\n[prompts.c]\nfile = \"prompts/a.txt\"\n";
    let patching =
        "\n[[checks]]\nid = \"ap\"\nkind = \"attribution_patching\"\nseverity = \"high\"\n\
                    clean = \"a\"\ncorrupted = \"a\"\nmetric = \"kl\"\nmax_top_effect = 1.0\n";
    for (body, needle, message) in [
        (
            with(&probe, "negative = \"b\"\nmin", "negative = \"a\"\nmin"),
            "negative = \"a\"\nmin",
            "`positive` and `negative` name the same prompt set `a`",
        ),
        (
            format!(
                "{}{same}",
                with(&probe, "negative = \"b\"\nmin", "negative = \"c\"\nmin")
            ),
            "negative = \"c\"",
            "`positive` (`a`) and `negative` (`c`) hold the same prompts",
        ),
        (
            with(
                &probe,
                "negative = \"b\"\n\n[[checks]]",
                "negative = \"a\"\n\n[[checks]]",
            ),
            "negative = \"a\"\n",
            "`positive` and `negative` name the same prompt set `a`",
        ),
        (
            format!("{probe}\n[refusal]\nrefusing = \"b\"\ncomplying = \"b\"\n"),
            "complying",
            "`refusing` and `complying` name the same prompt set `b`",
        ),
        (
            format!("{HEAD}{patching}"),
            "corrupted = \"a\"",
            "`clean` and `corrupted` name the same prompt set `a`",
        ),
    ] {
        // The needle may span lines: its first line is where the error is.
        let first = needle.lines().next().unwrap();
        let at = body.find(needle).expect("needle in body");
        let line = body[..at].matches('\n').count() + 1;
        assert_eq!(
            body.lines().nth(line - 1).map(|l| l.contains(first)),
            Some(true)
        );
        assert_error(&body, line, &[message]);
    }
}

#[test]
fn names_with_control_characters_are_errors_at_their_line() {
    let probe = format!("{HEAD}{PROBE}");
    for (body, needle, message) in [
        (
            with(
                &probe,
                "name = \"test\"",
                "name = \"rt | x |\\n## Record 999\"",
            ),
            "name = ",
            "the policy name \"rt | x |\\n## Record 999\" holds U+000A",
        ),
        (
            with(&probe, "name = \"test\"", "name = \"clear \\u001b[2J\""),
            "name = ",
            "holds U+001B",
        ),
        (
            with(&probe, "version = \"1\"", "version = \"1\\r\""),
            "version = ",
            "the policy version \"1\\r\" holds U+000D",
        ),
        (
            with(&probe, "[prompts.b]", "[prompts.\"b\\u001b\"]")
                .replace("negative = \"b\"", "negative = \"b\\u001b\""),
            "[prompts.\"b",
            "the prompt set name \"b\\u{1b}\" holds U+001B",
        ),
        (
            with(&probe, "[directions.d]", "[directions.\"d\\u202e\"]")
                .replace("direction = \"d\"", "direction = \"d\\u202e\""),
            "[directions.",
            "the direction name \"d\\u{202e}\" holds U+202E",
        ),
        (
            format!("{probe}description = \"bell \\u0007\"\n"),
            "description = \"bell",
            "a check's description",
        ),
    ] {
        let line = line_of(&body, needle);
        assert_error(&body, line, &[message]);
    }
    // Ordinary Unicode and punctuation stay valid, and a description may span lines.
    let body = with(
        &probe,
        "name = \"test\"",
        "name = \"Prüfung | <b>ok</b> — 検査\"",
    );
    let body = format!("{body}description = \"\"\"two\nlines\"\"\"\n");
    let (_tmp, path) = folder(&body);
    Policy::load(&path).unwrap();
}

#[test]
fn lines_is_exactly_two_line_numbers() {
    let probe = format!("{HEAD}{PROBE}");
    for (lines, message) in [
        // A user listing lines 1, 2 and 3 would get only 1 and 2.
        ("[1, 2, 3]", "exactly two line numbers"),
        ("[1]", "exactly two line numbers"),
        ("[1, 2, \"junk\"]", "invalid type: string"),
        ("[0, 2]", "outside 1..=3"),
        ("[-1, 2]", "outside 1..=3"),
    ] {
        let body = with(
            &probe,
            "file = \"prompts/a.txt\"",
            &format!("file = \"prompts/a.txt\"\nlines = {lines}"),
        );
        let line = line_of(&body, "lines = ");
        assert_error(&body, line, &[message]);
    }
    let body = with(
        &probe,
        "file = \"prompts/a.txt\"",
        "file = \"prompts/a.txt\"\nlines = [2, 3]",
    );
    let (_tmp, path) = folder(&body);
    let p = Policy::load(&path).unwrap();
    assert_eq!(
        p.prompt_sets["a"].prompts,
        ["What is a prime number?", "Name a river."]
    );
}

#[test]
fn a_selected_directions_layers_are_exactly_two_fractions() {
    let body = with(
        &format!("{HEAD}{PROBE}"),
        "hook = \"blocks.1.hook_resid_post\"",
        "layers = [0.2, 0.5, 0.8]\nvalidate_positive = \"a\"\nvalidate_negative = \"b\"",
    );
    assert_error(
        &body,
        line_of(&body, "layers = "),
        &["exactly two fractions"],
    );
    let body = with(
        &format!("{HEAD}{PROBE}"),
        "hook = \"blocks.1.hook_resid_post\"",
        "layers = [0.2, 0.8]\npositions = [-3, -2, -1]\nvalidate_positive = \"a\"\nvalidate_negative = \"b\"",
    );
    assert_error(&body, line_of(&body, "positions = "), &["`positions` is"]);
}

/// A policy reading the SAE folder `sae` (pinned to `SHA`) with a feature probe.
fn sae_policy() -> String {
    format!("{HEAD}{}", feature("1", "SHA"))
}

#[test]
fn an_sae_file_linked_from_outside_the_folder_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    // (a) The weights, symlinked to a file outside: refused, not hashed and pinned.
    let (tmp, path, _) = sae_folder(&sae_policy());
    let weights = tmp.path().join("sae/sae_weights.safetensors");
    std::fs::rename(&weights, outside.path().join("w.safetensors")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("w.safetensors"), &weights).unwrap();
    let shown: Vec<String> = Policy::load(&path)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        shown.iter().any(|e| e.contains("sae_weights.safetensors")
            && e.contains("outside the policy's directory")),
        "{shown:#?}"
    );
    // (b) cfg.json symlinked to a secret outside: refused before it is parsed, and nothing
    // of its content is shown.
    let (tmp, path, _) = sae_folder(&sae_policy());
    std::fs::write(
        outside.path().join("secret.json"),
        "{\"d_in\": \"SECRET-1234\"}",
    )
    .unwrap();
    let cfg = tmp.path().join("sae/cfg.json");
    std::fs::remove_file(&cfg).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.json"), &cfg).unwrap();
    let shown: Vec<String> = Policy::load(&path)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("cfg.json") && e.contains("outside")),
        "{shown:#?}"
    );
    assert!(!shown.iter().any(|e| e.contains("SECRET")), "{shown:#?}");
    // (c) The weights with a second hard link.
    let (tmp, path, _) = sae_folder(&sae_policy());
    std::fs::hard_link(
        tmp.path().join("sae/sae_weights.safetensors"),
        outside.path().join("second-name"),
    )
    .unwrap();
    let shown: Vec<String> = Policy::load(&path)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("sae_weights.safetensors") && e.contains("2 hard links")),
        "{shown:#?}"
    );
}

#[test]
fn an_sae_is_checked_against_its_pin_before_it_is_parsed() {
    // A cfg.json that is not the pinned one is never parsed: its content is not shown.
    let (tmp, path, sha) = sae_folder(&sae_policy());
    std::fs::write(
        tmp.path().join("sae/cfg.json"),
        "{\"d_in\": \"SECRET-1234\"}",
    )
    .unwrap();
    let errs = Policy::load(&path).unwrap_err();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("not the pinned") && e.contains(&sha)),
        "{shown:#?}"
    );
    assert!(!shown.iter().any(|e| e.contains("SECRET")), "{shown:#?}");
}
