//! The default model's SAE, shipped inside the binary.
//!
//! Training it from the recipe in [`super::default`] takes about 25 minutes on two cores, so
//! its result ships: SAELens files with f16 weights (`probes/data/default-sae/`), embedded
//! with `include_bytes!`, checked against the digests below and written once to
//! `$MECHWATCH_HOME/sae/shipped-<digest>/`, where SAELens can load them too.
//! `mechwatch sae default --retrain` trains from the recipe and compares its f16 copy with
//! these bytes.
//!
//! The shipped files are replaced only by a commit that changes the recipe (each replacement
//! adds about 11 MB to the repository's history), so recipe changes are batched: the test
//! `the_shipped_sae_matches_the_recipe` fails when the recipe moves without them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;

use super::SaeError;
use crate::digest::sha256_hex;
use crate::model::Model;

pub const WEIGHTS: &[u8] = include_bytes!("../../data/default-sae/sae_weights.safetensors");
pub const CFG: &[u8] = include_bytes!("../../data/default-sae/cfg.json");
/// The recipe the shipped weights were trained with (the default model's recipe).
pub const RECIPE: &str = include_str!("../../data/default-sae/recipe.json");

pub const WEIGHTS_SHA256: &str = "7b9331cb264ed8207e4928dbfc6810b4d92a20908ab9246b0dfbe87b4a972b50";
pub const CFG_SHA256: &str = "c06877c60385fd1a3a3ebdac562edc7218734c858ac8a3a0aea46bc2df58973c";

const FILES: [(&str, &[u8], &str); 2] = [
    ("sae_weights.safetensors", WEIGHTS, WEIGHTS_SHA256),
    ("cfg.json", CFG, CFG_SHA256),
];

/// Whether the shipped SAE was trained for `model`: the default model's exact file.
pub fn applies_to(model: &Model) -> bool {
    matches!(model.manifest.files.as_slice(), [f] if f.sha256 == crate::fetch::GGUF_SHA256)
}

/// The shipped SAE's folder in the cache, written there (and verified) on first use.
pub fn folder() -> Result<PathBuf, SaeError> {
    for (name, bytes, digest) in FILES {
        if sha256_hex(bytes) != digest {
            return Err(SaeError::Format {
                path: PathBuf::from(format!("probes/data/default-sae/{name}")),
                detail: "the SAE embedded in this binary does not match its digest; the build \
                         is corrupt"
                    .into(),
            });
        }
    }
    let root = crate::fetch::home().join("sae");
    let dir = root.join(format!("shipped-{}", &WEIGHTS_SHA256[..16]));
    if holds_shipped_files(&dir) {
        return Ok(dir);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SaeError::Io { path, source }
    };
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    // Written beside, then renamed into place: a folder under the final name is complete.
    let partial = root.join(format!(
        "shipped-{}.partial-{}",
        &WEIGHTS_SHA256[..16],
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    for (name, bytes, _) in FILES {
        std::fs::write(partial.join(name), bytes).map_err(io(&partial.join(name)))?;
    }
    if dir.exists() {
        // Another process finished first, or an older copy was damaged.
        if holds_shipped_files(&dir) {
            let _ = std::fs::remove_dir_all(&partial);
            return Ok(dir);
        }
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    match std::fs::rename(&partial, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if holds_shipped_files(&dir) => {
            let _ = std::fs::remove_dir_all(&partial);
            Ok(dir)
        }
        Err(source) => Err(SaeError::Io { path: dir, source }),
    }
}

fn holds_shipped_files(dir: &Path) -> bool {
    FILES.iter().all(|(name, _, digest)| {
        crate::files::read_regular(&dir.join(name)).is_ok_and(|b| sha256_hex(&b) == *digest)
    })
}

/// Write the SAE in `src` (SAELens files, as training saves them) to `dst` as the shipped
/// form: every tensor rounded to f16, `cfg.json` copied as it is.
pub fn write_f16(src: &Path, dst: &Path) -> Result<(), SaeError> {
    let weights = src.join("sae_weights.safetensors");
    let file =
        crate::safetensors::SafetensorsFile::read(&weights).map_err(|e| SaeError::Format {
            path: weights.clone(),
            detail: e.to_string(),
        })?;
    let mut tensors = Vec::new();
    for t in &file.tensors {
        let tensor = file
            .load_f32(t, &candle_core::Device::Cpu)
            .map_err(|e| e.to_string())
            .and_then(|x| x.to_dtype(DType::F16).map_err(|e| e.to_string()))
            .map_err(|detail| SaeError::Format {
                path: weights.clone(),
                detail,
            })?;
        tensors.push((t.name.clone(), tensor));
    }
    std::fs::create_dir_all(dst).map_err(|source| SaeError::Io {
        path: dst.to_path_buf(),
        source,
    })?;
    let out = dst.join("sae_weights.safetensors");
    crate::safetensors::write(&out, &tensors, &BTreeMap::new()).map_err(|e| SaeError::Format {
        path: out.clone(),
        detail: e.to_string(),
    })?;
    std::fs::copy(src.join("cfg.json"), dst.join("cfg.json")).map_err(|source| SaeError::Io {
        path: dst.join("cfg.json"),
        source,
    })?;
    Ok(())
}
