//! Checkpoint digests in the manner of OpenSSF model-signing: a manifest of (relative name,
//! sha256) pairs sorted by name, and a root digest that binds every name to its content.
//!
//! The root is sha256 over the manifest written the way GNU `sha256sum` writes it: one line
//! per file, sorted by name in byte order, `<sha256-hex>  <name>\n`. So two directories whose
//! files hold the same bytes under swapped names have different roots, and anyone can
//! recompute a root with standard tools (`-L` follows symlinked files, as the daemon does):
//!
//! ```text
//! cd checkpoint && find -L . -name '.?*' -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
//!     | xargs -0 sha256sum | sha256sum
//! ```
//!
//! A name holding a backslash, a newline or a carriage return is escaped as `sha256sum`
//! escapes it (the line starts with `\`; `\\`, `\n`, `\r` inside the name). A manifest of one
//! file (a single-file GGUF checkpoint) names it `-`, as `sha256sum` names its standard
//! input: the file's own name is not part of what is loaded, so the same bytes under another
//! name are the same checkpoint (`sha256sum < model.gguf | sha256sum`).
//!
//! Records written before this format carried the older root (sha256 over the concatenated
//! raw file digests). They still verify: verification checks the signature over the stored
//! bytes and never recomputes a root. A checkpoint audited under the old root is audited
//! once more under the new one, since its dedup key changed.

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

    /// The manifest as `sha256sum` prints it: `<sha256-hex>  <name>\n` per file, sorted by
    /// name (a lone file is named `-`). The root digest is sha256 over these bytes.
    pub fn listing(&self) -> String {
        let mut files: Vec<&FileDigest> = self.files.iter().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let lone = files.len() == 1;
        let mut out = String::new();
        for f in files {
            let name = if lone { "-" } else { f.path.as_str() };
            if name.contains(['\\', '\n', '\r']) {
                let escaped = name
                    .replace('\\', "\\\\")
                    .replace('\n', "\\n")
                    .replace('\r', "\\r");
                out.push_str(&format!("\\{}  {escaped}\n", f.sha256));
            } else {
                out.push_str(&format!("{}  {name}\n", f.sha256));
            }
        }
        out
    }

    /// sha256 over [`Manifest::listing`]: binds each file's relative name and content.
    pub fn root(&self) -> String {
        sha256_hex(self.listing().as_bytes())
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

    #[test]
    fn the_checkpoint_digest_ignores_file_names() {
        // Same bytes under swapped names: different checkpoints, different roots.
        let mut a = Manifest::default();
        a.add("model-00001.safetensors", b"first");
        a.add("model-00002.safetensors", b"second");
        let mut b = Manifest::default();
        b.add("model-00001.safetensors", b"second");
        b.add("model-00002.safetensors", b"first");
        assert_ne!(a.root(), b.root());
        // Known answer, recomputable with `sha256sum` as the module doc shows.
        let mut m = Manifest::default();
        m.add("b.txt", b"2");
        m.add("a.txt", b"1");
        assert_eq!(
            m.listing(),
            "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b  a.txt\n\
             d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35  b.txt\n"
        );
        assert_eq!(m.root(), sha256_hex(m.listing().as_bytes()));
    }

    #[test]
    fn a_lone_file_is_named_like_standard_input_and_odd_names_are_escaped() {
        let mut a = Manifest::default();
        a.add("one.gguf", b"abc");
        let mut b = Manifest::default();
        b.add("other.gguf", b"abc");
        assert_eq!(a.root(), b.root());
        assert_eq!(
            a.listing(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n"
        );
        let mut m = Manifest::default();
        m.add("a\nb", b"1");
        m.add("c\\d", b"1");
        assert!(
            m.listing().contains(
                "\\6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b  a\\nb\n"
            ),
            "{}",
            m.listing()
        );
        assert!(m.listing().contains("  c\\\\d\n"), "{}", m.listing());
    }
}
