//! Whole-log verification: signatures (batched), sequence without gaps, hash links, key
//! rotations, stored checkpoints, and consistency with an exported (off-host) checkpoint.
//! Signatures are checked before any record is parsed. Given the writer's head witness
//! (`<db>.head`), the log must also extend it, or it was rolled back.
//!
//! [`verify_export`] does the same for a DSSE export without the database: the envelopes'
//! signatures, the chain, and the Merkle root of the exported records at an exported
//! checkpoint's size.
//!
//! Only evidence about the log's contents is a [`Failure`] that counts as tampering; a
//! database that cannot be read (I/O error, locked, a missing `-shm`) is
//! [`Reason::Unreadable`]: could not check, not tampered.

use std::fmt;

use ed25519_dalek::{Signature, VerifyingKey};
use rusqlite::Connection;
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::dsse::{decode_b64, pae, Envelope, IN_TOTO_PAYLOAD_TYPE};
use crate::error::LogError;
use crate::keys::key_id;
use crate::merkle::{self, Hash};
use crate::record::*;
use crate::schema;
use crate::store::{self, StoredRecord, NOTE_KEY_NAME};

/// Why verification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    BadSignature,
    BrokenLink,
    Gap {
        expected: u64,
    },
    UnknownKey {
        key_id: String,
    },
    InconsistentWithCheckpoint(String),
    /// The log does not extend the head witness its writer left beside it: it holds fewer
    /// records (rolled back) or different ones (changed); the text says which.
    RolledBack(String),
    Malformed(String),
    /// The database's schema holds an object mechwatch does not create (a planted trigger,
    /// view, index or table), or a log id is missing.
    ForeignSchema(String),
    /// A value of the wrong type in one of mechwatch's tables.
    Mistyped(crate::schema::Mistyped),
    /// SQLite found the file corrupt: evidence that it was changed.
    Database(String),
    /// The database could not be read (I/O error, busy, cannot open): nothing was checked.
    Unreadable(String),
}

impl Reason {
    /// Whether this is evidence against the log (exit 1), rather than a failure to check it
    /// (exit 2).
    pub fn is_evidence(&self) -> bool {
        !matches!(self, Reason::Unreadable(_))
    }
}

/// The first problem found, with the `seq` it concerns where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub seq: Option<u64>,
    pub reason: Reason,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = self.seq {
            write!(f, "seq {s}: ")?;
        }
        match &self.reason {
            Reason::BadSignature => write!(f, "bad signature"),
            Reason::BrokenLink => write!(
                f,
                "broken link: prev does not match the previous record's hash"
            ),
            Reason::Gap { expected } => write!(f, "gap: expected seq {expected}"),
            Reason::UnknownKey { key_id } => write!(f, "unknown key {key_id}"),
            Reason::InconsistentWithCheckpoint(d) => write!(f, "inconsistent with checkpoint: {d}"),
            Reason::RolledBack(d) => write!(f, "the log does not extend its head witness: {d}"),
            Reason::Unreadable(d) => write!(f, "could not read the database: {d}"),
            Reason::Malformed(d) => write!(f, "malformed record: {d}"),
            Reason::Database(d) => write!(f, "database: {d}"),
            Reason::ForeignSchema(d) => write!(f, "the database was edited: {d}"),
            Reason::Mistyped(m) if m.seq.is_some() => write!(
                f,
                "the database was edited: column {} holds a {} value, not {}",
                m.column, m.found, m.expected
            ),
            Reason::Mistyped(m) => write!(f, "the database was edited: {m}"),
        }
    }
}

/// What a successful verification covered.
#[derive(Debug, Clone)]
pub struct Report {
    pub log_id: String,
    pub records: u64,
    pub root: Hash,
    pub stored_checkpoints: usize,
    pub external_checkpoint: Option<u64>,
    /// Size of the head witness the log was checked against.
    pub head_witness: Option<u64>,
    /// Key ids in the order they signed.
    pub keys: Vec<String>,
}

/// The checkpoint in `note` if any key the log has used signed it.
fn signed_by_any(note: &str, keys: &[(String, VerifyingKey)]) -> Option<Checkpoint> {
    keys.iter()
        .find_map(|(_, k)| Checkpoint::verify(note, NOTE_KEY_NAME, k).ok())
}

fn fail(seq: Option<u64>, reason: Reason) -> Failure {
    Failure { seq, reason }
}

fn db(e: LogError) -> Failure {
    if let LogError::Mistyped(m) = e {
        return fail(m.seq, Reason::Mistyped(m));
    }
    let corrupt = matches!(&e, LogError::Sqlite { source, .. } if is_corruption(source));
    let d = e.to_string();
    fail(
        None,
        if corrupt {
            Reason::Database(d)
        } else {
            Reason::Unreadable(d)
        },
    )
}

fn sqlite(e: rusqlite::Error) -> Failure {
    let d = e.to_string();
    fail(
        None,
        if is_corruption(&e) {
            Reason::Database(d)
        } else {
            Reason::Unreadable(d)
        },
    )
}

/// SQLite's verdicts on the file's contents, as opposed to failures to read it.
fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

const BATCH: usize = 512;

/// Verify the whole log in `conn` against the trusted initial public key, and optionally an
/// exported checkpoint (signed note) kept off the host.
pub fn verify_log(
    conn: &Connection,
    trusted: &VerifyingKey,
    external: Option<&str>,
) -> Result<Report, Failure> {
    verify_log_witnessed(conn, trusted, external, None)
}

/// [`verify_log`], and the log must extend `head`, the head witness (a signed checkpoint
/// note) its writer left in `<db>.head`.
pub fn verify_log_witnessed(
    conn: &Connection,
    trusted: &VerifyingKey,
    external: Option<&str>,
    head: Option<&str>,
) -> Result<Report, Failure> {
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(sqlite)?;
    if check != "ok" {
        return Err(fail(
            None,
            Reason::Database(format!("SQLite integrity check: {check}")),
        ));
    }
    let has_schema: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            [],
            |r| r.get(0),
        )
        .map_err(sqlite)?;
    if !has_schema {
        return Err(fail(
            None,
            Reason::Database("not an initialised mechwatch audit log (no schema)".into()),
        ));
    }
    if let Some(object) = schema::first_foreign_object(conn).map_err(sqlite)? {
        return Err(fail(
            None,
            Reason::ForeignSchema(format!("its schema holds {object}")),
        ));
    }
    if let Some(m) = schema::first_mistyped(conn).map_err(sqlite)? {
        return Err(fail(m.seq, Reason::Mistyped(m)));
    }
    let log_id = match store::log_id(conn) {
        Err(LogError::Sqlite {
            source: rusqlite::Error::QueryReturnedNoRows,
            ..
        }) => {
            return Err(fail(
                None,
                Reason::ForeignSchema("its meta table has no log_id".into()),
            ))
        }
        other => other.map_err(db)?,
    };
    let mut keys: Vec<(String, VerifyingKey)> = vec![(key_id(trusted), *trusted)];
    let mut current = 0usize; // index into keys
    let mut leaves: Vec<Hash> = Vec::new();
    // Key index current after n records, for checkpoints: (from_size, key index).
    let mut key_from: Vec<(u64, usize)> = vec![(0, 0)];
    let mut prev = GENESIS_PREV.to_string();
    let mut expected = 0u64;
    let stored = store::read_checkpoints(conn).map_err(db)?;
    // Prefix roots at the stored checkpoints' sizes, computed in one pass.
    let mut frontier = merkle::Frontier::default();
    let mut prefix_roots: std::collections::BTreeMap<u64, Hash> = std::collections::BTreeMap::new();
    if stored.iter().any(|(s, _)| *s == 0) {
        prefix_roots.insert(0, merkle::empty_root());
    }
    loop {
        let rows = store::read_records_from(conn, expected, BATCH).map_err(db)?;
        if rows.is_empty() {
            break;
        }
        // Batch-verify the longest prefix signed by keys already known; rotations inside
        // the batch make later rows wait for the next round.
        let mut msgs = Vec::with_capacity(rows.len());
        let mut sigs = Vec::with_capacity(rows.len());
        let mut vks = Vec::with_capacity(rows.len());
        for r in &rows {
            let Some((_, k)) = keys.iter().find(|(id, _)| *id == r.key_id) else {
                break;
            };
            let Ok(sig) = <[u8; 64]>::try_from(r.sig.as_slice()) else {
                break;
            };
            msgs.push(pae(IN_TOTO_PAYLOAD_TYPE, &r.bytes));
            sigs.push(Signature::from_bytes(&sig));
            vks.push(*k);
        }
        let n_ok = msgs.len();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        let batch_ok = n_ok > 0 && verify_parallel(&refs, &sigs, &vks);
        for (i, r) in rows.iter().enumerate() {
            if r.seq != expected {
                return Err(fail(Some(r.seq), Reason::Gap { expected }));
            }
            if r.key_id != keys[current].0 {
                let reason = if keys.iter().any(|(id, _)| *id == r.key_id) {
                    Reason::BadSignature
                } else {
                    Reason::UnknownKey {
                        key_id: r.key_id.clone(),
                    }
                };
                return Err(fail(Some(r.seq), reason));
            }
            let verified = if i < n_ok {
                batch_ok || vks[i].verify_strict(&msgs[i], &sigs[i]).is_ok()
            } else {
                let sig = <[u8; 64]>::try_from(r.sig.as_slice()).map(|b| Signature::from_bytes(&b));
                sig.is_ok_and(|s| {
                    keys[current]
                        .1
                        .verify_strict(&pae(IN_TOTO_PAYLOAD_TYPE, &r.bytes), &s)
                        .is_ok()
                })
            };
            if !verified {
                return Err(fail(Some(r.seq), Reason::BadSignature));
            }
            // Only now is the record parsed.
            let st: Statement = serde_json::from_slice(&r.bytes)
                .map_err(|e| fail(Some(r.seq), Reason::Malformed(e.to_string())))?;
            check_statement(&st, r, &log_id, &keys[current].0)?;
            if st.predicate.log.prev != prev {
                return Err(fail(Some(r.seq), Reason::BrokenLink));
            }
            if let RecordBody::KeyRotation {
                new_key_id,
                new_public_key,
                new_key_signature,
            } = &st.predicate.record
            {
                let new_key = rotation_key(
                    &log_id,
                    r.seq,
                    &keys[current].0,
                    new_key_id,
                    new_public_key,
                    new_key_signature,
                )
                .ok_or_else(|| fail(Some(r.seq), Reason::BadSignature))?;
                keys.push((new_key_id.clone(), new_key));
                current = keys.len() - 1;
                key_from.push((r.seq + 1, current));
            }
            prev = hex::encode(Sha256::digest(&r.bytes));
            let leaf = r.leaf();
            leaves.push(leaf);
            frontier.push(leaf);
            expected += 1;
            if stored.binary_search_by_key(&expected, |(s, _)| *s).is_ok() {
                prefix_roots.insert(expected, frontier.root());
            }
            if i + 1 >= n_ok && i + 1 < rows.len() {
                break; // re-batch after a rotation or an unknown key
            }
        }
    }
    let size = leaves.len() as u64;
    let key_at = |s: u64| {
        key_from
            .iter()
            .rev()
            .find(|(from, _)| *from <= s)
            .map_or(0, |(_, k)| *k)
    };

    for (cp_size, note) in &stored {
        let what = format!("stored checkpoint of size {cp_size}");
        let incons = |d: String| fail(None, Reason::InconsistentWithCheckpoint(d));
        let key = &keys[key_at(*cp_size)].1;
        let cp = Checkpoint::verify(note, NOTE_KEY_NAME, key)
            .map_err(|_| incons(format!("{what} has a bad signature")))?;
        if cp.size != *cp_size || cp.origin != store::origin(&log_id) {
            return Err(incons(format!("{what} describes another tree")));
        }
        match prefix_roots.get(cp_size) {
            None => {
                return Err(incons(format!(
                    "{what} covers more than the {size} records in the log: records were removed"
                )))
            }
            Some(root) if *root != cp.root => {
                return Err(incons(format!(
                    "{what}: the first {cp_size} records were rewritten"
                )))
            }
            Some(_) => {}
        }
    }
    let external_checkpoint = match external {
        None => None,
        Some(note) => {
            let cp = signed_by_any(note, &keys).ok_or_else(|| fail(None, Reason::InconsistentWithCheckpoint("the exported checkpoint's signature does not verify with any key of this log".into())))?;
            check_checkpoint(&cp, &log_id, &leaves, "exported checkpoint")?;
            Some(cp.size)
        }
    };
    let head_witness = match head {
        None => None,
        Some(note) => {
            let rolled = |d: String| fail(None, Reason::RolledBack(d));
            let cp = signed_by_any(note, &keys).ok_or_else(|| {
                rolled("the head witness is not signed by any key of this log".into())
            })?;
            check_checkpoint(&cp, &log_id, &leaves, "the head witness").map_err(|f| {
                let d = match f.reason {
                    Reason::InconsistentWithCheckpoint(d) => d,
                    other => format!("{other:?}"),
                };
                // Fewer records than the writer wrote is a rollback; as many or more, but
                // different ones, is an edit: the message says which was found.
                rolled(if cp.size > size {
                    format!("rolled back: {d}")
                } else {
                    d
                })
            })?;
            Some(cp.size)
        }
    };
    Ok(Report {
        log_id,
        records: size,
        root: frontier.root(),
        stored_checkpoints: stored.len(),
        external_checkpoint,
        head_witness,
        keys: keys.into_iter().map(|(id, _)| id).collect(),
    })
}

/// What a verified export covered.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub log_id: String,
    /// Records in the export, all signed and chained from seq 0.
    pub records: u64,
    /// Size and root of the checkpoint they were checked against.
    pub checkpoint_size: u64,
    pub checkpoint_root: Hash,
    /// Key ids in the order they signed.
    pub keys: Vec<String>,
}

/// Verify a DSSE export (one envelope per record, from seq 0 in order, as `log export
/// --format dsse` writes it) against the log's initial public key and a signed checkpoint:
/// every envelope's signature over its payload (following key rotations), the statement's log
/// position and hash link, and that the Merkle root of the first `size` payloads equals the
/// checkpoint's root. Each line is `Err` when it is not an envelope.
pub fn verify_export(
    envelopes: &[Result<Envelope, String>],
    trusted: &VerifyingKey,
    checkpoint: &str,
) -> Result<ExportReport, Failure> {
    let mut keys: Vec<(String, VerifyingKey)> = vec![(key_id(trusted), *trusted)];
    let mut current = 0usize;
    let mut prev = GENESIS_PREV.to_string();
    let mut log_id: Option<String> = None;
    let mut leaves: Vec<Hash> = Vec::with_capacity(envelopes.len());
    for (i, env) in envelopes.iter().enumerate() {
        let seq = i as u64;
        let env = env.as_ref().map_err(|e| {
            fail(
                Some(seq),
                Reason::Malformed(format!("not a DSSE envelope: {e}")),
            )
        })?;
        // Only the current key may sign: the export is the log, so the same rule holds.
        let trusted_now = [keys[current].clone()];
        let bytes = env
            .verify(&trusted_now, 1, &[IN_TOTO_PAYLOAD_TYPE])
            .map_err(|_| {
                let other = env
                    .signatures
                    .iter()
                    .filter_map(|s| s.keyid.as_ref())
                    .find(|k| !keys.iter().any(|(id, _)| id == *k));
                fail(
                    Some(seq),
                    match other {
                        Some(k) => Reason::UnknownKey { key_id: k.clone() },
                        None => Reason::BadSignature,
                    },
                )
            })?;
        let st: Statement = serde_json::from_slice(&bytes)
            .map_err(|e| fail(Some(seq), Reason::Malformed(e.to_string())))?;
        let id = log_id
            .get_or_insert_with(|| st.predicate.log.id.clone())
            .clone();
        let sig = env
            .signatures
            .first()
            .and_then(|s| decode_b64(&s.sig))
            .unwrap_or_default();
        let r = StoredRecord {
            seq,
            bytes,
            sig,
            key_id: keys[current].0.clone(),
        };
        check_statement(&st, &r, &id, &keys[current].0)?;
        if st.predicate.log.prev != prev {
            return Err(fail(Some(seq), Reason::BrokenLink));
        }
        if let RecordBody::KeyRotation {
            new_key_id,
            new_public_key,
            new_key_signature,
        } = &st.predicate.record
        {
            let new_key = rotation_key(
                &id,
                seq,
                &keys[current].0,
                new_key_id,
                new_public_key,
                new_key_signature,
            )
            .ok_or_else(|| fail(Some(seq), Reason::BadSignature))?;
            keys.push((new_key_id.clone(), new_key));
            current = keys.len() - 1;
        }
        prev = r.hash_hex();
        leaves.push(r.leaf());
    }
    let incons = |d: String| fail(None, Reason::InconsistentWithCheckpoint(d));
    let cp = signed_by_any(checkpoint, &keys).ok_or_else(|| {
        incons("the checkpoint's signature does not verify with any key of this log".into())
    })?;
    let log_id = match log_id {
        Some(id) => id,
        // An empty export matches only the checkpoint of an empty log.
        None => cp
            .origin
            .strip_prefix("mechwatch/")
            .unwrap_or(&cp.origin)
            .to_string(),
    };
    if cp.origin != store::origin(&log_id) {
        return Err(incons(format!(
            "the checkpoint is for {}, but the records are of {}",
            cp.origin,
            store::origin(&log_id)
        )));
    }
    let m = cp.size as usize;
    if m > leaves.len() {
        return Err(incons(format!(
            "the checkpoint covers {m} records but the export holds {}: records are missing",
            leaves.len()
        )));
    }
    if merkle::root(&leaves[..m]) != cp.root {
        return Err(incons(format!(
            "the Merkle root of the first {m} exported records is not the checkpoint's root: \
             records were changed, removed or reordered"
        )));
    }
    Ok(ExportReport {
        log_id,
        records: leaves.len() as u64,
        checkpoint_size: cp.size,
        checkpoint_root: cp.root,
        keys: keys.into_iter().map(|(id, _)| id).collect(),
    })
}

/// Batch-verify signatures, split across the available cores.
fn verify_parallel(msgs: &[&[u8]], sigs: &[Signature], keys: &[VerifyingKey]) -> bool {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = msgs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = msgs
            .chunks(chunk)
            .zip(sigs.chunks(chunk))
            .zip(keys.chunks(chunk))
            .map(|((m, sg), k)| s.spawn(move || ed25519_dalek::verify_batch(m, sg, k).is_ok()))
            .collect();
        handles.into_iter().all(|h| h.join().unwrap_or(false))
    })
}

fn check_statement(
    st: &Statement,
    r: &StoredRecord,
    log_id: &str,
    current_key: &str,
) -> Result<(), Failure> {
    let bad = |d: String| Err(fail(Some(r.seq), Reason::Malformed(d)));
    if st.statement_type != STATEMENT_TYPE || st.predicate_type != PREDICATE_TYPE {
        return bad("not a mechwatch in-toto statement".into());
    }
    if !SUPPORTED_RECORD_VERSIONS.contains(&st.predicate.version) {
        return bad(format!("record version {}", st.predicate.version));
    }
    if st.predicate.log.id != log_id {
        return bad(format!(
            "belongs to log {}, not {log_id}",
            st.predicate.log.id
        ));
    }
    if st.predicate.log.seq != r.seq {
        return Err(fail(
            Some(r.seq),
            Reason::Gap {
                expected: st.predicate.log.seq,
            },
        ));
    }
    if st.predicate.key_id != current_key {
        return bad(format!(
            "names key {} but is signed by {current_key}",
            st.predicate.key_id
        ));
    }
    // Each version's own subject rule, so records written before version 2 still verify.
    if st.subject != st.predicate.record.subjects(st.predicate.version) {
        return bad("subject does not match the record".into());
    }
    Ok(())
}

fn rotation_key(
    log_id: &str,
    seq: u64,
    old: &str,
    new_id: &str,
    public_hex: &str,
    sig_hex: &str,
) -> Option<VerifyingKey> {
    let raw: [u8; 32] = hex::decode(public_hex).ok()?.try_into().ok()?;
    let key = VerifyingKey::from_bytes(&raw).ok()?;
    if key_id(&key) != new_id {
        return None;
    }
    let sig: [u8; 64] = hex::decode(sig_hex).ok()?.try_into().ok()?;
    key.verify_strict(
        &rotation_message(log_id, seq, old, public_hex),
        &Signature::from_bytes(&sig),
    )
    .ok()?;
    Some(key)
}

/// The checkpoint must describe a prefix of this log: same origin, size within the log, and
/// a root that the RFC 6962 consistency proof from that prefix to the whole log confirms.
fn check_checkpoint(
    cp: &Checkpoint,
    log_id: &str,
    leaves: &[Hash],
    what: &str,
) -> Result<(), Failure> {
    let incons = |d: String| Err(fail(None, Reason::InconsistentWithCheckpoint(d)));
    if cp.origin != store::origin(log_id) {
        return incons(format!("{what} is for {}, not this log", cp.origin));
    }
    let m = cp.size as usize;
    if m > leaves.len() {
        return incons(format!(
            "{what} covers {m} records but the log holds {}: records were removed (truncation or rollback)",
            leaves.len()
        ));
    }
    let proof = merkle::consistency_proof(m, leaves);
    let new_root = merkle::root(leaves);
    let ok = if m == 0 {
        cp.root == merkle::empty_root()
    } else {
        merkle::verify_consistency(m, leaves.len(), &cp.root, &new_root, &proof)
    };
    if !ok {
        return incons(format!(
            "{what} of size {m}: records among the first {m} were changed since it was signed"
        ));
    }
    Ok(())
}

/// Inclusion proof for record `seq` against the root of the whole log.
pub fn inclusion(conn: &Connection, seq: u64) -> Result<(Hash, Vec<Hash>, Hash, u64), LogError> {
    let n = store::record_count(conn)?;
    let leaves: Vec<Hash> = store::read_records(conn, 0, n)?
        .iter()
        .map(StoredRecord::leaf)
        .collect();
    let i = seq as usize;
    if i >= leaves.len() {
        return Err(LogError::Format(format!("no record with seq {seq}")));
    }
    Ok((
        leaves[i],
        merkle::inclusion_proof(i, &leaves),
        merkle::root(&leaves),
        n,
    ))
}
