//! Decisions from verified records only. Anyone who can write the database can INSERT a row
//! (the triggers block only UPDATE and DELETE), so what was already audited and which audit
//! is a lineage's last pass are read from rows whose signatures and chain have been verified
//! against a trusted key, and which are exactly the rows that were verified.

use std::path::Path;

use anyhow::Context as _;
use audit_log::record::{RecordBody, Statement};
use audit_log::store::StoredRecord;
use ed25519_dalek::VerifyingKey;
use policies::result::RunResult;

/// Every row of the log in `conn`, once the whole log has verified against `trusted` (its
/// first signing key) and the rows read are the rows verified (same count, same Merkle root).
/// A log that does not verify is an error naming `db`.
pub fn rows(
    conn: &rusqlite::Connection,
    db: &Path,
    trusted: &VerifyingKey,
) -> anyhow::Result<Vec<StoredRecord>> {
    let mut rows = Vec::new();
    loop {
        let batch = audit_log::store::read_records_from(conn, rows.len() as u64, 512)
            .with_context(|| format!("reading {}", db.display()))?;
        if batch.is_empty() {
            break;
        }
        rows.extend(batch);
    }
    let report = audit_log::verify_log(conn, trusted, None).map_err(|f| {
        anyhow::anyhow!(
            "the audit log {} does not verify ({f}); decisions are made from verified records \
             only (`mechwatch log verify` shows the problem; give the log's first public key \
             as the trusted key if the signing key was rotated)",
            db.display()
        )
    })?;
    let leaves: Vec<_> = rows.iter().map(|r| r.leaf()).collect();
    if report.records != rows.len() as u64 || audit_log::merkle::root(&leaves) != report.root {
        anyhow::bail!(
            "the audit log {} changed while it was verified; try again",
            db.display()
        );
    }
    Ok(rows)
}

/// The newest audit of `lineage` among `rows` whose verdict is pass or warn.
pub fn last_pass(rows: &[StoredRecord], lineage: &str) -> Option<RunResult> {
    rows.iter().rev().find_map(|row| {
        let st = serde_json::from_slice::<Statement>(&row.bytes).ok()?;
        let RecordBody::Audit {
            verdict, result, ..
        } = st.predicate.record
        else {
            return None;
        };
        if verdict != "pass" && verdict != "warn" {
            return None;
        }
        serde_json::from_value::<RunResult>(result)
            .ok()
            .filter(|r| r.model.lineage == lineage)
    })
}
