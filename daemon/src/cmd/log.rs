//! `mechwatch log verify | show | checkpoint | export | proof`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use audit_log::dsse::{Envelope, IN_TOTO_PAYLOAD_TYPE};
use audit_log::store::{self, StoredRecord};
use audit_log::{AuditLog, RecordBody, Statement};
use base64::Engine;
use clap::{Subcommand, ValueEnum};

#[derive(Subcommand)]
pub enum LogCmd {
    /// Verify signatures, the hash chain, key rotations, stored checkpoints and, given an
    /// exported checkpoint, consistency with it. Exit 0 only if the whole log verifies.
    Verify {
        #[arg(long)]
        db: PathBuf,
        /// The log's initial public key (SPKI PEM or hex).
        #[arg(long)]
        pubkey: PathBuf,
        /// A checkpoint exported earlier with `log checkpoint`, kept off the host.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print records.
    Show {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, conflicts_with = "last")]
        seq: Option<u64>,
        #[arg(long)]
        last: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Export the newest checkpoint (a fresh one when the key is available) for off-host keeping.
    Checkpoint {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Export every record: DSSE envelopes around in-toto statements, or JSONL.
    Export {
        #[arg(long)]
        db: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print an RFC 6962 inclusion proof for one record.
    Proof {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        seq: u64,
    },
    /// Append records one by one, printing `acked SEQ` after each durable commit (crash tests).
    #[command(hide = true)]
    StressAppend {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Dsse,
    Jsonl,
}

pub fn run(cmd: LogCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LogCmd::Verify {
            db,
            pubkey,
            checkpoint,
        } => {
            let key = audit_log::keys::load_public(&pubkey)?;
            let conn = store::open_reader(&db)?;
            let external = checkpoint
                .as_ref()
                .map(|p| {
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            match audit_log::verify_log(&conn, &key, external.as_deref()) {
                Ok(r) => {
                    println!(
                        "ok: {} records in log {}, root {}, {} stored checkpoints{}, keys {}",
                        r.records,
                        r.log_id,
                        hex::encode(r.root),
                        r.stored_checkpoints,
                        r.external_checkpoint
                            .map(|s| format!(
                                ", consistent with the exported checkpoint of size {s}"
                            ))
                            .unwrap_or_default(),
                        r.keys.join(" -> ")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(f) => {
                    println!("FAILED: {f}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        LogCmd::Show {
            db,
            seq,
            last,
            json,
        } => {
            let conn = store::open_reader(&db)?;
            let n = store::record_count(&conn)?;
            let (from, to) = match (seq, last) {
                (Some(s), _) => (s, s + 1),
                (None, Some(l)) => (n.saturating_sub(l), n),
                (None, None) => (n.saturating_sub(10), n),
            };
            let rows = store::read_records(&conn, from, to)?;
            if seq.is_some() && rows.is_empty() {
                bail!("no record with seq {}", from);
            }
            let mut out = std::io::stdout().lock();
            for r in rows {
                let st: Statement = serde_json::from_slice(&r.bytes).with_context(|| {
                    format!("seq {}: unreadable record (run `log verify`)", r.seq)
                })?;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&st)?)?;
                } else {
                    writeln!(out, "{}", summary(&r, &st))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Checkpoint { db, key, out } => {
            let note = match audit_log::keys::resolve_key_path(key.as_deref()) {
                Some(_) => AuditLog::open(&db, Some(super::key::load_signer(key.as_deref())?))?
                    .checkpoint()?,
                None => AuditLog::open(&db, None)?
                    .latest_checkpoint()?
                    .context("the log has no checkpoint yet; pass --key to write one")?,
            };
            std::fs::write(&out, &note).with_context(|| format!("writing {}", out.display()))?;
            print!("{note}");
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Export { db, format, out } => {
            let conn = store::open_reader(&db)?;
            let n = store::record_count(&conn)?;
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .with_context(|| format!("creating {}", out.display()))?,
            );
            for r in store::read_records(&conn, 0, n)? {
                let line = match format {
                    ExportFormat::Dsse => {
                        let sig = ed25519_dalek_sig(&r)?;
                        serde_json::to_string(&Envelope::new(
                            IN_TOTO_PAYLOAD_TYPE,
                            &r.bytes,
                            &r.key_id,
                            &sig,
                        ))?
                    }
                    ExportFormat::Jsonl => serde_json::to_string(&serde_json::json!({
                        "seq": r.seq,
                        "key_id": r.key_id,
                        "sig": base64::engine::general_purpose::STANDARD.encode(&r.sig),
                        "statement": serde_json::from_slice::<serde_json::Value>(&r.bytes)
                            .with_context(|| format!("seq {}: unreadable record", r.seq))?,
                    }))?,
                };
                writeln!(w, "{line}")?;
            }
            w.flush()?;
            eprintln!("exported {n} records to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Proof { db, seq } => {
            let conn = store::open_reader(&db)?;
            let (leaf, proof, root, size) = audit_log::verify::inclusion(&conn, seq)?;
            let b64 = |h: &[u8]| base64::engine::general_purpose::STANDARD.encode(h);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "seq": seq,
                    "tree_size": size,
                    "leaf_hash": b64(&leaf),
                    "root_hash": b64(&root),
                    "inclusion_path": proof.iter().map(|h| b64(h)).collect::<Vec<_>>(),
                }))?
            );
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::StressAppend { db, key, count } => {
            let mut log = AuditLog::open(&db, Some(super::key::load_signer(key.as_deref())?))?;
            let mut out = std::io::stdout().lock();
            for i in 0..count {
                let r = log.append(RecordBody::Error {
                    model: None,
                    inputs: vec![],
                    stage: "stress".into(),
                    message: format!("stress record {i}"),
                })?;
                writeln!(out, "acked {}", r.seq)?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn ed25519_dalek_sig(r: &StoredRecord) -> anyhow::Result<ed25519_dalek::Signature> {
    let b: [u8; 64] = r
        .sig
        .as_slice()
        .try_into()
        .with_context(|| format!("seq {}: signature is not 64 bytes", r.seq))?;
    Ok(ed25519_dalek::Signature::from_bytes(&b))
}

fn summary(r: &StoredRecord, st: &Statement) -> String {
    let p = &st.predicate;
    let what = match &p.record {
        RecordBody::Audit { model, verdict, .. } => format!(
            "audit {verdict:<5} {} sha256:{}",
            model.path,
            &model.root_sha256[..16]
        ),
        RecordBody::Error {
            model,
            stage,
            message,
            ..
        } => format!(
            "error at {stage}: {message}{}",
            model
                .as_ref()
                .map(|m| format!(" ({})", m.path))
                .unwrap_or_default()
        ),
        RecordBody::KeyRotation { new_key_id, .. } => format!("key rotation to {new_key_id}"),
    };
    format!(
        "#{:<6} {} {} key {}  {}",
        r.seq, p.time, p.host, r.key_id, what
    )
}
