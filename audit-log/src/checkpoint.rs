//! Signed checkpoints in the C2SP tlog-checkpoint / signed-note format:
//!
//! ```text
//! <origin>
//! <tree size>
//! <base64 root hash>
//!
//! — <key name> <base64(key id (4 bytes) || Ed25519 signature)>
//! ```
//!
//! The Ed25519 note key id is `SHA-256(name || 0x0A || 0x01 || public key)[:4]`, as C2SP
//! signed-note specifies and Go's `golang.org/x/mod/sumdb/note` computes; [`note_verifier`]
//! prints the verifier key that Go's `note.NewVerifier` reads. The root hash is base64 here
//! because tlog-checkpoint mandates it; everywhere else mechwatch shows digests in hex.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::LogError;
use crate::keys::Signer;
use crate::merkle::Hash;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// The signed-note key id of an Ed25519 key called `name`.
pub fn note_key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0x0A, 0x01]);
    h.update(key.as_bytes());
    h.finalize()[..4].try_into().expect("4 bytes")
}

/// The C2SP signed-note verifier key of `key` under `name`:
/// `<name>+<hex key id>+<base64(0x01 || public key)>`, the string Go's `note.NewVerifier` takes.
pub fn note_verifier(name: &str, key: &VerifyingKey) -> String {
    let mut typed = vec![0x01];
    typed.extend_from_slice(key.as_bytes());
    format!(
        "{name}+{:08x}+{}",
        u32::from_be_bytes(note_key_id(name, key)),
        STANDARD.encode(typed)
    )
}

impl Checkpoint {
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// The signed note, signed by `signer` under key name `name`.
    pub fn sign(&self, name: &str, signer: &Signer) -> String {
        let body = self.body();
        let sig = signer.sign(body.as_bytes());
        let mut blob = note_key_id(name, &signer.public()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n\u{2014} {name} {}\n", STANDARD.encode(blob))
    }

    /// Parse a signed note and verify it against `key` (named `name`). The body is parsed
    /// only after a signature line by that key verifies.
    pub fn verify(note: &str, name: &str, key: &VerifyingKey) -> Result<Self, LogError> {
        let (body, sigs) = note.split_once("\n\n").ok_or_else(|| {
            LogError::Format("checkpoint: no blank line before signatures".into())
        })?;
        let body = format!("{body}\n");
        let want_id = note_key_id(name, key);
        let mut verified = false;
        for line in sigs.lines() {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                continue;
            };
            let Some((n, b64)) = rest.split_once(' ') else {
                continue;
            };
            let Ok(blob) = STANDARD.decode(b64) else {
                continue;
            };
            if n != name || blob.len() != 68 || blob[..4] != want_id {
                continue;
            }
            let sig = Signature::from_bytes(blob[4..].try_into().expect("64 bytes"));
            if key.verify(body.as_bytes(), &sig).is_ok() {
                verified = true;
                break;
            }
        }
        if !verified {
            return Err(LogError::Signature);
        }
        Self::parse_body(&body)
    }

    /// Parse a signed note without checking its signature: for a writer comparing its own
    /// head witness with the database, where a forged note can only cause a refusal.
    pub fn parse_unverified(note: &str) -> Result<Self, LogError> {
        let (body, _) = note.split_once("\n\n").ok_or_else(|| {
            LogError::Format("checkpoint: no blank line before signatures".into())
        })?;
        Self::parse_body(&format!("{body}\n"))
    }

    fn parse_body(body: &str) -> Result<Self, LogError> {
        let bad = |what: &str| LogError::Format(format!("checkpoint: {what}"));
        let mut lines = body.lines();
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| bad("missing origin"))?;
        let size = lines
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("bad tree size"))?;
        let root: Hash = lines
            .next()
            .and_then(|r| STANDARD.decode(r).ok())
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("bad root hash"))?;
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_notes_verify_and_tampering_is_caught() {
        let s = Signer::generate();
        let cp = Checkpoint {
            origin: "mechwatch.example/log/abc".into(),
            size: 42,
            root: [7u8; 32],
        };
        let note = cp.sign("mechwatch", &s);
        assert!(note.contains("\n\n\u{2014} mechwatch "));
        assert_eq!(
            Checkpoint::verify(&note, "mechwatch", &s.public()).unwrap(),
            cp
        );
        let tampered = note.replace("\n42\n", "\n41\n");
        assert!(Checkpoint::verify(&tampered, "mechwatch", &s.public()).is_err());
        let other = Signer::generate();
        assert!(Checkpoint::verify(&note, "mechwatch", &other.public()).is_err());
        assert!(Checkpoint::verify("garbage", "mechwatch", &s.public()).is_err());
    }

    #[test]
    fn the_note_key_id_and_verifier_key_follow_c2sp() {
        // Known answer for the all-zero seed, computed from the spec's definitions:
        // key id = SHA-256("mechwatch" || 0x0A || 0x01 || public key)[:4].
        let s = Signer::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&[0u8; 32]));
        let public = s.public();
        let mut h = Sha256::new();
        h.update(b"mechwatch\n\x01");
        h.update(public.as_bytes());
        let want: [u8; 4] = h.finalize()[..4].try_into().unwrap();
        assert_eq!(note_key_id("mechwatch", &public), want);
        let v = note_verifier("mechwatch", &public);
        let parts: Vec<&str> = v.split('+').collect();
        assert_eq!(parts.len(), 3, "{v}");
        assert_eq!(parts[0], "mechwatch");
        assert_eq!(parts[1], hex::encode(want));
        let raw = STANDARD.decode(parts[2]).unwrap();
        assert_eq!(raw[0], 0x01);
        assert_eq!(&raw[1..], public.as_bytes());
        // The signature line carries the same 4 bytes.
        let note = Checkpoint {
            origin: "o".into(),
            size: 1,
            root: [0; 32],
        }
        .sign("mechwatch", &s);
        let b64 = note.lines().last().unwrap().rsplit(' ').next().unwrap();
        assert_eq!(STANDARD.decode(b64).unwrap()[..4], want);
    }
}
