//! The audit log through the real binary: keys, verification verdicts and exit codes, DSSE
//! export verified by OpenSSL, a writer killed 200 times, and 1000 random tamperings.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use e2e::*;
use rand::{Rng, SeedableRng};

struct Log {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    db: PathBuf,
    key: PathBuf,
    pubkey: PathBuf,
}

fn new_log(records: u64) -> Log {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let key = dir.join("signing.pem");
    let o = mechwatch(&["key", "generate", "--out", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("-----BEGIN PUBLIC KEY-----"));
    let pubkey = dir.join("signing.pem.pub");
    let db = dir.join("audit.db");
    if records > 0 {
        let o = append(
            db.to_str().unwrap(),
            key.to_str().unwrap(),
            &records.to_string(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    Log {
        _tmp: tmp,
        dir,
        db,
        key,
        pubkey,
    }
}

/// Append `count` records with `mechwatch log stress-append` (0 just restarts the writer).
fn append(db: &str, key: &str, count: &str) -> std::process::Output {
    mechwatch(&[
        "log",
        "stress-append",
        "--db",
        db,
        "--key",
        key,
        "--count",
        count,
    ])
}

fn verify(log: &Log, db: &Path, checkpoint: Option<&Path>) -> std::process::Output {
    let mut args = vec![
        "log",
        "verify",
        "--db",
        db.to_str().unwrap(),
        "--pubkey",
        log.pubkey.to_str().unwrap(),
    ];
    if let Some(c) = checkpoint {
        args.extend(["--checkpoint", c.to_str().unwrap()]);
    }
    mechwatch(&args)
}

#[test]
fn key_files_are_private_and_loose_keys_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let log = new_log(0);
    let mode = std::fs::metadata(&log.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::set_permissions(&log.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = append(log.db.to_str().unwrap(), log.key.to_str().unwrap(), "1");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("readable by group or others"),
        "{}",
        stderr(&o)
    );
    let pem = std::fs::read_to_string(&log.key).unwrap();
    let body = pem.lines().nth(1).unwrap();
    assert!(
        !stderr(&o).contains(body) && !stdout(&o).contains(body),
        "the key leaked"
    );

    // systemd's LoadCredential= puts the key in $CREDENTIALS_DIRECTORY.
    std::fs::set_permissions(&log.key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let creds = log.dir.join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(&log.key, creds.join("mechwatch-signing-key")).unwrap();
    let o = Command::new(mechwatch_bin())
        .args([
            "log",
            "stress-append",
            "--db",
            log.db.to_str().unwrap(),
            "--count",
            "2",
        ])
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(verify(&log, &log.db, None).status.success());
}

#[test]
fn verify_show_proof_and_rotation() {
    let log = new_log(5);
    let o = verify(&log, &log.db, None);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("ok: 5 records"));
    let o = mechwatch(&[
        "log",
        "show",
        "--db",
        log.db.to_str().unwrap(),
        "--last",
        "2",
        "--json",
    ]);
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["predicate"]["log"]["seq"], 4);
    assert_eq!(lines[1]["_type"], "https://in-toto.io/Statement/v1");
    let o = mechwatch(&[
        "log",
        "show",
        "--db",
        log.db.to_str().unwrap(),
        "--seq",
        "2",
    ]);
    assert!(stdout(&o).starts_with("#2 "), "{}", stdout(&o));
    let o = mechwatch(&[
        "log",
        "proof",
        "--db",
        log.db.to_str().unwrap(),
        "--seq",
        "3",
    ]);
    let p: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(p["tree_size"], 5);
    assert_eq!(p["inclusion_path"].as_array().unwrap().len(), 3);

    let new_key = log.dir.join("new.pem");
    assert!(
        mechwatch(&["key", "generate", "--out", new_key.to_str().unwrap()])
            .status
            .success()
    );
    let o = mechwatch(&[
        "key",
        "rotate",
        "--db",
        log.db.to_str().unwrap(),
        "--key",
        log.key.to_str().unwrap(),
        "--new-key",
        new_key.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = append(log.db.to_str().unwrap(), new_key.to_str().unwrap(), "3");
    assert!(o.status.success());
    let o = verify(&log, &log.db, None);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("9 records") && stdout(&o).contains(" -> "),
        "{}",
        stdout(&o)
    );
    // The retired key can no longer append records that verify.
    append(log.db.to_str().unwrap(), log.key.to_str().unwrap(), "1");
    let o = verify(&log, &log.db, None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("seq 9:"), "{}", stdout(&o));
}

#[test]
fn dsse_export_verifies_with_openssl() {
    let log = new_log(3);
    let out = log.dir.join("records.dsse.jsonl");
    let o = mechwatch(&[
        "log",
        "export",
        "--db",
        log.db.to_str().unwrap(),
        "--format",
        "dsse",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 3);
    for (i, line) in text.lines().enumerate() {
        let env: audit_log::dsse::Envelope = serde_json::from_str(line).unwrap();
        assert_eq!(env.payload_type, "application/vnd.in-toto+json");
        let body = audit_log::dsse::decode_b64(&env.payload).unwrap();
        let st: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(st["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(
            st["subject"][0]["digest"]["sha256"].as_str().unwrap().len(),
            64
        );
        let pae = log.dir.join(format!("pae{i}.bin"));
        let sig = log.dir.join(format!("sig{i}.bin"));
        std::fs::write(&pae, audit_log::dsse::pae(&env.payload_type, &body)).unwrap();
        std::fs::write(
            &sig,
            audit_log::dsse::decode_b64(&env.signatures[0].sig).unwrap(),
        )
        .unwrap();
        let ossl = |pae: &Path| {
            Command::new("openssl")
                .args([
                    "pkeyutl",
                    "-verify",
                    "-pubin",
                    "-inkey",
                    log.pubkey.to_str().unwrap(),
                    "-rawin",
                    "-in",
                ])
                .arg(pae)
                .args(["-sigfile", sig.to_str().unwrap()])
                .output()
                .expect("openssl is installed by scripts/test-all")
        };
        let o = ossl(&pae);
        assert!(
            o.status.success(),
            "openssl rejected record {i}: {}",
            stderr(&o)
        );
        assert!(stdout(&o).contains("Signature Verified Successfully"));
        let mut tampered = std::fs::read(&pae).unwrap();
        let n = tampered.len();
        tampered[n - 3] ^= 1;
        std::fs::write(&pae, tampered).unwrap();
        assert!(
            !ossl(&pae).status.success(),
            "openssl accepted a tampered record"
        );
    }
    let jsonl = log.dir.join("records.jsonl");
    assert!(mechwatch(&[
        "log",
        "export",
        "--db",
        log.db.to_str().unwrap(),
        "--format",
        "jsonl",
        "--out",
        jsonl.to_str().unwrap()
    ])
    .status
    .success());
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&jsonl)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["seq"], 0);
}

#[test]
fn a_writer_killed_200_times_never_loses_an_acknowledged_record() {
    let log = new_log(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6962);
    let mut acked_max: Option<u64> = None;
    for round in 0..200 {
        let mut child = Command::new(mechwatch_bin())
            .args([
                "log",
                "stress-append",
                "--db",
                log.db.to_str().unwrap(),
                "--key",
                log.key.to_str().unwrap(),
                "--count",
                "100000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(seq) = line.strip_prefix("acked ") {
                    last = Some(seq.parse::<u64>().unwrap());
                }
            }
            last
        });
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(2..40)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if let Some(last) = reader.join().unwrap() {
            acked_max = Some(acked_max.map_or(last, |m: u64| m.max(last)));
        }
        // Restart the writer (it may have died before its first commit, even before the
        // schema existed), then verify.
        let o = append(log.db.to_str().unwrap(), log.key.to_str().unwrap(), "0");
        assert!(
            o.status.success(),
            "round {round}: restart failed: {}",
            stderr(&o)
        );
        let o = verify(&log, &log.db, None);
        assert!(
            o.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let records: u64 = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        if let Some(m) = acked_max {
            assert!(
                records > m,
                "round {round}: acked seq {m} but the log holds {records} records"
            );
        }
    }
    assert!(
        acked_max.unwrap_or(0) > 200,
        "the writer barely ran; the test proved little"
    );
}

/// A copy of `db` (with its WAL checkpointed into the main file) to mutate.
fn copy_db(src: &Path, dst: &Path) {
    let _ = std::fs::remove_file(dst);
    let c = rusqlite::Connection::open(src).unwrap();
    c.execute("VACUUM INTO ?1", [dst.to_str().unwrap()])
        .unwrap();
}

/// (seq, bytes, sig, key_id) of every row.
type Rows = Vec<(i64, Vec<u8>, Vec<u8>, String)>;

fn contents(db: &Path) -> Option<Rows> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()?;
    let mut s = c
        .prepare("SELECT seq, bytes, sig, key_id FROM records ORDER BY seq")
        .ok()?;
    let rows = s
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .ok()?;
    rows.collect::<Result<Vec<_>, _>>().ok()
}

#[test]
fn a_thousand_random_tamperings_are_all_detected() {
    let log = new_log(40);
    let cp = log.dir.join("exported.checkpoint");
    let o = mechwatch(&[
        "log",
        "checkpoint",
        "--db",
        log.db.to_str().unwrap(),
        "--key",
        log.key.to_str().unwrap(),
        "--out",
        cp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pristine = log.dir.join("pristine.db");
    copy_db(&log.db, &pristine);
    let original = contents(&pristine).unwrap();
    let pubkey = audit_log::keys::load_public(&log.pubkey).unwrap();
    let external = std::fs::read_to_string(&cp).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9162);
    let target = log.dir.join("t.db");
    let (mut detected, mut no_ops) = (0, 0);
    // A mutated log either fails verification (or SQLite refuses it), or left every record
    // exactly as it was (the flip hit unused bytes); anything else is a miss.
    let mut tally = |what: &str| {
        let passed = audit_log::store::open_reader(&target)
            .ok()
            .and_then(|c| audit_log::verify_log(&c, &pubkey, Some(&external)).ok())
            .is_some();
        if passed {
            assert_eq!(
                contents(&target).as_ref(),
                Some(&original),
                "{what} changed the log and passed verification"
            );
            no_ops += 1;
        } else {
            detected += 1;
        }
    };
    for i in 0..1000 {
        copy_db(&pristine, &target);
        let kind = i % 5;
        {
            let c = rusqlite::Connection::open(&target).unwrap();
            c.execute_batch("DROP TRIGGER records_no_update; DROP TRIGGER records_no_delete; DROP TRIGGER checkpoints_no_delete;").unwrap();
            let seq = rng.gen_range(0..40i64);
            match kind {
                0 => {
                    // Flip one byte of a record's signed bytes.
                    let (bytes,): (Vec<u8>,) = c
                        .query_row("SELECT bytes FROM records WHERE seq = ?1", [seq], |r| {
                            Ok((r.get(0)?,))
                        })
                        .unwrap();
                    let mut b = bytes;
                    let at = rng.gen_range(0..b.len());
                    b[at] ^= 1 << rng.gen_range(0..8);
                    c.execute(
                        "UPDATE records SET bytes = ?1 WHERE seq = ?2",
                        rusqlite::params![b, seq],
                    )
                    .unwrap();
                }
                1 => {
                    c.execute("DELETE FROM records WHERE seq = ?1", [seq])
                        .unwrap();
                }
                2 => {
                    let other = (seq + rng.gen_range(1..40)) % 40;
                    c.execute("UPDATE records SET seq = -1 WHERE seq = ?1", [seq])
                        .unwrap();
                    c.execute("UPDATE records SET seq = ?1 WHERE seq = ?2", [seq, other])
                        .unwrap();
                    c.execute("UPDATE records SET seq = ?1 WHERE seq = -1", [other])
                        .unwrap();
                }
                3 => {
                    // Truncate the tail and every checkpoint that would show it.
                    c.execute("DELETE FROM records WHERE seq >= ?1", [seq.max(1)])
                        .unwrap();
                    c.execute("DELETE FROM checkpoints WHERE size > ?1", [seq.max(1)])
                        .unwrap();
                }
                _ => {
                    let (sig,): (Vec<u8>,) = c
                        .query_row("SELECT sig FROM records WHERE seq = ?1", [seq], |r| {
                            Ok((r.get(0)?,))
                        })
                        .unwrap();
                    let mut s = sig;
                    s[rng.gen_range(0..64)] ^= 1 << rng.gen_range(0..8);
                    c.execute(
                        "UPDATE records SET sig = ?1 WHERE seq = ?2",
                        rusqlite::params![s, seq],
                    )
                    .unwrap();
                }
            }
        }
        tally(&format!("mutation {i} (kind {kind})"));
    }
    // Raw byte flips in the database file itself.
    let file = std::fs::read(&pristine).unwrap();
    for i in 0..300 {
        let mut b = file.clone();
        let at = rng.gen_range(0..b.len());
        b[at] ^= 1 << rng.gen_range(0..8);
        std::fs::write(&target, &b).unwrap();
        let _ = std::fs::remove_file(target.with_extension("db-wal"));
        tally(&format!("file flip {i} at byte {at}"));
    }
    eprintln!("{detected} tamperings detected; {no_ops} touched no record (unused bytes)");
    assert!(detected >= 1000, "only {detected} detected");
}
