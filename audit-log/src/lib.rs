//! The mechwatch audit log: Ed25519-signed in-toto statements in SQLite, linked into a hash
//! chain, covered by an RFC 6962 Merkle tree with C2SP signed-note checkpoints, exportable as
//! DSSE envelopes that standard tools verify.
//!
//! What this does not protect against, plainly: an attacker with root on the host who holds
//! the signing key can rewrite or drop every record written since the newest checkpoint that
//! was exported off the host, and can write new, validly signed records. Exported checkpoints
//! make truncation and rewriting of everything they cover detectable; nothing here makes the
//! unexported tail trustworthy against the key holder.

pub mod build_info;
pub mod checkpoint;
pub mod dsse;
pub mod error;
pub mod input;
pub mod keys;
pub mod merkle;
pub mod record;
pub mod schema;
pub mod store;
pub mod verify;

pub use error::LogError;
pub use keys::Signer;
pub use record::{FileDigest, InputDigest, ModelSubject, RecordBody, Statement};
pub use store::{AuditLog, CheckpointPolicy, Receipt, StoredRecord};
pub use verify::{
    verify_export, verify_log, verify_log_witnessed, ExportReport, Failure, Reason, Report,
};

/// The git commit this build came from (full hash), or `None` for a build from source
/// without git metadata.
pub const GIT_COMMIT: Option<&str> = match env!("MECHWATCH_GIT_COMMIT").as_bytes() {
    [] => None,
    _ => Some(env!("MECHWATCH_GIT_COMMIT")),
};

/// The version every signed record and `mechwatch --version` carry: the package version and
/// the commit, e.g. `0.1.0 (git 1a2b3c…)`, or `0.1.0 (commit unknown: built outside git)`.
pub const BUILD_VERSION: &str = env!("MECHWATCH_BUILD_VERSION");

/// `mechwatch --version`: [`BUILD_VERSION`], and for a build whose commit is unknown, what to
/// do about it ([`build_info::long_version`]).
pub const LONG_VERSION: &str = env!("MECHWATCH_LONG_VERSION");
