//! The instrument store: the directions and SAEs a lineage measures with, kept by content
//! digest under `$MECHWATCH_HOME/instruments/` so that later checkpoints of the lineage reuse
//! exactly the instruments its reference checkpoint was measured with.
//!
//! - `directions/<sha256>.safetensors`: one f32 tensor `direction` `[d_model]`, with the hook
//!   and position in the header's metadata; the name is the sha256 of the file's bytes.
//! - `saes/<root>/`: a copy of an SAE folder built for a checkpoint, named by its manifest
//!   root. The shipped default SAE is not copied: it is in the binary.
//!
//! Everything is written beside its final name and renamed into place, and every read checks
//! the digest it is asked for: a file that changed is an error, never a silent rebuild.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use probes::digest::sha256_hex;
use probes::sae::Sae;

/// Distinguishes the partial files of one process's writers.
static PARTIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn partial_name() -> String {
    let n = PARTIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".partial-{}-{n}", std::process::id())
}

/// A stored direction file is one vector and a small header; anything larger is not one.
const MAX_DIRECTION_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is missing from the instrument store")]
    Missing { path: PathBuf },
    #[error("{path} no longer matches its digest (sha256 {found}, pinned {expected})")]
    Digest {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("`{0}` is not a sha256 digest")]
    Name(String),
}

/// A direction as stored: its vector and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDirection {
    pub hook: String,
    pub position: i64,
    pub vector: Vec<f32>,
}

pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store under the cache folder (`$MECHWATCH_HOME/instruments`).
    pub fn in_cache() -> Self {
        Self::at(probes::fetch::home().join("instruments"))
    }

    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn direction_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        Ok(self
            .root
            .join("directions")
            .join(format!("{}.safetensors", digest_name(sha256)?)))
    }

    pub fn sae_dir(&self, root: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("saes").join(digest_name(root)?))
    }

    /// Store `d` and return its digest (the same direction always gives the same bytes).
    pub fn put_direction(&self, d: &StoredDirection) -> Result<String, StoreError> {
        let tmp_dir = self.root.join("directions");
        create_dir(&tmp_dir)?;
        let tmp = tmp_dir.join(partial_name());
        let t = Tensor::from_vec(d.vector.clone(), d.vector.len(), &Device::Cpu).map_err(|e| {
            StoreError::Format {
                path: tmp.clone(),
                detail: e.to_string(),
            }
        })?;
        let meta = BTreeMap::from([
            ("hook".to_string(), d.hook.clone()),
            ("position".to_string(), d.position.to_string()),
        ]);
        probes::safetensors::write(&tmp, &[("direction".to_string(), t)], &meta).map_err(|e| {
            StoreError::Format {
                path: tmp.clone(),
                detail: e.to_string(),
            }
        })?;
        let bytes = probes::files::read_regular(&tmp).map_err(io(&tmp))?;
        let sha = sha256_hex(&bytes);
        let path = self.direction_path(&sha)?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(sha)
    }

    /// The direction stored under `sha256`, checked against it and against `d_model`.
    pub fn direction(&self, sha256: &str, d_model: usize) -> Result<StoredDirection, StoreError> {
        let path = self.direction_path(sha256)?;
        let file = match probes::files::open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { path })
            }
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        // Read from the handle that was checked, never more than the bound.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_DIRECTION_BYTES + 1),
            &mut bytes,
        )
        .map_err(io(&path))?;
        if bytes.len() as u64 > MAX_DIRECTION_BYTES {
            return Err(StoreError::Format {
                path,
                detail: format!(
                    "more than {MAX_DIRECTION_BYTES} bytes is too large for a direction"
                ),
            });
        }
        let found = sha256_hex(&bytes);
        if found != sha256 {
            return Err(StoreError::Digest {
                path,
                expected: sha256.to_string(),
                found,
            });
        }
        let format = |detail: String| StoreError::Format {
            path: path.clone(),
            detail,
        };
        let file = probes::safetensors::SafetensorsFile::parse(&path, bytes)
            .map_err(|e| format(e.to_string()))?;
        let info = file
            .get("direction")
            .ok_or_else(|| format("no tensor `direction`".into()))?;
        if info.shape != [d_model] {
            return Err(format(format!(
                "tensor `direction` has shape {:?}; this model's d_model is {d_model}",
                info.shape
            )));
        }
        let vector = file
            .load_f32(info, &Device::Cpu)
            .map_err(|e| format(e.to_string()))?
            .to_vec1::<f32>()
            .map_err(|e| format(e.to_string()))?;
        let meta = |key: &str| {
            file.metadata
                .get(key)
                .cloned()
                .ok_or_else(|| format(format!("no `{key}` in the header's metadata")))
        };
        let hook = meta("hook")?;
        let position = meta("position")?
            .parse()
            .map_err(|_| format("`position` in the header is not an integer".into()))?;
        Ok(StoredDirection {
            hook,
            position,
            vector,
        })
    }

    /// Copy `sae`'s files into the store (once) and return their folder there.
    pub fn put_sae(&self, sae: &Sae) -> Result<PathBuf, StoreError> {
        let root = sae.manifest.root();
        let dir = self.sae_dir(&root)?;
        if self.sae(&root).is_ok() {
            return Ok(dir);
        }
        let parent = self.root.join("saes");
        create_dir(&parent)?;
        let partial = parent.join(partial_name());
        let _ = std::fs::remove_dir_all(&partial);
        create_dir(&partial)?;
        for f in &sae.manifest.files {
            let (src, dst) = (sae.path.join(&f.path), partial.join(&f.path));
            if let Some(up) = dst.parent() {
                create_dir(up)?;
            }
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
        // The copy must be what was loaded: a source changed since would make a pin that
        // no later audit could read.
        if let Err(e) = load_checked(&partial, &root) {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        if dir.exists() {
            if self.sae(&root).is_ok() {
                // Another run stored it meanwhile.
                let _ = std::fs::remove_dir_all(&partial);
                return Ok(dir);
            }
            // A damaged copy: replaced by the fresh one.
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::rename(&partial, &dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// The SAE stored under `root`, loaded and checked against it.
    pub fn sae(&self, root: &str) -> Result<Sae, StoreError> {
        let dir = self.sae_dir(root)?;
        if !dir.is_dir() {
            return Err(StoreError::Missing { path: dir });
        }
        load_checked(&dir, root)
    }
}

/// The SAE in `dir`, whose manifest root must be `root`.
pub fn load_checked(dir: &Path, root: &str) -> Result<Sae, StoreError> {
    let sae = probes::sae::load_sae(dir).map_err(|e| StoreError::Format {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    let found = sae.manifest.root();
    if found != root {
        return Err(StoreError::Digest {
            path: dir.to_path_buf(),
            expected: root.to_string(),
            found,
        });
    }
    Ok(sae)
}

/// A digest read from a record, before it becomes part of a path.
fn digest_name(s: &str) -> Result<&str, StoreError> {
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(s)
    } else {
        Err(StoreError::Name(s.to_string()))
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(io(dir))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        path: path.clone(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direction() -> StoredDirection {
        StoredDirection {
            hook: "blocks.1.hook_resid_post".into(),
            position: -1,
            vector: vec![0.5, -1.25, 3.0, 0.0],
        }
    }

    #[test]
    fn a_direction_round_trips_by_its_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path().to_path_buf());
        let sha = store.put_direction(&direction()).unwrap();
        assert_eq!(store.put_direction(&direction()).unwrap(), sha);
        assert_eq!(store.direction(&sha, 4).unwrap(), direction());
    }

    #[test]
    fn an_edited_direction_is_a_digest_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path().to_path_buf());
        let sha = store.put_direction(&direction()).unwrap();
        let path = store.direction_path(&sha).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = store.direction(&sha, 4).unwrap_err();
        assert!(matches!(e, StoreError::Digest { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_missing_direction_or_a_wrong_width_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path().to_path_buf());
        let e = store.direction(&"0".repeat(64), 4).unwrap_err();
        assert!(matches!(e, StoreError::Missing { .. }), "{e}");
        let sha = store.put_direction(&direction()).unwrap();
        let e = store.direction(&sha, 8).unwrap_err();
        assert!(e.to_string().contains("d_model is 8"), "{e}");
    }

    #[test]
    fn an_sae_is_copied_once_and_read_back_checked() {
        let tiny = crate::checks::testing::Tiny::new();
        let sae = probes::sae::load_sae(&tiny.dir.path().join("policy/sae")).unwrap();
        let store = Store::at(tiny.dir.path().join("store"));
        let dir = store.put_sae(&sae).unwrap();
        assert_eq!(store.put_sae(&sae).unwrap(), dir);
        assert_eq!(
            store.sae(&tiny.sae_sha).unwrap().manifest.root(),
            tiny.sae_sha
        );
        let cfg = dir.join("cfg.json");
        // Still a valid config, but not the pinned bytes.
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("{text} ")).unwrap();
        let e = store.sae(&tiny.sae_sha).unwrap_err();
        assert!(matches!(e, StoreError::Digest { .. }), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
    }

    #[test]
    fn a_digest_that_is_not_one_never_becomes_a_path() {
        let store = Store::at(PathBuf::from("/nonexistent"));
        for bad in ["../../etc/passwd", "", &"A".repeat(64)] {
            assert!(matches!(store.direction(bad, 4), Err(StoreError::Name(_))));
        }
    }
}
