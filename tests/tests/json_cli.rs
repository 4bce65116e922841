//! `--json` on `log verify`, `status` and `policy check`: one JSON object on standard output
//! with the fields docs/cli.md documents, and the same exit codes as the text output.

use std::path::Path;

use e2e::*;

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A key and a log of `n` records written by `log stress-append`.
fn log_with(dir: &Path, n: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = dir.join("signing.pem");
    let o = mechwatch(&["key", "generate", "--out", s(&key)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let db = dir.join("audit.db");
    let o = mechwatch(&[
        "log",
        "stress-append",
        "--db",
        s(&db),
        "--key",
        s(&key),
        "--count",
        n,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (db, key)
}

#[test]
fn log_verify_json_reports_success_and_evidence_with_the_same_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let (db, key) = log_with(tmp.path(), "3");
    let pubkey = tmp.path().join("signing.pem.pub");

    let o = mechwatch(&[
        "log",
        "verify",
        "--db",
        s(&db),
        "--pubkey",
        s(&pubkey),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["records"], 3, "{v}");
    assert_eq!(v["root"].as_str().unwrap().len(), 64, "{v}");
    assert_eq!(v["keys"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["failure"].is_null(), "{v}");
    assert_eq!(v["path"], s(&db));

    // The export and a checkpoint verify without the database.
    let export = tmp.path().join("records.jsonl");
    let cp = tmp.path().join("audit.checkpoint");
    for args in [
        vec![
            "log",
            "export",
            "--db",
            s(&db),
            "--format",
            "dsse",
            "--out",
            s(&export),
        ],
        vec![
            "log",
            "checkpoint",
            "--db",
            s(&db),
            "--key",
            s(&key),
            "--out",
            s(&cp),
        ],
    ] {
        let o = mechwatch(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = mechwatch(&[
        "log",
        "verify",
        "--export",
        s(&export),
        "--checkpoint",
        s(&cp),
        "--pubkey",
        s(&pubkey),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let e = json(&o);
    assert_eq!(e["verified"], true, "{e}");
    assert_eq!(e["records"], 3, "{e}");
    assert_eq!(e["checkpoint_size"], 3, "{e}");
    assert_eq!(e["uncovered_records"], 0, "{e}");
    assert_eq!(e["root"], v["root"], "the export's root is the log's");

    // A flipped signature bit is evidence: exit 1 and `verified: false` with the failure.
    // The attacker drops the append-only trigger first, as anyone with write access can.
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("DROP TRIGGER records_no_update;").unwrap();
    let sig: Vec<u8> = c
        .query_row("SELECT sig FROM records WHERE seq = 1", [], |r| r.get(0))
        .unwrap();
    let mut bad = sig.clone();
    bad[5] ^= 1;
    c.execute(
        "UPDATE records SET sig = ?1 WHERE seq = 1",
        rusqlite::params![bad],
    )
    .unwrap();
    drop(c);
    let o = mechwatch(&[
        "log",
        "verify",
        "--db",
        s(&db),
        "--pubkey",
        s(&pubkey),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let f = json(&o);
    assert_eq!(f["verified"], false, "{f}");
    assert_eq!(f["failure"]["seq"], 1, "{f}");
    assert!(
        f["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("bad signature"),
        "{f}"
    );
}

#[test]
fn policy_check_json_lists_policies_or_errors_with_their_lines() {
    let o = mechwatch(&["policy", "check", "default", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["valid"], true, "{v}");
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");
    let policies = v["policies"].as_array().unwrap();
    assert!(!policies.is_empty(), "{v}");
    for p in policies {
        assert!(p["name"].is_string() && p["version"].is_string(), "{p}");
        assert!(p["checks"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["digest"].as_str().unwrap().len(), 64, "{p}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "schema = 1\nname = \"bad\"\nversion = \"1\"\nnot_a_key = 3\n",
    )
    .unwrap();
    let o = mechwatch(&["policy", "check", s(&bad), "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["valid"], false, "{v}");
    assert!(v["policies"].as_array().unwrap().is_empty(), "{v}");
    let errors = v["errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{v}");
    assert!(
        errors
            .iter()
            .all(|e| e["path"] == s(&bad) && e["message"].is_string()),
        "{v}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e["line"] == 4 && e["message"].as_str().unwrap().contains("not_a_key")),
        "{v}"
    );
}

#[test]
fn status_json_reports_the_queue_the_audits_and_the_log_head() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for d in ["models", "state", "policy/prompts"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("policy/prompts/pos.txt"), HARMFUL_SAMPLE).unwrap();
    std::fs::write(root.join("policy/prompts/neg.txt"), HARMLESS_SAMPLE).unwrap();
    std::fs::write(
        root.join("policy/small.toml"),
        "schema = 1\nname = \"small\"\nversion = \"1\"\n\n[prompts.pos]\nfile = \"prompts/pos.txt\"\n\n[prompts.neg]\nfile = \"prompts/neg.txt\"\n\n[directions.d]\nhook = \"blocks.10.hook_resid_post\"\npositive = \"pos\"\nnegative = \"neg\"\n\n[[checks]]\nid = \"separates\"\nkind = \"direction_probe\"\nseverity = \"high\"\ndirection = \"d\"\npositive = \"pos\"\nnegative = \"neg\"\nmin_auroc = 0.5\n",
    )
    .unwrap();
    let key = root.join("key.pem");
    assert!(mechwatch(&["key", "generate", "--out", s(&key)])
        .status
        .success());
    let r = root.display();
    let config = root.join("mechwatch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{r}/state\"\nkey = \"{r}/key.pem\"\nshutdown_deadline_secs = 5\n\n[[watch]]\npath = \"{r}/models\"\npolicies = \"{r}/policy\"\n"
        ),
    )
    .unwrap();
    let log = root.join("daemon.log");
    let d = DaemonProcess::start(&config, &log);
    wait_for(60, "the daemon to start", || {
        d.logs().contains("daemon started").then_some(())
    });

    for args in [
        vec!["status", "--config", s(&config), "--json"],
        vec!["status", "--state-dir", s(&root.join("state")), "--json"],
    ] {
        let o = mechwatch(&args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let v = json(&o);
        assert_eq!(v["state_dir"], format!("{r}/state"), "{v}");
        assert!(v["queue"].as_array().unwrap().is_empty(), "{v}");
        assert!(v["recent"].is_array(), "{v}");
        let records = v["log"]["records"].as_u64().expect("log.records");
        if records > 0 {
            assert_eq!(v["log"]["head_sha256"].as_str().unwrap().len(), 64, "{v}");
        } else {
            assert!(v["log"]["head_sha256"].is_null(), "{v}");
        }
    }
}
