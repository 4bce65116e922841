//! The audit log through the real binary: keys, verification verdicts and exit codes, DSSE
//! export verified by OpenSSL, a writer killed 200 times, 1000 random tamperings, and the
//! issue 22 regressions (wrong keys, non-log files, read-only copies, rollbacks, forged rows).

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
    // The retired key can no longer append: refused, and the log still verifies.
    let o = append(log.db.to_str().unwrap(), log.key.to_str().unwrap(), "1");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("key rotate"), "{}", stderr(&o));
    let o = verify(&log, &log.db, None);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("9 records"), "{}", stdout(&o));
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
    let mut acked: Vec<(u64, String)> = Vec::new();
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
            let mut seen = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(ack) = parse_ack(&line) {
                    seen.push(ack);
                }
            }
            seen
        });
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(2..40)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for (seq, hash) in reader.join().unwrap() {
            acked_max = Some(acked_max.map_or(seq, |m: u64| m.max(seq)));
            acked.push((seq, hash));
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
    // Every acknowledged record is there with the bytes it was acknowledged with (a lost
    // record whose seq a later writer reused would pass the count check above).
    let stored = record_hashes(&log.db);
    for (seq, hash) in &acked {
        assert_eq!(
            stored.get(*seq as usize),
            Some(hash),
            "acknowledged record {seq} is missing or different"
        );
    }
    // Temporary files of killed writers were cleaned up by the restarts.
    let left: Vec<String> = std::fs::read_dir(&log.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".audit.db."))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// `acked SEQ HASH` from `log stress-append`.
fn parse_ack(line: &str) -> Option<(u64, String)> {
    let mut w = line.strip_prefix("acked ")?.split(' ');
    let seq = w.next()?.parse().ok()?;
    let hash = w.next()?.to_string();
    Some((seq, hash))
}

/// Hex SHA-256 of every stored record's bytes, by seq.
fn record_hashes(db: &Path) -> Vec<String> {
    use sha2::Digest;
    contents(db)
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, (seq, bytes, _, _))| {
            assert_eq!(*seq as usize, i, "gap at {i}");
            hex::encode(sha2::Sha256::digest(bytes))
        })
        .collect()
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

/// The key id of a public key file.
fn key_id_of(pubkey: &Path) -> String {
    audit_log::keys::key_id(&audit_log::keys::load_public(pubkey).unwrap())
}

/// Issue 22, item 8: `stress-append` (like `check --log` and the daemon) accepted a key that
/// was not the log's current key, and every later `log verify` failed.
#[test]
fn regression_appending_with_a_key_that_is_not_the_logs_current_key_corrupts_the_log() {
    let log = new_log(3);
    let other = log.dir.join("other.pem");
    assert!(
        mechwatch(&["key", "generate", "--out", other.to_str().unwrap()])
            .status
            .success()
    );
    let (current, given) = (
        key_id_of(&log.pubkey),
        key_id_of(&log.dir.join("other.pem.pub")),
    );
    let o = append(log.db.to_str().unwrap(), other.to_str().unwrap(), "1");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    for want in [current.as_str(), given.as_str(), "mechwatch key rotate"] {
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
    }
    // A checkpoint signed by the wrong key would break verification the same way.
    let o = mechwatch(&[
        "log",
        "checkpoint",
        "--db",
        log.db.to_str().unwrap(),
        "--key",
        other.to_str().unwrap(),
        "--out",
        log.dir.join("cp").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = verify(&log, &log.db, None);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("ok: 3 records"), "{}", stdout(&o));
}

/// Issue 22, item 9: a zero-byte file, a foreign SQLite database and a non-SQLite file were
/// turned into logs, and `log checkpoint --db typo.db` created a log and exited 0.
#[test]
fn regression_an_existing_file_that_is_not_a_mechwatch_log_starts_a_new_log() {
    let log = new_log(0);
    let zero = log.dir.join("zero.db");
    std::fs::write(&zero, b"").unwrap();
    let foreign = log.dir.join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE notes (x TEXT); INSERT INTO notes VALUES ('mine')")
        .unwrap();
    let text = log.dir.join("text.db");
    std::fs::write(&text, b"hello\n").unwrap();
    let (key, pubkey, out) = (
        log.key.to_str().unwrap(),
        log.pubkey.to_str().unwrap(),
        log.dir.join("out"),
    );
    let out = out.to_str().unwrap();
    let commands = |db: &str| -> Vec<Vec<String>> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        vec![
            v(&[
                "log",
                "stress-append",
                "--db",
                db,
                "--key",
                key,
                "--count",
                "1",
            ]),
            v(&["log", "verify", "--db", db, "--pubkey", pubkey]),
            v(&["log", "show", "--db", db]),
            v(&["log", "checkpoint", "--db", db, "--out", out]),
            v(&["log", "checkpoint", "--db", db, "--key", key, "--out", out]),
            v(&[
                "log", "export", "--db", db, "--format", "jsonl", "--out", out,
            ]),
            v(&["log", "proof", "--db", db, "--seq", "0"]),
            v(&["log", "init", "--db", db]),
        ]
    };
    for (path, what) in [
        (&zero, "zero-byte file, not a mechwatch log (truncated?)"),
        (&foreign, "SQLite database without mechwatch's tables"),
        (&text, "not an SQLite database"),
    ] {
        let before = std::fs::read(path).unwrap();
        for args in commands(path.to_str().unwrap()) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = mechwatch(&args);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
            assert!(
                e.contains(what) && e.contains(path.to_str().unwrap()),
                "{args:?}: {e}"
            );
            assert!(
                std::fs::read(path).unwrap() == before,
                "{args:?} changed {path:?}"
            );
        }
    }
    let c = rusqlite::Connection::open(&foreign).unwrap();
    let tables: i64 = c
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 1, "our tables were added to a foreign database");

    // A path where nothing exists: read-only commands fail and create nothing.
    let typo = log.dir.join("typo.db");
    for args in commands(typo.to_str().unwrap()).into_iter().skip(1).take(6) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = mechwatch(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no such audit log"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(!typo.exists(), "{args:?} created {typo:?}");
    }
    // `log init` starts one there, once.
    let o = mechwatch(&["log", "init", "--db", typo.to_str().unwrap(), "--key", key]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = verify(&log, &typo, None);
    assert!(stdout(&o).starts_with("ok: 0 records"), "{}", stdout(&o));
    let o = mechwatch(&["log", "init", "--db", typo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

/// Whether this process runs as root (which ignores permission bits).
fn running_as_root(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = dir.join(".uid-probe");
    std::fs::write(&probe, b"").unwrap();
    let root = std::fs::metadata(&probe).unwrap().uid() == 0;
    std::fs::remove_file(&probe).unwrap();
    root
}

/// Files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Issue 22, item 10: a read-only copy of a log could not be verified (WAL mode wanted a
/// writable `-shm`), and the I/O failure exited 1, as if tampered. Root ignores permission
/// bits, so when the tests run as root `log verify` runs as user 65534 (nobody) from a copy
/// of the binary that user can reach; the test first checks that this user really cannot
/// write in the directory. It proves that verification writes nothing and needs no write
/// access: a log with no `-wal` verifies, a `-wal` with its `-shm` verifies, and a `-wal`
/// without a `-shm` is refused with exit 2 and an explanation, not verified stale.
#[test]
fn regression_a_read_only_copy_of_a_log_cannot_be_verified() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let log = new_log(5);
    // A second log with records in its -wal: a writer killed after a few acknowledgements.
    let live = log.dir.join("live.db");
    let mut child = Command::new(mechwatch_bin())
        .args(["log", "stress-append", "--db", live.to_str().unwrap()])
        .args(["--key", log.key.to_str().unwrap(), "--count", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last = 0;
    while last < 5 {
        last = parse_ack(&lines.next().unwrap().unwrap()).unwrap().0;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(log.dir.join("live.db-wal").exists());

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_root = running_as_root(root);
    let bin = root.join("mechwatch");
    if std::fs::hard_link(mechwatch_bin(), &bin).is_err() {
        std::fs::copy(mechwatch_bin(), &bin).unwrap();
    }
    let pubkey = root.join("signing.pem.pub");
    std::fs::copy(&log.pubkey, &pubkey).unwrap();
    std::fs::set_permissions(&pubkey, std::fs::Permissions::from_mode(0o444)).unwrap();
    let read_only_dir = |name: &str, files: &[(&Path, &str)]| -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir(&d).unwrap();
        for (src, dst) in files {
            std::fs::copy(src, d.join(dst)).unwrap();
            let perms = std::fs::Permissions::from_mode(0o444);
            std::fs::set_permissions(d.join(dst), perms).unwrap();
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
        d
    };
    let unprivileged = |program: &Path| {
        let mut c = Command::new(program);
        if as_root {
            c.uid(65534).gid(65534);
        }
        c
    };
    let head = audit_log::store::head_path(&log.db);
    let plain = read_only_dir("plain", &[(&log.db, "audit.db"), (&head, "audit.db.head")]);
    let wal = |name| log.dir.join(format!("live.db{name}"));
    let with_shm = read_only_dir(
        "with-shm",
        &[
            (&live, "live.db"),
            (&wal("-wal"), "live.db-wal"),
            (&wal("-shm"), "live.db-shm"),
        ],
    );
    let no_shm = read_only_dir(
        "no-shm",
        &[(&live, "live.db"), (&wal("-wal"), "live.db-wal")],
    );

    // The set-up is honest: the verifying user cannot write there.
    let probe = unprivileged(Path::new("/bin/sh"))
        .args(["-c", &format!("echo x > {}/probe", plain.display())])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        !probe.success(),
        "the verifying user can write in {plain:?}"
    );

    let run_verify = |dir: &Path, db: &str| {
        unprivileged(&bin)
            .args(["log", "verify", "--db", dir.join(db).to_str().unwrap()])
            .args(["--pubkey", pubkey.to_str().unwrap()])
            .output()
            .unwrap()
    };
    for (dir, db, records) in [(&plain, "audit.db", 5), (&with_shm, "live.db", last + 1)] {
        let before = listing(dir);
        let o = run_verify(dir, db);
        assert!(o.status.success(), "{dir:?}: {}{}", stdout(&o), stderr(&o));
        let n: u64 = stdout(&o)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!(n >= records, "{dir:?}: {}", stdout(&o));
        assert_eq!(listing(dir), before, "verify wrote into {dir:?}");
    }
    let o = run_verify(&no_shm, "live.db");
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    assert!(!stdout(&o).contains("FAILED"), "{}", stdout(&o));
    assert!(stderr(&o).contains("write-ahead log"), "{}", stderr(&o));
    assert_eq!(listing(&no_shm), ["live.db", "live.db-wal"]);
    for d in [&plain, &with_shm, &no_shm] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Issue 22, item 11: after the tail was deleted (triggers dropped, rows deleted) the next
/// append reused sequence numbers and `verify` passed. The writer's head witness
/// (`audit.db.head`) makes both refuse.
#[test]
fn regression_the_writer_does_not_notice_a_shrunken_log() {
    let log = new_log(20);
    let c = rusqlite::Connection::open(&log.db).unwrap();
    c.execute_batch(
        "DROP TRIGGER records_no_delete; DROP TRIGGER checkpoints_no_delete;
         DELETE FROM records WHERE seq >= 12; DELETE FROM checkpoints WHERE size > 12;",
    )
    .unwrap();
    drop(c);
    let o = verify(&log, &log.db, None);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("rolled back"), "{}", stdout(&o));
    let o = append(log.db.to_str().unwrap(), log.key.to_str().unwrap(), "1");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("rolled back") && stderr(&o).contains("audit.db.head"),
        "{}",
        stderr(&o)
    );
    assert_eq!(contents(&log.db).unwrap().len(), 12);
}

/// Issue 22, item 12a: `log show` panicked on a forged row whose digest was shorter than the
/// 16 characters it prints. Forged rows (INSERT is not blocked) are flagged lines, exit 1.
#[test]
fn regression_log_show_panics_on_a_forged_row() {
    let log = new_log(2);
    let (_, bytes, _, key_id) = contents(&log.db).unwrap().remove(0);
    let mut st: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    st["predicate"]["log"]["seq"] = 2.into();
    st["predicate"]["record"] = serde_json::json!({
        "kind": "audit",
        "model": {"path": "/models/forged", "root_sha256": "abc", "files": []},
        "inputs": [], "verdict": "pass", "result": {}
    });
    let c = rusqlite::Connection::open(&log.db).unwrap();
    let insert = "INSERT INTO records (seq, bytes, sig, key_id, kind, subject) \
                  VALUES (?1, ?2, ?3, ?4, 'audit', 'abc')";
    let forged = serde_json::to_vec(&st).unwrap();
    c.execute(insert, rusqlite::params![2, forged, vec![0u8; 64], key_id])
        .unwrap();
    c.execute(
        insert,
        rusqlite::params![3, b"not json".to_vec(), vec![0u8; 3], key_id],
    )
    .unwrap();
    drop(c);
    let db = log.db.to_str().unwrap();
    let o = mechwatch(&["log", "show", "--db", db]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("MALFORMED digest \"abc\""), "{out}");
    assert!(
        out.lines().nth(3).unwrap().contains("MALFORMED record"),
        "{out}"
    );
    let o = mechwatch(&["log", "show", "--db", db, "--json", "--seq", "3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"malformed\""), "{}", stdout(&o));
    let o = mechwatch(&["log", "show", "--db", db, "--seq", &u64::MAX.to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(verify(&log, &log.db, None).status.code(), Some(1));
}

/// Run `mechwatch args`, killing it after `secs`: `None` if it had to be killed.
fn run_bounded(args: &[&str], secs: u64) -> Option<std::process::Output> {
    let mut child = Command::new(mechwatch_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

/// Red team, item 1: a trigger planted `AFTER INSERT ON records` with an endless query hung
/// every writer while `log verify` said ok. Verify names it (exit 1); writers refuse at once.
#[test]
fn regression_a_planted_trigger_hangs_every_writer() {
    let log = new_log(2);
    let c = rusqlite::Connection::open(&log.db).unwrap();
    c.execute_batch(
        "CREATE TRIGGER t_h AFTER INSERT ON records BEGIN SELECT COUNT(*) FROM (WITH RECURSIVE \
         r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT i FROM r); END;",
    )
    .unwrap();
    drop(c);
    let o = verify(&log, &log.db, None);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("trigger \"t_h\" on \"records\""),
        "{}",
        stdout(&o)
    );
    let (db, key) = (log.db.to_str().unwrap(), log.key.to_str().unwrap());
    let new_key = log.dir.join("new.pem");
    assert!(
        mechwatch(&["key", "generate", "--out", new_key.to_str().unwrap()])
            .status
            .success()
    );
    for args in [
        vec![
            "log",
            "stress-append",
            "--db",
            db,
            "--key",
            key,
            "--count",
            "1",
        ],
        vec![
            "key",
            "rotate",
            "--db",
            db,
            "--key",
            key,
            "--new-key",
            new_key.to_str().unwrap(),
        ],
        vec![
            "log",
            "checkpoint",
            "--db",
            db,
            "--key",
            key,
            "--out",
            "/dev/null",
        ],
    ] {
        let o = run_bounded(&args, 60).unwrap_or_else(|| panic!("{args:?} hung"));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("t_h"), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(contents(&log.db).unwrap().len(), 2);
}

/// Red team, item 2: a record's bytes stored as text made `log verify` exit 2 ("could not
/// read ... Invalid column type") and `report` write no page. It is evidence: exit 1.
#[test]
fn regression_a_value_of_the_wrong_type_is_reported_as_could_not_check() {
    let log = new_log(3);
    let c = rusqlite::Connection::open(&log.db).unwrap();
    c.execute_batch(
        "DROP TRIGGER records_no_update;
         UPDATE records SET bytes = CAST(bytes AS TEXT) WHERE seq = 1;",
    )
    .unwrap();
    drop(c);
    let o = verify(&log, &log.db, None);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("seq 1: the database was edited"),
        "{}",
        stdout(&o)
    );
    let page = log.dir.join("r.html");
    let o = mechwatch(&[
        "report",
        "--db",
        log.db.to_str().unwrap(),
        "--pubkey",
        log.pubkey.to_str().unwrap(),
        "--last",
        "5",
        "--out",
        page.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(std::fs::read_to_string(&page).unwrap().contains("edited"));
    let o = mechwatch(&["log", "show", "--db", log.db.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("#1      MALFORMED row"),
        "{}",
        stdout(&o)
    );
}

/// Red team, item 3: without `audit.db.head`, `log checkpoint --key` signed a fresh
/// checkpoint over a forged record (and recreated the witness) and `key rotate` appended
/// after it. Writers verify the whole log first and refuse.
#[test]
fn regression_writers_sign_over_a_log_that_does_not_verify() {
    let log = new_log(3);
    std::fs::remove_file(log.dir.join("audit.db.head")).unwrap();
    let c = rusqlite::Connection::open(&log.db).unwrap();
    let bytes: Vec<u8> = c
        .query_row("SELECT bytes FROM records WHERE seq = 1", [], |r| r.get(0))
        .unwrap();
    let forged = String::from_utf8(bytes)
        .unwrap()
        .replace("stress record 1", "stress record X");
    c.execute_batch("DROP TRIGGER records_no_update;").unwrap();
    c.execute(
        "UPDATE records SET bytes = ?1 WHERE seq = 1",
        [forged.into_bytes()],
    )
    .unwrap();
    drop(c);
    let (db, key) = (log.db.to_str().unwrap(), log.key.to_str().unwrap());
    let cp = log.dir.join("fresh.cp");
    let o = mechwatch(&[
        "log",
        "checkpoint",
        "--db",
        db,
        "--key",
        key,
        "--out",
        cp.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not verify (seq 1: bad signature)"),
        "{}",
        stderr(&o)
    );
    assert!(!cp.exists() && !log.dir.join("audit.db.head").exists());
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
        db,
        "--key",
        key,
        "--new-key",
        new_key.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(append(db, key, "1").status.code(), Some(2));
    assert_eq!(contents(&log.db).unwrap().len(), 3);
}

/// Red team, item 4: `log show` printed stored strings raw (an ESC sequence, a newline
/// forging a line) and `report --format md` emitted HTML and `javascript:` links verbatim.
#[test]
fn regression_log_show_and_the_markdown_report_pass_markup_through() {
    let log = new_log(0);
    let hostile = "x\u{1b}[2J\n#9      forged line <script>alert(1)</script> \
                   <img src=x onerror=alert(2)> [l](javascript:alert(3)) | `tick`";
    {
        let signer = audit_log::Signer::load(&log.key).unwrap();
        let mut w = audit_log::AuditLog::open(&log.db, Some(signer)).unwrap();
        w.append(audit_log::RecordBody::Error {
            model: None,
            inputs: vec![],
            stage: hostile.into(),
            message: hostile.into(),
        })
        .unwrap();
    }
    let db = log.db.to_str().unwrap();
    let o = mechwatch(&["log", "show", "--db", db]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        !out.contains('\u{1b}') && out.contains("\\u{1b}[2J\\u{a}#9"),
        "{out}"
    );
    let md = log.dir.join("r.md");
    let o = mechwatch(&[
        "report",
        "--db",
        db,
        "--pubkey",
        log.pubkey.to_str().unwrap(),
        "--last",
        "1",
        "--format",
        "md",
        "--out",
        md.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(&md).unwrap();
    for raw in [
        "<script",
        "<img",
        "](javascript",
        "\u{1b}",
        "`tick`",
        "\n#9",
    ] {
        assert!(!md.contains(raw), "{raw:?} in {md}");
    }
    assert!(md.contains("&lt;script&gt;"), "{md}");
}

/// Red team, item 5: `key generate --out FILE` replaced FILE.pub even through a symlink to
/// another file, and under umask 000 made it 0666.
#[test]
fn regression_key_generate_replaces_a_symlinked_public_key_file() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, tmp.path().join("s.pem.pub")).unwrap();
    let key = tmp.path().join("s.pem");
    let o = mechwatch(&["key", "generate", "--out", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        !key.exists(),
        "a private key without its public key was left behind"
    );
    let key = tmp.path().join("u.pem");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec '{}' key generate --out '{}'",
            mechwatch_bin().display(),
            key.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&tmp.path().join("u.pem.pub")), 0o644);
}

/// Red team, item 6: `log proof ... | head -c1` panicked ("failed printing to stdout:
/// Broken pipe", exit 101). A closed pipe ends every command quietly with 141.
#[test]
fn regression_log_proof_panics_when_stdout_is_closed() {
    let log = new_log(3);
    let db = log.db.to_str().unwrap();
    for args in [
        vec!["log", "proof", "--db", db, "--seq", "0"],
        vec!["log", "show", "--db", db],
        vec![
            "log",
            "verify",
            "--db",
            db,
            "--pubkey",
            log.pubkey.to_str().unwrap(),
        ],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(mechwatch_bin())
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(141), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).is_empty(), "{args:?}: {}", stderr(&o));
    }
}

/// A closed standard error (`... 2>&1 | head` after `head` exits) made `eprintln!` panic
/// (exit 101); the error's message is lost, its exit status is not.
#[test]
fn regression_a_closed_stderr_panics() {
    let log = new_log(1);
    let missing = log.dir.join("missing.db");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(mechwatch_bin())
        .args(["log", "verify", "--db", missing.to_str().unwrap()])
        .args(["--pubkey", log.pubkey.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// Red team, item 7: `--key /dev/zero`, `--checkpoint /dev/zero` and `--export /dev/zero`
/// grew memory without bound, and a FIFO as `--key` blocked forever.
#[test]
fn regression_input_files_are_read_without_a_bound() {
    let log = new_log(2);
    let fifo = log.dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = log.dir.join("big.cp");
    std::fs::write(&big, vec![b'a'; 64 * 1024 + 1]).unwrap();
    let (db, pubkey) = (log.db.to_str().unwrap(), log.pubkey.to_str().unwrap());
    let cp = log.dir.join("audit.cp");
    let key = log.key.to_str().unwrap();
    let o = mechwatch(&[
        "log",
        "checkpoint",
        "--db",
        db,
        "--key",
        key,
        "--out",
        cp.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (args, says) in [
        (
            vec!["key", "public", "--key", "/dev/zero"],
            "not a regular file",
        ),
        (
            vec!["key", "public", "--key", fifo.to_str().unwrap()],
            "not a regular file",
        ),
        (
            vec!["key", "public", "--pubkey", "/dev/zero"],
            "not a regular file",
        ),
        (
            vec![
                "log",
                "verify",
                "--db",
                db,
                "--pubkey",
                pubkey,
                "--checkpoint",
                "/dev/zero",
            ],
            "not a regular file",
        ),
        (
            vec![
                "log",
                "verify",
                "--db",
                db,
                "--pubkey",
                pubkey,
                "--checkpoint",
                big.to_str().unwrap(),
            ],
            "larger than 64 KiB",
        ),
        (
            vec![
                "log",
                "verify",
                "--export",
                "/dev/zero",
                "--checkpoint",
                cp.to_str().unwrap(),
                "--pubkey",
                pubkey,
            ],
            "not a regular file",
        ),
    ] {
        let o = run_bounded(&args, 60).unwrap_or_else(|| panic!("{args:?} hung"));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

/// Red team, item 8: the head witness was written 0600, so another user who may read the
/// 0644 log could not verify it ("unreadable head witness: Permission denied").
#[test]
fn regression_the_head_witness_is_unreadable_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let log = new_log(2);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let db_mode = mode(&log.db);
    assert_eq!(
        mode(&log.dir.join("audit.db.head")),
        db_mode,
        "the witness's mode"
    );
}

/// Red team, item 9: `status` presented the unsigned job table as fact (a "done pass" for
/// a record whose signed verdict is fail, a seq that does not exist), printed control
/// characters raw, and showed the head of a log that fails verification unmarked.
#[test]
fn regression_status_presents_the_unsigned_job_table_as_fact() {
    let log = new_log(2);
    let state = log.dir.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::rename(&log.db, state.join("audit.db")).unwrap();
    std::fs::rename(log.dir.join("audit.db.head"), state.join("audit.db.head")).unwrap();
    let jobs = rusqlite::Connection::open(state.join("state.db")).unwrap();
    jobs.execute_batch(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, path TEXT NOT NULL, watch INTEGER NOT NULL,
             state TEXT NOT NULL, verdict TEXT, seq INTEGER, message TEXT,
             created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
         INSERT INTO jobs VALUES (1, '/m/a', 0, 'done', 'pass', 1, NULL, 't', 't');
         INSERT INTO jobs VALUES (2, '/m/b' || char(27) || '[32mOK', 0, 'done', 'error', 7, NULL, 't', 't');
         INSERT INTO jobs VALUES (3, '/m/c', 0, 'failed', 'error', 0, NULL, 't', 't');",
    )
    .unwrap();
    drop(jobs);
    let dir = state.to_str().unwrap();
    let o = mechwatch(&["status", "--state-dir", dir]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains('\u{1b}'), "{out}");
    let line = |p: &str| out.lines().find(|l| l.contains(p)).unwrap().to_string();
    assert!(
        line("/m/a (seq 1)").contains("NOT what the log says: seq 1 is a error record"),
        "{out}"
    );
    assert!(line("(seq 7)").contains("no record with seq 7"), "{out}");
    assert!(!line("/m/c").contains("NOT what"), "{out}");
    assert!(out.contains("not verified"), "{out}");
    let o = mechwatch(&[
        "status",
        "--state-dir",
        dir,
        "--pubkey",
        log.pubkey.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(verified)"), "{}", stdout(&o));
    let c = rusqlite::Connection::open(state.join("audit.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER records_no_update; UPDATE records SET sig = x'00' WHERE seq = 1;",
    )
    .unwrap();
    drop(c);
    let o = mechwatch(&[
        "status",
        "--state-dir",
        dir,
        "--pubkey",
        log.pubkey.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("FAILED verification: seq 1"),
        "{}",
        stdout(&o)
    );
}
