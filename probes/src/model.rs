//! A loaded model: transformer weights, tokenizer and chat template, and the digest of the
//! exact bytes it was loaded from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::ModelConfig;
use crate::digest::Manifest;
use crate::error::{LoadError, RunError};
use crate::gguf::GgufFile;
use crate::hooks::HookPoint;
use crate::safetensors::SafetensorsFile;
use crate::tokenizer::{Message, TextCodec};
use crate::transformer::Transformer;
use crate::weights::{self, GgufSource, SafetensorsShards, TensorSource};

/// The file format a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    Safetensors,
}

/// Options for [`Model::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Generation reads quantized weights: a GGUF file's own Q4_K and Q6_K blocks where it
    /// has them and the CPU runs their kernels, in the prefill and decode steps, otherwise a
    /// Q8_0 copy in decode steps (about 2.5x faster generation on CPU than f32; prompt passes
    /// always use f32, and so does a generation with [`GenerateOptions::f32_decode`]).
    ///
    /// [`GenerateOptions::f32_decode`]: crate::GenerateOptions::f32_decode
    pub quantized_decode: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            quantized_decode: true,
        }
    }
}

pub struct Model {
    pub transformer: Transformer,
    pub codec: TextCodec,
    pub manifest: Manifest,
    pub path: PathBuf,
    pub format: Format,
    /// Storage dtypes of the checkpoint's tensors, e.g. `["F32", "Q4_1", "Q8_0"]`.
    pub storage_dtypes: BTreeSet<String>,
}

/// What `mechwatch model info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub format: Format,
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub storage_dtypes: Vec<String>,
    pub digest: String,
    pub files: Manifest,
    pub hooks: Vec<String>,
}

impl Model {
    /// Load a GGUF file, an HF directory, or a known model by name (`default`, the cached
    /// SmolLM2 model, is fetched on first use; see [`crate::fetch::resolve`]).
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self, LoadError> {
        let path = crate::fetch::resolve(spec)?;
        Self::load_path(&path, opts)
    }

    pub fn load_path(path: &Path, opts: &LoadOptions) -> Result<Self, LoadError> {
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut model = if meta.is_dir() {
            Self::load_hf_dir(path)?
        } else {
            Self::load_gguf(path, opts)?
        };
        model.transformer.quantized_decode = opts.quantized_decode;
        tracing::info!(
            path = %path.display(),
            architecture = model.transformer.config.architecture.name(),
            digest = %model.manifest.root(),
            "model loaded"
        );
        Ok(model)
    }

    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self, LoadError> {
        let file = GgufFile::read(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let codec = TextCodec::from_gguf(&file)?;
        check_vocab(path, &codec, &config)?;
        let src = GgufSource::new(&file, &config).keeping_blocks(opts.quantized_decode);
        let transformer = weights::build(&src, &config)?;
        let mut manifest = Manifest::default();
        let name = path
            .file_name()
            .map_or_else(|| "model.gguf".into(), |n| n.to_string_lossy().into_owned());
        manifest.add(&name, file.bytes());
        let storage_dtypes = file
            .tensors
            .iter()
            .map(|t| format!("{:?}", t.dtype))
            .collect();
        Ok(Self {
            transformer,
            codec,
            manifest,
            path: path.to_path_buf(),
            format: Format::Gguf,
            storage_dtypes,
        })
    }

    fn load_hf_dir(dir: &Path) -> Result<Self, LoadError> {
        let mut manifest = Manifest::default();
        let mut read = |name: &str| -> Result<Option<Vec<u8>>, LoadError> {
            let p = dir.join(name);
            match crate::files::read_text_file(&p) {
                Ok(b) => {
                    manifest.add(name, &b);
                    Ok(Some(b))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(LoadError::Io { path: p, source }),
            }
        };
        let config_path = dir.join("config.json");
        let config_bytes = read("config.json")?.ok_or_else(|| LoadError::Config {
            path: config_path.clone(),
            detail: "config.json is missing".into(),
        })?;
        let config_text = String::from_utf8(config_bytes).map_err(|_| LoadError::Config {
            path: config_path.clone(),
            detail: "not UTF-8".into(),
        })?;
        let config = ModelConfig::from_hf_json(&config_path, &config_text)?;
        let codec = TextCodec::from_hf_dir(dir, &mut read)?;
        check_vocab(&dir.join("tokenizer.json"), &codec, &config)?;

        let shard_names: Vec<String> = match read("model.safetensors.index.json")? {
            Some(index) => {
                let index_path = dir.join("model.safetensors.index.json");
                let v: serde_json::Value =
                    serde_json::from_slice(&index).map_err(|e| LoadError::Header {
                        path: index_path.clone(),
                        detail: e.to_string(),
                    })?;
                let map = v["weight_map"]
                    .as_object()
                    .ok_or_else(|| LoadError::Header {
                        path: index_path.clone(),
                        detail: "`weight_map` is missing".into(),
                    })?;
                let mut shards = BTreeMap::new();
                for (tensor, file) in map {
                    let file =
                        file.as_str()
                            .filter(|f| is_plain_file_name(f))
                            .ok_or_else(|| LoadError::Header {
                                path: index_path.clone(),
                                detail: format!(
                                "tensor `{tensor}` maps to {file}, not a file in this directory"
                            ),
                            })?;
                    shards
                        .entry(file.to_string())
                        .or_insert_with(Vec::new)
                        .push(tensor.clone());
                }
                shards.into_keys().collect()
            }
            None => vec!["model.safetensors".into()],
        };
        let mut files = Vec::with_capacity(shard_names.len());
        let mut storage_dtypes = BTreeSet::new();
        for name in &shard_names {
            let p = dir.join(name);
            let file = SafetensorsFile::read(&p)?;
            manifest.add(name, file.bytes());
            storage_dtypes.extend(
                file.tensors
                    .iter()
                    .map(|t| format!("{:?}", t.dtype).to_uppercase()),
            );
            files.push(file);
        }
        let shards = SafetensorsShards::new(dir.to_path_buf(), files)?;
        let transformer = weights::build(&shards, &config)?;
        Ok(Self {
            transformer,
            codec,
            manifest,
            path: dir.to_path_buf(),
            format: Format::Safetensors,
            storage_dtypes,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.transformer.config
    }

    /// Parse a hook name against this model.
    pub fn hook(&self, name: &str) -> Result<HookPoint, RunError> {
        HookPoint::parse(name, self.config().n_layers)
    }

    pub fn info(&self) -> ModelInfo {
        let c = self.config();
        ModelInfo {
            path: self.path.clone(),
            format: self.format,
            architecture: c.architecture.name().into(),
            n_layers: c.n_layers,
            d_model: c.d_model,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            d_mlp: c.d_mlp,
            vocab_size: c.vocab_size,
            storage_dtypes: self.storage_dtypes.iter().cloned().collect(),
            digest: self.manifest.root(),
            files: self.manifest.clone(),
            hooks: HookPoint::all(c.n_layers)
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// Tokenise `text`, through the chat template when `chat` is set; plain text gets the
    /// special tokens the tokenizer adds (see [`TextCodec::encode_text`]).
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>, RunError> {
        if chat {
            let rendered = self.codec.apply_chat_template(&[Message::user(text)])?;
            self.codec.encode(&rendered)
        } else {
            self.codec.encode_text(text)
        }
    }

    /// [`Model::encode_prompt`] for many texts, their chat templates rendered together (one
    /// child process for the batch, see [`TextCodec::apply_chat_templates`]): one result per
    /// text, or `Err` when the batch could not be rendered at all.
    pub fn encode_prompts<S: AsRef<str>>(
        &self,
        texts: &[S],
        chat: bool,
    ) -> Result<Vec<Result<Vec<u32>, RunError>>, RunError> {
        if !chat {
            return Ok(texts
                .iter()
                .map(|t| self.codec.encode_text(t.as_ref()))
                .collect());
        }
        let messages: Vec<[Message; 1]> =
            texts.iter().map(|t| [Message::user(t.as_ref())]).collect();
        let batch: Vec<&[Message]> = messages.iter().map(|m| &m[..]).collect();
        Ok(self
            .codec
            .apply_chat_templates(&batch)?
            .into_iter()
            .map(|r| r.and_then(|text| self.codec.encode(&text)))
            .collect())
    }

    /// Token ids that end a generation: the config's EOS ids and the chat end-of-turn token.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stops = self.config().eos_token_ids.clone();
        for t in [
            self.codec.eos_token.as_deref(),
            Some("<|im_end|>"),
            Some("<|endoftext|>"),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(id) = self.codec.token_id(t) {
                stops.push(id);
            }
        }
        stops.sort_unstable();
        stops.dedup();
        stops
    }
}

/// Every token the tokenizer can produce must have a row in the embedding.
fn check_vocab(path: &Path, codec: &TextCodec, config: &ModelConfig) -> Result<(), LoadError> {
    let vocab = codec.tokenizer.get_vocab(true);
    if let Some((token, &id)) = vocab
        .iter()
        .filter(|(_, &id)| id as usize >= config.vocab_size)
        .max_by_key(|(_, &id)| id)
    {
        return Err(LoadError::Tokenizer {
            path: path.to_path_buf(),
            detail: format!(
                "token {token:?} has id {id}, outside the model's vocabulary of {} ({} tokens)",
                config.vocab_size,
                vocab.len()
            ),
        });
    }
    Ok(())
}

fn is_plain_file_name(f: &str) -> bool {
    !f.is_empty() && !f.contains('/') && !f.contains('\\') && f != "." && f != ".."
}

/// Convert a GGUF file into an HF directory (f32 safetensors, config.json, tokenizer files),
/// undoing GGUF's q/k permutation.
pub fn convert_gguf(gguf: &Path, out_dir: &Path) -> Result<(), LoadError> {
    let file = GgufFile::read(gguf)?;
    let config = ModelConfig::from_gguf(&file)?;
    let codec = TextCodec::from_gguf(&file)?;
    let hf_config = config.to_hf_json().ok_or_else(|| LoadError::Config {
        path: gguf.to_path_buf(),
        detail: format!(
            "`model convert` writes plain Llama/Qwen2 checkpoints; this {} model's block \
             (or its RoPE scaling or sliding window) does not convert",
            config.architecture.name()
        ),
    })?;
    let src = GgufSource::new(&file, &config);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    // Into a new or empty folder only: files left there (an old shard index, say) would be
    // read with the new ones as one checkpoint.
    if let Ok(mut entries) = std::fs::read_dir(out_dir) {
        if entries.next().is_some() {
            return Err(LoadError::Io {
                path: out_dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the output folder is not empty; convert into a new or empty folder",
                ),
            });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut tensors = Vec::new();
    for name in weights::llama_tensor_names(&config) {
        let t = src.load(&name)?.ok_or_else(|| LoadError::MissingTensor {
            path: gguf.to_path_buf(),
            tensor: name.clone(),
        })?;
        tensors.push((name, t));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "converted_from".to_string(),
        crate::digest::sha256_hex(file.bytes()),
    );
    crate::safetensors::write(&out_dir.join("model.safetensors"), &tensors, &meta)?;
    let config_path = out_dir.join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&hf_config).expect("json"),
    )
    .map_err(io(&config_path))?;
    let tok_path = out_dir.join("tokenizer.json");
    let tok_err = |detail: String| LoadError::Tokenizer {
        path: gguf.to_path_buf(),
        detail,
    };
    let mut tokenizer = codec.tokenizer.clone();
    // GGUF's add_bos_token / add_eos_token become tokenizer.json's post-processor, which is
    // how an HF directory says the same.
    if codec.add_bos.is_some() || codec.add_eos.is_some() {
        let mut single = Vec::new();
        let mut specials = Vec::new();
        let mut special = |id: u32, single: &mut Vec<String>| -> Result<(), LoadError> {
            let t = codec
                .tokenizer
                .id_to_token(id)
                .ok_or_else(|| tok_err(format!("special token id {id} has no text")))?;
            single.push(t.clone());
            specials.push((t, id));
            Ok(())
        };
        if let Some(b) = codec.add_bos {
            special(b, &mut single)?;
        }
        single.push("$A".to_string());
        if let Some(e) = codec.add_eos {
            special(e, &mut single)?;
        }
        let processor = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(single.join(" "))
            .map_err(|e| tok_err(format!("post-processor template: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| tok_err(format!("post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(processor));
    }
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| LoadError::Tokenizer {
            path: tok_path.clone(),
            detail: e.to_string(),
        })?;
    let tc_path = out_dir.join("tokenizer_config.json");
    let tc = serde_json::json!({
        "chat_template": codec.chat_template,
        "bos_token": codec.bos_token,
        "eos_token": codec.eos_token,
    });
    std::fs::write(&tc_path, serde_json::to_vec_pretty(&tc).expect("json")).map_err(io(&tc_path))
}
