//! Byte-level BPE tokenizers from GGUF metadata (`tokenizer.ggml.model = "gpt2"`: GPT-2,
//! SmolLM, Qwen2/2.5/3, Llama 3, Mistral Nemo), with the pre-tokenizer llama.cpp picks for
//! `tokenizer.ggml.pre`.
//!
//! The pre-tokenizer decides where words end before merging, so a value mechwatch does not
//! implement is refused: splitting with another regex gives other tokens without any error.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer regex (HF `tokenizer.json` `Split`; llama.cpp `qwen2`): like GPT-2's,
/// but single digits, letters glued to one leading non-letter, and newlines kept apart.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer regex (llama.cpp `llama-bpe`): Qwen2's with digits in runs of three.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken regex (llama.cpp `tekken`, Mistral Nemo): words split at case changes
/// (`HelloWorld` is two), single digits, `/` kept with the punctuation before it.
pub const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The `tokenizer.ggml.pre` values mechwatch implements for byte-level BPE.
pub const SUPPORTED_PRE_TOKENIZERS: &str =
    "default, gpt-2, smollm, qwen2, deepseek-r1-qwen, llama-bpe, llama3, llama-v3, tekken";

/// How llama.cpp treats a BPE vocabulary of one `tokenizer.ggml.pre` value.
pub struct PreTokenizer {
    pub split: PreTokenizerWrapper,
    /// A word that is itself a token is taken whole, without merging (Llama 3, Tekken).
    pub ignore_merges: bool,
    /// Whether plain text starts with BOS when the file has no `tokenizer.ggml.add_bos_token`.
    pub add_bos_by_default: bool,
}

/// The pre-tokenizer llama.cpp uses for GGUF `tokenizer.ggml.pre` = `pre`; `None` when mechwatch
/// does not implement it.
pub fn gguf_pre_tokenizer(pre: &str) -> Option<PreTokenizerWrapper> {
    pre_tokenizer(pre).map(|p| p.split)
}

/// [`gguf_pre_tokenizer`] with the settings llama.cpp ties to the same value.
pub fn pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
    // Regex splitting first, then bytes to GPT-2's printable alphabet.
    let split_then_bytes = |pattern: &str| -> Option<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
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
    let plain = |split| PreTokenizer {
        split,
        ignore_merges: false,
        add_bos_by_default: false,
    };
    let whole_words = |split| PreTokenizer {
        split,
        ignore_merges: true,
        add_bos_by_default: true,
    };
    Some(match pre {
        "default" | "gpt-2" => plain(ByteLevel::new(false, true, true).into()),
        "smollm" => plain(
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
        ),
        "qwen2" | "deepseek-r1-qwen" => plain(split_then_bytes(QWEN2_PATTERN)?),
        "llama-bpe" | "llama3" | "llama-v3" => whole_words(split_then_bytes(LLAMA3_PATTERN)?),
        "tekken" => whole_words(split_then_bytes(TEKKEN_PATTERN)?),
        _ => return None,
    })
}

/// A byte-level BPE over `tokens` (ids are positions) and `merges` (`"left right"`).
pub fn build(
    tokens: &[String],
    merges: &[String],
    pre: &PreTokenizer,
) -> Result<Tokenizer, String> {
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge `{m}` in tokenizer.ggml.merges has no space"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| format!("building BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre.split.clone()));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}
