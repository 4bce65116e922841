//! The audit record: an in-toto Statement v1 whose subject is the checkpoint's root digest
//! and whose predicate carries the log position, provenance and the engine's run result.
//!
//! The stored bytes are exactly the bytes signed (Ed25519 over their DSSE PAE with payload
//! type `application/vnd.in-toto+json`), so a DSSE export reuses the stored signature and
//! standard tools verify it without mechwatch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://mechwatch.dev/audit-record/v1";
pub const RECORD_VERSION: u32 = 1;
/// `prev` of the first record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Predicate,
}

/// Where the record sits in its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogPosition {
    pub id: String,
    pub seq: u64,
    /// Hex SHA-256 of the previous record's stored bytes.
    pub prev: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    pub version: u32,
    pub log: LogPosition,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    pub mechwatch_version: String,
    pub key_id: String,
    pub record: RecordBody,
}

/// One file of a checkpoint, as in OpenSSF model-signing manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// The checkpoint audited: per-file digests sorted by path and their root digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSubject {
    pub path: String,
    pub root_sha256: String,
    pub files: Vec<FileDigest>,
}

/// A policy, prompt set, SAE or direction file that the run used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigest {
    pub kind: String,
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecordBody {
    /// A completed audit: the engine's run result and its verdict.
    Audit {
        model: ModelSubject,
        inputs: Vec<InputDigest>,
        verdict: String,
        result: serde_json::Value,
    },
    /// An audit that could not run. "Could not check" is recorded, never dropped.
    Error {
        model: Option<ModelSubject>,
        inputs: Vec<InputDigest>,
        stage: String,
        message: String,
    },
    /// Hand-over to a new signing key; signed by the old key (the record signature) and by
    /// the new one (`new_key_signature`, over [`rotation_message`]).
    KeyRotation {
        new_key_id: String,
        new_public_key: String,
        new_key_signature: String,
    },
}

impl RecordBody {
    /// The in-toto subject: the checkpoint root digest, or the new key for a rotation.
    pub fn subject(&self) -> Subject {
        let (name, sha) = match self {
            RecordBody::Audit { model, .. }
            | RecordBody::Error {
                model: Some(model), ..
            } => (model.path.clone(), model.root_sha256.clone()),
            RecordBody::Error { model: None, .. } => {
                ("unhashed-checkpoint".to_string(), hex::encode(sha2_empty()))
            }
            RecordBody::KeyRotation {
                new_key_id,
                new_public_key,
                ..
            } => (
                format!("ed25519-key:{new_key_id}"),
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                    hex::decode(new_public_key).unwrap_or_default(),
                )),
            ),
        };
        Subject {
            name,
            digest: BTreeMap::from([("sha256".to_string(), sha)]),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::Audit { .. } => "audit",
            RecordBody::Error { .. } => "error",
            RecordBody::KeyRotation { .. } => "key_rotation",
        }
    }
}

fn sha2_empty() -> [u8; 32] {
    <sha2::Sha256 as sha2::Digest>::digest([]).into()
}

/// What the new key signs when it takes over: the log, the position and both keys.
pub fn rotation_message(log_id: &str, seq: u64, old_key_id: &str, new_public_hex: &str) -> Vec<u8> {
    format!("mechwatch-key-rotation-v1\n{log_id}\n{seq}\n{old_key_id}\n{new_public_hex}\n")
        .into_bytes()
}

/// The host name, for provenance.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("UTC times format")
}
