//! A policy named by a bare file name, from inside its folder (`mechwatch policy check
//! probe.toml`). Alone in its test binary because it changes the working directory.

use policies::Policy;

const POLICY: &str = r#"schema = 1
name = "bare"
version = "1"

[prompts.a]
file = "prompts/a.txt"

[prompts.b]
file = "prompts/missing.txt"

[directions.d]
hook = "blocks.1.hook_resid_post"
positive = "a"
negative = "b"

[[checks]]
id = "probe"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "a"
negative = "b"
min_auroc = 0.8
"#;

#[test]
fn a_bare_policy_file_name_reads_its_prompts_and_reports_each_root_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("prompts")).unwrap();
    std::fs::write(tmp.path().join("prompts/a.txt"), "Name a river.\n").unwrap();
    std::fs::write(tmp.path().join("probe.toml"), POLICY).unwrap();
    std::env::set_current_dir(tmp.path()).unwrap();

    let errors = Policy::load(std::path::Path::new("probe.toml")).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    // The one root cause: `b`'s file is missing. `a` (present) is read; the direction and
    // the check that name `b` are not reported again as undefined.
    assert_eq!(shown.len(), 1, "{shown:#?}");
    assert!(shown[0].contains("missing.txt"), "{shown:#?}");
    assert!(shown[0].contains("does not exist"), "{shown:#?}");

    std::fs::write(tmp.path().join("prompts/missing.txt"), "Name a lake.\n").unwrap();
    let policy = Policy::load(std::path::Path::new("probe.toml")).unwrap();
    assert_eq!(policy.prompt_sets["a"].prompts, ["Name a river."]);
}
