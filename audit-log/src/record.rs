//! The audit record: an in-toto Statement v1 whose subjects are the audited checkpoint's
//! files and whose predicate carries the log position, provenance and the engine's run result.
//!
//! **Subjects.** Each file of the checkpoint is one subject (an in-toto `ResourceDescriptor`),
//! named by its path relative to the checkpoint directory and digested by its own sha256, so
//! a verifier matches them to the artifact it holds the way `sha256sum -c` does. Each carries
//! the checkpoint's root digest (sha256 over the `sha256sum`-style manifest) in its
//! `annotations` as `checkpoint_root_sha256`. Records of version 1, written before this, have
//! one subject: the root digest, named by the checkpoint's absolute host path. They still
//! verify: verification checks signatures over the stored bytes and compares each record's
//! subjects with what its own version prescribes; nothing is rewritten.
//!
//! The stored bytes are exactly the bytes signed (Ed25519 over their DSSE PAE with payload
//! type `application/vnd.in-toto+json`), so a DSSE export reuses the stored signature and
//! standard tools verify it without mechwatch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://mechwatch.dev/audit-record/v1";
/// The version written now: subjects are the checkpoint's files.
pub const RECORD_VERSION: u32 = 2;
/// Versions that verify: 1 (one subject, the root digest under the host path) and 2.
pub const SUPPORTED_RECORD_VERSIONS: [u32; 2] = [1, 2];
/// The annotation on each file subject that holds the checkpoint's root digest (hex).
pub const ROOT_ANNOTATION: &str = "checkpoint_root_sha256";
/// `prev` of the first record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An in-toto `ResourceDescriptor` as a statement subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Subject {
    fn sha256(name: String, sha256: String) -> Self {
        Self {
            name,
            digest: BTreeMap::from([("sha256".to_string(), sha256)]),
            annotations: BTreeMap::new(),
        }
    }
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
    /// The in-toto subjects a record of `version` carries: one per checkpoint file (version 2),
    /// or the root digest under the host path (version 1); for a rotation, the new key.
    pub fn subjects(&self, version: u32) -> Vec<Subject> {
        match self {
            RecordBody::Audit { model, .. }
            | RecordBody::Error {
                model: Some(model), ..
            } if version >= 2 => {
                let annotate = |mut s: Subject| {
                    s.annotations
                        .insert(ROOT_ANNOTATION.to_string(), model.root_sha256.clone());
                    s
                };
                if model.files.is_empty() {
                    // No file list to name: the root alone, under the directory's name.
                    let name = std::path::Path::new(&model.path)
                        .file_name()
                        .map_or_else(|| model.path.clone(), |n| n.to_string_lossy().into_owned());
                    return vec![annotate(Subject::sha256(name, model.root_sha256.clone()))];
                }
                model
                    .files
                    .iter()
                    .map(|f| annotate(Subject::sha256(f.path.clone(), f.sha256.clone())))
                    .collect()
            }
            _ => {
                let (name, sha) = self.legacy_subject();
                vec![Subject::sha256(name, sha)]
            }
        }
    }

    /// The digest the store indexes a record by: the checkpoint root, or the new key's.
    pub fn index_digest(&self) -> String {
        self.legacy_subject().1
    }

    /// Version 1's single subject: (name, sha256 hex).
    fn legacy_subject(&self) -> (String, String) {
        match self {
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
