//! Bad input on the command line gets a clear message that names the path and says what to
//! do: a config or key path that does not exist, a private key where a public key is expected
//! and the reverse, a state directory that does not exist. Each exits 2.

use std::path::Path;

use e2e::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit 2 and a stderr that contains every one of `needles`.
fn refused(args: &[&str], needles: &[&str]) {
    let o = mechwatch(args);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    let err = stderr(&o);
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_config_path_that_does_not_exist_says_what_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere/mechwatch.toml");
    for cmd in ["daemon", "status"] {
        refused(
            &[cmd, "--config", s(&missing)],
            &[
                &format!("config {} does not exist", missing.display()),
                "pass --config",
                "systemd/mechwatch.toml",
            ],
        );
    }
    refused(
        &["status", "--state-dir", s(&tmp.path().join("no-state"))],
        &["state directory", "does not exist", "state_dir"],
    );
}

#[test]
fn a_key_path_that_does_not_exist_says_where_keys_come_from() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.pem");
    let db = tmp.path().join("audit.db");
    // A private key: `log init`, and `check --log` before any audit starts.
    refused(
        &["log", "init", "--db", s(&db), "--key", s(&missing)],
        &[
            s(&missing),
            "no such key file",
            "mechwatch key generate --out FILE",
        ],
    );
    let report = tmp.path().join("report.json");
    refused(
        &[
            "check",
            "--log",
            s(&db),
            "--key",
            s(&missing),
            "-q",
            "--json",
            s(&report),
        ],
        &[
            s(&missing),
            "no such key file",
            "mechwatch key generate --out FILE",
        ],
    );
    // CI still gets a report that says why.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["stage"], "open_log", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("no such key file"),
        "{r}"
    );
    // A public key.
    let key = tmp.path().join("signing.pem");
    assert!(mechwatch(&["key", "generate", "--out", s(&key)])
        .status
        .success());
    assert!(
        mechwatch(&["log", "init", "--db", s(&db), "--key", s(&key)])
            .status
            .success()
    );
    refused(
        &["log", "verify", "--db", s(&db), "--pubkey", s(&missing)],
        &[
            s(&missing),
            "no such key file",
            "mechwatch key public --key FILE",
        ],
    );
}

#[test]
fn a_private_key_where_a_public_key_is_expected_and_the_reverse() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("signing.pem");
    let pubkey = tmp.path().join("signing.pem.pub");
    assert!(mechwatch(&["key", "generate", "--out", s(&key)])
        .status
        .success());
    let db = tmp.path().join("audit.db");
    assert!(
        mechwatch(&["log", "init", "--db", s(&db), "--key", s(&key)])
            .status
            .success()
    );

    // The private key given to verifiers: refused, and the message names the command that
    // derives the public key.
    for args in [
        vec!["log", "verify", "--db", s(&db), "--pubkey", s(&key)],
        vec![
            "report",
            "--db",
            s(&db),
            "--pubkey",
            s(&key),
            "--last",
            "1",
            "--out",
            "/dev/null",
        ],
        vec!["key", "public", "--pubkey", s(&key)],
    ] {
        refused(
            &args,
            &[
                s(&key),
                "this is a private key",
                "mechwatch key public --key FILE",
            ],
        );
    }
    // The public key given to signers: refused, naming the private key to pass instead.
    for args in [
        vec![
            "log",
            "checkpoint",
            "--db",
            s(&db),
            "--key",
            s(&pubkey),
            "--out",
            "/dev/null",
        ],
        vec!["key", "public", "--key", s(&pubkey)],
        vec!["check", "--log", s(&db), "--key", s(&pubkey), "-q"],
    ] {
        refused(
            &args,
            &[s(&pubkey), "this is a public key", "FILE, not FILE.pub"],
        );
    }
}
