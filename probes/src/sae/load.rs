//! Reading SAEs from disk: SAELens v6 and pre-v6 folders, sparsify folders, Gemma Scope
//! `params.npz`. Each format is mapped onto SAELens' tensor convention.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{candle, f32_on, npy, Activation, Normalization, Sae, SaeError};
use crate::digest::Manifest;
use crate::safetensors::SafetensorsFile;

fn read(path: &Path, manifest: &mut Manifest, root: &Path) -> Result<Vec<u8>, SaeError> {
    let bytes = crate::files::read_regular(path).map_err(|source| SaeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let rel = path
        .strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned();
    manifest.add(&rel, &bytes);
    Ok(bytes)
}

fn tensors_from_safetensors(
    path: &Path,
    bytes: Vec<u8>,
) -> Result<HashMap<String, Tensor>, SaeError> {
    let f = SafetensorsFile::parse(path, bytes).map_err(|e| SaeError::Format {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for info in &f.tensors {
        let t = f
            .load_f32(info, &Device::Cpu)
            .map_err(|e| SaeError::Tensor {
                path: path.to_path_buf(),
                tensor: info.name.clone(),
                detail: e.to_string(),
            })?;
        out.insert(info.name.clone(), t);
    }
    Ok(out)
}

struct Cfg<'a> {
    path: &'a Path,
    v: Value,
}

impl Cfg<'_> {
    fn err(&self, field: &str, detail: impl Into<String>) -> SaeError {
        SaeError::Config {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            detail: detail.into(),
        }
    }
    fn usize(&self, field: &str) -> Result<usize, SaeError> {
        match self.v.get(field) {
            None | Some(Value::Null) => Err(self.err(field, "missing")),
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(field, format!("{v} is not a positive integer"))),
        }
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>, SaeError> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(field).map(Some),
        }
    }
    fn str(&self, field: &str) -> Option<&str> {
        self.v.get(field).and_then(Value::as_str)
    }
    fn bool(&self, field: &str, default: bool) -> Result<bool, SaeError> {
        match self.v.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(field, format!("{v} is not a boolean"))),
        }
    }
}

/// Load the SAE at `path`: a SAELens or sparsify folder, a Gemma Scope `params.npz`, or a
/// folder holding one.
pub fn load_sae(path: &Path) -> Result<Sae, SaeError> {
    let (dir, file) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        (
            path.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            Some(path.to_path_buf()),
        )
    };
    let npz = file
        .clone()
        .filter(|f| f.extension().is_some_and(|e| e == "npz"))
        .or_else(|| {
            let p = dir.join("params.npz");
            (file.is_none() && p.exists()).then_some(p)
        });
    if let Some(npz) = npz {
        return load_gemma_scope(&npz, &dir);
    }
    let cfg_path = dir.join("cfg.json");
    let mut manifest = Manifest::default();
    if !cfg_path.exists() {
        return Err(SaeError::Format {
            path: path.to_path_buf(),
            detail: "not an SAE: expected cfg.json with sae_weights.safetensors (SAELens) or \
                     sae.safetensors (sparsify), or params.npz (Gemma Scope)"
                .into(),
        });
    }
    let cfg_bytes = read(&cfg_path, &mut manifest, &dir)?;
    let v: Value = serde_json::from_slice(&cfg_bytes).map_err(|e| SaeError::Format {
        path: cfg_path.clone(),
        detail: format!("invalid JSON: {e}"),
    })?;
    let cfg = Cfg { path: &cfg_path, v };
    if dir.join("sae_weights.safetensors").exists() {
        let w_path = dir.join("sae_weights.safetensors");
        let bytes = read(&w_path, &mut manifest, &dir)?;
        let t = tensors_from_safetensors(&w_path, bytes)?;
        load_saelens(&cfg, t, &w_path, manifest)
    } else if dir.join("sae.safetensors").exists() {
        let w_path = dir.join("sae.safetensors");
        let bytes = read(&w_path, &mut manifest, &dir)?;
        let t = tensors_from_safetensors(&w_path, bytes)?;
        load_sparsify(&cfg, t, &w_path, &dir, manifest)
    } else {
        Err(SaeError::Format {
            path: dir.clone(),
            detail: "cfg.json is present but neither sae_weights.safetensors nor sae.safetensors"
                .into(),
        })
    }
}

struct Weights<'a> {
    path: &'a Path,
    t: HashMap<String, Tensor>,
}

impl Weights<'_> {
    fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed_hint: bool,
    ) -> Result<Tensor, SaeError> {
        let t = self.t.remove(name).ok_or_else(|| SaeError::Tensor {
            path: self.path.to_path_buf(),
            tensor: name.into(),
            detail: "missing".into(),
        })?;
        if t.dims() != shape {
            let mut rev = shape.to_vec();
            rev.reverse();
            let detail = if transposed_hint && t.dims() == rev.as_slice() && shape[0] != shape[1] {
                format!(
                    "has shape {:?}: it is transposed (expected {shape:?})",
                    t.dims()
                )
            } else {
                format!("has shape {:?}, expected {shape:?}", t.dims())
            };
            return Err(SaeError::Tensor {
                path: self.path.to_path_buf(),
                tensor: name.into(),
                detail,
            });
        }
        let n_bad = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map_err(candle("checking weights"))?
            .iter()
            .filter(|v| !v.is_finite())
            .count();
        if n_bad > 0 {
            return Err(SaeError::Tensor {
                path: self.path.to_path_buf(),
                tensor: name.into(),
                detail: format!("holds {n_bad} NaN or Inf values"),
            });
        }
        f32_on(t, &Device::Cpu).map_err(candle("loading weights"))
    }
}

fn normalization(cfg: &Cfg) -> Result<Normalization, SaeError> {
    let field = "normalize_activations";
    Ok(match cfg.v.get(field) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Normalization::None,
        Some(Value::String(s)) => match s.as_str() {
            "none" => Normalization::None,
            "constant_norm_rescale" => Normalization::ConstantNormRescale,
            "layer_norm" => Normalization::LayerNorm,
            "expected_average_only_in" => {
                let factor = cfg
                    .v
                    .get("norm_scaling_factor")
                    .or_else(|| cfg.v.get("scaling_factor"))
                    .and_then(Value::as_f64)
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| {
                        cfg.err(
                            field,
                            "expected_average_only_in needs `norm_scaling_factor` in cfg.json \
                             (SAELens folds it from its release table; without it every \
                             activation is off by an unknown constant)",
                        )
                    })?;
                Normalization::ExpectedAverageOnlyIn {
                    factor: factor as f32,
                }
            }
            other => return Err(cfg.err(field, format!("unknown mode `{other}`"))),
        },
        Some(v) => return Err(cfg.err(field, format!("{v} is not a mode name"))),
    })
}

fn load_saelens(
    cfg: &Cfg,
    t: HashMap<String, Tensor>,
    w_path: &Path,
    manifest: Manifest,
) -> Result<Sae, SaeError> {
    let d_in = cfg.usize("d_in")?;
    let d_sae = cfg.usize("d_sae")?;
    let mut w = Weights { path: w_path, t };
    let has_threshold = w.t.contains_key("threshold");
    // v6 names the architecture; earlier versions put it in activation_fn_str.
    let arch = cfg.str("architecture").unwrap_or("standard").to_string();
    let act_fn = cfg.str("activation_fn_str").unwrap_or("relu").to_string();
    let k_field = cfg.opt_usize("k")?.or(cfg
        .v
        .get("activation_fn_kwargs")
        .and_then(|k| k.get("k"))
        .and_then(Value::as_u64)
        .map(|k| k as usize));
    let activation = match (arch.as_str(), act_fn.as_str()) {
        ("gated", _) => Activation::Gated,
        ("jumprelu", _) => Activation::JumpRelu,
        ("batchtopk", _) if has_threshold => Activation::JumpRelu,
        ("topk" | "batchtopk", _) | ("standard", "topk") => {
            let k = k_field.ok_or_else(|| cfg.err("k", "missing (a TopK SAE needs k)"))?;
            if k > d_sae {
                return Err(cfg.err("k", format!("k = {k} exceeds d_sae = {d_sae}")));
            }
            Activation::TopK { k }
        }
        ("standard", "relu") => Activation::Relu,
        (a, f) => {
            return Err(cfg.err(
                "architecture",
                format!("unsupported architecture `{a}` / activation `{f}`"),
            ))
        }
    };
    let hook = cfg
        .v
        .get("metadata")
        .and_then(|m| m.get("hook_name"))
        .and_then(Value::as_str)
        .or_else(|| cfg.str("hook_name"))
        .or_else(|| cfg.str("hook_point"))
        .map(str::to_string);
    let model_name = cfg
        .v
        .get("metadata")
        .and_then(|m| m.get("model_name"))
        .and_then(Value::as_str)
        .or_else(|| cfg.str("model_name"))
        .map(str::to_string);
    let w_enc = w.get("W_enc", &[d_in, d_sae], true)?;
    let w_dec = w.get("W_dec", &[d_sae, d_in], true)?;
    let b_dec = w.get("b_dec", &[d_in], false)?;
    let (b_enc, gated) = if activation == Activation::Gated {
        let g = (
            w.get("b_gate", &[d_sae], false)?,
            w.get("b_mag", &[d_sae], false)?,
            w.get("r_mag", &[d_sae], false)?,
        );
        (g.0.zeros_like().map_err(candle("gated"))?, Some(g))
    } else {
        (w.get("b_enc", &[d_sae], false)?, None)
    };
    let threshold = if activation == Activation::JumpRelu {
        Some(w.get("threshold", &[d_sae], false)?)
    } else {
        None
    };
    Ok(Sae {
        d_in,
        d_sae,
        activation,
        normalization: normalization(cfg)?,
        apply_b_dec_to_input: cfg.bool("apply_b_dec_to_input", true)?,
        rescale_acts_by_decoder_norm: cfg.bool("rescale_acts_by_decoder_norm", false)?,
        hook,
        model_name,
        format: if cfg.v.get("architecture").is_some() {
            "saelens"
        } else {
            "saelens-pre-v6"
        },
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold,
        gated,
        path: w_path.parent().unwrap_or(w_path).to_path_buf(),
        manifest,
    })
}

/// sparsify names hookpoints after HF modules: `layers.N` is block N's output.
fn sparsify_hook(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    let rest = name.strip_prefix("layers.")?;
    let (n, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let n: usize = n.parse().ok()?;
    match tail {
        "" => Some(format!("blocks.{n}.hook_resid_post")),
        "mlp" => Some(format!("blocks.{n}.hook_mlp_out")),
        "self_attn" => Some(format!("blocks.{n}.hook_attn_out")),
        _ => None,
    }
}

fn load_sparsify(
    cfg: &Cfg,
    t: HashMap<String, Tensor>,
    w_path: &Path,
    dir: &Path,
    manifest: Manifest,
) -> Result<Sae, SaeError> {
    let mut w = Weights { path: w_path, t };
    let d_in = cfg
        .usize("d_in")
        .or_else(|e| w.t.get("b_dec").map(|b| b.dims()[0]).ok_or(e))?;
    let d_sae = match cfg.opt_usize("num_latents")? {
        Some(n) => n,
        None => d_in * cfg.usize("expansion_factor")?,
    };
    let k = cfg.usize("k")?;
    if k > d_sae {
        return Err(cfg.err("k", format!("k = {k} exceeds the {d_sae} latents")));
    }
    if let Some(a) = cfg.str("activation") {
        if a != "topk" {
            return Err(cfg.err("activation", format!("`{a}` is not supported (only topk)")));
        }
    }
    let enc = w.get("encoder.weight", &[d_sae, d_in], true)?;
    let w_enc = enc
        .t()
        .and_then(|t| t.contiguous())
        .map_err(candle("encoder"))?;
    Ok(Sae {
        d_in,
        d_sae,
        activation: Activation::TopK { k },
        normalization: Normalization::None,
        apply_b_dec_to_input: true,
        rescale_acts_by_decoder_norm: false,
        hook: sparsify_hook(dir),
        model_name: None,
        format: "sparsify",
        b_enc: w.get("encoder.bias", &[d_sae], false)?,
        w_dec: w.get("W_dec", &[d_sae, d_in], true)?,
        b_dec: w.get("b_dec", &[d_in], false)?,
        w_enc,
        threshold: None,
        gated: None,
        path: dir.to_path_buf(),
        manifest,
    })
}

fn load_gemma_scope(npz: &Path, dir: &Path) -> Result<Sae, SaeError> {
    let (arrays, bytes) = npy::read_npz(npz)?;
    let mut manifest = Manifest::default();
    manifest.add(
        &npz.file_name()
            .map_or("params.npz".into(), |n| n.to_string_lossy().into_owned()),
        &bytes,
    );
    let t: HashMap<String, Tensor> = arrays.into_iter().collect();
    let dims = t
        .get("W_enc")
        .map(|w| w.dims().to_vec())
        .ok_or_else(|| SaeError::Tensor {
            path: npz.to_path_buf(),
            tensor: "W_enc".into(),
            detail: "missing".into(),
        })?;
    let [d_in, d_sae] = dims[..] else {
        return Err(SaeError::Tensor {
            path: npz.to_path_buf(),
            tensor: "W_enc".into(),
            detail: format!("has shape {dims:?}, expected [d_model, d_sae]"),
        });
    };
    let mut w = Weights { path: npz, t };
    let _ = dir;
    Ok(Sae {
        d_in,
        d_sae,
        activation: Activation::JumpRelu,
        normalization: Normalization::None,
        apply_b_dec_to_input: false,
        rescale_acts_by_decoder_norm: false,
        hook: None,
        model_name: None,
        format: "gemma-scope",
        w_enc: w.get("W_enc", &[d_in, d_sae], true)?,
        b_enc: w.get("b_enc", &[d_sae], false)?,
        w_dec: w.get("W_dec", &[d_sae, d_in], true)?,
        b_dec: w.get("b_dec", &[d_in], false)?,
        threshold: Some(w.get("threshold", &[d_sae], false)?),
        gated: None,
        path: npz.to_path_buf(),
        manifest,
    })
}
