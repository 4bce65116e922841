//! `mechwatch check` writes several reports in one run (`--json`, `--junit`, `--sarif` beside
//! the main `--format` report), writes them even when it exits 2, sends `-` to standard output
//! (at most one report), and refuses missing folders before the audit.

use std::path::{Path, PathBuf};

use e2e::*;

#[path = "support/sarif_schema.rs"]
mod sarif_schema;

/// A small policy on the default model: one direction probe over four prompts per side.
fn small_policy(dir: &Path) -> PathBuf {
    sample_policy(
        dir,
        "small.toml",
        "schema = 1\nname = \"small\"\nversion = \"1\"\n\n[prompts.pos]\nfile = \"prompts/pos.txt\"\n\n[prompts.neg]\nfile = \"prompts/neg.txt\"\n\n[directions.d]\nhook = \"blocks.10.hook_resid_post\"\npositive = \"pos\"\nnegative = \"neg\"\n\n[[checks]]\nid = \"separates\"\nkind = \"direction_probe\"\nseverity = \"high\"\ndirection = \"d\"\npositive = \"pos\"\nnegative = \"neg\"\nmin_auroc = 0.5\n",
    )
}

fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", p.display()))
}

/// Valid against the OASIS SARIF 2.1.0 schema, and the fields every consumer needs: version,
/// one run, the tool's driver name, results, one invocation.
fn sarif_run(sarif: &serde_json::Value) -> &serde_json::Value {
    let schema = sarif_schema::sarif_schema();
    let validator = jsonschema::validator_for(&schema).expect("the SARIF schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(sarif)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "SARIF is not valid 2.1.0: {errors:#?}");
    let mut wrong = sarif.clone();
    wrong["runs"][0]["invocations"][0]["executionSuccessful"] = serde_json::json!("no");
    assert!(
        !validator.is_valid(&wrong),
        "the validator accepts a string for a boolean"
    );
    assert_eq!(sarif["version"], "2.1.0", "{sarif}");
    assert!(sarif["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    let runs = sarif["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{sarif}");
    let run = &runs[0];
    assert_eq!(run["tool"]["driver"]["name"], "mechwatch");
    assert!(run["results"].is_array(), "{run}");
    assert_eq!(
        run["invocations"].as_array().map(Vec::len),
        Some(1),
        "{run}"
    );
    let typed: serde_sarif::sarif::Sarif =
        serde_json::from_value(sarif.clone()).expect("serde-sarif reads it");
    assert_eq!(typed.runs.len(), 1);
    run
}

/// The JUnit document's root and its testcases, parsed as XML.
fn junit_cases(xml: &str) -> Vec<(String, Vec<String>)> {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("JUnit XML ({e}): {xml}"));
    assert_eq!(doc.root_element().tag_name().name(), "testsuites");
    doc.descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .map(|c| {
            (
                c.attribute("name").unwrap().to_string(),
                c.children()
                    .filter(|n| n.is_element())
                    .map(|n| n.tag_name().name().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn one_check_writes_text_json_junit_and_sarif() {
    let model = default_model();
    let tmp = tempfile::tempdir().unwrap();
    let policy = small_policy(&tmp.path().join("p"));
    let (json, junit, sarif) = (
        tmp.path().join("r.json"),
        tmp.path().join("r.xml"),
        tmp.path().join("r.sarif"),
    );
    let o = mechwatch(&[
        "check",
        "--model",
        model.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "-q",
        "--json",
        json.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
        "--sarif",
        sarif.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The text report still goes to standard output.
    assert!(
        stdout(&o).starts_with("mechwatch verdict: PASS"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("PASS  small/separates"),
        "{}",
        stdout(&o)
    );

    let j = read_json(&json);
    assert_eq!(j["status"], "pass");
    assert_eq!(j["verdict"], "pass");
    assert_eq!(j["model"]["architecture"], "llama");
    assert_eq!(j["policies"][0]["findings"][0]["check"], "separates");

    let cases = junit_cases(&std::fs::read_to_string(&junit).unwrap());
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].0, "separates");
    assert!(
        !cases[0].1.iter().any(|t| t == "failure" || t == "error"),
        "{cases:?}"
    );

    let s = read_json(&sarif);
    let run = sarif_run(&s);
    assert_eq!(run["invocations"][0]["executionSuccessful"], true);
    assert_eq!(run["tool"]["driver"]["rules"][0]["id"], "small/separates");
    assert_eq!(run["results"].as_array().unwrap().len(), 0);

    // The same run with the JSON report on standard output: the text goes to standard error.
    let o = mechwatch(&[
        "check",
        "--model",
        model.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "-q",
        "--json",
        "-",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(
        v, j,
        "the JSON report is the same bytes in a file and on stdout"
    );
    assert!(
        stderr(&o).contains("mechwatch verdict: PASS"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_check_that_cannot_check_still_writes_every_report_with_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A model file that is not a model: the run stops at load_model and exits 2.
    let broken = tmp.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF this is not a real checkpoint").unwrap();
    let (json, junit, sarif, text) = (
        tmp.path().join("r.json"),
        tmp.path().join("r.xml"),
        tmp.path().join("r.sarif"),
        tmp.path().join("r.txt"),
    );
    let o = mechwatch(&[
        "check",
        "--model",
        broken.to_str().unwrap(),
        "--policy",
        "default",
        "-q",
        "--out",
        text.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
        "--sarif",
        sarif.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("broken.gguf"), "{err}");

    let j = read_json(&json);
    assert_eq!(j["status"], "error", "{j}");
    assert_eq!(j["verdict"], "error", "{j}");
    assert_eq!(j["stage"], "load_model", "{j}");
    assert!(j["error"].as_str().unwrap().contains("broken.gguf"), "{j}");

    let xml = std::fs::read_to_string(&junit).unwrap();
    let cases = junit_cases(&xml);
    assert_eq!(
        cases,
        [("check".to_string(), vec!["error".to_string()])],
        "{xml}"
    );
    let doc = roxmltree::Document::parse(&xml).unwrap();
    assert_eq!(doc.root_element().attribute("errors"), Some("1"));
    let error = doc.descendants().find(|n| n.has_tag_name("error")).unwrap();
    assert!(
        error.attribute("message").unwrap().contains("broken.gguf"),
        "{xml}"
    );
    assert_eq!(error.attribute("type"), Some("load_model"));

    let s = read_json(&sarif);
    let run = sarif_run(&s);
    let inv = &run["invocations"][0];
    assert_eq!(inv["executionSuccessful"], false, "{inv}");
    assert_eq!(inv["exitCode"], 2, "{inv}");
    let note = &inv["toolExecutionNotifications"][0];
    assert_eq!(note["level"], "error", "{inv}");
    assert!(
        note["message"]["text"]
            .as_str()
            .unwrap()
            .contains("broken.gguf"),
        "{inv}"
    );
    assert_eq!(run["results"].as_array().unwrap().len(), 0);

    let t = std::fs::read_to_string(&text).unwrap();
    assert!(t.starts_with("mechwatch verdict: ERROR"), "{t}");
    assert!(t.contains("stage: load_model"), "{t}");
}

#[test]
fn only_one_report_may_go_to_standard_output() {
    let o = mechwatch(&["check", "--out", "-", "--sarif", "-", "-q"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(
            "only one report can go to standard output (`-`), but --out and --sarif ask for it"
        ) && err.contains("give the others a file name"),
        "{err}"
    );
    assert!(!err.contains("loading model"), "{err}");
    assert!(o.stdout.is_empty(), "{}", stdout(&o));

    let tmp = tempfile::tempdir().unwrap();
    let same = tmp.path().join("r.json");
    let o = mechwatch(&[
        "check",
        "--json",
        same.to_str().unwrap(),
        "--sarif",
        same.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--json and --sarif both write"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_missing_report_folder_is_refused_before_the_audit_and_the_others_get_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let junit = tmp.path().join("no-such-folder/r.xml");
    let json = tmp.path().join("r.json");
    let o = mechwatch(&[
        "check",
        "--junit",
        junit.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot write the --junit report to") && err.contains("does not exist"),
        "{err}"
    );
    // Refused before the model was loaded: no audit was spent on it.
    assert!(!err.contains("loading model"), "{err}");
    assert!(!junit.exists());
    let j = read_json(&json);
    assert_eq!(j["status"], "error");
    assert_eq!(j["stage"], "write_output");
}
