//! The vocabulary a GGUF file stores under `tokenizer.ggml.*`: token texts, their types and
//! (for SentencePiece) their scores, validated once for both tokenizer kinds.
//!
//! The arrays are parallel: token `i` is `tokens[i]`, of type `token_type[i]`, with score
//! `scores[i]`. A length mismatch, an unknown type or a NaN score is an error naming the key,
//! since any of them would tokenise text differently from the runtime that wrote the file.

use crate::error::LoadError;
use crate::gguf::{GgufArray, GgufFile, GgufValue};

/// llama.cpp's token types (`llama_token_type`, gguf-py `TokenType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// The type stored as `value` in `tokenizer.ggml.token_type`.
    pub fn from_gguf(value: u64) -> Option<Self> {
        Some(match value {
            0 => Self::Undefined,
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// Token texts, types and scores of one GGUF file.
pub struct GgufVocab<'a> {
    pub tokens: &'a [String],
    pub types: Vec<TokenType>,
    /// `tokenizer.ggml.scores`, when the file has them (SentencePiece merge priorities).
    pub scores: Option<Vec<f32>>,
}

/// A tokenizer error about `g`'s metadata.
pub fn error(g: &GgufFile, detail: String) -> LoadError {
    LoadError::Tokenizer {
        path: g.path.clone(),
        detail,
    }
}

impl<'a> GgufVocab<'a> {
    pub fn read(g: &'a GgufFile) -> Result<Self, LoadError> {
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
            return Err(error(
                g,
                format!("tokenizer.ggml.tokens holds {} tokens", tokens.len()),
            ));
        }
        let n = tokens.len();
        // A vocabulary maps each string to one id (SentencePiece refuses a piece defined
        // twice); a repeated string would leave one of its ids unreachable.
        let mut seen = std::collections::HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = seen.insert(t.as_str(), i) {
                return Err(error(
                    g,
                    format!(
                        "tokenizer.ggml.tokens[{i}] {t:?} repeats tokenizer.ggml.tokens[{first}]"
                    ),
                ));
            }
        }
        let parallel = |key: &str| -> Result<Option<&GgufArray>, LoadError> {
            let Some(v) = g.metadata.get(key) else {
                return Ok(None);
            };
            let a = v
                .as_array()
                .ok_or_else(|| error(g, format!("{key} is not an array")))?;
            if a.len() != n {
                return Err(error(
                    g,
                    format!(
                        "{key} holds {} values but tokenizer.ggml.tokens holds {n} tokens",
                        a.len()
                    ),
                ));
            }
            Ok(Some(a))
        };
        let types = match parallel("tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n],
            Some(a) => (0..n)
                .map(|i| {
                    let raw = a.u64_at(i);
                    raw.and_then(TokenType::from_gguf).ok_or_else(|| {
                        let shown = raw.map_or_else(|| "not an integer".into(), |v| v.to_string());
                        error(
                            g,
                            format!(
                                "tokenizer.ggml.token_type[{i}] = {shown} is not a token type \
                                 (0 to 6)"
                            ),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let scores = match parallel("tokenizer.ggml.scores")? {
            None => None,
            Some(a) => {
                let values: Vec<f32> = match a {
                    GgufArray::F32(v) => v.clone(),
                    // f64 scores are narrowed as llama.cpp reads them.
                    GgufArray::F64(v) => v.iter().map(|&x| x as f32).collect(),
                    _ => {
                        return Err(error(
                            g,
                            "tokenizer.ggml.scores is not an array of floats".into(),
                        ))
                    }
                };
                if let Some(i) = values.iter().position(|s| s.is_nan()) {
                    return Err(error(g, format!("tokenizer.ggml.scores[{i}] is NaN")));
                }
                Some(values)
            }
        };
        Ok(Self {
            tokens,
            types,
            scores,
        })
    }

    /// The token id stored under `key`, if present; an error when it is not a token id.
    pub fn id(&self, g: &GgufFile, key: &str) -> Result<Option<u32>, LoadError> {
        match g.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&i| i < self.tokens.len() as u64)
                .map(|i| Some(i as u32))
                .ok_or_else(|| {
                    error(
                        g,
                        format!(
                            "{key} = {v:?} is not a token id below {}",
                            self.tokens.len()
                        ),
                    )
                }),
        }
    }

    /// Ids and texts of every token of type `ty`, in id order.
    pub fn of_type(&self, ty: TokenType) -> impl Iterator<Item = (u32, &'a str)> + '_ {
        let tokens = self.tokens;
        self.types
            .iter()
            .enumerate()
            .filter(move |(_, &t)| t == ty)
            .map(move |(i, _)| (i as u32, tokens[i].as_str()))
    }
}

/// A string array (an empty array of any element type counts as an empty string array).
pub fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<&'a [String], LoadError> {
    g.meta(key)
        .map_err(|_| error(g, format!("GGUF has no {key}")))?
        .as_array()
        .and_then(|a| a.as_strings().or(a.is_empty().then_some(&[][..])))
        .ok_or_else(|| error(g, format!("{key} is not an array of strings")))
}

/// A boolean flag: `None` when absent, an error when it is not a bool.
pub fn flag(g: &GgufFile, key: &str) -> Result<Option<bool>, LoadError> {
    match g.metadata.get(key) {
        None => Ok(None),
        Some(GgufValue::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(error(g, format!("{key} = {v:?} is not a bool"))),
    }
}
