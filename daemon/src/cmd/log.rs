//! `mechwatch log init | verify | show | checkpoint | export | proof`.
//!
//! Only `log init` and the writers start a log, and only where nothing exists; the read-only
//! commands never create a file. `log verify` exits 1 only on evidence against the log, and 2
//! when it could not read it; with `--export` it verifies a DSSE export and a checkpoint
//! without the database. Digests are printed in lowercase hex; base64 appears only where a
//! format mandates it (DSSE payloads and signatures, checkpoint notes).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use audit_log::dsse::{Envelope, IN_TOTO_PAYLOAD_TYPE};
use audit_log::store::{self, StoredRecord};
use audit_log::{AuditLog, RecordBody, Statement};
use base64::Engine;
use clap::{Subcommand, ValueEnum};

use crate::text::terminal_safe;

#[derive(Subcommand)]
pub enum LogCmd {
    /// Start a new, empty log at a path where nothing exists yet. With --key, only that key
    /// may sign its first record.
    #[command(after_help = "Examples:
  mechwatch log init --db audit.db --key signing.pem")]
    Init {
        /// The log to create (SQLite); nothing may exist there yet.
        #[arg(long)]
        db: PathBuf,
        /// The only key allowed to sign the first record (PKCS#8 PEM private key).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Verify signatures, the hash chain, key rotations, stored checkpoints, the writer's head
    /// witness (DB.head) when present and, given an exported checkpoint, consistency with it.
    /// Exit 0 only if the whole log verifies, 1 on evidence against it, 2 if it cannot be read.
    ///
    /// With --export instead of --db: verify a DSSE export (`log export --format dsse`) without
    /// the database: every envelope's signature, the hash chain from seq 0, and that the Merkle
    /// root of the first N exported records equals the root the checkpoint (size N) signs.
    #[command(after_help = "Examples:
  mechwatch log verify --db audit.db --pubkey signing.pem.pub
  mechwatch log verify --db audit.db --pubkey signing.pem.pub --checkpoint kept-off-host.checkpoint --json
  mechwatch log verify --export records.jsonl --checkpoint audit.checkpoint --pubkey signing.pem.pub")]
    Verify {
        /// The audit log (SQLite) to verify.
        #[arg(long, required_unless_present = "export", conflicts_with = "export")]
        db: Option<PathBuf>,
        /// A DSSE export (one envelope per line) to verify instead of a database; needs
        /// --checkpoint.
        #[arg(long, requires = "checkpoint")]
        export: Option<PathBuf>,
        /// The log's initial public key (SPKI PEM or hex).
        #[arg(long)]
        pubkey: PathBuf,
        /// A checkpoint exported earlier with `log checkpoint`, kept off the host.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Print one JSON object (verified, records, root, keys, failure) on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Print records, one line each (not verified: use `log verify` for that).
    #[command(after_help = "Examples:
  mechwatch log show --db audit.db
  mechwatch log show --db audit.db --seq 3 --json")]
    Show {
        /// The audit log (SQLite) to read.
        #[arg(long)]
        db: PathBuf,
        /// Only the record with this sequence number.
        #[arg(long, conflicts_with = "last")]
        seq: Option<u64>,
        /// The last N records [default: 10].
        #[arg(long)]
        last: Option<u64>,
        /// Print each record's in-toto statement as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Export the newest checkpoint (a fresh one when the key is available) for off-host keeping.
    #[command(after_help = "Examples:
  mechwatch log checkpoint --db audit.db --key signing.pem --out audit.checkpoint")]
    Checkpoint {
        /// The audit log (SQLite).
        #[arg(long)]
        db: PathBuf,
        /// The signing key, to sign a fresh checkpoint [default:
        /// $CREDENTIALS_DIRECTORY/mechwatch-signing-key; without one, the newest stored one].
        #[arg(long)]
        key: Option<PathBuf>,
        /// The log's first public key, to verify the log from before signing. Needed once
        /// for a log whose key an older mechwatch rotated (it does not record that key);
        /// it is then recorded in the log.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// The file to write the checkpoint (a C2SP signed note) to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Export every record: DSSE envelopes around in-toto statements (one per line), or JSONL.
    /// With --seq, only that record: one DSSE envelope (a JSON object) or one JSONL line.
    #[command(after_help = "Examples:
  mechwatch log export --db audit.db --format dsse --out records.jsonl
  mechwatch log export --db audit.db --seq 7 --format dsse --out record-7.dsse.json")]
    Export {
        /// The audit log (SQLite).
        #[arg(long)]
        db: PathBuf,
        /// Only the record with this sequence number.
        #[arg(long)]
        seq: Option<u64>,
        /// `dsse` (envelopes around in-toto statements) or `jsonl` (statement and signature).
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print an RFC 6962 inclusion proof for one record.
    #[command(after_help = "Examples:
  mechwatch log proof --db audit.db --seq 7")]
    Proof {
        /// The audit log (SQLite).
        #[arg(long)]
        db: PathBuf,
        /// The record's sequence number.
        #[arg(long)]
        seq: u64,
    },
    /// Append records one by one, printing `acked SEQ HASH` after each durable commit (crash
    /// tests; HASH is the hex SHA-256 of the stored record bytes).
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
        LogCmd::Init { db, key } => {
            let signer = match key {
                Some(k) => Some(super::key::load_signer(Some(&k))?),
                None => None,
            };
            let log = AuditLog::init(&db, signer)?;
            println!("created log {} at {}", log.log_id(), db.display());
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Verify {
            db,
            export,
            pubkey,
            checkpoint,
            json,
        } => {
            let key = audit_log::keys::load_public(&pubkey)?;
            if let Some(export) = export {
                let cp_path = checkpoint.context("--export needs --checkpoint")?;
                return verify_export(&export, &cp_path, &key, json);
            }
            let db = db.context("pass --db LOG or --export FILE")?;
            let conn = store::open_reader(&db)?;
            let head = store::read_head(&db)?;
            let external = checkpoint.as_deref().map(read_checkpoint).transpose()?;
            match audit_log::verify_log_witnessed(&conn, &key, external.as_deref(), head.as_deref())
            {
                Ok(r) if json => {
                    print_json(&serde_json::json!({
                        "verified": true,
                        "path": db.display().to_string(),
                        "log_id": r.log_id,
                        "records": r.records,
                        "root": hex::encode(r.root),
                        "stored_checkpoints": r.stored_checkpoints,
                        "head_witness_size": r.head_witness,
                        "checkpoint_size": r.external_checkpoint,
                        "keys": r.keys,
                        "failure": null,
                    }))?;
                    Ok(ExitCode::SUCCESS)
                }
                Ok(r) => {
                    println!(
                        "ok: {} records in log {}, root {}, {} stored checkpoints{}{}, keys {}",
                        r.records,
                        r.log_id,
                        hex::encode(r.root),
                        r.stored_checkpoints,
                        r.head_witness
                            .map(|s| format!(", extends the head witness of size {s}"))
                            .unwrap_or_default(),
                        r.external_checkpoint
                            .map(|s| format!(
                                ", consistent with the exported checkpoint of size {s}"
                            ))
                            .unwrap_or_default(),
                        terminal_safe(&r.keys.join(" -> "))
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(f) if !f.reason.is_evidence() => {
                    Err(anyhow::anyhow!("{f}")).with_context(|| format!("{}", db.display()))
                }
                Err(f) => {
                    if json {
                        print_json(&failed_json(&db, &f))?;
                    } else {
                        println!("FAILED: {}", terminal_safe(&f.to_string()));
                    }
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
                (Some(s), _) => (s, s.saturating_add(1)),
                (None, Some(l)) => (n.saturating_sub(l), n),
                (None, None) => (n.saturating_sub(10), n),
            };
            let rows = store::read_records_each(&conn, from, to)?;
            if seq.is_some() && rows.is_empty() {
                bail!("no record with seq {}", from);
            }
            // `show` does not verify; a record no mechwatch writer could have written is
            // flagged on its line, and the exit code says that there were some.
            let mut flagged = 0;
            let mut out = std::io::stdout().lock();
            for r in rows {
                let r = match r {
                    Ok(r) => r,
                    Err(m) => {
                        flagged += 1;
                        let line = if json {
                            serde_json::to_string(&serde_json::json!({
                                "seq": m.seq,
                                "malformed": m.to_string(),
                            }))?
                        } else {
                            format!("#{:<6} MALFORMED row: {m}", m.seq.unwrap_or_default())
                        };
                        writeln!(out, "{line}")?;
                        continue;
                    }
                };
                let (line, bad) = match serde_json::from_slice::<Statement>(&r.bytes) {
                    Ok(st) if json => (serde_json::to_string(&st)?, false),
                    Ok(st) => summary(&r, &st),
                    Err(e) if json => (
                        serde_json::to_string(&serde_json::json!({
                            "seq": r.seq,
                            "malformed": e.to_string(),
                        }))?,
                        true,
                    ),
                    Err(e) => (format!("#{:<6} MALFORMED record: {e}", r.seq), true),
                };
                flagged += usize::from(bad);
                writeln!(out, "{}", terminal_safe(&line))?;
            }
            if flagged > 0 {
                eprintln!(
                    "{}: {flagged} malformed record(s) that no mechwatch writer wrote; run `mechwatch log verify`",
                    db.display()
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Checkpoint {
            db,
            key,
            pubkey,
            out,
        } => {
            let note = match audit_log::keys::resolve_key_path(key.as_deref()) {
                Some(_) => {
                    let signer = super::key::load_signer(key.as_deref())?;
                    let mut log = match pubkey {
                        Some(p) => AuditLog::open_existing_trusting(
                            &db,
                            signer,
                            &audit_log::keys::load_public(&p)?,
                        )?,
                        None => AuditLog::open_existing(&db, Some(signer))?,
                    };
                    log.checkpoint()?
                }
                None => AuditLog::open_existing(&db, None)?
                    .latest_checkpoint()?
                    .context("the log has no checkpoint yet; pass --key to write one")?,
            };
            std::fs::write(&out, &note).with_context(|| format!("writing {}", out.display()))?;
            print!("{note}");
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Export {
            db,
            seq,
            format,
            out,
        } => {
            let conn = store::open_reader(&db)?;
            let n = store::record_count(&conn)?;
            let (from, to) = match seq {
                Some(s) if s >= n => bail!(
                    "{}: no record with seq {s} (the log holds {n} records)",
                    db.display()
                ),
                Some(s) => (s, s + 1),
                None => (0, n),
            };
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .with_context(|| format!("creating {}", out.display()))?,
            );
            for r in store::read_records(&conn, from, to)? {
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
            eprintln!("exported {} records to {}", to - from, out.display());
            Ok(ExitCode::SUCCESS)
        }
        LogCmd::Proof { db, seq } => {
            let conn = store::open_reader(&db)?;
            let (leaf, proof, root, size) = audit_log::verify::inclusion(&conn, seq)?;
            // Digests in lowercase hex, as everywhere a person reads them.
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "seq": seq,
                    "tree_size": size,
                    "leaf_hash": hex::encode(leaf),
                    "root_hash": hex::encode(root),
                    "inclusion_path": proof.iter().map(hex::encode).collect::<Vec<_>>(),
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
                writeln!(out, "acked {} {}", r.seq, r.hash)?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `log verify --export FILE --checkpoint CP`: exit 0 verified, 1 evidence, 2 unreadable.
fn verify_export(
    export: &std::path::Path,
    checkpoint: &std::path::Path,
    key: &ed25519_dalek::VerifyingKey,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let note = read_checkpoint(checkpoint)?;
    let mut envelopes: Vec<Result<Envelope, String>> = Vec::new();
    for line in audit_log::input::Lines::open(export)
        .with_context(|| format!("reading the export {}", export.display()))?
    {
        let line = line.with_context(|| format!("reading the export {}", export.display()))?;
        envelopes.push(serde_json::from_str(&line).map_err(|e| e.to_string()));
    }
    match audit_log::verify_export(&envelopes, key, &note) {
        Ok(r) if json => {
            print_json(&serde_json::json!({
                "verified": true,
                "path": export.display().to_string(),
                "log_id": r.log_id,
                "records": r.records,
                "root": hex::encode(r.checkpoint_root),
                "checkpoint_size": r.checkpoint_size,
                "uncovered_records": r.records.saturating_sub(r.checkpoint_size),
                "keys": r.keys,
                "failure": null,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => {
            println!(
                "ok: {} exported records of log {} verify; the first {} match the checkpoint \
                 (root {}){}, keys {}",
                r.records,
                r.log_id,
                r.checkpoint_size,
                hex::encode(r.checkpoint_root),
                if r.records > r.checkpoint_size {
                    format!(
                        "; {} later records are signed and chained but no checkpoint covers them",
                        r.records - r.checkpoint_size
                    )
                } else {
                    String::new()
                },
                r.keys.join(" -> ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(f) if json => {
            print_json(&failed_json(export, &f))?;
            Ok(ExitCode::from(1))
        }
        Err(f) => {
            println!(
                "FAILED: {}: {}",
                terminal_safe(&export.display().to_string()),
                terminal_safe(&f.to_string())
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// An exported checkpoint note: a small regular file (see `audit_log::input`).
pub fn read_checkpoint(path: &std::path::Path) -> anyhow::Result<String> {
    audit_log::input::read_small_text(path, "a checkpoint note")
        .with_context(|| format!("reading the checkpoint {}", path.display()))
}

/// `log verify --json` when the log or export failed to verify (exit 1).
fn failed_json(path: &std::path::Path, f: &audit_log::Failure) -> serde_json::Value {
    serde_json::json!({
        "verified": false,
        "path": path.display().to_string(),
        "failure": { "seq": f.seq, "message": f.to_string() },
    })
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn ed25519_dalek_sig(r: &StoredRecord) -> anyhow::Result<ed25519_dalek::Signature> {
    let b: [u8; 64] = r
        .sig
        .as_slice()
        .try_into()
        .with_context(|| format!("seq {}: signature is not 64 bytes", r.seq))?;
    Ok(ed25519_dalek::Signature::from_bytes(&b))
}

/// One line per record, and whether it is flagged as malformed. Fields come from unverified
/// bytes: nothing here may assume they are well formed.
fn summary(r: &StoredRecord, st: &Statement) -> (String, bool) {
    let mut bad = false;
    let p = &st.predicate;
    let what = match &p.record {
        RecordBody::Audit { model, verdict, .. } => {
            let d = &model.root_sha256;
            let digest = if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
                format!("sha256:{}", &d[..16])
            } else {
                bad = true;
                format!("MALFORMED digest {d:?}")
            };
            format!("audit {verdict:<5} {} {digest}", model.path)
        }
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
    let line = format!(
        "#{:<6} {} {} key {}  {}",
        r.seq, p.time, p.host, r.key_id, what
    );
    (line, bad)
}
