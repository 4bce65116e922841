//! The SQLite store: WAL, `synchronous=FULL`, one writer using `BEGIN IMMEDIATE`, versioned
//! migrations, and triggers that refuse UPDATE and DELETE (a guard against accidents, not a
//! security boundary: the signatures, the chain and exported checkpoints are).

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::dsse::{pae, IN_TOTO_PAYLOAD_TYPE};
use crate::error::{sql, LogError};
use crate::keys::Signer;
use crate::merkle::{self, Hash};
use crate::record::*;

/// Name of the key in checkpoint signature lines.
pub const NOTE_KEY_NAME: &str = "mechwatch";
const SCHEMA_VERSION: i64 = 1;

const MIGRATIONS: &[&str] = &[
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
    conn: Connection,
    signer: Option<Signer>,
    log_id: String,
    policy: CheckpointPolicy,
    last_checkpoint: Instant,
    /// Merkle frontier of the records this writer knows; rebuilt if another writer appended.
    frontier: merkle::Frontier,
}

fn configure(conn: &Connection) -> Result<(), LogError> {
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

fn build_frontier(conn: &Connection) -> Result<merkle::Frontier, LogError> {
    let mut f = merkle::Frontier::default();
    let mut stmt = conn
        .prepare("SELECT bytes FROM records ORDER BY seq")
        .map_err(sql("reading records"))?;
    let mut rows = stmt.query([]).map_err(sql("reading records"))?;
    while let Some(row) = rows.next().map_err(sql("reading records"))? {
        let bytes: Vec<u8> = row.get(0).map_err(sql("reading records"))?;
        f.push(merkle::leaf_hash(&bytes));
    }
    Ok(f)
}

/// Open a database read-only for readers (show, report, verify).
pub fn open_reader(path: &Path) -> Result<Connection, LogError> {
    if !path.exists() {
        return Err(LogError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such audit log"),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql("opening the audit log"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql("busy_timeout"))?;
    Ok(conn)
}

pub fn log_id(conn: &Connection) -> Result<String, LogError> {
    conn.query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
        r.get(0)
    })
    .map_err(sql("reading log id"))
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
    let mut stmt = conn.prepare_cached(query).map_err(sql("reading records"))?;
    let rows = stmt
        .query_map(args, |r| {
            Ok(StoredRecord {
                seq: r.get::<_, i64>(0)? as u64,
                bytes: r.get(1)?,
                sig: r.get(2)?,
                key_id: r.get(3)?,
            })
        })
        .map_err(sql("reading records"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(sql("reading records"))
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

/// Stored checkpoints, `(size, note)`, by size.
pub fn read_checkpoints(conn: &Connection) -> Result<Vec<(u64, String)>, LogError> {
    let mut stmt = conn
        .prepare("SELECT size, note FROM checkpoints ORDER BY size")
        .map_err(sql("reading checkpoints"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .map_err(sql("reading checkpoints"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(sql("reading checkpoints"))
}

pub fn origin(log_id: &str) -> String {
    format!("mechwatch/{log_id}")
}

impl AuditLog {
    /// Open (creating and migrating) the log at `path`. A `signer` is needed to append.
    pub fn open(path: &Path, signer: Option<Signer>) -> Result<Self, LogError> {
        let mut conn = Connection::open(path).map_err(sql("opening the audit log"))?;
        configure(&conn)?;
        migrate(&mut conn)?;
        let log_id = log_id(&conn)?;
        let frontier = build_frontier(&conn)?;
        Ok(Self {
            conn,
            signer,
            log_id,
            policy: CheckpointPolicy::default(),
            last_checkpoint: Instant::now(),
            frontier,
        })
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
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT seq, bytes FROM records ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading the log head"))?;
        let (mut seq, mut prev) = match last {
            Some((s, b)) => (s as u64 + 1, hex::encode(Sha256::digest(&b))),
            None => (0, GENESIS_PREV.to_string()),
        };
        if self.frontier.size() != seq {
            self.frontier = build_frontier(&tx)?;
        }
        let mut frontier = self.frontier.clone();
        let mut receipts = Vec::with_capacity(bodies.len());
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO records (seq, bytes, sig, key_id, kind, subject) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(sql("appending"))?;
            for body in bodies {
                let statement = Statement {
                    statement_type: STATEMENT_TYPE.into(),
                    subject: vec![body.subject()],
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
                        mechwatch_version: env!("CARGO_PKG_VERSION").into(),
                        key_id: signer.id().into(),
                        record: body,
                    },
                };
                let bytes = serde_json::to_vec(&statement).expect("records serialise");
                let sig = signer.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &bytes));
                let subject = statement.subject[0].digest["sha256"].clone();
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
                frontier.push(merkle::leaf_hash(&bytes));
                receipts.push(Receipt {
                    seq,
                    hash: prev.clone(),
                });
                seq += 1;
            }
        }
        tx.commit().map_err(sql("committing append"))?;
        self.frontier = frontier;
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
        let size = record_count(&tx)?;
        if self.frontier.size() != size {
            self.frontier = build_frontier(&tx)?;
        }
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
