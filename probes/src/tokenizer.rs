//! Tokenizers (the `tokenizers` crate, from `tokenizer.json` or GGUF metadata) and chat
//! templates rendered with a real Jinja engine (minijinja).
//!
//! A chat template is code from the checkpoint: its rendering is bounded in instructions
//! (minijinja fuel) and in output bytes, so a template that loops (`range(9999)` nested) fails
//! with an error instead of running for minutes or filling memory.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{LoadError, RunError};
use crate::gguf::{GgufFile, GgufValue};

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

/// Qwen2's pre-tokenizer regex (HF `tokenizer.json` `Split`; llama.cpp `qwen2`): like GPT-2's,
/// but single digits, letters glued to one leading non-letter, and newlines kept apart.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (llama.cpp `llama-bpe`): Qwen2's with digits in runs of three.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The `tokenizer.ggml.pre` values mechwatch implements.
pub const SUPPORTED_PRE_TOKENIZERS: &str =
    "default, gpt-2, smollm, qwen2, deepseek-r1-qwen, llama-bpe, llama3, llama-v3";

/// The pre-tokenizer llama.cpp uses for GGUF `tokenizer.ggml.pre` = `pre`; `None` when mechwatch
/// does not implement it.
pub fn gguf_pre_tokenizer(pre: &str) -> Option<PreTokenizerWrapper> {
    // Regex splitting first, then bytes to GPT-2's printable alphabet.
    let split_then_bytes = |pattern: &str| -> Option<PreTokenizerWrapper> {
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .ok()?;
        Some(
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
        )
    };
    match pre {
        "default" | "gpt-2" => Some(ByteLevel::new(false, true, true).into()),
        "smollm" => Some(
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
        ),
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2_PATTERN),
        "llama-bpe" | "llama3" | "llama-v3" => split_then_bytes(LLAMA3_PATTERN),
        _ => None,
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

impl TextCodec {
    /// Load `tokenizer.json` and `tokenizer_config.json` from an HF directory.
    pub fn from_hf_dir(dir: &Path, read: &mut FileReader<'_>) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let bytes = read("tokenizer.json")?.ok_or_else(|| LoadError::Tokenizer {
            path: path.clone(),
            detail: "tokenizer.json is missing".into(),
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
            codec.chat_template = v["chat_template"].as_str().map(str::to_string);
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
        Ok(codec)
    }

    /// Build a byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LoadError> {
        let err = |detail: String| LoadError::Tokenizer {
            path: g.path.clone(),
            detail,
        };
        let model = g
            .meta_str("tokenizer.ggml.model")
            .map_err(|_| err("GGUF has no tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE `gpt2`)"
            )));
        }
        let strings = |key: &str| -> Result<&[String], LoadError> {
            g.meta(key)
                .map_err(|_| err(format!("GGUF has no {key}")))?
                .as_array()
                .and_then(|a| a.as_strings().or(a.is_empty().then_some(&[][..])))
                .ok_or_else(|| err(format!("{key} is not an array of strings")))
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
            return Err(err(format!(
                "tokenizer.ggml.tokens holds {} tokens",
                tokens.len()
            )));
        }
        let merges = strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge `{m}` has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => {
                let a = v
                    .as_array()
                    .filter(|a| a.len() == tokens.len())
                    .ok_or_else(|| {
                        err(format!(
                            "tokenizer.ggml.token_type is not an array of {} integers",
                            tokens.len()
                        ))
                    })?;
                (0..a.len())
                    .map(|i| {
                        a.u64_at(i).ok_or_else(|| {
                            err(format!(
                                "tokenizer.ggml.token_type[{i}] is not a token type"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("building BPE: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        // Files written before llama.cpp recorded the pre-tokenizer get its `default` (GPT-2's
        // regex), as llama.cpp gives them; a value we do not implement is refused, since
        // splitting with another regex gives other tokens without any error.
        let pre = match g.metadata.get("tokenizer.ggml.pre") {
            None => "default",
            Some(v) => v
                .as_str()
                .ok_or_else(|| err(format!("tokenizer.ggml.pre = {v:?} is not a string")))?,
        };
        let pre_tokenizer = gguf_pre_tokenizer(pre).ok_or_else(|| {
            err(format!(
                "tokenizer.ggml.pre `{pre}` is not supported (supported: \
                 {SUPPORTED_PRE_TOKENIZERS})"
            ))
        })?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) such as <|im_start|> must match as single tokens; so must
        // user-defined ones (type 4, e.g. Qwen's `<tool_call>`), which llama.cpp also matches
        // before splitting but, not being special, keeps when decoding.
        let added = |ty: u64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(types.iter())
                .filter(|(_, &t)| t == ty)
                .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
                .collect()
        };
        tokenizer
            .add_special_tokens(added(3, true))
            .map_err(|e| err(format!("adding special tokens: {e}")))?;
        tokenizer
            .add_tokens(added(4, false))
            .map_err(|e| err(format!("adding user-defined tokens: {e}")))?;
        let id_str = |key: &str| -> Result<Option<String>, LoadError> {
            match g.metadata.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|i| tokens.get(usize::try_from(i).ok()?))
                    .map(|t| Some(t.clone()))
                    .ok_or_else(|| {
                        err(format!(
                            "{key} = {v:?} is not a token id below {}",
                            tokens.len()
                        ))
                    }),
            }
        };
        let bos_token = id_str("tokenizer.ggml.bos_token_id")?;
        let eos_token = id_str("tokenizer.ggml.eos_token_id")?;
        // What llama.cpp does with plain text: add BOS / EOS when the file says so.
        let add = |flag: &str, id_key: &str| -> Result<Option<u32>, LoadError> {
            match g.metadata.get(flag) {
                None | Some(GgufValue::Bool(false)) => Ok(None),
                Some(GgufValue::Bool(true)) => g
                    .metadata
                    .get(id_key)
                    .and_then(|v| v.as_u64())
                    .and_then(|i| u32::try_from(i).ok())
                    .map(Some)
                    .ok_or_else(|| err(format!("{flag} is set but {id_key} is missing"))),
                Some(v) => Err(err(format!("{flag} = {v:?} is not a bool"))),
            }
        };
        let add_bos = add(
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id",
        )?;
        let add_eos = add(
            "tokenizer.ggml.add_eos_token",
            "tokenizer.ggml.eos_token_id",
        )?;
        let chat_template = match g.metadata.get("tokenizer.chat_template") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| err("tokenizer.chat_template is not a string".into()))?
                    .to_string(),
            ),
        };
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            add_bos,
            add_eos,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, RunError> {
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
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| RunError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.add_bos.filter(|&b| ids.first() != Some(&b)) {
            ids.insert(0, bos);
        }
        if let Some(eos) = self.add_eos.filter(|&e| ids.last() != Some(&e)) {
            ids.push(eos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, RunError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| RunError::Tokenizer(e.to_string()))
    }

    /// The text of one token id, special tokens included.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .decode(&[id], false)
            .unwrap_or_else(|_| format!("<{id}>"))
    }

    /// Render `messages` through the chat template, with the generation prompt appended.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String, RunError> {
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
