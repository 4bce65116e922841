//! In-toto subjects that standard tools can match: one per checkpoint file, by relative name
//! and the file's own sha256, with the checkpoint root as an annotation; and records written
//! before this (version 1, one subject: the root under the host path) still verify.

use audit_log::dsse::{pae, IN_TOTO_PAYLOAD_TYPE};
use audit_log::record::*;
use audit_log::{verify_log, AuditLog, Reason, Signer};
use rusqlite::params;

fn model() -> ModelSubject {
    ModelSubject {
        path: "/srv/models/run-7/step-1000".into(),
        root_sha256: "ab".repeat(32),
        files: vec![
            FileDigest {
                path: "config.json".into(),
                sha256: "01".repeat(32),
                size: 10,
            },
            FileDigest {
                path: "shards/model-00001.safetensors".into(),
                sha256: "02".repeat(32),
                size: 20,
            },
        ],
    }
}

fn audit() -> RecordBody {
    RecordBody::Audit {
        model: model(),
        inputs: vec![],
        verdict: "pass".into(),
        result: serde_json::json!({}),
    }
}

fn stored_statement(path: &std::path::Path, seq: u64) -> serde_json::Value {
    let c = audit_log::store::open_reader(path).unwrap();
    let r = audit_log::store::read_records(&c, seq, seq + 1).unwrap();
    serde_json::from_slice(&r[0].bytes).unwrap()
}

#[test]
fn regression_record_subjects_are_a_root_under_a_host_path() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("audit.db");
    let mut log = AuditLog::open(&db, Some(Signer::generate())).unwrap();
    log.append(audit()).unwrap();
    let st = stored_statement(&db, 0);
    assert_eq!(st["predicate"]["version"], 2);
    let subjects = st["subject"].as_array().unwrap();
    assert_eq!(subjects.len(), 2, "{st}");
    for (s, (name, sha)) in subjects.iter().zip([
        ("config.json", "01".repeat(32)),
        ("shards/model-00001.safetensors", "02".repeat(32)),
    ]) {
        assert_eq!(s["name"], name);
        assert_eq!(s["digest"], serde_json::json!({ "sha256": sha }));
        assert_eq!(
            s["annotations"],
            serde_json::json!({ "checkpoint_root_sha256": "ab".repeat(32) })
        );
    }
    // Error records that hashed the checkpoint name its files too; rotations the new key.
    log.append(RecordBody::Error {
        model: Some(model()),
        inputs: vec![],
        stage: "load".into(),
        message: "m".into(),
    })
    .unwrap();
    assert_eq!(
        stored_statement(&db, 1)["subject"][1]["name"],
        "shards/model-00001.safetensors"
    );
}

/// A statement signed and inserted the way an older writer (or a forger with the key) would.
fn insert_signed(
    db: &std::path::Path,
    signer: &Signer,
    log_id: &str,
    version: u32,
    subject: Vec<Subject>,
) {
    let body = audit();
    let st = Statement {
        statement_type: STATEMENT_TYPE.into(),
        subject,
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Predicate {
            version,
            log: LogPosition {
                id: log_id.into(),
                seq: 0,
                prev: GENESIS_PREV.into(),
            },
            time: now_rfc3339(),
            host: "old-host".into(),
            mechwatch_version: "0.0.1".into(),
            key_id: signer.id().into(),
            record: body.clone(),
        },
    };
    let bytes = serde_json::to_vec(&st).unwrap();
    let sig = signer.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &bytes));
    rusqlite::Connection::open(db)
        .unwrap()
        .execute(
            "INSERT INTO records (seq, bytes, sig, key_id, kind, subject) VALUES (0, ?1, ?2, ?3, 'audit', ?4)",
            params![bytes, sig.to_bytes().to_vec(), signer.id(), body.index_digest()],
        )
        .unwrap();
}

fn key_pair() -> (Signer, Signer) {
    let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    (
        Signer::from_signing_key(sk.clone()),
        Signer::from_signing_key(sk),
    )
}

#[test]
fn version_1_records_with_the_root_subject_still_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("audit.db");
    let (signer, same) = key_pair();
    let log_id = AuditLog::init(&db, None).unwrap().log_id().to_string();
    let legacy = vec![Subject {
        name: model().path,
        digest: [("sha256".to_string(), model().root_sha256)].into(),
        annotations: Default::default(),
    }];
    insert_signed(&db, &same, &log_id, 1, legacy.clone());
    let mut log = AuditLog::open(&db, Some(signer)).unwrap();
    log.append(audit()).unwrap();
    let c = audit_log::store::open_reader(&db).unwrap();
    let r = verify_log(&c, &same.public(), None).unwrap();
    assert_eq!(r.records, 2);
    assert_eq!(stored_statement(&db, 0)["subject"][0]["name"], model().path);
    assert_eq!(
        stored_statement(&db, 1)["subject"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The version decides the rule: a version 2 record with the old subject is refused.
    let db2 = tmp.path().join("mixed.db");
    let log_id = AuditLog::init(&db2, None).unwrap().log_id().to_string();
    insert_signed(&db2, &same, &log_id, 2, legacy);
    let c = audit_log::store::open_reader(&db2).unwrap();
    let f = verify_log(&c, &same.public(), None).unwrap_err();
    assert_eq!(f.seq, Some(0));
    assert!(matches!(f.reason, Reason::Malformed(_)), "{f}");
}
