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
    /// There is no file at the path. Read-only commands never create a log; writers start
    /// one only at a path where nothing exists. A typo in the path is the usual cause.
    #[error("{path}: no such audit log")]
    Missing { path: PathBuf },
    /// Something other than a mechwatch log is at the path: a zero-byte file (a truncated
    /// log), a foreign SQLite database, or a file that is not SQLite at all. It is never
    /// turned into a log.
    #[error("{path}: {what}")]
    NotALog { path: PathBuf, what: String },
    /// `log init` on a path where a file already exists.
    #[error(
        "{path}: already exists ({what}); a new log starts only at a path where nothing exists"
    )]
    Exists { path: PathBuf, what: String },
    /// The signing key is not the log's current key: records it signed would never verify.
    /// A wrong `--key`, or a key retired by a rotation.
    #[error(
        "{path}: the log's current signing key is {current}, but the given key is {given}; \
         records signed by it would make every later `log verify` fail. Use key {current}, or \
         hand the log over with `mechwatch key rotate --db {path} --key <key {current}> --new-key <new key>`"
    )]
    WrongKey {
        path: PathBuf,
        current: String,
        given: String,
    },
    /// The log holds fewer records than this host's writer last wrote, or different ones:
    /// records were deleted or changed, or the database was replaced by an older copy.
    /// `detail` says which was found.
    #[error(
        "{path}: {detail}. Do not append to it: keep copies of the \
         database and of {head}, run `mechwatch log verify` against your exported checkpoints \
         and look for who changed the file. Only once that is understood, move {head} aside to \
         accept the log as it is"
    )]
    RolledBack {
        path: PathBuf,
        head: PathBuf,
        detail: String,
    },
    /// The database holds something no mechwatch writes: an object in its schema that the
    /// migrations do not create (a planted trigger would run inside every append), or a
    /// missing or mistyped log id. Writers refuse it; `log verify` reports it (exit 1).
    #[error(
        "{path}: {detail}: the database was edited. Refusing to write to it; keep a copy and \
         run `mechwatch log verify --db {path}` to see what else changed"
    )]
    Tampered { path: PathBuf, detail: String },
    /// A value of the wrong type in one of mechwatch's tables (text where a record's signed
    /// bytes belong, a NULL signature): only someone editing the database stores one.
    #[error("{0}: the database was edited (run `mechwatch log verify`)")]
    Mistyped(crate::schema::Mistyped),
    /// A writer refuses to extend, rotate or checkpoint a log that does not verify: what it
    /// signed next would vouch for the forged records before it.
    #[error(
        "{path}: the log does not verify ({failure}); refusing to sign anything that extends \
         it. Keep a copy of the database, run `mechwatch log verify --db {path} --pubkey ...` \
         and find out who changed it"
    )]
    Unverified { path: PathBuf, failure: String },
    /// A writer must verify the log before it signs, from the log's first key. The log records
    /// that key's public half from the first append on; a log whose key was rotated by an
    /// older mechwatch does not, and the writer's own key is not its first.
    #[error(
        "{path}: cannot verify the log before writing to it: its first record is signed by key \
         {key_id}, whose public key the log does not record (it was rotated by an older \
         mechwatch). Record it once with `mechwatch log checkpoint --db {path} --key <current \
         key> --pubkey <the first key's .pub> --out <file>`"
    )]
    InitialKeyUnknown { path: PathBuf, key_id: String },
    /// The head witness beside the log cannot be read or parsed.
    #[error("{path}: unreadable head witness: {detail}")]
    Witness { path: PathBuf, detail: String },
    /// The log's newest records are in its write-ahead log (`-wal`), which SQLite reads only
    /// through a shared-memory index (`-shm`) that cannot be created here: read-only media or
    /// someone else's copy without write access to its directory.
    #[error(
        "{path}: the log has a write-ahead log ({path}-wal) that SQLite can read only through \
         {path}-shm, which cannot be created here (read-only directory?); reading the main file \
         alone would verify a stale view. Copy {path}-shm along with it, or copy the database and \
         its -wal file to a writable directory, or on the host run `sqlite3 {path} 'PRAGMA wal_checkpoint(TRUNCATE)'` \
         before copying"
    )]
    WalUnreadable { path: PathBuf },
    /// A file given to read is not one mechwatch reads: not a regular file (a FIFO, a
    /// device), or larger than such a file ever is.
    #[error("{path}: {detail}")]
    Input { path: PathBuf, detail: String },
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
