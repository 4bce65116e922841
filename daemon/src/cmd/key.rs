//! `mechwatch key generate | rotate`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use audit_log::{AuditLog, Signer};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create an Ed25519 signing key (PKCS#8 PEM, mode 0600) and print its public key (SPKI PEM,
    /// also written to FILE.pub).
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Hand the log over to a new key: a rotation record signed by both keys.
    Rotate {
        #[arg(long)]
        db: PathBuf,
        /// The current key (default: $CREDENTIALS_DIRECTORY/mechwatch-signing-key).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The new key, made with `key generate`.
        #[arg(long)]
        new_key: PathBuf,
    },
}

/// Load the signing key from `--key` or systemd's credentials directory.
pub fn load_signer(key: Option<&std::path::Path>) -> anyhow::Result<Signer> {
    let path = audit_log::keys::resolve_key_path(key)
        .context("no signing key: pass --key or run with $CREDENTIALS_DIRECTORY set")?;
    Ok(Signer::load(&path)?)
}

pub fn run(cmd: KeyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeyCmd::Generate { out } => {
            let signer = Signer::generate();
            let public = signer
                .write_new(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            std::fs::write(&pub_path, &public)
                .with_context(|| format!("writing {}", pub_path.display()))?;
            eprintln!(
                "key id {}; private key in {} (mode 0600)",
                signer.id(),
                out.display()
            );
            print!("{public}");
        }
        KeyCmd::Rotate { db, key, new_key } => {
            let old = load_signer(key.as_deref())?;
            let new = Signer::load(&new_key)?;
            let new_id = new.id().to_string();
            let mut log = AuditLog::open_existing(&db, Some(old))?;
            let r = log.rotate_key(new)?;
            println!("rotated to key {new_id} at seq {}", r.seq);
        }
    }
    Ok(ExitCode::SUCCESS)
}
