//! Ed25519 signing keys in the files other tools read: private keys as RFC 8410 PKCS#8 v1
//! `PrivateKeyInfo` PEM (no embedded public key; what `openssl genpkey -algorithm ed25519`
//! writes, and what OpenSSL 3 and Python `cryptography` load), mode 0600, refused when readable
//! by group or others; public keys as SPKI PEM. Private keys written by older mechwatch
//! versions (PKCS#8 v2 `OneAsymmetricKey`, with the public key embedded) still load.
//!
//! A public key given where a private key is expected, or the reverse, is refused with a
//! message that says which file to pass instead. The private key never appears in logs or
//! errors: `Signer`'s `Debug` prints the key id only.

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
pub use ed25519_dalek::{Signature, VerifyingKey};
use ed25519_dalek::{Signer as _, SigningKey};
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

    /// Load a PKCS#8 PEM private key (v1, or the v2 files older versions wrote), refusing
    /// files readable by group or others.
    pub fn load(path: &Path) -> Result<Self, LogError> {
        let text = read_key_file(path, "private")?;
        if text.contains("-----BEGIN PUBLIC KEY-----") {
            return Err(LogError::Key {
                path: path.to_path_buf(),
                detail: "this is a public key, but a private (signing) key is needed here; pass \
                         the private key file `mechwatch key generate --out FILE` wrote (FILE, not \
                         FILE.pub)"
                    .into(),
            });
        }
        check_private_mode(path)?;
        let key = SigningKey::from_pkcs8_pem(text.trim()).map_err(|_| LogError::Key {
            path: path.to_path_buf(),
            detail: "not an Ed25519 PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----); make \
                     one with `mechwatch key generate --out FILE` or `openssl genpkey -algorithm \
                     ed25519`"
                .into(),
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
        // PKCS#8 v1 (RFC 8410 `PrivateKeyInfo`): OpenSSL 3 refuses the v2 encoding with the
        // embedded public key.
        let pem = KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        }
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

/// Write a public key file beside a new private key: created exclusively (an existing file,
/// or a symlink, at `path` is refused, never replaced or followed), mode 0644.
pub fn write_public_new(path: &Path, pem: &str) -> Result<(), LogError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(path)
        .map_err(io)?;
    f.write_all(pem.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as `openssl pkey -pubout` writes it.
pub fn public_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(Default::default())
        .expect("an Ed25519 public key always encodes")
}

/// Read a key file, turning "no such file" into a message that says where keys come from.
fn read_key_file(path: &Path, which: &str) -> Result<String, LogError> {
    match crate::input::read_small(path, &format!("an Ed25519 {which} key")) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| LogError::Key {
            path: path.to_path_buf(),
            detail: format!("not a PEM file (not text); expected an Ed25519 {which} key"),
        }),
        Err(LogError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(LogError::Key {
                path: path.to_path_buf(),
                detail: if which == "private" {
                    "no such key file; create a signing key with `mechwatch key generate --out FILE`"
                    .into()
                } else {
                    "no such key file; the public key is FILE.pub beside the key that `mechwatch key \
                 generate --out FILE` wrote, or re-derive it with `mechwatch key public --key FILE`"
                    .into()
                },
            })
        }
        Err(e) => Err(e),
    }
}

/// Read a public key: SPKI PEM, or 64 hex digits of the raw key.
pub fn load_public(path: &Path) -> Result<VerifyingKey, LogError> {
    let text = read_key_file(path, "public")?;
    if text.contains("PRIVATE KEY-----") {
        return Err(LogError::Key {
            path: path.to_path_buf(),
            detail: "this is a private key, but a public key is expected here; pass its public \
                     key instead (FILE.pub, or make one with `mechwatch key public --key FILE \
                     --out FILE.pub`) and keep the private key off the verifying machine"
                .into(),
        });
    }
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

    #[test]
    fn regression_openssl_rejects_the_private_key_files_we_write() {
        // PKCS#8 v1 is a SEQUENCE of version 0, the algorithm and the key, nothing after:
        // 30 2e 02 01 00 30 05 06 03 2b 65 70 04 22 04 20 <32 bytes>.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.pem");
        let s = Signer::generate();
        s.write_new(&path).unwrap();
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(der.len(), 48);
        assert_eq!(
            der[..16],
            [
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20
            ]
        );
        assert_eq!(der[16..], s.key.to_bytes());
        assert_eq!(Signer::load(&path).unwrap().public(), s.public());
    }

    #[test]
    fn private_keys_written_by_older_versions_still_load() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("old.pem");
        let s = Signer::generate();
        // What earlier mechwatch versions wrote: PKCS#8 v2 with the public key embedded.
        let v2 = s.key.to_pkcs8_pem(Default::default()).unwrap();
        assert!(v2.len() > 130, "v2 carries the public key too");
        std::fs::write(&path, v2.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Signer::load(&path).unwrap().id(), s.id());
    }

    #[test]
    fn a_key_of_the_wrong_kind_or_at_a_missing_path_says_what_to_pass() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("k.pem");
        let public = tmp.path().join("k.pem.pub");
        let s = Signer::generate();
        std::fs::write(&public, s.write_new(&private).unwrap()).unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();

        let e = Signer::load(&public).unwrap_err().to_string();
        assert!(
            e.contains("this is a public key") && e.contains("k.pem.pub"),
            "{e}"
        );
        let e = load_public(&private).unwrap_err().to_string();
        assert!(
            e.contains("this is a private key") && e.contains("key public"),
            "{e}"
        );
        assert!(!e.contains("BEGIN"), "{e}");
        let missing = tmp.path().join("nope.pem");
        let e = Signer::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope.pem: no such key file") && e.contains("key generate"),
            "{e}"
        );
        let e = load_public(&missing).unwrap_err().to_string();
        assert!(
            e.contains("nope.pem: no such key file") && e.contains("key public"),
            "{e}"
        );
    }
}
