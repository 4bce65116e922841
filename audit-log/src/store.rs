//! The SQLite store: WAL, `synchronous=FULL`, one writer using `BEGIN IMMEDIATE`, versioned
//! migrations, and triggers that refuse UPDATE and DELETE (a guard against accidents, not a
//! security boundary: the signatures, the chain and exported checkpoints are).
//!
//! **What may become a log.** Only a path where nothing exists: a writer creates the database
//! under a temporary name, initialises it, and links it into place, so a writer killed while
//! creating leaves either no log or a complete empty one, never a zero-byte file. Anything
//! already at the path must be a mechwatch log; a zero-byte file (a truncated log), a foreign
//! SQLite database and a non-SQLite file are refused with what they are, never initialised.
//! Readers ([`open_reader`], [`AuditLog::open_existing`]) never create anything.
//!
//! **Nothing foreign, nothing unverified.** The schema is an allow-list ([`crate::schema`]):
//! a writer refuses a database holding a trigger, view, index or table its migrations do not
//! create, at open and again under the write lock of each append. Before its first append,
//! rotation or checkpoint a writer verifies the whole log ([`AuditLog::verify_before_writing`]).
//!
//! **Keys.** A writer refuses a signing key that is not the log's current key (the key of the
//! newest record, or the new key of a rotation record), at open and again at each append:
//! one record signed by another key would make every later verification fail.
//!
//! **Head witness.** After each durable append the writer replaces `<db>.head` (mode 0644,
//! written to a temporary file, fsynced, renamed) with a signed checkpoint note of the size
//! and Merkle root it just wrote, and it keeps the same in memory. It refuses to append when
//! the log holds fewer records than the witness, or when the first `size` records no longer
//! have the witnessed root: someone deleted the tail (and the stored checkpoints that would
//! show it) or put back an older copy. `log verify` checks the witness too. It is a local
//! witness only: whoever can delete rows can delete or replace this file as well; only a
//! checkpoint exported off the host proves what it covers. The directory is not fsynced per
//! append: after a power loss the witness may lag by a batch, which makes it weaker, never
//! wrong (any earlier head of an honest log is a prefix of it).
//!
//! **Reading read-only copies.** [`open_reader`] opens with `SQLITE_OPEN_READ_ONLY`. In WAL mode
//! a reader still needs the shared-memory index `-shm`, which it creates when the directory is
//! writable (so it sees records a live writer has in the `-wal`). When that cannot be created
//! (read-only media, another user's copy) and there is no `-wal` file, every committed record
//! is in the main file, and the reader opens it with SQLite's `immutable=1`: no locks, no
//! `-shm`, nothing written. When a `-wal` exists but cannot be read that way, the reader
//! refuses with [`LogError::WalUnreadable`] rather than verify a stale view.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::dsse::{pae, IN_TOTO_PAYLOAD_TYPE};
use crate::error::{sql, LogError};
use crate::keys::{key_id, Signer, VerifyingKey};
use crate::merkle::{self, Hash};
use crate::record::*;
use crate::schema::{self, Mistyped};

/// Name of the key in checkpoint signature lines.
pub const NOTE_KEY_NAME: &str = "mechwatch";
const SCHEMA_VERSION: i64 = 1;

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: records, checkpoints, metadata, append-only triggers.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE records (
         seq INTEGER PRIMARY KEY,
         bytes BLOB NOT NULL,
         sig BLOB NOT NULL,
         key_id TEXT NOT NULL,
         kind TEXT NOT NULL,
         subject TEXT NOT NULL
     );
     CREATE INDEX records_subject ON records(subject);
     CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL, written_at TEXT NOT NULL);
     CREATE TRIGGER records_no_update BEFORE UPDATE ON records
         BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
     CREATE TRIGGER records_no_delete BEFORE DELETE ON records
         BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
     CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
         BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
     CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
         BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;",
];

/// When to write a signed checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_records: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_records: 64,
            every: Duration::from_secs(600),
        }
    }
}

/// A stored row: the signed bytes, their signature and the signing key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub sig: Vec<u8>,
    pub key_id: String,
}

impl StoredRecord {
    pub fn hash_hex(&self) -> String {
        hex::encode(Sha256::digest(&self.bytes))
    }
    pub fn leaf(&self) -> Hash {
        merkle::leaf_hash(&self.bytes)
    }
}

/// What an append returns once the record is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub hash: String,
}

pub struct AuditLog {
    path: PathBuf,
    conn: Connection,
    signer: Option<Signer>,
    log_id: String,
    policy: CheckpointPolicy,
    last_checkpoint: Instant,
    /// Merkle frontier of the records this writer knows; rebuilt if another writer appended.
    frontier: merkle::Frontier,
    /// Leaf hash of the newest record the frontier covers.
    tip: Option<Hash>,
    /// The head this writer last wrote or checked: (size, root). The log must always extend it.
    head: Option<(u64, Hash)>,
}

/// The head witness of the log at `db`: `<db>.head`.
pub fn head_path(db: &Path) -> PathBuf {
    let mut s: OsString = db.as_os_str().to_owned();
    s.push(".head");
    PathBuf::from(s)
}

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Whether `path` holds nothing (`Ok(false)`) or an SQLite file (`Ok(true)`); anything else
/// is refused, saying what it is.
fn inspect(path: &Path) -> Result<bool, LogError> {
    let not_a_log = |what: &str| LogError::NotALog {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    };
    if meta.is_dir() {
        return Err(not_a_log("a directory, not a mechwatch log"));
    }
    if meta.len() == 0 {
        return Err(not_a_log(
            "zero-byte file, not a mechwatch log (truncated?)",
        ));
    }
    let mut magic = [0u8; 16];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(io(path))?;
        let mut n = 0;
        while n < magic.len() {
            match f.read(&mut magic[n..]).map_err(io(path))? {
                0 => break,
                k => n += k,
            }
        }
        n
    };
    if n < magic.len() || &magic != SQLITE_MAGIC {
        return Err(not_a_log("not an SQLite database, so not a mechwatch log"));
    }
    Ok(true)
}

/// Refuse an SQLite database that lacks the log's tables. What else is in it is for `log
/// verify` to judge ([`check_writable`] for writers).
fn check_schema(conn: &Connection, path: &Path) -> Result<(), LogError> {
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' \
             AND name IN ('meta', 'records', 'checkpoints')",
            [],
            |r| r.get(0),
        )
        .map_err(sql("reading the schema"))?;
    if tables != 3 {
        return Err(LogError::NotALog {
            path: path.to_path_buf(),
            what: "SQLite database without mechwatch's tables, not a mechwatch log".into(),
        });
    }
    Ok(())
}

/// Refuse to write to a log whose schema holds an object mechwatch does not create (a
/// planted trigger would run inside the append), or whose log id is missing or mistyped.
fn check_writable(conn: &Connection, path: &Path) -> Result<(), LogError> {
    let tampered = |detail: String| LogError::Tampered {
        path: path.to_path_buf(),
        detail,
    };
    if let Some(object) = schema::first_foreign_object(conn).map_err(sql("reading the schema"))? {
        return Err(tampered(format!("its schema holds {object}")));
    }
    match log_id(conn) {
        Ok(_) => Ok(()),
        Err(LogError::Mistyped(m)) => Err(tampered(m.to_string())),
        Err(LogError::Sqlite {
            source: rusqlite::Error::QueryReturnedNoRows,
            ..
        }) => Err(tampered("its meta table has no log_id".into())),
        Err(e) => Err(e),
    }
}

/// Temporary files beside the log: `.<name>.<what>.<pid>.<n>`, unique per process and call.
fn temp_name(db: &Path, what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = db.file_name().unwrap_or_default().to_string_lossy();
    let n = N.fetch_add(1, Ordering::Relaxed);
    db.with_file_name(format!(".{name}.{what}.{}.{n}", std::process::id()))
}

/// Remove temporary files (and their SQLite sidecars) left by killed processes.
fn remove_stale_temps(db: &Path, what: &str) {
    let Some(dir) = db.parent().map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    }) else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return; // no way to tell a live writer's file from a dead one's
    }
    let prefix = format!(
        ".{}.{what}.",
        db.file_name().unwrap_or_default().to_string_lossy()
    );
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn sync_dir(db: &Path) -> Result<(), LogError> {
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Create an empty log at `path` atomically: initialise it under a temporary name, then
/// link it into place. Returns `Ok(false)` when another writer created it first.
fn create(path: &Path, signer: Option<&Signer>) -> Result<bool, LogError> {
    let head = head_path(path);
    if head.exists() {
        return Err(LogError::RolledBack {
            path: path.to_path_buf(),
            head: head.clone(),
            detail: "the log was rolled back: the database is missing but its head witness \
                     exists, so the log was deleted or moved"
                .into(),
        });
    }
    remove_stale_temps(path, "init");
    let tmp = temp_name(path, "init");
    let result = (|| {
        let mut conn = Connection::open(&tmp).map_err(sql("creating the audit log"))?;
        configure(&conn)?;
        migrate(&mut conn)?;
        if let Some(signer) = signer {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('key_id', ?1)",
                params![signer.id()],
            )
            .map_err(sql("writing the initial key id"))?;
            pin_initial_key(&conn, &signer.public())?;
        }
        conn.close()
            .map_err(|(_, e)| sql("closing the new audit log")(e))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            // A file system without hard links: rename, which is not exclusive.
            Err(_) if !path.exists() => std::fs::rename(&tmp, path).map(|_| true).map_err(io(path)),
            Err(e) => Err(io(path)(e)),
        }
    })();
    for f in [sidecar(&tmp, "-wal"), sidecar(&tmp, "-shm"), tmp] {
        let _ = std::fs::remove_file(f);
    }
    let created = result?;
    sync_dir(path)?;
    Ok(created)
}

/// `path` as an SQLite URI filename (`file:` with `%`-escapes) plus `query`.
fn uri(path: &Path, query: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut u = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            u.push(b as char);
        } else {
            u.push_str(&format!("%{b:02X}"));
        }
    }
    u.push('?');
    u.push_str(query);
    u
}

fn configure(conn: &Connection) -> Result<(), LogError> {
    schema::harden(conn).map_err(sql("hardening the connection"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql("busy_timeout"))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql("journal_mode=WAL"))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql("synchronous=FULL"))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sql("foreign_keys"))?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), LogError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("starting migration"))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("user_version"))?;
    if version > SCHEMA_VERSION {
        return Err(LogError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(m).map_err(sql("applying migration"))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(sql("user_version"))?;
    }
    let has_id: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql("reading log id"))?;
    if has_id.is_none() {
        let id = hex::encode(
            &Sha256::digest(format!("{}{:?}", now_rfc3339(), rand::random::<[u8; 16]>()))[..8],
        );
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('log_id', ?1)",
            params![id],
        )
        .map_err(sql("writing log id"))?;
    }
    tx.commit().map_err(sql("committing migration"))
}

/// The frontier over every record, the newest leaf, and the root of the first `at` records
/// (`None` when the log holds fewer).
struct Rebuilt {
    frontier: merkle::Frontier,
    tip: Option<Hash>,
    root_at: Option<Hash>,
}

fn build_frontier(conn: &Connection, at: Option<u64>) -> Result<Rebuilt, LogError> {
    let mut frontier = merkle::Frontier::default();
    let mut tip = None;
    let mut root_at = (at == Some(0)).then(merkle::empty_root);
    let mut stmt = conn
        .prepare("SELECT seq, bytes FROM records ORDER BY seq")
        .map_err(sql("reading records"))?;
    let mut rows = stmt.query([]).map_err(sql("reading records"))?;
    while let Some(row) = rows.next().map_err(sql("reading records"))? {
        let bytes = match row.get_ref(1).map_err(sql("reading records"))? {
            rusqlite::types::ValueRef::Blob(b) => b,
            other => {
                let seq = row.get::<_, i64>(0).map_err(sql("reading records"))? as u64;
                return Err(LogError::Mistyped(Mistyped {
                    seq: Some(seq),
                    place: format!("records seq {seq}"),
                    column: "bytes",
                    expected: "blob",
                    found: type_name(other.data_type()).into(),
                }));
            }
        };
        let leaf = merkle::leaf_hash(bytes);
        frontier.push(leaf);
        tip = Some(leaf);
        if Some(frontier.size()) == at {
            root_at = Some(frontier.root());
        }
    }
    Ok(Rebuilt {
        frontier,
        tip,
        root_at,
    })
}

/// Refuse a signer that is not the log's current key.
fn check_key(conn: &Connection, path: &Path, signer: Option<&Signer>) -> Result<(), LogError> {
    let Some(signer) = signer else {
        return Ok(());
    };
    match current_key_id(conn)? {
        Some(current) if current != signer.id() => Err(LogError::WrongKey {
            path: path.to_path_buf(),
            current,
            given: signer.id().to_string(),
        }),
        _ => Ok(()),
    }
}

/// Rebuild the frontier from the database, checking that it still extends `head`, the head
/// this writer last wrote or checked.
fn resync(conn: &Connection, path: &Path, head: Option<(u64, Hash)>) -> Result<Rebuilt, LogError> {
    let rebuilt = build_frontier(conn, head.map(|(s, _)| s))?;
    let Some((size, root)) = head else {
        return Ok(rebuilt);
    };
    let have = rebuilt.frontier.size();
    let detail = match rebuilt.root_at {
        None => format!(
            "the log was rolled back: it holds {have} records, but this host's writer wrote {size}"
        ),
        Some(r) if r != root => format!(
            "the log's first {size} records are not the ones this host's writer wrote (it \
             holds {have}): records among them were changed, or deleted and others appended"
        ),
        Some(_) => return Ok(rebuilt),
    };
    tracing::error!(log = %path.display(), witnessed = size, found = have, "audit log rolled back");
    Err(LogError::RolledBack {
        path: path.to_path_buf(),
        head: head_path(path),
        detail,
    })
}

/// Open a log read-only for readers (show, report, verify, export). Never creates or writes
/// anything; see the module documentation for read-only media.
#[tracing::instrument(skip_all, fields(path = %path.display()), err(level = "debug"))]
pub fn open_reader(path: &Path) -> Result<Connection, LogError> {
    use rusqlite::OpenFlags;
    if !inspect(path)? {
        return Err(LogError::Missing {
            path: path.to_path_buf(),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(sql("opening the audit log"))?;
    schema::harden(&conn).map_err(sql("hardening the connection"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql("busy_timeout"))?;
    // SQLite opens lazily: the first read is where a missing `-shm` shows.
    let conn = match conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => conn,
        Err(e) if cannot_open_wal_index(&e) => {
            drop(conn);
            if sidecar(path, "-wal").exists() {
                return Err(LogError::WalUnreadable {
                    path: path.to_path_buf(),
                });
            }
            tracing::debug!("no -shm can be created and there is no -wal: opening immutable");
            let conn = Connection::open_with_flags(
                uri(path, "immutable=1"),
                flags | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(sql("opening the audit log (immutable)"))?;
            schema::harden(&conn).map_err(sql("hardening the connection"))?;
            conn
        }
        Err(e) => return Err(sql("opening the audit log")(e)),
    };
    check_schema(&conn, path)?;
    Ok(conn)
}

/// The error SQLite gives a read-only connection that cannot create the WAL index.
fn cannot_open_wal_index(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
    )
}

/// The key that must sign the next record: the new key of a newest rotation record, the key
/// of the newest record, or for an empty log the key named at `log init` (if any).
pub fn current_key_id(conn: &Connection) -> Result<Option<String>, LogError> {
    let last: Option<(i64, String, String, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, key_id, kind, bytes FROM records ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(sql("reading the log head"))?;
    match last {
        Some((seq, key_id, kind, bytes)) => {
            if kind != "key_rotation" {
                return Ok(Some(key_id));
            }
            let st: Statement = serde_json::from_slice(&bytes).map_err(|e| {
                LogError::Format(format!(
                    "seq {seq}: the newest record is unreadable ({e}); run `log verify`"
                ))
            })?;
            match st.predicate.record {
                RecordBody::KeyRotation { new_key_id, .. } => Ok(Some(new_key_id)),
                _ => Err(LogError::Format(format!(
                    "seq {seq}: stored as a key rotation but is not one; run `log verify`"
                ))),
            }
        }
        None => conn
            .query_row("SELECT value FROM meta WHERE key = 'key_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("reading the initial key id")),
    }
}

/// The meta key under which the log records its first public key (hex), for writers.
const INITIAL_KEY: &str = "initial_public_key";

/// The first public key the log records, if it records one.
fn pinned_initial_key(conn: &Connection, path: &Path) -> Result<Option<VerifyingKey>, LogError> {
    let value: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [INITIAL_KEY],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql("reading the first public key"))?;
    value
        .map(|hex_key| {
            crate::keys::parse_public(&hex_key).ok_or_else(|| LogError::Tampered {
                path: path.to_path_buf(),
                detail: format!("its meta {INITIAL_KEY} is not a public key"),
            })
        })
        .transpose()
}

fn pin_initial_key(conn: &Connection, key: &VerifyingKey) -> Result<(), LogError> {
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
        params![INITIAL_KEY, hex::encode(key.as_bytes())],
    )
    .map(drop)
    .map_err(sql("recording the first public key"))
}

/// Read the head witness beside `db`, if there is one: the checkpoint note it holds,
/// unverified (the writer compares it with the database; `verify` checks its signature).
pub fn read_head(db: &Path) -> Result<Option<String>, LogError> {
    let head = head_path(db);
    match crate::input::read_small_text(&head, "a head witness") {
        Ok(note) => Ok(Some(note)),
        Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(LogError::Io { source, .. }) => Err(LogError::Witness {
            path: head,
            detail: source.to_string(),
        }),
        Err(e) => Err(LogError::Witness {
            path: head,
            detail: e.to_string(),
        }),
    }
}

/// Replace the head witness: a temporary file (0644: it holds nothing secret, and whoever
/// may read the log must be able to verify it), fsynced, renamed over `<db>.head`.
fn write_head(db: &Path, note: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_name(db, "head");
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(note.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, head_path(db))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The log's id; [`LogError::Mistyped`] when it is not text.
pub fn log_id(conn: &Connection) -> Result<String, LogError> {
    let value = conn
        .query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
            r.get::<_, rusqlite::types::Value>(0)
        })
        .map_err(sql("reading log id"))?;
    match value {
        rusqlite::types::Value::Text(id) => Ok(id),
        other => Err(LogError::Mistyped(Mistyped {
            seq: None,
            place: "meta key \"log_id\"".into(),
            column: "value",
            expected: "text",
            found: type_name(other.data_type()).into(),
        })),
    }
}

/// SQLite's `typeof()` name of a value's type.
fn type_name(t: rusqlite::types::Type) -> &'static str {
    use rusqlite::types::Type;
    match t {
        Type::Null => "null",
        Type::Integer => "integer",
        Type::Real => "real",
        Type::Text => "text",
        Type::Blob => "blob",
    }
}

/// Rows with `seq` in `[from, to)`, in order.
pub fn read_records(conn: &Connection, from: u64, to: u64) -> Result<Vec<StoredRecord>, LogError> {
    query_records(
        conn,
        "SELECT seq, bytes, sig, key_id FROM records WHERE seq >= ?1 AND seq < ?2 ORDER BY seq",
        [
            from.min(i64::MAX as u64) as i64,
            to.min(i64::MAX as u64) as i64,
        ],
    )
}

/// Up to `limit` rows with `seq >= from`, in order (gaps show as jumps in `seq`).
pub fn read_records_from(
    conn: &Connection,
    from: u64,
    limit: usize,
) -> Result<Vec<StoredRecord>, LogError> {
    query_records(
        conn,
        "SELECT seq, bytes, sig, key_id FROM records WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        [
            from.min(i64::MAX as u64) as i64,
            limit.min(i64::MAX as usize) as i64,
        ],
    )
}

fn query_records(
    conn: &Connection,
    query: &str,
    args: [i64; 2],
) -> Result<Vec<StoredRecord>, LogError> {
    query_records_each(conn, query, args)?
        .into_iter()
        .map(|r| r.map_err(LogError::Mistyped))
        .collect()
}

/// Rows with `seq` in `[from, to)`, in order; a row with a value of the wrong type is an
/// `Err` naming it, in its place (`log show` and `report` flag it and go on).
pub fn read_records_each(
    conn: &Connection,
    from: u64,
    to: u64,
) -> Result<Vec<Result<StoredRecord, Mistyped>>, LogError> {
    query_records_each(
        conn,
        "SELECT seq, bytes, sig, key_id FROM records WHERE seq >= ?1 AND seq < ?2 ORDER BY seq",
        [
            from.min(i64::MAX as u64) as i64,
            to.min(i64::MAX as u64) as i64,
        ],
    )
}

fn query_records_each(
    conn: &Connection,
    query: &str,
    args: [i64; 2],
) -> Result<Vec<Result<StoredRecord, Mistyped>>, LogError> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare_cached(query).map_err(sql("reading records"))?;
    let mut rows = stmt.query(args).map_err(sql("reading records"))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(sql("reading records"))? {
        // `seq` is the rowid (INTEGER PRIMARY KEY): SQLite keeps it an integer.
        let seq = r.get::<_, i64>(0).map_err(sql("reading records"))? as u64;
        let value = |i: usize| r.get_ref(i).map_err(sql("reading records"));
        let mistyped = |column: &'static str, expected: &'static str, v: ValueRef| Mistyped {
            seq: Some(seq),
            place: format!("records seq {seq}"),
            column,
            expected,
            found: type_name(v.data_type()).into(),
        };
        let row = match (value(1)?, value(2)?, value(3)?) {
            (ValueRef::Blob(bytes), ValueRef::Blob(sig), ValueRef::Text(key_id)) => {
                Ok(StoredRecord {
                    seq,
                    bytes: bytes.to_vec(),
                    sig: sig.to_vec(),
                    key_id: String::from_utf8_lossy(key_id).into_owned(),
                })
            }
            (ValueRef::Blob(_), ValueRef::Blob(_), k) => Err(mistyped("key_id", "text", k)),
            (ValueRef::Blob(_), s, _) => Err(mistyped("sig", "blob", s)),
            (b, _, _) => Err(mistyped("bytes", "blob", b)),
        };
        out.push(row);
    }
    Ok(out)
}

/// Length of the log: one past the highest seq (equal to the row count when it has no
/// gaps, which `verify` checks). O(log n), unlike `COUNT(*)`.
pub fn record_count(conn: &Connection) -> Result<u64, LogError> {
    // A bare MAX() lets SQLite read the last b-tree entry instead of scanning.
    conn.query_row("SELECT MAX(seq) FROM records", [], |r| {
        r.get::<_, Option<i64>>(0)
    })
    .map(|n| n.map_or(0, |n| n as u64 + 1))
    .map_err(sql("counting records"))
}

/// Stored checkpoints, `(size, note)`, by size; [`LogError::Mistyped`] for a note that is
/// not text.
pub fn read_checkpoints(conn: &Connection) -> Result<Vec<(u64, String)>, LogError> {
    let mut stmt = conn
        .prepare("SELECT size, note FROM checkpoints ORDER BY size")
        .map_err(sql("reading checkpoints"))?;
    let mut rows = stmt.query([]).map_err(sql("reading checkpoints"))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(sql("reading checkpoints"))? {
        // `size` is the rowid (INTEGER PRIMARY KEY): SQLite keeps it an integer.
        let size = r.get::<_, i64>(0).map_err(sql("reading checkpoints"))? as u64;
        match r.get_ref(1).map_err(sql("reading checkpoints"))? {
            rusqlite::types::ValueRef::Text(note) => {
                out.push((size, String::from_utf8_lossy(note).into_owned()))
            }
            other => {
                return Err(LogError::Mistyped(Mistyped {
                    seq: None,
                    place: format!("checkpoints size {size}"),
                    column: "note",
                    expected: "text",
                    found: type_name(other.data_type()).into(),
                }))
            }
        }
    }
    Ok(out)
}

pub fn origin(log_id: &str) -> String {
    format!("mechwatch/{log_id}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    /// Writers: start a log where nothing exists.
    IfMissing,
    /// The log must exist.
    Never,
    /// `log init`: nothing may exist yet.
    Only,
}

impl AuditLog {
    /// Open the log at `path` to append to it, starting a new one if nothing exists there.
    /// A `signer` is needed to append, and must be the log's current key.
    ///
    /// With a signer the whole log must verify first (see [`Self::verify_before_writing`]).
    pub fn open(path: &Path, signer: Option<Signer>) -> Result<Self, LogError> {
        Self::open_with(path, signer, Create::IfMissing, None)
    }

    /// [`Self::open`], verifying the log from `initial`, its first public key (the daemon's
    /// `trusted_pubkey`), which is then recorded in the log for later writers.
    pub fn open_trusting(
        path: &Path,
        signer: Signer,
        initial: &VerifyingKey,
    ) -> Result<Self, LogError> {
        Self::open_with(path, Some(signer), Create::IfMissing, Some(initial))
    }

    /// Open an existing log (`log checkpoint`, `key rotate`); never creates one.
    pub fn open_existing(path: &Path, signer: Option<Signer>) -> Result<Self, LogError> {
        Self::open_with(path, signer, Create::Never, None)
    }

    /// [`Self::open_existing`], verifying from `initial` as [`Self::open_trusting`] does.
    pub fn open_existing_trusting(
        path: &Path,
        signer: Signer,
        initial: &VerifyingKey,
    ) -> Result<Self, LogError> {
        Self::open_with(path, Some(signer), Create::Never, Some(initial))
    }

    /// Start a new, empty log at `path`, where nothing may exist yet. With a signer, the log
    /// accepts only that key for its first record.
    pub fn init(path: &Path, signer: Option<Signer>) -> Result<Self, LogError> {
        Self::open_with(path, signer, Create::Only, None)
    }

    #[tracing::instrument(skip_all, fields(path = %path.display()), err(level = "debug"))]
    fn open_with(
        path: &Path,
        signer: Option<Signer>,
        mode: Create,
        initial: Option<&VerifyingKey>,
    ) -> Result<Self, LogError> {
        let exists = inspect(path)?;
        match (exists, mode) {
            (false, Create::Never) => {
                return Err(LogError::Missing {
                    path: path.to_path_buf(),
                })
            }
            (false, _) => {
                let created = create(path, signer.as_ref())?;
                if !created && mode == Create::Only {
                    return Err(LogError::Exists {
                        path: path.to_path_buf(),
                        what: "another process created it just now".into(),
                    });
                }
                if created {
                    tracing::info!(log = %path.display(), "audit log created");
                }
            }
            (true, Create::Only) => {
                let what = match Self::open_with(path, None, Create::Never, None) {
                    Ok(log) => {
                        format!("a mechwatch log, id {}, {} records", log.log_id, log.len()?)
                    }
                    Err(e) => e.to_string(),
                };
                return Err(LogError::Exists {
                    path: path.to_path_buf(),
                    what,
                });
            }
            (true, _) => {}
        }
        let mut conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening the audit log"))?;
        schema::harden(&conn).map_err(sql("hardening the connection"))?;
        // Before `configure`, which would switch a foreign database to WAL mode.
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql("busy_timeout"))?;
        check_schema(&conn, path)?;
        check_writable(&conn, path)?;
        configure(&conn)?;
        migrate(&mut conn)?;
        let log_id = log_id(&conn)?;
        let mut log = Self {
            path: path.to_path_buf(),
            conn,
            signer,
            log_id,
            policy: CheckpointPolicy::default(),
            last_checkpoint: Instant::now(),
            frontier: merkle::Frontier::default(),
            tip: None,
            head: None,
        };
        if log.signer.is_some() {
            remove_stale_temps(path, "head");
            log.head = log.witnessed_head()?;
            check_key(&log.conn, path, log.signer.as_ref())?;
        }
        let r = resync(&log.conn, path, log.head).map_err(|e| match e {
            LogError::Mistyped(m) => LogError::Tampered {
                path: path.to_path_buf(),
                detail: m.to_string(),
            },
            e => e,
        })?;
        (log.frontier, log.tip) = (r.frontier, r.tip);
        if log.signer.is_some() {
            log.verify_before_writing(initial)?;
        }
        if log.signer.is_some() && log.head.is_none() {
            log.head = Some((log.frontier.size(), log.frontier.root()));
            log.publish_head();
        }
        Ok(log)
    }

    /// A writer signs nothing that extends a log that does not verify: before its first
    /// append, rotation or checkpoint it verifies the whole log as `log verify` does (every
    /// signature, the chain, key rotations, stored checkpoints, the head witness, the schema
    /// and the column types), at about 20,000 records a second. It verifies from the log's
    /// first public key: `initial` if given, else the one recorded in the log's meta table
    /// (its id must be the first record's key id), else the writer's own key when it signed
    /// the first record. The key is then recorded, so later writers after a rotation find it.
    /// Later appends by the same writer check only what changed: the schema, and that the log
    /// still extends the head this writer holds.
    fn verify_before_writing(&mut self, initial: Option<&VerifyingKey>) -> Result<(), LogError> {
        if let Some(m) = schema::first_mistyped(&self.conn).map_err(sql("reading the log"))? {
            return Err(LogError::Tampered {
                path: self.path.clone(),
                detail: m.to_string(),
            });
        }
        let signer = self.signer()?;
        let first: Option<String> = self
            .conn
            .query_row("SELECT key_id FROM records ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("reading the first record"))?;
        let pinned = pinned_initial_key(&self.conn, &self.path)?;
        let Some(first) = first else {
            if pinned.is_none() {
                pin_initial_key(&self.conn, initial.unwrap_or(&signer.public()))?;
            }
            return Ok(());
        };
        let trusted = match (initial, pinned) {
            (Some(k), _) if key_id(k) != first => {
                return Err(LogError::Format(format!(
                    "{}: the given public key {} is not the log's first key {first}",
                    self.path.display(),
                    key_id(k)
                )))
            }
            (Some(k), _) => *k,
            (None, Some(k)) if key_id(&k) == first => k,
            (None, Some(k)) => {
                return Err(LogError::Tampered {
                    path: self.path.clone(),
                    detail: format!(
                        "its meta table records {} as the first public key, but the first \
                         record is signed by {first}",
                        key_id(&k)
                    ),
                })
            }
            (None, None) if signer.id() == first => signer.public(),
            (None, None) => {
                return Err(LogError::InitialKeyUnknown {
                    path: self.path.clone(),
                    key_id: first,
                })
            }
        };
        let head = read_head(&self.path)?;
        crate::verify::verify_log_witnessed(&self.conn, &trusted, None, head.as_deref()).map_err(
            |f| LogError::Unverified {
                path: self.path.clone(),
                failure: f.to_string(),
            },
        )?;
        if pinned.is_none() {
            pin_initial_key(&self.conn, &trusted)?;
        }
        Ok(())
    }

    /// The head recorded in `<db>.head`, if any; it must belong to this log.
    fn witnessed_head(&self) -> Result<Option<(u64, Hash)>, LogError> {
        let Some(note) = read_head(&self.path)? else {
            return Ok(None);
        };
        let head = head_path(&self.path);
        let cp = Checkpoint::parse_unverified(&note).map_err(|e| LogError::Witness {
            path: head.clone(),
            detail: e.to_string(),
        })?;
        if cp.origin != origin(&self.log_id) {
            return Err(LogError::RolledBack {
                path: self.path.clone(),
                head,
                detail: format!(
                    "the log was replaced: the head witness is of {}, but the database holds {}",
                    cp.origin,
                    origin(&self.log_id)
                ),
            });
        }
        Ok(Some((cp.size, cp.root)))
    }

    /// Record the current head in memory and in `<db>.head`. The records are already durable,
    /// so failing to write the witness only weakens it: warn, do not fail the append.
    fn publish_head(&mut self) {
        let Some(signer) = &self.signer else {
            return;
        };
        let cp = Checkpoint {
            origin: origin(&self.log_id),
            size: self.frontier.size(),
            root: self.frontier.root(),
        };
        self.head = Some((cp.size, cp.root));
        let first = !head_path(&self.path).exists();
        let written = write_head(&self.path, &cp.sign(NOTE_KEY_NAME, signer)).and_then(|()| {
            if first {
                sync_dir(&self.path).map_err(std::io::Error::other)
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            tracing::warn!(head = %head_path(&self.path).display(), error = %e, "could not write the head witness");
        }
    }

    pub fn with_checkpoint_policy(mut self, policy: CheckpointPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn len(&self) -> Result<u64, LogError> {
        record_count(&self.conn)
    }

    pub fn is_empty(&self) -> Result<bool, LogError> {
        Ok(self.len()? == 0)
    }

    fn signer(&self) -> Result<&Signer, LogError> {
        self.signer
            .as_ref()
            .ok_or_else(|| LogError::Format("this log was opened without a signing key".into()))
    }

    /// Append one record durably (one fsync'd transaction).
    pub fn append(&mut self, body: RecordBody) -> Result<Receipt, LogError> {
        Ok(self.append_batch(vec![body])?.remove(0))
    }

    /// Append records in one transaction (group commit): all become durable together.
    pub fn append_batch(&mut self, bodies: Vec<RecordBody>) -> Result<Vec<Receipt>, LogError> {
        let signer = self
            .signer
            .as_ref()
            .ok_or_else(|| LogError::Format("no signing key".into()))?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting append"))?;
        // Under the write lock: nothing can plant a trigger between this check and the insert.
        check_writable(&tx, &self.path)?;
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT seq, bytes FROM records ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading the log head"))?;
        let tip = last.as_ref().map(|(_, b)| merkle::leaf_hash(b));
        let (mut seq, mut prev) = match last {
            Some((s, b)) => (s as u64 + 1, hex::encode(Sha256::digest(&b))),
            None => (0, GENESIS_PREV.to_string()),
        };
        // Another writer appended, or the log changed under us: check it still extends
        // our head, and that our key is still the current one.
        if self.frontier.size() != seq || self.tip != tip {
            let r = resync(&tx, &self.path, self.head)?;
            (self.frontier, self.tip) = (r.frontier, r.tip);
        }
        check_key(&tx, &self.path, self.signer.as_ref())?;
        let mut frontier = self.frontier.clone();
        let mut tip = self.tip;
        let mut receipts = Vec::with_capacity(bodies.len());
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO records (seq, bytes, sig, key_id, kind, subject) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(sql("appending"))?;
            for body in bodies {
                let statement = Statement {
                    statement_type: STATEMENT_TYPE.into(),
                    subject: body.subjects(RECORD_VERSION),
                    predicate_type: PREDICATE_TYPE.into(),
                    predicate: Predicate {
                        version: RECORD_VERSION,
                        log: LogPosition {
                            id: self.log_id.clone(),
                            seq,
                            prev: prev.clone(),
                        },
                        time: now_rfc3339(),
                        host: hostname(),
                        mechwatch_version: crate::BUILD_VERSION.into(),
                        key_id: signer.id().into(),
                        record: body,
                    },
                };
                let bytes = serde_json::to_vec(&statement).expect("records serialise");
                let sig = signer.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &bytes));
                let subject = statement.predicate.record.index_digest();
                insert
                    .execute(params![
                        seq as i64,
                        bytes,
                        sig.to_bytes().to_vec(),
                        signer.id(),
                        statement.predicate.record.kind(),
                        subject
                    ])
                    .map_err(sql("appending"))?;
                prev = hex::encode(Sha256::digest(&bytes));
                let leaf = merkle::leaf_hash(&bytes);
                frontier.push(leaf);
                tip = Some(leaf);
                receipts.push(Receipt {
                    seq,
                    hash: prev.clone(),
                });
                seq += 1;
            }
        }
        tx.commit().map_err(sql("committing append"))?;
        self.frontier = frontier;
        self.tip = tip;
        self.publish_head();
        self.maybe_checkpoint(seq)?;
        Ok(receipts)
    }

    fn maybe_checkpoint(&mut self, size: u64) -> Result<(), LogError> {
        let last: Option<i64> = self
            .conn
            .query_row("SELECT MAX(size) FROM checkpoints", [], |r| r.get(0))
            .map_err(sql("reading checkpoints"))?;
        let last = last.unwrap_or(0) as u64;
        if size >= last + self.policy.every_records
            || (size > last && self.last_checkpoint.elapsed() >= self.policy.every)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Write and return a signed checkpoint of the whole log now.
    pub fn checkpoint(&mut self) -> Result<String, LogError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("starting checkpoint"))?;
        check_writable(&tx, &self.path)?;
        let size = record_count(&tx)?;
        let tip: Option<Vec<u8>> = tx
            .query_row(
                "SELECT bytes FROM records ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading the log head"))?;
        if self.frontier.size() != size || self.tip != tip.map(|b| merkle::leaf_hash(&b)) {
            let r = resync(&tx, &self.path, self.head)?;
            (self.frontier, self.tip) = (r.frontier, r.tip);
        }
        check_key(&tx, &self.path, self.signer.as_ref())?;
        let cp = Checkpoint {
            origin: origin(&self.log_id),
            size,
            root: self.frontier.root(),
        };
        let note = cp.sign(
            NOTE_KEY_NAME,
            self.signer
                .as_ref()
                .ok_or_else(|| LogError::Format("no signing key".into()))?,
        );
        tx.execute(
            "INSERT OR IGNORE INTO checkpoints (size, note, written_at) VALUES (?1, ?2, ?3)",
            params![size as i64, note, now_rfc3339()],
        )
        .map_err(sql("writing checkpoint"))?;
        tx.commit().map_err(sql("committing checkpoint"))?;
        self.last_checkpoint = Instant::now();
        Ok(note)
    }

    /// The newest stored checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, LogError> {
        self.conn
            .query_row(
                "SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading checkpoints"))
    }

    /// Hand over to `new`: a rotation record signed by the current key carrying the new
    /// key's signature; later records and checkpoints are signed by `new`.
    pub fn rotate_key(&mut self, new: Signer) -> Result<Receipt, LogError> {
        let old_id = self.signer()?.id().to_string();
        let seq = self.len()?;
        let new_public = hex::encode(new.public().as_bytes());
        let msg = rotation_message(&self.log_id, seq, &old_id, &new_public);
        let body = RecordBody::KeyRotation {
            new_key_id: new.id().to_string(),
            new_public_key: new_public,
            new_key_signature: hex::encode(new.sign(&msg).to_bytes()),
        };
        let receipt = self.append(body)?;
        self.signer = Some(new);
        self.checkpoint()?;
        Ok(receipt)
    }
}
