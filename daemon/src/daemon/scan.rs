//! Finding checkpoints under a watched directory and telling when one is complete.
//!
//! A checkpoint is a `*.gguf` file or a directory holding `config.json` and `*.safetensors`.
//! Its snapshot is the size and modification time of each of its files; it is complete once
//! the snapshot has not changed for the quiet period, or once its ready marker exists, and
//! never while a temporary file (`*.partial`, `*.tmp`, ...) belongs to it.

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

/// Every checkpoint under `root`.
pub fn checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(root, &mut out, 0);
    out.sort();
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subdirs = Vec::new();
    let mut is_hf = false;
    let mut has_safetensors = false;
    let mut ggufs = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if hidden(&p) {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            subdirs.push(p);
        } else if ft.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "config.json" {
                is_hf = true;
            } else if name.ends_with(".safetensors") {
                has_safetensors = true;
            } else if name.ends_with(".gguf") {
                ggufs.push(p);
            }
        }
    }
    if is_hf && has_safetensors {
        out.push(dir.to_path_buf());
        return;
    }
    out.extend(ggufs);
    for d in subdirs {
        walk(&d, out, depth + 1);
    }
}

/// Size and modification time of each file of a checkpoint, and whether a temporary file
/// belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub files: Vec<(String, u64, Option<SystemTime>)>,
    pub writing: bool,
}

/// The files of a checkpoint: the GGUF file itself, or every non-hidden file in the directory.
fn files(path: &Path) -> Vec<(String, PathBuf)> {
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return vec![(name, path.to_path_buf())];
    }
    let mut out = Vec::new();
    collect(path, path, &mut out);
    out.sort();
    out
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if hidden(&p) {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => collect(root, &p, out),
            Ok(t) if t.is_file() => {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, p));
            }
            _ => {}
        }
    }
}

pub fn snapshot(path: &Path) -> Option<Snapshot> {
    let fs = files(path);
    if fs.is_empty() {
        return None;
    }
    let mut writing = fs.iter().any(|(_, p)| temporary(p));
    if path.is_file() {
        // A GGUF being written beside its final name, e.g. `model.gguf.partial`.
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        writing |= Path::new(&partial).exists();
    }
    let files = fs
        .iter()
        .map(|(rel, p)| {
            let m = std::fs::metadata(p).ok();
            (
                rel.clone(),
                m.as_ref().map_or(0, |m| m.len()),
                m.and_then(|m| m.modified().ok()),
            )
        })
        .collect();
    Some(Snapshot { files, writing })
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

/// sha256 of every file of the checkpoint, streamed, as a manifest.
pub fn manifest(path: &Path) -> std::io::Result<Manifest> {
    let mut m = Manifest::default();
    for (rel, p) in files(path) {
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        m.files.push(FileDigest {
            path: rel,
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
