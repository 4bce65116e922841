//! Errors of the audit log. Signature failures stay opaque ("invalid signature"): the
//! reason a signature fails is not something to explain to an attacker.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The key file is missing, unreadable or not an Ed25519 PKCS#8/SPKI PEM.
    #[error("{path}: {detail}")]
    Key { path: PathBuf, detail: String },
    /// The private key file can be read by group or others; it is refused, not used.
    #[error("{path}: private key is readable by group or others (mode {mode:o}); run chmod 600")]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// A SQLite error (locked database, full disk, corrupt file).
    #[error("{context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer mechwatch.
    #[error("database schema version {found} is newer than this mechwatch supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// A record, envelope or checkpoint is malformed.
    #[error("{0}")]
    Format(String),
    #[error("invalid signature")]
    Signature,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn sql(context: &str) -> impl FnOnce(rusqlite::Error) -> LogError + '_ {
    move |source| LogError::Sqlite {
        context: context.to_string(),
        source,
    }
}
