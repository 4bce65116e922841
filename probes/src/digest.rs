//! Checkpoint digests in the manner of OpenSSF model-signing: a manifest of per-file sha256
//! digests sorted by path, and a root digest over the sorted resource digests.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Path relative to the checkpoint root (the file name for a single GGUF).
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// The digests of every file a model was loaded from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: Vec<FileDigest>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Manifest {
    /// Record `bytes` as the content of `path` (the bytes actually parsed, not re-read).
    pub fn add(&mut self, path: &str, bytes: &[u8]) {
        self.files.retain(|f| f.path != path);
        self.files.push(FileDigest {
            path: path.to_string(),
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        });
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
    }

    /// sha256 over the concatenated raw digests of the files, in path order.
    pub fn root(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(hex::decode(&f.sha256).expect("manifest digests are hex"));
        }
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_depends_on_content_not_insertion_order() {
        let mut a = Manifest::default();
        a.add("b", b"2");
        a.add("a", b"1");
        let mut b = Manifest::default();
        b.add("a", b"1");
        b.add("b", b"2");
        assert_eq!(a.root(), b.root());
        b.add("b", b"3");
        assert_ne!(a.root(), b.root());
        // Known answer: sha256("abc").
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
