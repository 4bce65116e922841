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
    // Readable by whoever may read the log, who must be able to verify it: nothing secret.
    let mode = std::fs::metadata(&head).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
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

/// Red team, item 1: a trigger planted `AFTER INSERT ON records` ran inside every writer's
/// append (an endless query hung it; here it copies each record out) while `verify` passed.
/// The schema is an allow-list: `verify` names the trigger, writers refuse to open the log,
/// and a writer that opened it before the trigger was planted refuses its next append.
#[test]
fn regression_a_planted_trigger_runs_inside_every_append() {
    let (_t, path, key) = log_with(3);
    let same =
        || Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)));
    let mut live = AuditLog::open(&path, Some(same())).unwrap();
    let c = Connection::open(&path).unwrap();
    c.execute_batch(
        "CREATE TABLE loot (bytes BLOB);
         CREATE TRIGGER t_h AFTER INSERT ON records BEGIN INSERT INTO loot VALUES (new.bytes); END;",
    )
    .unwrap();
    let e = verify(&path, &key, None).unwrap_err();
    assert!(matches!(e.reason, Reason::ForeignSchema(_)), "{e}");
    assert!(e.reason.is_evidence());
    assert!(
        e.to_string().contains("loot") || e.to_string().contains("t_h"),
        "{e}"
    );
    let e = live.append(body(9)).unwrap_err();
    assert!(matches!(e, LogError::Tampered { .. }), "{e}");
    let e = AuditLog::open(&path, Some(same())).err().unwrap();
    assert!(matches!(e, LogError::Tampered { .. }), "{e}");
    c.execute_batch("DROP TABLE loot;").unwrap();
    let e = AuditLog::open(&path, Some(same())).err().unwrap();
    assert!(
        e.to_string().contains("trigger \"t_h\" on \"records\""),
        "{e}"
    );
    assert_eq!(audit_log::store::record_count(&c).unwrap(), 3);
    // A guard trigger replaced by another body under its own name is foreign too.
    c.execute_batch(
        "DROP TRIGGER t_h; DROP TRIGGER records_no_update;
         CREATE TRIGGER records_no_update BEFORE UPDATE ON records BEGIN SELECT 1; END;",
    )
    .unwrap();
    let e = verify(&path, &key, None).unwrap_err();
    assert!(e.to_string().contains("records_no_update"), "{e}");
}

/// Red team, item 2: a value of the wrong type (a record's bytes stored as text, a
/// signature as text, a checkpoint note as a blob, the meta table emptied) made `verify`
/// report "could not read" (exit 2, not tampered). It is evidence, naming the seq or place.
#[test]
fn regression_a_value_of_the_wrong_type_reads_as_could_not_check() {
    let cases = [
        (
            "UPDATE records SET bytes = CAST(bytes AS TEXT) WHERE seq = 1",
            Some(1),
            "bytes",
        ),
        (
            "UPDATE records SET sig = hex(sig) WHERE seq = 2",
            Some(2),
            "sig",
        ),
        (
            "UPDATE records SET key_id = CAST(key_id AS BLOB) WHERE seq = 0",
            Some(0),
            "key_id",
        ),
        (
            "UPDATE records SET kind = CAST(kind AS BLOB) WHERE seq = 1",
            Some(1),
            "kind",
        ),
        (
            "UPDATE checkpoints SET note = CAST(note AS BLOB)",
            None,
            "checkpoints size 8",
        ),
        (
            "UPDATE meta SET value = CAST(value AS BLOB) WHERE key = 'log_id'",
            None,
            "log_id",
        ),
        ("DELETE FROM meta", None, "no log_id"),
    ];
    for (edit, seq, named) in cases {
        let (_t, path, key) = log_with(9);
        let c = raw(&path);
        c.execute_batch("DROP TRIGGER checkpoints_no_update;")
            .unwrap();
        c.execute(edit, []).unwrap();
        drop(c);
        let e = verify(&path, &key, None).unwrap_err();
        assert!(e.reason.is_evidence(), "{edit}: {e}");
        assert_eq!(e.seq, seq, "{edit}: {e}");
        assert!(e.to_string().contains(named), "{edit}: {e}");
        assert!(e.to_string().contains("edited"), "{edit}: {e}");
        let same =
            Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)));
        let e = AuditLog::open(&path, Some(same)).err().expect(edit);
        assert!(e.to_string().contains("edited"), "{edit}: {e}");
    }
}

/// Red team, item 3: without the head witness a writer appended after, and signed a fresh
/// checkpoint over, a record edited in place. A writer now verifies the whole log first.
#[test]
fn regression_a_writer_extends_a_log_that_does_not_verify() {
    let (_t, path, key) = log_with(4);
    let same =
        || Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)));
    std::fs::remove_file(audit_log::store::head_path(&path)).unwrap();
    let c = raw(&path);
    let bytes: Vec<u8> = c
        .query_row("SELECT bytes FROM records WHERE seq = 1", [], |r| r.get(0))
        .unwrap();
    let forged = String::from_utf8(bytes)
        .unwrap()
        .replace("\"verdict\":\"pass\"", "\"verdict\":\"fail\"");
    c.execute(
        "UPDATE records SET bytes = ?1 WHERE seq = 1",
        params![forged.into_bytes()],
    )
    .unwrap();
    let e = AuditLog::open(&path, Some(same())).err().unwrap();
    assert!(matches!(e, LogError::Unverified { .. }), "{e}");
    assert!(e.to_string().contains("seq 1: bad signature"), "{e}");
    assert!(!audit_log::store::head_path(&path).exists());
    assert_eq!(audit_log::store::record_count(&c).unwrap(), 4);
    let checkpoints: i64 = c
        .query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    let e = AuditLog::open_existing(&path, Some(same())).err().unwrap();
    assert!(matches!(e, LogError::Unverified { .. }), "{e}");
    let after: i64 = c
        .query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    assert_eq!(after, checkpoints);
}

/// After a rotation the writer's key is not the first one; it verifies from the first
/// public key the log records, or one given, and refuses when it has neither.
#[test]
fn a_writer_after_a_rotation_verifies_from_the_logs_first_key() {
    let (_t, path, key) = log_with(3);
    let new = Signer::generate();
    let new_bytes = signer_bytes(&new);
    let again = || Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&new_bytes));
    let mut log = AuditLog::open(
        &path,
        Some(Signer::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)),
        )),
    )
    .unwrap();
    log.rotate_key(new).unwrap();
    drop(log);
    AuditLog::open(&path, Some(again()))
        .unwrap()
        .append(body(7))
        .unwrap();
    let c = raw(&path);
    c.execute("DELETE FROM meta WHERE key = 'initial_public_key'", [])
        .unwrap();
    let e = AuditLog::open(&path, Some(again())).err().unwrap();
    assert!(matches!(e, LogError::InitialKeyUnknown { .. }), "{e}");
    let e = AuditLog::open_existing_trusting(&path, again(), &Signer::generate().public())
        .err()
        .unwrap();
    assert!(e.to_string().contains("not the log's first key"), "{e}");
    drop(AuditLog::open_existing_trusting(&path, again(), &key.public()).unwrap());
    AuditLog::open(&path, Some(again()))
        .unwrap()
        .append(body(8))
        .unwrap();
    assert_eq!(verify(&path, &key, None).unwrap().records, 6);
}
