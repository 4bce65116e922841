//! The store end to end: appends verify, every kind of tampering is named with its seq,
//! rotations are followed, exported checkpoints catch truncation, readers see a consistent log.

use audit_log::record::{FileDigest, ModelSubject, RecordBody};
use audit_log::{verify_log, AuditLog, CheckpointPolicy, LogError, Reason, Signer};
use rusqlite::{params, Connection};

fn body(i: u64) -> RecordBody {
    RecordBody::Audit {
        model: ModelSubject {
            path: format!("/models/m{i}"),
            root_sha256: format!("{:064x}", i),
            files: vec![FileDigest {
                path: "model.safetensors".into(),
                sha256: format!("{:064x}", i + 1),
                size: 10,
            }],
        },
        inputs: vec![],
        verdict: "pass".into(),
        result: serde_json::json!({"checks": [{"id": "refusal", "status": "pass", "n": i}]}),
    }
}

fn log_with(n: u64) -> (tempfile::TempDir, std::path::PathBuf, Signer) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("audit.db");
    let signer = Signer::generate();
    let key = Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&signer_bytes(
        &signer,
    )));
    let mut log = AuditLog::open(&path, Some(signer))
        .unwrap()
        .with_checkpoint_policy(CheckpointPolicy {
            every_records: 8,
            every: std::time::Duration::from_secs(3600),
        });
    for i in 0..n {
        log.append(body(i)).unwrap();
    }
    (tmp, path, key)
}

/// Tests need the same key twice; Signer deliberately has no Clone.
fn signer_bytes(s: &Signer) -> [u8; 32] {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("k");
    s.write_new(&p).unwrap();
    let pem = std::fs::read_to_string(&p).unwrap();
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
        .unwrap()
        .to_bytes()
}

/// Open a raw connection with the append-only guards removed, as an attacker would.
fn raw(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch("DROP TRIGGER records_no_update; DROP TRIGGER records_no_delete; DROP TRIGGER checkpoints_no_delete;")
        .unwrap();
    c
}

fn verify(
    path: &std::path::Path,
    key: &Signer,
    external: Option<&str>,
) -> Result<audit_log::Report, audit_log::Failure> {
    let c = audit_log::store::open_reader(path).unwrap();
    verify_log(&c, &key.public(), external)
}

#[test]
fn an_honest_log_verifies_with_checkpoints() {
    let (_t, path, key) = log_with(20);
    let r = verify(&path, &key, None).unwrap();
    assert_eq!(r.records, 20);
    assert_eq!(r.stored_checkpoints, 2);
    let other = Signer::generate();
    let e = verify(&path, &other, None).unwrap_err();
    assert_eq!(e.seq, Some(0));
    assert!(matches!(e.reason, Reason::UnknownKey { .. }), "{e}");
}

#[test]
fn triggers_refuse_updates_and_deletes() {
    let (_t, path, _key) = log_with(3);
    let c = Connection::open(&path).unwrap();
    let e = c
        .execute("DELETE FROM records WHERE seq = 1", [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("append-only"), "{e}");
    let e = c
        .execute("UPDATE records SET key_id = 'x'", [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("append-only"), "{e}");
}

#[test]
fn tampering_is_named_with_seq_and_reason() {
    // Modified bytes: bad signature.
    let (_t, path, key) = log_with(10);
    raw(&path)
        .execute("UPDATE records SET bytes = CAST(replace(CAST(bytes AS TEXT), '\"pass\"', '\"fail\"') AS BLOB) WHERE seq = 4", [])
        .unwrap();
    let e = verify(&path, &key, None).unwrap_err();
    assert_eq!(
        (e.seq, e.reason.clone()),
        (Some(4), Reason::BadSignature),
        "{e}"
    );

    // Deleted row: gap.
    let (_t, path, key) = log_with(10);
    raw(&path)
        .execute("DELETE FROM records WHERE seq = 6", [])
        .unwrap();
    let e = verify(&path, &key, None).unwrap_err();
    assert_eq!(
        (e.seq, e.reason.clone()),
        (Some(7), Reason::Gap { expected: 6 }),
        "{e}"
    );

    // Reordered rows: the signed seq disagrees with the row's.
    let (_t, path, key) = log_with(10);
    let c = raw(&path);
    c.execute("UPDATE records SET seq = 100 WHERE seq = 2", [])
        .unwrap();
    c.execute("UPDATE records SET seq = 2 WHERE seq = 3", [])
        .unwrap();
    c.execute("UPDATE records SET seq = 3 WHERE seq = 100", [])
        .unwrap();
    let e = verify(&path, &key, None).unwrap_err();
    assert_eq!(e.seq, Some(2), "{e}");
    assert!(matches!(e.reason, Reason::Gap { expected: 3 }), "{e}");

    // Truncation: only an exported checkpoint can tell.
    let (_t, path, key) = log_with(10);
    let exported = {
        let mut log = AuditLog::open(
            &path,
            Some(Signer::from_signing_key(
                ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)),
            )),
        )
        .unwrap();
        log.checkpoint().unwrap()
    };
    let c = raw(&path);
    c.execute("DELETE FROM records WHERE seq >= 8", []).unwrap();
    c.execute("DELETE FROM checkpoints WHERE size > 8", [])
        .unwrap();
    verify(&path, &key, None).unwrap();
    let e = verify(&path, &key, Some(&exported)).unwrap_err();
    assert!(
        matches!(e.reason, Reason::InconsistentWithCheckpoint(_)),
        "{e}"
    );
    assert!(e.to_string().contains("truncation or rollback"), "{e}");
}

#[test]
fn rotated_keys_are_followed_and_the_old_key_stops_counting() {
    let (_t, path, key) = log_with(5);
    let new = Signer::generate();
    let new_bytes = signer_bytes(&new);
    let mut log = AuditLog::open(
        &path,
        Some(Signer::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)),
        )),
    )
    .unwrap();
    log.rotate_key(new).unwrap();
    for i in 0..5 {
        log.append(body(100 + i)).unwrap();
    }
    let exported = log.checkpoint().unwrap();
    drop(log);
    let r = verify(&path, &key, Some(&exported)).unwrap();
    assert_eq!(r.keys.len(), 2);
    assert_eq!(r.records, 11);
    // The retired key can no longer open the log to append (issue 22, item 8).
    let e = AuditLog::open(
        &path,
        Some(Signer::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)),
        )),
    )
    .err()
    .expect("the retired key was accepted");
    assert!(matches!(e, LogError::WrongKey { .. }), "{e}");
    assert_eq!(verify(&path, &key, None).unwrap().records, 11);
    let _ = new_bytes;
}

#[test]
fn inclusion_proofs_verify_against_the_root() {
    let (_t, path, _key) = log_with(13);
    let c = audit_log::store::open_reader(&path).unwrap();
    for seq in 0..13 {
        let (leaf, proof, root, n) = audit_log::verify::inclusion(&c, seq).unwrap();
        assert!(audit_log::merkle::verify_inclusion(
            seq as usize,
            n as usize,
            &leaf,
            &proof,
            &root
        ));
    }
    assert!(audit_log::verify::inclusion(&c, 13).is_err());
}

#[test]
fn readers_are_not_blocked_by_a_writer_transaction() {
    let (_t, path, key) = log_with(4);
    let writer = Connection::open(&path).unwrap();
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    writer
        .execute("INSERT INTO meta (key, value) VALUES ('x', 'y')", params![])
        .unwrap();
    // WAL: a reader sees the committed log while the writer holds its transaction.
    let r = verify(&path, &key, None).unwrap();
    assert_eq!(r.records, 4);
    writer.execute_batch("ROLLBACK").unwrap();
}

/// Found by the crash test: a writer killed before its first commit left a database with no
/// schema. Such a file is now never produced (a log is created under a temporary name and
/// linked into place); one left by an older mechwatch is refused, by readers and writers
/// alike, with what it is, rather than initialised or reported as a SQL error.
#[test]
fn regression_verify_on_a_database_without_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("new.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA user_version = 0")
        .unwrap();
    let e = audit_log::store::open_reader(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SQLite database without mechwatch's tables"),
        "{e}"
    );
    let e = AuditLog::open(&path, Some(Signer::generate()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("SQLite database without mechwatch's tables"),
        "{e}"
    );
}

fn tables(path: &std::path::Path) -> Vec<String> {
    let c = Connection::open(path).unwrap();
    let mut s = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    let names = s.query_map([], |r| r.get(0)).unwrap();
    names.collect::<Result<_, _>>().unwrap()
}

/// Issue 22, item 8: a writer with a key that is not the log's current key was accepted, and
/// every later verification failed. Refused at open and, for a writer that was already open
/// when another rotated the key, at append.
#[test]
fn regression_appending_with_a_key_that_is_not_the_logs_current_key_corrupts_the_log() {
    let (_t, path, key) = log_with(3);
    let other = Signer::generate();
    let other_id = other.id().to_string();
    let e = AuditLog::open(&path, Some(other)).err().unwrap();
    let msg = e.to_string();
    assert!(
        matches!(&e, LogError::WrongKey { current, given, .. } if *current == key.id() && *given == other_id),
        "{msg}"
    );
    assert!(msg.contains("mechwatch key rotate"), "{msg}");

    // A writer opened with the right key; then the key is rotated by another writer.
    let same =
        || Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)));
    let mut early = AuditLog::open(&path, Some(same())).unwrap();
    let new = Signer::generate();
    let new_id = new.id().to_string();
    AuditLog::open(&path, Some(same()))
        .unwrap()
        .rotate_key(new)
        .unwrap();
    let e = early.append(body(7)).unwrap_err();
    assert!(
        matches!(&e, LogError::WrongKey { current, .. } if *current == new_id),
        "{e}"
    );
    // `checkpoint` signs too: the same refusal.
    assert!(matches!(early.checkpoint(), Err(LogError::WrongKey { .. })));
    let r = verify(&path, &key, None).unwrap();
    assert_eq!(r.records, 4);

    // `log init --key`: an empty log accepts only the key it was made for.
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh.db");
    drop(AuditLog::init(&fresh, Some(same())).unwrap());
    let e = AuditLog::open(&fresh, Some(Signer::generate()))
        .err()
        .unwrap();
    assert!(matches!(e, LogError::WrongKey { .. }), "{e}");
    AuditLog::open(&fresh, Some(same()))
        .unwrap()
        .append(body(1))
        .unwrap();
}

/// Issue 22, item 9: a zero-byte file, a foreign SQLite database and a file that is not SQLite
/// at all each became a new log. Each is now refused, saying what it is, and left unchanged;
/// a path where nothing exists is opened only by writers.
#[test]
fn regression_an_existing_file_that_is_not_a_mechwatch_log_starts_a_new_log() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = tmp.path().join("zero.db");
    std::fs::write(&zero, b"").unwrap();
    let foreign = tmp.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE notes (x TEXT); INSERT INTO notes VALUES ('mine')")
        .unwrap();
    let text = tmp.path().join("text.db");
    std::fs::write(&text, b"not a database at all\n").unwrap();
    for (path, what) in [
        (&zero, "zero-byte file, not a mechwatch log (truncated?)"),
        (&foreign, "SQLite database without mechwatch's tables"),
        (&text, "not an SQLite database"),
    ] {
        let before = std::fs::read(path).unwrap();
        let e = AuditLog::open(path, Some(Signer::generate()))
            .err()
            .unwrap();
        assert!(matches!(e, LogError::NotALog { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        let e = audit_log::store::open_reader(path).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
        let e = AuditLog::init(path, None).err().unwrap().to_string();
        assert!(e.contains(what), "{e}");
        assert!(
            std::fs::read(path).unwrap() == before,
            "{} changed",
            path.display()
        );
    }
    assert_eq!(tables(&foreign), vec!["notes".to_string()]);

    // Nothing at the path: readers and `open_existing` refuse and create nothing.
    let typo = tmp.path().join("typo.db");
    let e = audit_log::store::open_reader(&typo).unwrap_err();
    assert!(matches!(e, LogError::Missing { .. }), "{e}");
    let e = AuditLog::open_existing(&typo, None).err().unwrap();
    assert!(matches!(e, LogError::Missing { .. }), "{e}");
    assert!(!typo.exists());
    // A writer starts a log there, complete from the first moment, and leaves no temporaries.
    let mut log = AuditLog::open(&typo, Some(Signer::generate())).unwrap();
    log.append(body(0)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("typo") || n.starts_with(".typo"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["typo.db", "typo.db-shm", "typo.db-wal", "typo.db.head"]
    );
    assert!(AuditLog::init(&typo, None).is_err());
}

/// Issue 22, item 10: a read-only copy could not be verified (WAL mode wanted a writable
/// `-shm`). The reader's connection is read-only, and on a log with no `-wal` in a directory
/// where no `-shm` can be made it opens the file immutable; the end-to-end test runs `log
/// verify` as an unprivileged user on a read-only directory.
#[test]
fn regression_a_read_only_copy_of_a_log_cannot_be_verified() {
    let (_t, path, key) = log_with(5);
    let c = audit_log::store::open_reader(&path).unwrap();
    assert!(c.is_readonly(rusqlite::DatabaseName::Main).unwrap());
    let e = c
        .execute("INSERT INTO meta (key, value) VALUES ('x', 'y')", [])
        .unwrap_err();
    assert_eq!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::ReadOnly));
    drop(c);
    // An I/O failure is "could not check", never evidence of tampering.
    assert!(!Reason::Unreadable("disk I/O error".into()).is_evidence());
    assert!(Reason::Database("malformed".into()).is_evidence());
    assert_eq!(verify(&path, &key, None).unwrap().records, 5);
}

/// Issue 22, item 11: after the tail and the stored checkpoints that would show it were
/// deleted, the next append reused sequence numbers and `verify` passed. The writer's head
/// witness catches it: a live writer from memory, a new one and `verify` from `<db>.head`.
#[test]
fn regression_the_writer_does_not_notice_a_shrunken_log() {
    use std::os::unix::fs::PermissionsExt;
    let (_t, path, key) = log_with(20);
    let same =
        || Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)));
    let head = audit_log::store::head_path(&path);
    let mode = std::fs::metadata(&head).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let witnessed = |p: &std::path::Path| {
        let note = audit_log::store::read_head(p).unwrap();
        let c = audit_log::store::open_reader(p).unwrap();
        audit_log::verify_log_witnessed(&c, &key.public(), None, note.as_deref())
    };
    assert_eq!(witnessed(&path).unwrap().head_witness, Some(20));
    let mut live = AuditLog::open(&path, Some(same())).unwrap();

    let c = raw(&path);
    c.execute("DELETE FROM records WHERE seq >= 12", [])
        .unwrap();
    c.execute("DELETE FROM checkpoints WHERE size > 12", [])
        .unwrap();
    drop(c);
    // Without the witness nothing shows it (as before).
    verify(&path, &key, None).unwrap();
    let e = witnessed(&path).unwrap_err();
    assert!(matches!(e.reason, Reason::RolledBack(_)), "{e}");
    assert!(e.to_string().contains("log holds 12"), "{e}");
    let e = AuditLog::open(&path, Some(same())).err().unwrap();
    assert!(matches!(e, LogError::RolledBack { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("holds 12 records, but this host's writer wrote 20"),
        "{e}"
    );
    // The live writer notices from memory, even with the witness file gone.
    std::fs::rename(&head, path.with_extension("aside")).unwrap();
    let e = live.append(body(50)).unwrap_err();
    assert!(matches!(e, LogError::RolledBack { .. }), "{e}");
    assert_eq!(
        audit_log::store::record_count(live.connection()).unwrap(),
        12
    );
    drop(live);

    // Regrown to the same length with other records: the root at the witnessed size differs.
    {
        let mut log = AuditLog::open(&path, Some(same())).unwrap();
        for i in 0..8 {
            log.append(body(100 + i)).unwrap();
        }
    }
    std::fs::rename(path.with_extension("aside"), &head).unwrap();
    let e = AuditLog::open(&path, Some(same())).err().unwrap();
    assert!(
        e.to_string().contains("first 20 records are not the ones"),
        "{e}"
    );
    let e = witnessed(&path).unwrap_err();
    assert!(matches!(e.reason, Reason::RolledBack(_)), "{e}");

    // The database deleted outright: no writer starts a new log over its witness.
    std::fs::remove_file(&path).unwrap();
    let _ = std::fs::remove_file(path.with_extension("db-wal"));
    let e = AuditLog::open(&path, Some(same())).err().unwrap();
    assert!(e.to_string().contains("deleted or moved"), "{e}");
    assert!(!path.exists());
}
