//! Ed25519 signing keys: PKCS#8 PEM private keys (mode 0600, refused when readable by group
//! or others), SPKI PEM public keys that OpenSSL reads, and key ids.
//!
//! The private key never appears in logs or errors: `Signer`'s `Debug` prints the key id only.

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::LogError;

/// File name of the signing key inside `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
pub const CREDENTIAL_NAME: &str = "mechwatch-signing-key";

/// Short, stable identifier of a public key: the first 16 hex digits of SHA-256(raw key).
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))[..16].to_string()
}

pub struct Signer {
    key: SigningKey,
    id: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.id)
    }
}

impl Signer {
    pub fn from_signing_key(key: SigningKey) -> Self {
        let id = key_id(&key.verifying_key());
        Self { key, id }
    }

    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.key.sign(msg)
    }

    /// Load a PKCS#8 PEM private key, refusing files readable by group or others.
    pub fn load(path: &Path) -> Result<Self, LogError> {
        check_private_mode(path)?;
        let pem = std::fs::read_to_string(path).map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|_| LogError::Key {
            path: path.to_path_buf(),
            detail: "not an Ed25519 PKCS#8 PEM private key".into(),
        })?;
        Ok(Self::from_signing_key(key))
    }

    /// Write the private key (mode 0600, created exclusively) and return the public key PEM.
    pub fn write_new(&self, path: &Path) -> Result<String, LogError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| LogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let pem = self
            .key
            .to_pkcs8_pem(Default::default())
            .map_err(|_| LogError::Format("encoding the private key".into()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(public_pem(&self.public()))
    }
}

/// SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as `openssl pkey -pubout` writes it.
pub fn public_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(Default::default())
        .expect("an Ed25519 public key always encodes")
}

/// Read a public key: SPKI PEM, or 64 hex digits of the raw key.
pub fn load_public(path: &Path) -> Result<VerifyingKey, LogError> {
    let text = std::fs::read_to_string(path).map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_public(text.trim()).ok_or_else(|| LogError::Key {
        path: path.to_path_buf(),
        detail: "not an Ed25519 public key (SPKI PEM or 64 hex digits)".into(),
    })
}

pub fn parse_public(text: &str) -> Option<VerifyingKey> {
    if let Ok(k) = VerifyingKey::from_public_key_pem(text) {
        return Some(k);
    }
    let raw: [u8; 32] = hex::decode(text).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&raw).ok()
}

fn check_private_mode(path: &Path) -> Result<(), LogError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(LogError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The signing key path: the one given, else `$CREDENTIALS_DIRECTORY/mechwatch-signing-key`.
pub fn resolve_key_path(given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(CREDENTIAL_NAME))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_loose_permissions_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.pem");
        let s = Signer::generate();
        let public = s.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Signer::load(&path).unwrap();
        assert_eq!(loaded.id(), s.id());
        assert_eq!(parse_public(&public).unwrap(), s.public());
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Signer::load(&path).unwrap_err().to_string();
        assert!(e.contains("readable by group or others"), "{e}");
        assert!(!e.contains("BEGIN"), "{e}");
        // Never overwrite an existing key.
        assert!(Signer::generate().write_new(&path).is_err());
    }
}
