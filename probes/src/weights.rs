//! Materialising a [`Transformer`] from checkpoint tensors.
//!
//! Every source (HF safetensors shards, GGUF) answers the same question, "give me the HF-named
//! tensor as f32", so there is one loader per architecture and one shape check.
//!
//! Before anything is allocated, the configuration's counts are bounded by the checkpoint: the
//! layer count by the tensors present, the implied parameter count by their bytes. After the
//! build, every tensor of the checkpoint must have been used (or verified to hold what the
//! forward pass computes anyway, such as RoPE frequencies or GPT-2's causal mask): leftover
//! tensors are refused, never dropped.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::LoadError;
use crate::family::{self, Family};
use crate::gguf::GgufFile;
use crate::kquant::{KMatrix, KQuant};
use crate::safetensors::SafetensorsFile;
use crate::transformer::{Linear, Norm, Transformer};

/// Refuse tensors holding NaN or Inf.
pub(crate) fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<(), LoadError> {
    let candle_err = |source: candle_core::Error| LoadError::Candle {
        path: path.to_path_buf(),
        context: format!("checking tensor `{name}`"),
        source: Box::new(source),
    };
    let flat = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .map_err(candle_err)?;
    let count = flat
        .to_vec1::<f32>()
        .map_err(candle_err)?
        .iter()
        .filter(|v| !v.is_finite())
        .count();
    if count > 0 {
        return Err(LoadError::NonFinite {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            count,
        });
    }
    Ok(())
}

/// A source of HF-named f32 tensors.
pub(crate) trait TensorSource {
    /// The file that holds `name`, for error messages.
    fn path_of(&self, name: &str) -> PathBuf;
    fn load(&self, name: &str) -> Result<Option<Tensor>, LoadError>;
    /// The tensor's own K-quant blocks, where the checkpoint stores it so and decode steps
    /// are to read them ([`crate::kquant`]); the same matrix as [`TensorSource::load`] gives.
    fn load_blocks(&self, _name: &str) -> Result<Option<KMatrix>, LoadError> {
        Ok(None)
    }
    /// The architecture's own tensors resolve to these names.
    fn has(&self, name: &str) -> bool;
    /// The file whose configuration describes the model, for error messages.
    fn config_path(&self) -> PathBuf;
    /// How many tensors the checkpoint holds, and their total bytes.
    fn totals(&self) -> (usize, usize);
    /// The checkpoint's tensors (in its own naming) not among the HF names `used`.
    fn leftovers(&self, used: &BTreeSet<String>) -> Vec<(PathBuf, String)>;
    /// Whether RMSNorm weights are stored with the configuration's `norm_offset` added.
    fn norm_offset_folded(&self) -> bool {
        false
    }
}

/// Safetensors shards of an HF directory.
pub(crate) struct SafetensorsShards {
    pub dir: PathBuf,
    pub files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

impl SafetensorsShards {
    pub fn new(dir: PathBuf, files: Vec<SafetensorsFile>) -> Result<Self, LoadError> {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for t in &f.tensors {
                if let Some(prev) = index.insert(t.name.clone(), i) {
                    return Err(LoadError::Tensor {
                        path: f.path.clone(),
                        tensor: t.name.clone(),
                        detail: format!("also defined in {}", files[prev].path.display()),
                    });
                }
            }
        }
        Ok(Self { dir, files, index })
    }
}

impl TensorSource for SafetensorsShards {
    fn path_of(&self, name: &str) -> PathBuf {
        self.index
            .get(name)
            .map_or_else(|| self.dir.clone(), |&i| self.files[i].path.clone())
    }
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    fn totals(&self) -> (usize, usize) {
        let tensors = self.files.iter().map(|f| f.tensors.len()).sum();
        let bytes = self
            .files
            .iter()
            .flat_map(|f| &f.tensors)
            .map(|t| t.end - t.begin)
            .sum();
        (tensors, bytes)
    }
    fn leftovers(&self, used: &BTreeSet<String>) -> Vec<(PathBuf, String)> {
        let mut left: Vec<(PathBuf, String)> = self
            .index
            .iter()
            .filter(|(name, _)| !used.contains(*name))
            .map(|(name, &i)| (self.files[i].path.clone(), name.clone()))
            .collect();
        left.sort();
        left
    }
    fn load(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let f = &self.files[i];
        let Some(info) = f.get(name) else {
            return Ok(None);
        };
        // Integer tensors are ids or counts, not weights: converting them would run garbage.
        if !matches!(
            info.dtype,
            candle_core::DType::F32
                | candle_core::DType::F16
                | candle_core::DType::BF16
                | candle_core::DType::F64
        ) {
            return Err(LoadError::Tensor {
                path: f.path.clone(),
                tensor: name.to_string(),
                detail: format!("dtype {:?} is not a floating-point weight type", info.dtype),
            });
        }
        f.load_f32(info, &Device::Cpu).map(Some)
    }
}

/// A GGUF file seen through HF tensor names (its family maps them), with the q/k RoPE
/// permutation undone where the family's converter applied one.
pub(crate) struct GgufSource<'a> {
    pub file: &'a GgufFile,
    pub config: &'a ModelConfig,
    family: &'static dyn Family,
    /// Keep Q4_K and Q6_K tensors' blocks for decode steps.
    keep_blocks: bool,
}

impl<'a> GgufSource<'a> {
    pub fn new(file: &'a GgufFile, config: &'a ModelConfig) -> Self {
        Self {
            file,
            config,
            family: family::of(config.architecture),
            keep_blocks: false,
        }
    }

    /// Keep the Q4_K and Q6_K tensors' blocks for decode steps, where this CPU runs the
    /// kernels.
    pub fn keeping_blocks(mut self, keep: bool) -> Self {
        self.keep_blocks = keep && crate::kquant::supported();
        self
    }

    fn gguf_name(&self, name: &str) -> Option<(String, Option<bool>)> {
        self.family.gguf_tensor(name).map(|t| (t.name, t.rope_rows))
    }
}

impl TensorSource for GgufSource<'_> {
    fn path_of(&self, _name: &str) -> PathBuf {
        self.file.path.clone()
    }
    fn has(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|(g, _)| self.file.get(&g).is_some())
    }
    fn config_path(&self) -> PathBuf {
        self.file.path.clone()
    }
    fn norm_offset_folded(&self) -> bool {
        self.family.gguf_norms_hold_offset()
    }
    fn totals(&self) -> (usize, usize) {
        let bytes = self.file.tensors.iter().map(|t| t.end - t.begin).sum();
        (self.file.tensors.len(), bytes)
    }
    fn leftovers(&self, used: &BTreeSet<String>) -> Vec<(PathBuf, String)> {
        let used: BTreeSet<String> = used
            .iter()
            .filter_map(|n| self.gguf_name(n).map(|(g, _)| g))
            .collect();
        self.file
            .tensors
            .iter()
            .filter(|t| !used.contains(&t.name))
            .map(|t| (self.file.path.clone(), t.name.clone()))
            .collect()
    }
    fn load_blocks(&self, name: &str) -> Result<Option<KMatrix>, LoadError> {
        if !self.keep_blocks {
            return Ok(None);
        }
        let Some((gg, permute)) = self.gguf_name(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.get(&gg) else {
            return Ok(None);
        };
        let Some(kind) = KQuant::of(info.dtype) else {
            return Ok(None);
        };
        let [rows, cols] = info.shape()[..] else {
            return Ok(None);
        };
        let Some(blocks) =
            KMatrix::from_ggml(kind, &self.file.bytes()[info.begin..info.end], rows, cols)
        else {
            return Ok(None);
        };
        let Some(is_q) = permute.filter(|_| self.family.gguf_permutes_qk()) else {
            return Ok(Some(blocks));
        };
        // The rows of `load`'s un-permutation: row (head, half, i) comes from (head, i, half).
        let heads = if is_q {
            self.config.n_heads
        } else {
            self.config.n_kv_heads
        };
        if heads == 0 || rows % (heads * 2) != 0 {
            return Ok(None);
        }
        let hd = rows / heads;
        let order: Vec<usize> = (0..rows)
            .map(|new| {
                let (h, rest) = (new / hd, new % hd);
                let (half, i) = (rest / (hd / 2), rest % (hd / 2));
                h * hd + i * 2 + half
            })
            .collect();
        Ok(blocks.gather_rows(&order))
    }
    fn load(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        let Some((gg, permute)) = self.gguf_name(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.get(&gg) else {
            return Ok(None);
        };
        let t = self.file.load_f32(info)?;
        let Some(is_q) = permute.filter(|_| self.family.gguf_permutes_qk()) else {
            return Ok(Some(t));
        };
        // GGUF stores q/k rows interleaved for its RoPE; go back to the HF (half-split) layout.
        let heads = if is_q {
            self.config.n_heads
        } else {
            self.config.n_kv_heads
        };
        let candle_err = |source: candle_core::Error| LoadError::Candle {
            path: self.file.path.clone(),
            context: format!("un-permuting `{gg}`"),
            source: Box::new(source),
        };
        // A bias permutes as a weight with one input column.
        let dims = t.dims().to_vec();
        let (out, d_in) = match dims[..] {
            [out] => (out, 1),
            _ => t.dims2().map_err(candle_err)?,
        };
        if out % (heads * 2) != 0 {
            return Err(LoadError::Shape {
                path: self.file.path.clone(),
                tensor: gg,
                expected: vec![heads * self.config.head_dim, self.config.d_model],
                actual: vec![out, d_in],
            });
        }
        let hd = out / heads;
        t.reshape((heads, hd / 2, 2, d_in))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.reshape(dims))
            .and_then(|t| t.contiguous())
            .map(Some)
            .map_err(candle_err)
    }
}

/// Loads HF-named tensors with their expected shapes, for a family's builder, recording which
/// were used.
pub(crate) struct Loader<'a> {
    pub src: &'a dyn TensorSource,
    pub cfg: &'a ModelConfig,
    /// HF names of the tensors loaded so far.
    used: RefCell<BTreeSet<String>>,
}

impl Loader<'_> {
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        self.used.borrow_mut().insert(name.to_string());
        let t = self
            .src
            .load(name)?
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.src.path_of(name),
                tensor: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(LoadError::Shape {
                path: self.src.path_of(name),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    pub(crate) fn linear(
        &self,
        prefix: &str,
        out: usize,
        d_in: usize,
        bias: bool,
    ) -> Result<Linear, LoadError> {
        let name = format!("{prefix}.weight");
        let w = self.get(&name, &[out, d_in])?;
        let b = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        let blocks = self.src.load_blocks(&name)?;
        Ok(self.in_out(prefix, w, b)?.with_blocks(blocks))
    }

    /// An untied output layer `[vocab, d_model]`, kept as stored ([`Linear::new`]).
    pub(crate) fn unembedding(
        &self,
        prefix: &str,
        out: usize,
        d_in: usize,
    ) -> Result<Linear, LoadError> {
        let name = format!("{prefix}.weight");
        let w = self.get(&name, &[out, d_in])?;
        Ok(Linear::new(w, None).with_blocks(self.src.load_blocks(&name)?))
    }

    /// A block's layer from its `[out, in]` weight ([`Linear::stored_in_out`]).
    fn in_out(&self, prefix: &str, w: Tensor, b: Option<Tensor>) -> Result<Linear, LoadError> {
        Linear::stored_in_out(w, b).map_err(|source| LoadError::Candle {
            path: self.src.path_of(prefix),
            context: format!("laying out `{prefix}.weight`"),
            source: Box::new(source),
        })
    }

    /// Stack linear layers that read the same input into one, so one matmul does their work.
    pub(crate) fn fuse(&self, prefix: &str, parts: &[Linear]) -> Result<Linear, LoadError> {
        let candle_err = |source: candle_core::Error| LoadError::Candle {
            path: self.src.path_of(prefix),
            context: format!("fusing the projections of `{prefix}`"),
            source: Box::new(source),
        };
        let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
        let w = Tensor::cat(&ws, 0).map_err(candle_err)?;
        let b = if parts.iter().all(|l| l.b.is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.b.as_ref()).collect();
            Some(Tensor::cat(&bs, 0).map_err(candle_err)?)
        } else {
            None
        };
        let blocks: Option<Vec<&KMatrix>> = parts.iter().map(|l| l.blocks.as_ref()).collect();
        let blocks = blocks.and_then(|q| KMatrix::stack(&q));
        Ok(self.in_out(prefix, w, b)?.with_blocks(blocks))
    }

    pub(crate) fn rms(&self, name: &str) -> Result<Norm, LoadError> {
        self.rms_sized(name, self.cfg.d_model)
    }

    /// An RMSNorm of width `n`, multiplying by `norm_offset + w` (unless the checkpoint
    /// stores the offset already added).
    pub(crate) fn rms_sized(&self, name: &str, n: usize) -> Result<Norm, LoadError> {
        let w = self.get(name, &[n])?;
        let offset = if self.src.norm_offset_folded() {
            0.0
        } else {
            self.cfg.norm_offset
        };
        let weight = if offset == 0.0 {
            w
        } else {
            (w + offset).map_err(|source| LoadError::Candle {
                path: self.src.path_of(name),
                context: format!("adding the norm offset to `{name}`"),
                source: Box::new(source),
            })?
        };
        Ok(Norm {
            weight,
            bias: None,
            eps: self.cfg.norm_eps as f32,
        })
    }

    pub(crate) fn layer_norm(&self, prefix: &str) -> Result<Norm, LoadError> {
        let d = self.cfg.d_model;
        Ok(Norm {
            weight: self.get(&format!("{prefix}.weight"), &[d])?,
            bias: Some(self.get(&format!("{prefix}.bias"), &[d])?),
            eps: self.cfg.norm_eps as f32,
        })
    }

    /// A stored copy of RoPE's inverse frequencies (older HF checkpoints keep one per layer):
    /// accepted only if it holds what the configuration gives for that kind of layer.
    pub(crate) fn rotary_inv_freq(&self, name: &str, sliding: bool) -> Result<(), LoadError> {
        if !self.src.has(name) {
            return Ok(());
        }
        let want = self.cfg.rope_inv_freqs(sliding);
        let t = self.get(name, &[want.len()])?;
        let stored: Vec<f32> = t.to_vec1().map_err(|source| LoadError::Candle {
            path: self.src.path_of(name),
            context: format!("reading `{name}`"),
            source: Box::new(source),
        })?;
        for (i, (&v, &want)) in stored.iter().zip(&want).enumerate() {
            if (f64::from(v) - want).abs() > 1e-5 * want.abs().max(1e-12) + 1e-7 {
                return Err(LoadError::Tensor {
                    path: self.src.path_of(name),
                    tensor: name.to_string(),
                    detail: format!(
                        "element {i} is {v}, but rope_theta {} and rope_scaling give {want}: \
                         custom RoPE frequencies are not implemented",
                        self.cfg.rope_theta
                    ),
                });
            }
        }
        Ok(())
    }

    /// llama.cpp's `rope_freqs.weight`: accepted as what the configuration read from it.
    pub(crate) fn rope_divisors(&self, name: &str) -> Result<(), LoadError> {
        if !self.src.has(name) {
            return Ok(());
        }
        let Some(RopeScaling::Divisors(want)) = &self.cfg.rope_scaling else {
            return Err(LoadError::Tensor {
                path: self.src.path_of(name),
                tensor: name.to_string(),
                detail: "RoPE frequency divisors, but the configuration scales RoPE otherwise"
                    .into(),
            });
        };
        let t = self.get(name, &[want.len()])?;
        let stored: Vec<f32> = t.to_vec1().map_err(|source| LoadError::Candle {
            path: self.src.path_of(name),
            context: format!("reading `{name}`"),
            source: Box::new(source),
        })?;
        if stored.iter().zip(want).any(|(&s, &w)| f64::from(s) != w) {
            return Err(LoadError::Tensor {
                path: self.src.path_of(name),
                tensor: name.to_string(),
                detail: "differs from the RoPE divisors the configuration was read with".into(),
            });
        }
        Ok(())
    }

    /// A stored unembedding that the configuration ties to the embedding: accepted only if it
    /// is the embedding.
    pub(crate) fn tied_copy(&self, name: &str, embed: &Tensor) -> Result<(), LoadError> {
        if !self.src.has(name) {
            return Ok(());
        }
        let t = self.get(name, embed.dims())?;
        let same = (&t - embed)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .map_err(|source| LoadError::Candle {
                path: self.src.path_of(name),
                context: format!("comparing `{name}` with the embedding"),
                source: Box::new(source),
            })?
            == 0.0;
        if !same {
            return Err(LoadError::Tensor {
                path: self.src.path_of(name),
                tensor: name.to_string(),
                detail: "differs from the embedding, but the configuration ties them \
                         (tie_word_embeddings)"
                    .into(),
            });
        }
        Ok(())
    }

    /// GPT-2's stored causal-mask buffers (`attn.bias`, `attn.masked_bias`): accepted only if
    /// they hold the causal mask the forward pass applies anyway.
    pub(crate) fn causal_mask_buffers(&self, prefix: &str) -> Result<(), LoadError> {
        let bad = |name: &str, detail: &str| LoadError::Tensor {
            path: self.src.path_of(name),
            tensor: name.to_string(),
            detail: detail.to_string(),
        };
        let candle_err = |name: &str| {
            let name = name.to_string();
            let path = self.src.path_of(&name);
            move |source| LoadError::Candle {
                path,
                context: format!("reading `{name}`"),
                source: Box::new(source),
            }
        };
        let name = format!("{prefix}.attn.bias");
        if self.src.has(&name) {
            let t = self
                .src
                .load(&name)?
                .ok_or_else(|| bad(&name, "vanished"))?;
            self.used.borrow_mut().insert(name.clone());
            let n = match *t.dims() {
                [1, 1, a, b] if a == b && a >= self.cfg.max_positions => a,
                _ => return Err(bad(&name, "is not a [1, 1, n, n] causal mask")),
            };
            let rows: Vec<Vec<f32>> = t
                .reshape((n, n))
                .and_then(|t| t.to_vec2())
                .map_err(candle_err(&name))?;
            for (i, row) in rows.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    if v != f32::from(u8::from(j <= i)) {
                        return Err(bad(
                            &name,
                            "is not the lower-triangular causal mask: custom attention masks \
                             are not implemented",
                        ));
                    }
                }
            }
        }
        let name = format!("{prefix}.attn.masked_bias");
        if self.src.has(&name) {
            let t = self
                .src
                .load(&name)?
                .ok_or_else(|| bad(&name, "vanished"))?;
            self.used.borrow_mut().insert(name.clone());
            let v: Vec<f32> = t
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(candle_err(&name))?;
            // Masked scores become this value before the softmax: a large negative one is the
            // same as the -inf used here.
            if v.len() != 1 || v[0] > -1e4 {
                return Err(bad(&name, "is not a large negative scalar"));
            }
        }
        Ok(())
    }

    /// GPT-2 Conv1D weight `[in, out]` as a Linear weight `[out, in]`.
    pub(crate) fn conv1d(
        &self,
        prefix: &str,
        d_in: usize,
        out: usize,
    ) -> Result<Linear, LoadError> {
        let w = self.get(&format!("{prefix}.weight"), &[d_in, out])?;
        let b = self.get(&format!("{prefix}.bias"), &[out])?;
        // Conv1D stores `[in, out]`, the layout a block's layer keeps: its `[out, in]` view.
        let w = w.t().map_err(|source| LoadError::Candle {
            path: self.src.path_of(prefix),
            context: format!("transposing `{prefix}.weight`"),
            source: Box::new(source),
        })?;
        self.in_out(prefix, w, Some(b))
    }
}

/// Build the transformer for `cfg` from `src`.
pub(crate) fn build(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<Transformer, LoadError> {
    check_counts(src, cfg)?;
    let loader = Loader {
        src,
        cfg,
        used: RefCell::new(BTreeSet::new()),
    };
    let t = family::of(cfg.architecture).build(&loader)?;
    let left = src.leftovers(&loader.used.borrow());
    if let Some((path, first)) = left.first() {
        let more = match left.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return Err(LoadError::Tensor {
            path: path.clone(),
            tensor: first.clone(),
            detail: format!(
                "not used by the {} forward pass that the configuration describes{more}: \
                 refusing to drop it silently",
                cfg.architecture.name()
            ),
        });
    }
    Ok(t)
}

/// Bound the configuration's counts by what the checkpoint holds, before any allocation
/// sized by them.
fn check_counts(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<(), LoadError> {
    let err = |detail: String| LoadError::Config {
        path: src.config_path(),
        detail,
    };
    let (tensors, bytes) = src.totals();
    // Each layer has at least its two norms and four projections.
    let per_layer = 6;
    if cfg.n_layers.saturating_mul(per_layer) > tensors {
        return Err(err(format!(
            "{} layers need at least {} tensors but the checkpoint holds {tensors}",
            cfg.n_layers,
            cfg.n_layers.saturating_mul(per_layer)
        )));
    }
    // The fewest weights the configuration implies, at the fewest bytes a supported type
    // stores one in (Q2_K: 2.625 bits, so more than a quarter byte).
    let c = cfg;
    let implied = (|| {
        let q = c.n_heads.checked_mul(c.head_dim)?;
        let kv = c.n_kv_heads.checked_mul(c.head_dim)?;
        // q, k, v and o projections, then the two smallest MLP matrices.
        let attn = q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?;
        let per_layer = attn
            .checked_mul(c.d_model)?
            .checked_add(c.d_mlp.checked_mul(c.d_model)?.checked_mul(2)?)?;
        c.n_layers
            .checked_mul(per_layer)?
            .checked_add(c.vocab_size.checked_mul(c.d_model)?)
    })();
    match implied {
        Some(n) if n / 4 <= bytes => Ok(()),
        _ => Err(err(format!(
            "the configuration implies {} weights, more than the checkpoint's {bytes} bytes \
             of tensor data can hold",
            implied.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
        ))),
    }
}

/// The HF tensor names of a Llama-family model, in a stable order (used by `model convert`).
pub(crate) fn llama_tensor_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..cfg.n_layers {
        for t in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{l}.{t}"));
        }
        let biases = [
            (
                cfg.qkv_bias,
                &["q_proj", "k_proj", "v_proj"][..],
                "self_attn",
            ),
            (cfg.o_bias, &["o_proj"][..], "self_attn"),
            (
                cfg.mlp_bias,
                &["gate_proj", "up_proj", "down_proj"][..],
                "mlp",
            ),
        ];
        for (on, projections, module) in biases {
            if on {
                for p in projections {
                    names.push(format!("model.layers.{l}.{module}.{p}.bias"));
                }
            }
        }
    }
    names.push("model.norm.weight".into());
    if !cfg.tie_embeddings {
        names.push("lm_head.weight".into());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rand;
    use crate::transformer::Mlp;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    const D: usize = 256;
    const D_MLP: usize = 512;
    const VOCAB: usize = 96;

    fn values(l: &Linear) -> Vec<f32> {
        l.w.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A two-block Llama GGUF 256 wide, as a Q4_K_M file mixes its types: matrices Q4_K but
    /// block 1's `attn_v` and `ffn_down` and the output (Q6_K), and block 1's `attn_output`
    /// (Q8_0). Written into `dir`.
    fn k_quant_file(dir: &std::path::Path) -> std::path::PathBuf {
        use gguf_file::Value as V;
        let mut r = Rand::new(5);
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: &str, shape: &[usize], ty: GgmlDType, r: &mut Rand| {
            let t = if shape.len() == 1 {
                r.norm(shape[0])
            } else {
                r.tensor(shape, 0.5)
            };
            tensors.push((name.into(), QTensor::quantize(&t, ty).unwrap()));
        };
        add("token_embd.weight", &[VOCAB, D], GgmlDType::F32, &mut r);
        add("output_norm.weight", &[D], GgmlDType::F32, &mut r);
        add("output.weight", &[VOCAB, D], GgmlDType::Q6K, &mut r);
        for l in 0..2 {
            let (v_type, o_type) = if l == 0 {
                (GgmlDType::Q4K, GgmlDType::Q4K)
            } else {
                (GgmlDType::Q6K, GgmlDType::Q8_0)
            };
            for (n, shape, ty) in [
                ("attn_norm", vec![D], GgmlDType::F32),
                ("ffn_norm", vec![D], GgmlDType::F32),
                ("attn_q", vec![D, D], GgmlDType::Q4K),
                ("attn_k", vec![128, D], GgmlDType::Q4K),
                ("attn_v", vec![128, D], v_type),
                ("attn_output", vec![D, D], o_type),
                ("ffn_gate", vec![D_MLP, D], GgmlDType::Q4K),
                ("ffn_up", vec![D_MLP, D], GgmlDType::Q4K),
                ("ffn_down", vec![D, D_MLP], v_type),
            ] {
                add(&format!("blk.{l}.{n}.weight"), &shape, ty, &mut r);
            }
        }
        let meta: Vec<(&str, V)> = vec![
            ("general.architecture", V::String("llama".into())),
            ("llama.block_count", V::U32(2)),
            ("llama.embedding_length", V::U32(D as u32)),
            ("llama.feed_forward_length", V::U32(D_MLP as u32)),
            ("llama.attention.head_count", V::U32(4)),
            ("llama.attention.head_count_kv", V::U32(2)),
            ("llama.rope.dimension_count", V::U32(64)),
            ("llama.rope.freq_base", V::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
            ("llama.context_length", V::U32(64)),
            ("tokenizer.ggml.model", V::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                V::Array((0..VOCAB).map(|i| V::String(format!("w{i}"))).collect()),
            ),
        ];
        let path = dir.join("q4k.gguf");
        let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(
            &mut std::fs::File::create(&path).unwrap(),
            &meta_refs,
            &t_refs,
        )
        .unwrap();

        path
    }

    /// [`k_quant_file`]: decode steps read the file's K-quant blocks, and they hold the very
    /// values of the f32 weights, q/k rows un-permuted and fused projections stacked as
    /// theirs are.
    #[test]
    fn a_k_quant_file_keeps_its_blocks_for_decode_steps_and_they_hold_its_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = k_quant_file(dir.path());
        let file = GgufFile::read(&path).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        let src = GgufSource::new(&file, &cfg).keeping_blocks(true);
        let mut t = build(&src, &cfg).unwrap();
        t.quantized_decode = true;
        if !crate::kquant::supported() {
            assert!(t.blocks.iter().all(|b| b.qkv.blocks.is_none()));
            return;
        }
        let same = |l: &Linear, what: &str, kinds: &[KQuant]| {
            let q = l
                .blocks
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no K-quant blocks kept"));
            assert_eq!(q.kinds(), kinds, "{what}");
            assert_eq!(q.dequantize(), values(l), "{what}");
        };
        for (i, b) in t.blocks.iter().enumerate() {
            let Mlp::Gated { gate_up, down, .. } = &b.mlp else {
                panic!("llama's MLP is gated")
            };
            same(gate_up, &format!("block {i} gate_up"), &[KQuant::Q4K]);
            let kind = [KQuant::Q4K, KQuant::Q6K][i];
            same(down, &format!("block {i} down"), &[kind]);
        }
        same(
            &t.blocks[0].qkv,
            "block 0 qkv (q and k un-permuted)",
            &[KQuant::Q4K],
        );
        same(&t.blocks[0].o, "block 0 o", &[KQuant::Q4K]);
        // q and k Q4_K, v Q6_K: one matrix of two runs.
        same(&t.blocks[1].qkv, "block 1 qkv", &[KQuant::Q4K, KQuant::Q6K]);
        same(&t.unembed, "unembedding", &[KQuant::Q6K]);
        // A Q8_0 tensor has no K-quant blocks: decode steps read a Q8_0 copy of it.
        assert!(t.blocks[1].o.blocks.is_none());
        assert!(t.precision().contains("Q6_K"), "{}", t.precision());
        // The record names the file's blocks where only the unembedding has them.
        let mut only_unembed = build(&src, &cfg).unwrap();
        only_unembed.quantized_decode = true;
        for b in &mut only_unembed.blocks {
            b.qkv.blocks = None;
            b.o.blocks = None;
            if let Mlp::Gated { gate_up, down, .. } = &mut b.mlp {
                gate_up.blocks = None;
                down.blocks = None;
            }
        }
        assert!(
            only_unembed.precision().contains("Q6_K"),
            "{}",
            only_unembed.precision()
        );

        // Not kept when decode steps run in f32.
        let t = build(&GgufSource::new(&file, &cfg), &cfg).unwrap();
        assert!(t.unembed.blocks.is_none() && t.blocks[0].qkv.blocks.is_none());
    }

    /// An interactive generation's prefill reads the file's blocks as its decode steps do:
    /// its logits are not the f32 pass's but within the activations' 8-bit rounding of them,
    /// a prompt's are the same bits alone as in a batch, and a shared start (whose passes
    /// are f32) is not taken.
    #[test]
    fn a_generations_prefill_reads_the_files_blocks_whatever_its_batch() {
        if !crate::kquant::supported() {
            return;
        }
        use crate::transformer::KvCache;
        let dir = tempfile::tempdir().unwrap();
        let file = GgufFile::read(&k_quant_file(dir.path())).unwrap();
        let cfg = ModelConfig::from_gguf(&file).unwrap();
        let mut t = build(&GgufSource::new(&file, &cfg).keeping_blocks(true), &cfg).unwrap();
        t.quantized_decode = true;
        let hooks = crate::Hooks::default();
        let prompts: Vec<Vec<u32>> = vec![
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            vec![1, 2, 3, 4, 40, 41],
            vec![1, 2, 3, 4, 50, 51, 52, 53, 54, 55, 56, 57],
        ];
        let last_logits = |prompts: &[Vec<u32>], f32_decode: bool, shared: usize| {
            let mut cache = Some(KvCache::new(f32_decode));
            let out = t
                .prefill_shared(prompts, shared, &hooks, &mut cache)
                .unwrap();
            out.logits.unwrap().to_vec2::<f32>().unwrap()
        };
        let blocks = last_logits(&prompts, false, 0);
        let f32s = last_logits(&prompts, true, 0);
        // Pearson correlation, as the llama.cpp comparison judges 8-bit activations.
        let pearson = |a: &[f32], b: &[f32]| {
            let n = a.len() as f64;
            let (ma, mb) = (
                a.iter().map(|&v| v as f64).sum::<f64>() / n,
                b.iter().map(|&v| v as f64).sum::<f64>() / n,
            );
            let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
            for (&x, &y) in a.iter().zip(b) {
                let (x, y) = (x as f64 - ma, y as f64 - mb);
                (sab, saa, sbb) = (sab + x * y, saa + x * x, sbb + y * y);
            }
            sab / (saa * sbb).sqrt()
        };
        for (row, (q, f)) in blocks.iter().zip(&f32s).enumerate() {
            assert_ne!(q, f, "prompt {row}: the prefill did not read the blocks");
            let r = pearson(q, f);
            assert!(
                r >= 0.99,
                "prompt {row}: Pearson {r} with the f32 prefill's logits"
            );
        }
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(
                last_logits(std::slice::from_ref(p), false, 0)[0],
                blocks[i],
                "prompt {i}"
            );
        }
        assert_eq!(
            last_logits(&prompts, false, 4),
            blocks,
            "a shared start was taken"
        );
        assert_ne!(last_logits(&prompts, true, 4), blocks);
    }
}
