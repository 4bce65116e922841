//! `mechwatch key generate | public | rotate`.
//!
//! Keys are files other tools read: the private key is PKCS#8 v1 PEM (`openssl pkey -in`),
//! the public key SPKI PEM (`openssl pkey -pubin -in`), and `key public --note-verifier` prints
//! the C2SP signed-note verifier key that Go's `golang.org/x/mod/sumdb/note` takes to verify
//! the log's checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use audit_log::checkpoint::note_verifier;
use audit_log::store::NOTE_KEY_NAME;
use audit_log::{AuditLog, Signer};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create an Ed25519 signing key (PKCS#8 v1 PEM, mode 0600) and print its public key (SPKI
    /// PEM, also written to FILE.pub); the key id and checkpoint note verifier key go to stderr.
    #[command(after_help = "Examples:
  mechwatch key generate --out signing.pem
  sudo mechwatch key generate --out /etc/mechwatch/signing.pem")]
    Generate {
        /// The private key file to create; the public key goes to FILE.pub (mode 0644).
        /// Neither may exist yet, and a symlink at either is refused, never followed.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of a signing key (SPKI PEM), or with --note-verifier the C2SP
    /// signed-note verifier key (`mechwatch+<key id>+<base64 key>`) for checkpoint verifiers.
    #[command(after_help = "Examples:
  mechwatch key public --key signing.pem --out signing.pem.pub
  mechwatch key public --pubkey signing.pem.pub --note-verifier")]
    Public {
        /// The private signing key.
        #[arg(long, required_unless_present = "pubkey", conflicts_with = "pubkey")]
        key: Option<PathBuf>,
        /// A public key (SPKI PEM or hex) instead, e.g. to get its note verifier key.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// Print the signed-note verifier key instead of the PEM.
        #[arg(long)]
        note_verifier: bool,
        /// Write to FILE instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Hand the log over to a new key: a rotation record signed by both keys.
    #[command(after_help = "Examples:
  mechwatch key generate --out new.pem
  mechwatch key rotate --db audit.db --key signing.pem --new-key new.pem")]
    Rotate {
        /// The audit log (SQLite) to hand over.
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
            let mut pub_path = out.clone().into_os_string();
            pub_path.push(".pub");
            let pub_path = PathBuf::from(pub_path);
            // Never replace (or follow a symlink at) FILE.pub; without it the new private key
            // is of no use, so it goes too.
            if let Err(e) = audit_log::keys::write_public_new(&pub_path, &public) {
                let _ = std::fs::remove_file(&out);
                return Err(anyhow::Error::new(e).context(format!(
                    "writing {} (nothing was written: {} is removed again)",
                    pub_path.display(),
                    out.display()
                )));
            }
            eprintln!(
                "key id {}; private key in {} (mode 0600), public key in {}\n\
                 checkpoint note verifier key: {}",
                signer.id(),
                out.display(),
                pub_path.display(),
                note_verifier(NOTE_KEY_NAME, &signer.public())
            );
            print!("{public}");
        }
        KeyCmd::Public {
            key,
            pubkey,
            note_verifier: note,
            out,
        } => {
            let public = match (key, pubkey) {
                (Some(k), _) => Signer::load(&k)?.public(),
                (None, Some(p)) => audit_log::keys::load_public(&p)?,
                (None, None) => anyhow::bail!("pass --key PRIVATE_KEY or --pubkey PUBLIC_KEY"),
            };
            let text = if note {
                format!("{}\n", note_verifier(NOTE_KEY_NAME, &public))
            } else {
                audit_log::keys::public_pem(&public)
            };
            match out {
                Some(path) => std::fs::write(&path, &text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
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
