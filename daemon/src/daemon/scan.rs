//! Finding checkpoints under a watched directory and telling when one is complete.
//!
//! A checkpoint is a `*.gguf` file or a directory holding `config.json` and `*.safetensors`.
//! Its snapshot is the size and modification time of each of its files; it is complete once
//! the snapshot has not changed for the quiet period, or once its ready marker exists, and
//! never while a temporary file (`*.partial`, `*.tmp`, ...) belongs to it.
//!
//! Symlinked files are followed (a Hugging Face cache snapshot is a directory of symlinks);
//! symlinked directories are not descended into, so a link cannot make the scan loop. Hidden
//! entries (`.name`) are ignored. Everything else the scan passes over is reported as a
//! [`Skip`] with its reason: a symlinked directory, a broken link, a directory deeper than
//! [`MAX_DEPTH`], an unreadable directory, a special file (FIFO, socket, device). A special
//! file inside a checkpoint, or one named `*.gguf`, is part of the checkpoint and makes
//! hashing it fail with an error naming the file: opening a FIFO would block a worker forever.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use probes::digest::{FileDigest, Manifest};
use sha2::{Digest, Sha256};

/// Name suffixes of files still being written.
const TEMPORARY: &[&str] = &[
    ".partial",
    ".tmp",
    ".part",
    ".incomplete",
    ".download",
    ".crdownload",
];
pub const DIR_MARKER: &str = ".mechwatch-ready";
/// Directories more than this many levels below a watched directory are not scanned.
pub const MAX_DEPTH: usize = 8;

/// A path the scan passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Skip {
    pub path: PathBuf,
    pub reason: String,
}

/// What a scan of a watched directory found.
#[derive(Debug, Default)]
pub struct Found {
    pub checkpoints: Vec<PathBuf>,
    pub skipped: Vec<Skip>,
}

fn hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn temporary(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| TEMPORARY.iter().any(|t| n.ends_with(t)))
}

/// What an entry is once symlinks to files are followed.
enum Entry {
    Dir,
    File,
    /// A FIFO, socket or device, with its kind in words.
    Special(&'static str),
    Skipped(String),
}

fn classify(p: &Path, ft: std::fs::FileType) -> Entry {
    if ft.is_symlink() {
        return match std::fs::metadata(p) {
            Err(e) => Entry::Skipped(format!("a symlink whose target cannot be read: {e}")),
            Ok(m) if m.is_dir() => Entry::Skipped(
                "a symlinked directory; symlinked directories are not followed".into(),
            ),
            Ok(m) if m.is_file() => Entry::File,
            Ok(m) => Entry::Special(probes::files::kind_of(m.file_type())),
        };
    }
    if ft.is_dir() {
        Entry::Dir
    } else if ft.is_file() {
        Entry::File
    } else {
        Entry::Special(probes::files::kind_of(ft))
    }
}

/// Every checkpoint under `root`, and what the scan passed over.
pub fn checkpoints(root: &Path) -> Found {
    let mut found = Found::default();
    walk(root, &mut found, 0);
    found.checkpoints.sort();
    found
}

fn walk(dir: &Path, found: &mut Found, depth: usize) {
    if depth > MAX_DEPTH {
        found.skipped.push(Skip {
            path: dir.to_path_buf(),
            reason: format!(
                "more than {MAX_DEPTH} directories below the watched directory; not scanned"
            ),
        });
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            // A watched directory that is gone is reported by the daemon itself.
            if depth > 0 || dir.exists() {
                found.skipped.push(Skip {
                    path: dir.to_path_buf(),
                    reason: format!("cannot read the directory: {e}"),
                });
            }
            return;
        }
    };
    let mut subdirs = Vec::new();
    let mut is_hf = false;
    let mut has_safetensors = false;
    let mut ggufs = Vec::new();
    let mut specials = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if hidden(&p) {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        // Whatever their type, these names make a checkpoint: a FIFO named `config.json`
        // is a checkpoint that cannot be hashed, and gets an error record saying so.
        if name == "config.json" {
            is_hf = true;
        } else if name.ends_with(".safetensors") {
            has_safetensors = true;
        }
        match classify(&p, ft) {
            Entry::Dir => subdirs.push(p),
            Entry::File if name.ends_with(".gguf") => ggufs.push(p),
            Entry::File => {}
            Entry::Special(_) if name.ends_with(".gguf") => ggufs.push(p),
            Entry::Special(kind) => specials.push(Skip {
                path: p,
                reason: format!("{kind}, not a regular file"),
            }),
            Entry::Skipped(reason) => found.skipped.push(Skip { path: p, reason }),
        }
    }
    if is_hf && has_safetensors {
        found.checkpoints.push(dir.to_path_buf());
        return;
    }
    found.skipped.extend(specials);
    found.checkpoints.extend(ggufs);
    subdirs.sort();
    for d in subdirs {
        walk(&d, found, depth + 1);
    }
}

/// Size and modification time of each file of a checkpoint, and whether a temporary file
/// belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub files: Vec<(String, u64, Option<SystemTime>)>,
    pub writing: bool,
    /// Entries inside the checkpoint that are not part of it (symlinked directories).
    pub skipped: Vec<Skip>,
}

impl Snapshot {
    /// sha256 over the snapshot's names, sizes and modification times: a key for a
    /// checkpoint state whose content could not be hashed.
    pub fn state_digest(&self, path: &Path) -> String {
        let mut s = format!("{}\n", path.display());
        for (name, size, mtime) in &self.files {
            let t = mtime
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            s.push_str(&format!("{name}\t{size}\t{t}\n"));
        }
        probes::digest::sha256_hex(s.as_bytes())
    }
}

/// One file of a checkpoint: its name relative to the checkpoint, its path, and what it is
/// when it is not a regular file.
struct Member {
    rel: String,
    path: PathBuf,
    special: Option<&'static str>,
}

/// The files of a checkpoint: the GGUF file itself, or every non-hidden file in the directory.
fn files(path: &Path) -> (Vec<Member>, Vec<Skip>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => collect(path, path, &mut out, &mut skipped),
        Ok(m) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let special = (!m.is_file()).then(|| probes::files::kind_of(m.file_type()));
            out.push(Member {
                rel: name,
                path: path.to_path_buf(),
                special,
            });
        }
        Err(_) => {}
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    (out, skipped)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<Member>, skipped: &mut Vec<Skip>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if hidden(&p) {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        let rel = || {
            p.strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned()
        };
        match classify(&p, ft) {
            Entry::Dir => collect(root, &p, out, skipped),
            Entry::File => out.push(Member {
                rel: rel(),
                path: p.clone(),
                special: None,
            }),
            Entry::Special(kind) => out.push(Member {
                rel: rel(),
                path: p.clone(),
                special: Some(kind),
            }),
            Entry::Skipped(reason) => skipped.push(Skip { path: p, reason }),
        }
    }
}

pub fn snapshot(path: &Path) -> Option<Snapshot> {
    let (fs, skipped) = files(path);
    if fs.is_empty() {
        return None;
    }
    let mut writing = fs.iter().any(|m| temporary(&m.path));
    if !path.is_dir() {
        // A GGUF being written beside its final name, e.g. `model.gguf.partial`.
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        writing |= Path::new(&partial).exists();
    }
    let files = fs
        .iter()
        .map(|m| {
            let meta = std::fs::metadata(&m.path).ok();
            (
                m.rel.clone(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect();
    Some(Snapshot {
        files,
        writing,
        skipped,
    })
}

/// Whether the checkpoint's ready marker exists.
pub fn marked_ready(path: &Path) -> bool {
    if path.is_dir() {
        path.join(DIR_MARKER).exists()
    } else {
        let mut m = path.as_os_str().to_owned();
        m.push(".ready");
        Path::new(&m).exists()
    }
}

fn named(p: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// Open a checkpoint file for reading without ever blocking on a FIFO; only a regular file
/// opens ([`probes::files::open_regular`]).
fn open_regular(p: &Path) -> std::io::Result<std::fs::File> {
    probes::files::open_regular(p).map_err(|e| named(p, e))
}

/// sha256 of every file of the checkpoint, streamed, as a manifest. Fails, naming the file,
/// on a special file (FIFO, socket, device) that belongs to the checkpoint.
pub fn manifest(path: &Path) -> std::io::Result<Manifest> {
    manifest_reporting(path, &mut |_| {})
}

/// [`manifest`], telling `step` which file it hashes (`hashing NAME (SIZE MB)`).
pub fn manifest_reporting(path: &Path, step: &mut dyn FnMut(&str)) -> std::io::Result<Manifest> {
    let mut m = Manifest::default();
    for member in files(path).0 {
        if let Some(kind) = member.special {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "`{}` ({}) is {kind}, not a regular file",
                    member.rel,
                    member.path.display()
                ),
            ));
        }
        let mut f = open_regular(&member.path)?;
        let bytes = f.metadata().map_or(0, |m| m.len());
        step(&format!(
            "hashing {} ({:.1} MB)",
            member.rel,
            bytes as f64 / 1e6
        ));
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| named(&member.path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        m.files.push(FileDigest {
            path: member.rel,
            sha256: hex::encode(h.finalize()),
            size,
        });
    }
    m.files.sort_by(|a, b| a.path.cmp(&b.path));
    if m.files.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the checkpoint has no files",
        ));
    }
    Ok(m)
}

/// A rough peak-memory estimate for auditing a checkpoint: f32 weights plus a Q8_0 decode
/// copy. GGUF files are assumed 4-bit (about 7x on expansion), safetensors f32-sized
/// storage as is (f16/bf16 double).
pub fn estimated_memory_mb(m: &Manifest) -> u64 {
    let mut bytes = 0f64;
    for f in &m.files {
        if f.path.ends_with(".gguf") {
            bytes += f.size as f64 * 7.5;
        } else if f.path.ends_with(".safetensors") {
            bytes += f.size as f64 * 2.6;
        }
    }
    (bytes / 1e6) as u64 + 200
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(p: &Path) {
        // The `mkfifo` command keeps the tests free of unsafe code.
        let ok = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn hf_dir(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("model.safetensors"), b"weights").unwrap();
    }

    #[test]
    fn a_fifo_blocks_a_worker_forever() {
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = tmp.path().join("m");
        hf_dir(&ckpt);
        mkfifo(&ckpt.join("tokenizer.json"));
        // The checkpoint is found, and hashing it fails at once naming the FIFO.
        assert_eq!(checkpoints(tmp.path()).checkpoints, vec![ckpt.clone()]);
        let e = manifest(&ckpt).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("FIFO"), "{e}");
        // A FIFO named as a GGUF checkpoint: found, and refused the same way.
        let gguf = tmp.path().join("x.gguf");
        mkfifo(&gguf);
        assert!(checkpoints(tmp.path()).checkpoints.contains(&gguf));
        let e = manifest(&gguf).unwrap_err().to_string();
        assert!(e.contains("x.gguf") && e.contains("FIFO"), "{e}");
        // Any other FIFO is passed over with its reason.
        let other = tmp.path().join("notes");
        mkfifo(&other);
        let found = checkpoints(tmp.path());
        assert!(
            found
                .skipped
                .iter()
                .any(|s| s.path == other && s.reason.contains("FIFO")),
            "{:?}",
            found.skipped
        );
        // Opening through `open_regular` never blocks either.
        assert!(open_regular(&other).is_err());
    }

    #[test]
    fn a_symlinked_gguf_is_never_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        let watched = tmp.path().join("watched");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(&watched).unwrap();
        std::fs::write(store.join("blob"), b"gguf bytes").unwrap();
        std::os::unix::fs::symlink(store.join("blob"), watched.join("m.gguf")).unwrap();
        // A Hugging Face cache snapshot: a directory of symlinks.
        let snap = watched.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        hf_dir(&store.join("hf"));
        for n in ["config.json", "model.safetensors"] {
            std::os::unix::fs::symlink(store.join("hf").join(n), snap.join(n)).unwrap();
        }
        // A symlinked directory is reported, not followed; a broken link is reported.
        std::os::unix::fs::symlink(&store, watched.join("loop")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), watched.join("broken.gguf"))
            .unwrap();
        let found = checkpoints(&watched);
        assert_eq!(
            found.checkpoints,
            vec![watched.join("m.gguf"), snap.clone()]
        );
        let reasons: Vec<_> = found
            .skipped
            .iter()
            .map(|s| (s.path.file_name().unwrap().to_str().unwrap(), &s.reason[..]))
            .collect();
        assert!(
            reasons
                .iter()
                .any(|(n, r)| *n == "loop" && r.contains("symlinked directory")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|(n, r)| *n == "broken.gguf" && r.contains("cannot be read")),
            "{reasons:?}"
        );
        // The manifest follows the links and hashes the targets' bytes under the links' names.
        let m = manifest(&snap).unwrap();
        let names: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["config.json", "model.safetensors"]);
        assert_eq!(manifest(&watched.join("m.gguf")).unwrap().files[0].size, 10);
    }

    #[test]
    fn a_checkpoint_more_than_8_directories_deep_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let mut deep = tmp.path().to_path_buf();
        for i in 0..=MAX_DEPTH {
            deep.push(format!("d{i}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("m.gguf"), b"x").unwrap();
        std::fs::write(deep.parent().unwrap().join("ok.gguf"), b"x").unwrap();
        let found = checkpoints(tmp.path());
        assert_eq!(
            found.checkpoints,
            vec![deep.parent().unwrap().join("ok.gguf")]
        );
        assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
        assert_eq!(found.skipped[0].path, deep);
        assert!(found.skipped[0].reason.contains("more than 8 directories"));
    }

    #[test]
    fn a_state_digest_changes_with_size_and_names() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("m.gguf");
        std::fs::write(&p, b"x").unwrap();
        let a = snapshot(&p).unwrap().state_digest(&p);
        assert_eq!(a, snapshot(&p).unwrap().state_digest(&p));
        std::fs::write(&p, b"xy").unwrap();
        assert_ne!(a, snapshot(&p).unwrap().state_digest(&p));
    }
}
