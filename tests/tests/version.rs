//! `mechwatch --version` and every signed record name the git commit of the build.

use e2e::*;

#[test]
fn the_version_and_every_record_carry_the_git_commit() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(head.status.success(), "the tests run from a git checkout");
    let head = String::from_utf8(head.stdout).unwrap().trim().to_string();

    let o = mechwatch(&["--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let version = stdout(&o);
    assert!(version.contains(&format!("(git {head})")), "{version}");

    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key.pem");
    let db = tmp.path().join("log.db");
    let made = mechwatch(&["key", "generate", "--out", key.to_str().unwrap()]);
    assert!(made.status.success(), "{}", stderr(&made));
    let init = mechwatch(&[
        "log",
        "init",
        "--db",
        db.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(init.status.success(), "{}", stderr(&init));
    let rotated = tmp.path().join("new.pem");
    let made = mechwatch(&["key", "generate", "--out", rotated.to_str().unwrap()]);
    assert!(made.status.success(), "{}", stderr(&made));
    let r = mechwatch(&[
        "key",
        "rotate",
        "--db",
        db.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--new-key",
        rotated.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let show = mechwatch(&["log", "show", "--db", db.to_str().unwrap(), "--json"]);
    assert!(show.status.success(), "{}", stderr(&show));
    assert!(
        stdout(&show).contains(&format!("(git {head})")),
        "{}",
        stdout(&show)
    );
}
