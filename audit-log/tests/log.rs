//! The store end to end: appends verify, every kind of tampering is named with its seq,
//! rotations are followed, exported checkpoints catch truncation, readers see a consistent log.

use audit_log::record::{FileDigest, ModelSubject, RecordBody};
use audit_log::{verify_log, AuditLog, CheckpointPolicy, Reason, Signer};
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
    // A record appended with the retired key after the rotation is refused.
    let mut stale = AuditLog::open(
        &path,
        Some(Signer::from_signing_key(
            ed25519_dalek::SigningKey::from_bytes(&signer_bytes(&key)),
        )),
    )
    .unwrap();
    stale.append(body(999)).unwrap();
    let e = verify(&path, &key, None).unwrap_err();
    assert_eq!(e.seq, Some(11), "{e}");
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

/// Found by the crash test: a writer killed before its first commit leaves a database with no
/// schema. Verification must say so, not report a SQL error about a missing table.
#[test]
fn regression_verify_on_a_database_without_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("new.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 0")
        .unwrap();
    let key = Signer::generate();
    let e = verify(&path, &key, None).unwrap_err();
    assert!(
        e.to_string()
            .contains("not an initialised mechwatch audit log"),
        "{e}"
    );
    // Opening it as a writer initialises it, and the empty log verifies.
    drop(AuditLog::open(&path, None).unwrap());
    assert_eq!(verify(&path, &key, None).unwrap().records, 0);
}
