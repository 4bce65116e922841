//! `mechwatch report`: an HTML (or Markdown) report of signed records for reviewers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use audit_log::record::{RecordBody, Statement};
use audit_log::store;
use clap::{Args, ValueEnum};

use crate::report::{Entry, Input, Verification};

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Html,
    Md,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["seq", "last", "model"])))]
pub struct ReportArgs {
    /// The audit log (SQLite) to read.
    #[arg(long)]
    pub db: PathBuf,
    /// The log's initial public key: verification runs when the report is made.
    #[arg(long)]
    pub pubkey: PathBuf,
    /// A checkpoint exported earlier with `log checkpoint`, to check the log against.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// One record.
    #[arg(long)]
    pub seq: Option<u64>,
    /// The last N audit and error records.
    #[arg(long)]
    pub last: Option<usize>,
    /// Every record of the checkpoint with this sha256 (a prefix is enough).
    #[arg(long)]
    pub model: Option<String>,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// `html` (one self-contained page) or `md` (a Markdown summary).
    #[arg(long, value_enum, default_value = "html")]
    pub format: Format,
}

fn entry(row: &Result<store::StoredRecord, audit_log::schema::Mistyped>) -> Entry {
    let row = match row {
        Ok(row) => row,
        Err(m) => {
            return Entry {
                seq: m.seq.unwrap_or_default(),
                statement: None,
                unreadable: Some(format!("{m}: the database was edited")),
            }
        }
    };
    match serde_json::from_slice::<Statement>(&row.bytes) {
        Ok(st) => Entry {
            seq: row.seq,
            statement: Some(st),
            unreadable: None,
        },
        Err(e) => Entry {
            seq: row.seq,
            statement: None,
            unreadable: Some(format!("record {} does not parse: {e}", row.seq)),
        },
    }
}

fn checkpoint_digest(e: &Entry) -> Option<String> {
    match &e.statement.as_ref()?.predicate.record {
        RecordBody::Audit { model, .. } => Some(model.root_sha256.clone()),
        RecordBody::Error { model, inputs, .. } => {
            model.as_ref().map(|m| m.root_sha256.clone()).or_else(|| {
                inputs
                    .iter()
                    .find(|i| i.kind == "checkpoint")
                    .map(|i| i.sha256.clone())
            })
        }
        RecordBody::KeyRotation { .. } => None,
    }
}

pub fn run(a: ReportArgs) -> anyhow::Result<ExitCode> {
    let key = audit_log::keys::load_public(&a.pubkey)?;
    let conn = store::open_reader(&a.db)?;
    let external = a
        .checkpoint
        .as_deref()
        .map(super::log::read_checkpoint)
        .transpose()?;
    let verification = match audit_log::verify::verify_log(&conn, &key, external.as_deref()) {
        Ok(r) => Verification::Verified {
            records: r.records,
            checkpoints: r.stored_checkpoints,
            keys: r.keys,
        },
        Err(f) => Verification::Failed {
            seq: f.seq,
            reason: f.to_string(),
        },
    };
    let n = store::record_count(&conn)?;
    let all: Vec<Entry> = store::read_records_each(&conn, 0, n)?
        .iter()
        .map(entry)
        .collect();
    let is_audit = |e: &Entry| {
        e.unreadable.is_some()
            || matches!(
                e.statement.as_ref().map(|s| &s.predicate.record),
                Some(RecordBody::Audit { .. } | RecordBody::Error { .. })
            )
    };
    let selected: Vec<usize> = if let Some(seq) = a.seq {
        all.iter().position(|e| e.seq == seq).into_iter().collect()
    } else if let Some(last) = a.last {
        let v: Vec<usize> = (0..all.len()).filter(|&i| is_audit(&all[i])).collect();
        v[v.len().saturating_sub(last)..].to_vec()
    } else {
        let want = a.model.clone().unwrap_or_default().to_lowercase();
        (0..all.len())
            .filter(|&i| checkpoint_digest(&all[i]).is_some_and(|d| d.starts_with(&want)))
            .collect()
    };
    anyhow::ensure!(
        !selected.is_empty(),
        "no record matches in {}",
        a.db.display()
    );
    let lineages: Vec<String> = selected
        .iter()
        .filter_map(|&i| all[i].result())
        .map(|r| r.model.lineage)
        .collect();
    let history = all
        .iter()
        .filter_map(|e| {
            let r = e.result()?;
            let time = e.statement.as_ref()?.predicate.time.clone();
            lineages
                .contains(&r.model.lineage)
                .then_some((e.seq, time, r))
        })
        .collect();
    let mut entries = Vec::new();
    let mut all = all;
    for &i in selected.iter().rev() {
        entries.push(all.remove(i));
    }
    entries.reverse();
    let input = Input {
        db: a.db.display().to_string(),
        verification,
        entries,
        history,
    };
    let text = match a.format {
        Format::Html => crate::report::html(&input),
        Format::Md => crate::report::markdown(&input),
    };
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    let verified = matches!(input.verification, Verification::Verified { .. });
    eprintln!(
        "wrote {} ({} record(s)); log {}",
        a.out.display(),
        input.entries.len(),
        if verified {
            "verified"
        } else {
            "FAILED verification"
        }
    );
    Ok(if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
