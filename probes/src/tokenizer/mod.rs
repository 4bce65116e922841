//! Tokenizers (the `tokenizers` crate from `tokenizer.json`; from GGUF metadata a byte-level
//! BPE ([`bpe`]) or SentencePiece ([`spm`])) and chat templates rendered with a real Jinja
//! engine (minijinja).
//!
//! A chat template is code from the checkpoint: its rendering is bounded in instructions
//! (minijinja fuel) and in output bytes, so a template that loops (`range(9999)` nested) fails
//! with an error instead of running for minutes or filling memory.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use crate::error::{LoadError, RunError};
use crate::gguf::GgufFile;

pub mod bpe;
mod expansion;
mod isolated;
pub mod spm;
pub mod vocab;

pub use bpe::{gguf_pre_tokenizer, LLAMA3_PATTERN, QWEN2_PATTERN, SUPPORTED_PRE_TOKENIZERS};
use vocab::{GgufVocab, TokenType};

/// Template instructions allowed per render, plus [`TEMPLATE_FUEL_PER_MESSAGE`] per message.
/// Real chat templates use a few hundred per message.
pub const TEMPLATE_FUEL: u64 = 200_000;
pub const TEMPLATE_FUEL_PER_MESSAGE: u64 = 20_000;
/// Rendered bytes allowed beyond the messages' own text (which is allowed four times over).
pub const TEMPLATE_OUTPUT_ALLOWANCE: usize = 64 * 1024;

/// A writer that refuses to grow past `limit` bytes.
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads a file of the checkpoint directory by name (`None` when absent), recording its digest.
pub type FileReader<'a> = dyn FnMut(&str) -> Result<Option<Vec<u8>>, LoadError> + 'a;

/// A tokenizer with the model's chat template and special tokens.
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that plain-text prompts start and end with (GGUF `tokenizer.ggml.add_bos_token`
    /// and `add_eos_token`; `tokenizer.json` says the same with its post-processor).
    pub add_bos: Option<u32>,
    pub add_eos: Option<u32>,
    /// A GGUF SentencePiece vocabulary encodes and decodes through this (`tokenizer` then
    /// serves look-ups and conversion to `tokenizer.json`).
    spm: Option<spm::Spm>,
    /// See [`TextCodec::digest`].
    digest: String,
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// `chat_template` of `tokenizer_config.json`: absent, one template, or a list of named
/// templates, of which the one named `default` is the chat template (as transformers reads it).
fn named_template(v: &serde_json::Value) -> Result<Option<String>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(t) => Ok(Some(t.clone())),
        serde_json::Value::Array(list) => {
            let named = |t: &serde_json::Value| t["name"].as_str() == Some("default");
            match list.iter().find(|t| named(t)).map(|t| &t["template"]) {
                Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
                Some(other) => Err(format!(
                    "`chat_template` named `default` holds {other}, not a template string"
                )),
                None => Err(format!(
                    "`chat_template` lists {} named templates but none named `default`",
                    list.len()
                )),
            }
        }
        other => Err(format!(
            "`chat_template` is {other}: neither a template string nor a list of named \
             templates"
        )),
    }
}

impl TextCodec {
    /// Load `tokenizer.json` and `tokenizer_config.json` from an HF directory.
    pub fn from_hf_dir(dir: &Path, read: &mut FileReader<'_>) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let bytes = read("tokenizer.json")?.ok_or_else(|| LoadError::Tokenizer {
            path: path.clone(),
            detail: "tokenizer.json is missing".into(),
        })?;
        let parsed: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| LoadError::Tokenizer {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        expansion::check_normalizer(&parsed).map_err(|detail| LoadError::Tokenizer {
            path: path.clone(),
            detail,
        })?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| LoadError::Tokenizer {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let mut codec = Self {
            tokenizer,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            add_bos: None,
            add_eos: None,
            spm: None,
            digest: String::new(),
        };
        if let Some(cfg) = read("tokenizer_config.json")? {
            let cfg_path = dir.join("tokenizer_config.json");
            let v: serde_json::Value =
                serde_json::from_slice(&cfg).map_err(|e| LoadError::Tokenizer {
                    path: cfg_path,
                    detail: e.to_string(),
                })?;
            let token = |k: &str| match &v[k] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            };
            codec.chat_template =
                named_template(&v["chat_template"]).map_err(|detail| LoadError::Tokenizer {
                    path: dir.join("tokenizer_config.json"),
                    detail,
                })?;
            codec.bos_token = token("bos_token");
            codec.eos_token = token("eos_token");
        }
        // Current transformers saves the template beside the config instead of inside it.
        if codec.chat_template.is_none() {
            if let Some(t) = read("chat_template.jinja")? {
                let t = String::from_utf8(t).map_err(|_| LoadError::Tokenizer {
                    path: dir.join("chat_template.jinja"),
                    detail: "not UTF-8".into(),
                })?;
                codec.chat_template = Some(t);
            }
        }
        codec.digest = codec
            .canonical_digest()
            .map_err(|detail| LoadError::Tokenizer {
                path: path.clone(),
                detail,
            })?;
        Ok(codec)
    }

    /// Build the tokenizer GGUF `tokenizer.ggml.*` metadata describes: byte-level BPE
    /// (`gpt2`) or SentencePiece (`llama`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LoadError> {
        let err = |detail: String| vocab::error(g, detail);
        let model = g
            .meta_str("tokenizer.ggml.model")
            .map_err(|_| err("GGUF has no tokenizer.ggml.model".into()))?;
        let v = GgufVocab::read(g)?;
        let bos = v.id(g, "tokenizer.ggml.bos_token_id")?;
        let eos = v.id(g, "tokenizer.ggml.eos_token_id")?;
        // Every special id the file names must be a token, whether or not it is used.
        for key in [
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.seperator_token_id",
            "tokenizer.ggml.separator_token_id",
            "tokenizer.ggml.cls_token_id",
            "tokenizer.ggml.mask_token_id",
        ] {
            v.id(g, key)?;
        }
        let (tokenizer, spm, add_bos_by_default) = match model {
            "gpt2" => {
                let merges = vocab::strings(g, "tokenizer.ggml.merges")?;
                // Files written before llama.cpp recorded the pre-tokenizer get its `default`
                // (GPT-2's regex), as llama.cpp gives them.
                let pre = match g.metadata.get("tokenizer.ggml.pre") {
                    None => "default",
                    Some(p) => p.as_str().ok_or_else(|| {
                        err(format!("tokenizer.ggml.pre = {p:?} is not a string"))
                    })?,
                };
                let pre = bpe::pre_tokenizer(pre).ok_or_else(|| {
                    err(format!(
                        "tokenizer.ggml.pre `{pre}` is not supported (supported: \
                         {SUPPORTED_PRE_TOKENIZERS})"
                    ))
                })?;
                let mut tokenizer = bpe::build(v.tokens, merges, &pre).map_err(err)?;
                // Control tokens (type 3) such as <|im_start|> must match as single tokens; so
                // must user-defined ones (type 4, e.g. Qwen's `<tool_call>`), which llama.cpp
                // also matches before splitting but, not being special, keeps when decoding.
                let added = |ty: TokenType, special: bool| -> Vec<AddedToken> {
                    v.of_type(ty)
                        .map(|(_, s)| AddedToken::from(s.to_string(), special).normalized(false))
                        .collect()
                };
                tokenizer
                    .add_special_tokens(added(TokenType::Control, true))
                    .map_err(|e| err(format!("adding special tokens: {e}")))?;
                tokenizer
                    .add_tokens(added(TokenType::UserDefined, false))
                    .map_err(|e| err(format!("adding user-defined tokens: {e}")))?;
                (tokenizer, None, pre.add_bos_by_default)
            }
            "llama" => {
                let scores = v.scores.as_deref().ok_or_else(|| {
                    err("a SentencePiece (`llama`) vocabulary needs tokenizer.ggml.scores".into())
                })?;
                let unk = match v.id(g, "tokenizer.ggml.unknown_token_id")? {
                    Some(id) => Some(id),
                    None => v.of_type(TokenType::Unknown).map(|(id, _)| id).next(),
                };
                // llama.cpp prefixes a space unless the file says otherwise.
                let add_space_prefix =
                    vocab::flag(g, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let spm = spm::Spm::new(v.tokens, &v.types, scores, unk, add_space_prefix)
                    .map_err(|e| match e {
                        spm::SpmError::NoFallback { byte } => err(format!(
                            "the vocabulary has no byte token <0x{byte:02X}> and no unknown \
                             token (tokenizer.ggml.unknown_token_id or a token of type 2) to \
                             stand for it"
                        )),
                    })?;
                let tokenizer = spm.to_hf().map_err(err)?;
                (tokenizer, Some(spm), true)
            }
            _ => {
                return Err(err(format!(
                    "tokenizer.ggml.model `{model}` is not supported (supported: gpt2 \
                     (byte-level BPE), llama (SentencePiece))"
                )))
            }
        };
        let text = |id: Option<u32>| id.map(|i| v.tokens[i as usize].clone());
        // What llama.cpp does with plain text: add BOS / EOS when the file says so (BOS by
        // default for SentencePiece and some BPE pre-tokenizers, as llama.cpp).
        let add =
            |key: &str, id: Option<u32>, id_key: &str, default: bool| match vocab::flag(g, key)? {
                Some(false) => Ok(None),
                None if !default => Ok(None),
                None => Ok(id),
                Some(true) => id
                    .map(Some)
                    .ok_or_else(|| err(format!("{key} is set but {id_key} is missing"))),
            };
        let add_bos = add(
            "tokenizer.ggml.add_bos_token",
            bos,
            "tokenizer.ggml.bos_token_id",
            add_bos_by_default,
        )?;
        let add_eos = add(
            "tokenizer.ggml.add_eos_token",
            eos,
            "tokenizer.ggml.eos_token_id",
            false,
        )?;
        let chat_template = match g.metadata.get("tokenizer.chat_template") {
            None => None,
            Some(t) => Some(
                t.as_str()
                    .ok_or_else(|| err("tokenizer.chat_template is not a string".into()))?
                    .to_string(),
            ),
        };
        let mut codec = Self {
            tokenizer,
            chat_template,
            bos_token: text(bos),
            eos_token: text(eos),
            add_bos,
            add_eos,
            spm,
            digest: String::new(),
        };
        codec.digest = codec.canonical_digest().map_err(err)?;
        Ok(codec)
    }

    /// sha256 of the tokenizer's canonical content, as loaded: the vocabulary with its merges
    /// (or scores) in the order `tokenizers` writes them (by id, by rank), the added tokens by
    /// id with whether each is special, and the BOS and EOS tokens. The file it came from
    /// (GGUF metadata or `tokenizer.json`) and how plain text gets its BOS are not part of it,
    /// so a GGUF checkpoint and its `model convert` copy have the same digest; another
    /// vocabulary, merge order or special token gives another.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    fn canonical_digest(&self) -> Result<String, String> {
        #[derive(serde::Serialize)]
        struct Canonical<'a> {
            model: &'a tokenizers::ModelWrapper,
            added_tokens: Vec<(u32, String, bool)>,
            bos_token: Option<&'a str>,
            eos_token: Option<&'a str>,
        }
        let mut added_tokens: Vec<(u32, String, bool)> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content, t.special))
            .collect();
        added_tokens.sort();
        let canonical = Canonical {
            model: self.tokenizer.get_model(),
            added_tokens,
            bos_token: self.bos_token.as_deref(),
            eos_token: self.eos_token.as_deref(),
        };
        let bytes = serde_json::to_vec(&canonical)
            .map_err(|e| format!("writing the vocabulary out to digest it: {e}"))?;
        Ok(crate::digest::sha256_hex(&bytes))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, RunError> {
        if let Some(spm) = &self.spm {
            return Ok(spm.encode(text));
        }
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| RunError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenise plain text as the checkpoint asks: `tokenizer.json`'s post-processor (HF's
    /// `add_special_tokens=True`) and GGUF's `add_bos_token` / `add_eos_token` apply. Chat
    /// templates write their own special tokens, so rendered chats go through [`Self::encode`].
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, RunError> {
        let mut ids = match &self.spm {
            Some(spm) => spm.encode(text),
            None => self
                .tokenizer
                .encode(text, true)
                .map_err(|e| RunError::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec(),
        };
        if let Some(bos) = self.add_bos.filter(|&b| ids.first() != Some(&b)) {
            ids.insert(0, bos);
        }
        if let Some(eos) = self.add_eos.filter(|&e| ids.last() != Some(&e)) {
            ids.push(eos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, RunError> {
        if let Some(spm) = &self.spm {
            return Ok(spm.decode(ids, true));
        }
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| RunError::Tokenizer(e.to_string()))
    }

    /// The text of one token id, special tokens included.
    pub fn token_text(&self, id: u32) -> String {
        if let Some(spm) = &self.spm {
            return spm.piece(id).unwrap_or_else(|| format!("<{id}>"));
        }
        self.tokenizer
            .decode(&[id], false)
            .unwrap_or_else(|_| format!("<{id}>"))
    }

    /// Render `messages` through the chat template, with the generation prompt appended.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, RunError> {
        let mut out = self.apply_chat_templates(std::slice::from_ref(&messages))?;
        out.pop().expect("one conversation rendered")
    }

    /// Render each conversation of `batch` as [`TextCodec::apply_chat_template`] does, all in
    /// one child process whose memory is capped ([`isolated`]): `Err` when the child gave no
    /// result (a template that builds values past the cap), else one result per conversation.
    pub fn apply_chat_templates(
        &self,
        batch: &[&[Message]],
    ) -> Result<Vec<Result<String, RunError>>, RunError> {
        if self.chat_template.is_none() {
            return Ok(batch.iter().map(|m| self.render_template(m)).collect());
        }
        let rendered = isolated::run(|| {
            batch
                .iter()
                .map(|m| {
                    self.render_template(m).map_err(|e| match e {
                        RunError::Tokenizer(detail) => detail,
                        other => other.to_string(),
                    })
                })
                .collect::<Vec<Result<String, String>>>()
        })
        .map_err(|why| RunError::Tokenizer(format!("chat template: {why}")))?;
        Ok(rendered
            .into_iter()
            .map(|r| r.map_err(RunError::Tokenizer))
            .collect())
    }

    /// Render `messages` in this process: fuel and output are bounded, the values built are
    /// not (see [`TextCodec::apply_chat_templates`]).
    fn render_template(&self, messages: &[Message]) -> Result<String, RunError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| RunError::Tokenizer("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let n = messages.len() as u64;
        let fuel = TEMPLATE_FUEL.saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(n));
        env.set_fuel(Some(fuel));
        env.add_template("chat", template)
            .map_err(|e| RunError::Tokenizer(format!("chat template: {e}")))?;
        let text: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        let limit = text
            .saturating_mul(4)
            .saturating_add(TEMPLATE_OUTPUT_ALLOWANCE);
        let mut out = BoundedOutput {
            buf: Vec::new(),
            limit,
        };
        let rendered = env.get_template("chat").and_then(|t| {
            t.render_captured_to(
                minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                },
                &mut out,
            )
            .map(drop)
        });
        match rendered {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| RunError::Tokenizer("chat template rendered invalid UTF-8".into())),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
                Err(RunError::Tokenizer(format!(
                    "chat template ran more than {fuel} instructions for {n} message(s): \
                     does it loop?"
                )))
            }
            Err(e) if e.kind() == minijinja::ErrorKind::WriteFailure => Err(RunError::Tokenizer(
                format!("chat template output exceeds {limit} bytes for {text} bytes of messages"),
            )),
            Err(e) => Err(RunError::Tokenizer(format!("chat template: {e}"))),
        }
    }

    /// Token id of a special token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}
