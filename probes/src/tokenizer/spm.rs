//! SentencePiece tokenizers from GGUF metadata (`tokenizer.ggml.model = "llama"`: Llama 2,
//! TinyLlama, Mistral v0.1-v0.3, Gemma, Phi-3), encoding as llama.cpp's SPM tokenizer does.
//!
//! Text is split around control and user-defined tokens (longest first); every other piece
//! gets a leading space when `tokenizer.ggml.add_space_prefix` says so and it follows a special
//! token or starts the text, has its spaces escaped to `▁`, and is cut into UTF-8 characters.
//! Adjacent symbols are then merged, always the pair whose concatenation is the vocabulary
//! token with the highest score (leftmost on a tie), until no pair forms a token. A symbol that
//! is no token becomes its bytes' `<0xNN>` tokens (byte fallback), or the unknown token in a
//! vocabulary without byte tokens.
//!
//! The same vocabulary is also built as a `tokenizers` BPE (merges ordered by the merged
//! token's score, byte fallback, `▁` normaliser and decoder: what `transformers` converts a
//! Llama SentencePiece model to), which serves vocabulary look-ups and is what a GGUF converted
//! to an HF directory ships as `tokenizer.json`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{Prepend, Sequence as NormalizerSequence};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use super::vocab::TokenType;

/// SentencePiece's escaped space.
pub const SPACE: char = '\u{2581}';

/// Tokens longer than this get no merge in the `tokenizers` form (see [`Spm::to_hf`]).
pub const MAX_MERGED_TOKEN_BYTES: usize = 512;

/// A SentencePiece vocabulary and the settings llama.cpp reads with it.
#[derive(Clone)]
pub struct Spm {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    /// Text to id; a text stored twice maps to its last id, as in llama.cpp.
    ids: HashMap<String, u32>,
    /// The `<0xNN>` token of each byte, where the vocabulary has one.
    bytes: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
    /// Control, user-defined and unknown tokens, matched in text before merging: longest
    /// first, then lowest id.
    specials: Vec<u32>,
}

/// Why a vocabulary cannot be used.
#[derive(Debug)]
pub enum SpmError {
    /// Some byte has no `<0xNN>` token and there is no unknown token to stand for it.
    NoFallback { byte: u8 },
}

/// One candidate merge: symbols `left` and `right`, forming a token of `score`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The greatest bigram merges first: highest score, then leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A symbol of the text being merged: bytes `start..start + len`, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A piece of text: plain text to merge, or a special token matched verbatim.
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

impl Spm {
    /// `tokens`, `types` and `scores` are parallel; `unk` is the unknown token, if any.
    pub fn new(
        tokens: &[String],
        types: &[TokenType],
        scores: &[f32],
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, SpmError> {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        if unk.is_none() {
            if let Some(b) = bytes.iter().position(Option::is_none) {
                return Err(SpmError::NoFallback { byte: b as u8 });
            }
        }
        let mut specials: Vec<u32> = (0..tokens.len())
            .filter(|&i| {
                matches!(
                    types[i],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                ) && !tokens[i].is_empty()
            })
            .map(|i| i as u32)
            .collect();
        specials.sort_by_key(|&i| (std::cmp::Reverse(tokens[i as usize].len()), i));
        Ok(Self {
            tokens: tokens.to_vec(),
            types: types.to_vec(),
            scores: scores.to_vec(),
            ids,
            bytes,
            unk,
            add_space_prefix,
            specials,
        })
    }

    /// Token ids of `text`; control and user-defined tokens written in it are matched as such.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut after_special = true;
        for fragment in self.split_specials(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(t) => {
                    let mut escaped = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && after_special {
                        escaped.push(SPACE);
                    }
                    escaped.extend(t.chars().map(|c| if c == ' ' { SPACE } else { c }));
                    self.merge(&escaped, &mut out);
                    after_special = false;
                }
            }
        }
        out
    }

    /// Cut `text` around every special token, longest tokens first.
    fn split_specials<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        // Empty text is no fragment at all: no space prefix, no tokens.
        let mut fragments: Vec<Fragment<'t>> = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(text));
        }
        for &id in &self.specials {
            let special = self.tokens[id as usize].as_str();
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(special)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(special) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Merge the characters of the escaped `text` by score and append the resulting ids.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let candidate = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (l, r) = (left?, right?);
            let (a, b) = (symbols[l], symbols[r]);
            let joined = &text[a.start..b.start + b.len];
            let id = *self.ids.get(joined)?;
            Some(Bigram {
                score: self.scores[id as usize],
                left: l,
                right: r,
                len: joined.len(),
            })
        };
        for i in 1..symbols.len() {
            queue.extend(candidate(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Stale: one side was merged into something else since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            let left = symbols[b.left];
            queue.extend(candidate(&symbols, left.prev, Some(b.left)));
            queue.extend(candidate(&symbols, Some(b.left), left.next));
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => self.fall_back(piece, out),
            }
            at = s.next;
        }
    }

    /// A character that is no token: its bytes' tokens, or else the unknown token.
    fn fall_back(&self, piece: &str, out: &mut Vec<u32>) {
        let bytes: Option<Vec<u32>> = piece.bytes().map(|b| self.bytes[b as usize]).collect();
        match (bytes, self.unk) {
            (Some(ids), _) => out.extend(ids),
            (None, Some(unk)) => out.push(unk),
            // `new` refuses a vocabulary with neither.
            (None, None) => unreachable!("SentencePiece vocabulary without byte or unknown token"),
        }
    }

    /// The text of `ids`. Byte tokens are joined before UTF-8 decoding (invalid sequences
    /// become U+FFFD); `▁` in normal tokens is a space; control and unknown tokens are left out
    /// when `skip_special`; the space added in front of the text is removed. Ids outside the
    /// vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(text) = self.tokens.get(id as usize) else {
                continue;
            };
            // As llama.cpp: user-defined and special tokens read as written, unused ones as
            // nothing.
            match self.types[id as usize] {
                TokenType::Byte => bytes.extend(self.byte_of(id)),
                TokenType::Normal => Self::unescape(text, &mut bytes),
                TokenType::Control | TokenType::Unknown if skip_special => {}
                TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                    bytes.extend_from_slice(text.as_bytes())
                }
                TokenType::Unused | TokenType::Undefined => {}
            }
        }
        if self.add_space_prefix && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The text one token stands for: a byte token's byte (lossily), a normal token with
    /// `▁` as space, any other as written.
    pub fn piece(&self, id: u32) -> Option<String> {
        let text = self.tokens.get(id as usize)?;
        let mut bytes = Vec::new();
        match self.types[id as usize] {
            TokenType::Byte => bytes.extend(self.byte_of(id)),
            TokenType::Normal => Self::unescape(text, &mut bytes),
            _ => bytes.extend_from_slice(text.as_bytes()),
        }
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn byte_of(&self, id: u32) -> Option<u8> {
        let t = &self.tokens[id as usize];
        t.strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
    }

    fn unescape(text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            let c = if c == SPACE { ' ' } else { c };
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }

    /// The same vocabulary as a `tokenizers` BPE with byte fallback: a token made of two
    /// tokens (and at most [`MAX_MERGED_TOKEN_BYTES`] long) is a merge, ranked by its score.
    pub fn to_hf(&self) -> Result<Tokenizer, String> {
        let mergeable = |i: usize| {
            matches!(
                self.types[i],
                TokenType::Normal
                    | TokenType::UserDefined
                    | TokenType::Unused
                    | TokenType::Undefined
            )
        };
        let mut merges: Vec<(f32, u32, u32, usize)> = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            // Splitting costs the square of a token's length: a crafted file's megabyte-long
            // token must not stall loading, and real vocabularies' tokens are far shorter.
            if !mergeable(i) || t.len() > MAX_MERGED_TOKEN_BYTES {
                continue;
            }
            for (cut, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(cut);
                if let (Some(&li), Some(&ri)) = (self.ids.get(l), self.ids.get(r)) {
                    if mergeable(li as usize) && mergeable(ri as usize) {
                        merges.push((self.scores[i], i as u32, li, cut));
                    }
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let merges = merges
            .into_iter()
            .map(|(_, id, _, cut)| {
                let (l, r) = self.tokens[id as usize].split_at(cut);
                (l.to_string(), r.to_string())
            })
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = self.ids.clone().into_iter().collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(self.bytes.iter().all(Option::is_some))
            .fuse_unk(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = builder.build().map_err(|e| format!("building BPE: {e}"))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let space = SPACE.to_string();
        let escape: NormalizerWrapper = Replace::new(" ", space.as_str())
            .map_err(|e| e.to_string())?
            .into();
        let normalizer: NormalizerWrapper = if self.add_space_prefix {
            NormalizerSequence::new(vec![Prepend::new(space.clone()).into(), escape]).into()
        } else {
            escape
        };
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| format!("setting the normaliser: {e}"))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new(space.as_str(), " ")
                .map_err(|e| e.to_string())?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        let added = |special: bool| -> Vec<AddedToken> {
            self.specials
                .iter()
                .filter(|&&i| (self.types[i as usize] != TokenType::UserDefined) == special)
                .map(|&i| {
                    AddedToken::from(self.tokens[i as usize].clone(), special).normalized(false)
                })
                .collect()
        };
        tokenizer
            .add_special_tokens(added(true))
            .map_err(|e| format!("adding special tokens: {e}"))?;
        tokenizer
            .add_tokens(added(false))
            .map_err(|e| format!("adding user-defined tokens: {e}"))?;
        Ok(tokenizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(pieces: &[(&str, f32, TokenType)], add_space_prefix: bool) -> Spm {
        let tokens: Vec<String> = pieces.iter().map(|p| p.0.to_string()).collect();
        let scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
        let types: Vec<TokenType> = pieces.iter().map(|p| p.2).collect();
        let unk = types
            .iter()
            .position(|&t| t == TokenType::Unknown)
            .map(|i| i as u32);
        Spm::new(&tokens, &types, &scores, unk, add_space_prefix).unwrap()
    }

    use TokenType::{Control, Normal, Unknown};

    /// `abc` is `ab c` or `a bc` depending only on which of `ab` and `bc` scores higher.
    #[test]
    fn the_higher_scoring_pair_merges_first() {
        let vocab = |ab: f32, bc: f32| {
            spm(
                &[
                    ("<unk>", 0.0, Unknown),
                    ("a", -10.0, Normal),
                    ("b", -10.0, Normal),
                    ("c", -10.0, Normal),
                    ("ab", ab, Normal),
                    ("bc", bc, Normal),
                ],
                false,
            )
        };
        assert_eq!(vocab(-1.0, -2.0).encode("abc"), [4, 3]);
        assert_eq!(vocab(-2.0, -1.0).encode("abc"), [1, 5]);
        // Equal scores: the leftmost pair wins.
        assert_eq!(vocab(-1.0, -1.0).encode("abc"), [4, 3]);
    }

    /// Merges build on merges: `ab` (the highest score) merges first, then `▁` joins it,
    /// although `▁a` is a token too.
    #[test]
    fn merges_chain_and_the_space_prefix_is_escaped() {
        let v = spm(
            &[
                ("<unk>", 0.0, Unknown),
                ("<s>", 0.0, Control),
                ("\u{2581}", -5.0, Normal),
                ("a", -5.0, Normal),
                ("b", -5.0, Normal),
                ("ab", -1.0, Normal),
                ("\u{2581}ab", -3.0, Normal),
                ("\u{2581}a", -4.0, Normal),
            ],
            true,
        );
        // `ab` first (score -1), then `▁` + `ab` (-3): one token.
        assert_eq!(v.encode("ab"), [6]);
        // Without the prefix there is no `▁` to merge with.
        assert_eq!(v.encode("ab ab a"), [6, 6, 7]);
        // A control token in the text is matched, and the text after it gets the prefix again.
        assert_eq!(v.encode("a<s>b"), [7, 1, 2, 4]);
        assert_eq!(v.decode(&v.encode("ab ab a"), true), "ab ab a");
        assert_eq!(v.decode(&[1, 6], false), "<s> ab");
        assert_eq!(v.decode(&[1, 6], true), "ab");
        // Unknown characters become the unknown token (no byte tokens here).
        assert_eq!(v.encode("xa"), [2, 0, 3]);
    }

    /// User-defined tokens match in text like control tokens and decode as written (no `▁`
    /// unescaping); unused tokens decode as nothing, as in llama.cpp.
    #[test]
    fn user_defined_and_unused_tokens() {
        let v = spm(
            &[
                ("<unk>", 0.0, Unknown),
                ("\u{2581}", -1.0, Normal),
                ("a", -1.0, Normal),
                ("<x\u{2581}>", 0.0, TokenType::UserDefined),
                ("[u]", 0.0, TokenType::Unused),
            ],
            true,
        );
        assert_eq!(v.encode("a<x\u{2581}>a"), [1, 2, 3, 1, 2]);
        assert_eq!(v.decode(&[1, 2, 3, 1, 2, 4], true), "a<x\u{2581}> a");
        assert_eq!(v.piece(3).unwrap(), "<x\u{2581}>");
        assert_eq!(v.piece(1).unwrap(), " ");
    }

    #[test]
    fn a_vocabulary_with_neither_byte_tokens_nor_unk_is_refused() {
        let r = Spm::new(&["a".to_string()], &[Normal], &[0.0], None, true);
        assert!(matches!(r, Err(SpmError::NoFallback { byte: 0 })));
    }
}
