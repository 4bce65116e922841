//! Policy errors: each names the file and, where it can, the line and column.

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based line and column in a policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

impl Loc {
    /// The line and column of byte `offset` in `text`.
    pub fn of(text: &str, offset: usize) -> Self {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Self { line, col }
    }
}

/// Where each line of a text starts, so that locating an offset costs a binary search rather
/// than a scan from the start: validation locates several values per check, and a scan per
/// value made a policy of many checks quadratic to validate.
#[derive(Debug, Clone)]
pub struct LineIndex {
    /// Byte offset of the start of each line; the first is 0.
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { starts }
    }

    /// The line and column of byte `offset` in `text` (the text this index was made of);
    /// the same as [`Loc::of`].
    pub fn loc(&self, text: &str, offset: usize) -> Loc {
        let offset = offset.min(text.len());
        let line = self.starts.partition_point(|s| *s <= offset);
        let start = self.starts[line - 1];
        let col = text.get(start..offset).map_or(0, |l| l.chars().count()) + 1;
        Loc { line, col }
    }
}

/// A policy that cannot be used as written (or against this model), with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub path: PathBuf,
    pub at: Option<Loc>,
    pub message: String,
}

impl PolicyError {
    pub fn at(path: &Path, at: Option<Loc>, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            at,
            message: message.into(),
        }
    }

    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Self::at(path, None, format!("cannot read: {e}"))
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(Loc { line, col }) => {
                write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// Several policy errors, shown one per line.
#[derive(Debug, Clone)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based() {
        let t = "ab\ncd\n";
        assert_eq!(Loc::of(t, 0), Loc { line: 1, col: 1 });
        assert_eq!(Loc::of(t, 4), Loc { line: 2, col: 2 });
        assert_eq!(Loc::of(t, 99), Loc { line: 3, col: 1 });
    }

    #[test]
    fn the_line_index_locates_as_a_scan_does() {
        let t = "ab\ncd\n\né\u{1b}x\n";
        let index = LineIndex::new(t);
        for offset in (0..=t.len() + 2).filter(|o| t.is_char_boundary(*o.min(&t.len()))) {
            assert_eq!(index.loc(t, offset), Loc::of(t, offset), "offset {offset}");
        }
    }
}

/// Why one check could not be evaluated; its finding becomes `error` with this message, and
/// the check's id and policy are on the finding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// A prompt set the model cannot take: a prompt with no tokens, or longer than the
    /// model's context.
    #[error("prompt set `{set}`: {why}")]
    Prompts { set: String, why: String },
    /// The tokenizer rejected a prompt of a set.
    #[error("prompt set `{set}`: {source}")]
    Tokenise {
        set: String,
        #[source]
        source: probes::RunError,
    },
    /// A forward pass over a prompt set failed (most often: out of memory).
    #[error("forward pass over `{set}`: {source}")]
    Forward {
        set: String,
        #[source]
        source: probes::RunError,
    },
    /// Greedy generation over a prompt set failed.
    #[error("generating for `{set}`: {source}")]
    Generate {
        set: String,
        #[source]
        source: probes::RunError,
    },
    /// Tokenising or decoding a single string failed.
    #[error(transparent)]
    Codec(#[from] probes::RunError),
    /// The SAE could not encode or decode these activations.
    #[error(transparent)]
    Sae(#[from] probes::sae::SaeError),
    /// A tensor operation failed (a shape the model did not produce as expected).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The model produced NaN or infinite activations, logits or divergences.
    #[error("{0}")]
    NonFinite(String),
    /// A token position that is not inside a prompt of the set.
    #[error("position {position} is outside prompt {prompt} of `{set}`")]
    Position {
        position: i64,
        prompt: usize,
        set: String,
    },
    /// A word whose first token the check needs encodes to no tokens at all.
    #[error("`{0}` has no tokens")]
    NoTokens(String),
    /// The check's measurement has nothing to measure (no latent fires, an SAE that reads a
    /// later hook than the direction it should explain).
    #[error("{0}")]
    Unmeasurable(String),
    /// A drift check's baseline cannot be used: unreadable, not a result, or made with
    /// another SAE.
    #[error("{0}")]
    Baseline(String),
    /// A pinned instrument of the lineage that cannot be used (missing from the store, changed
    /// since it was pinned, or pinned by a lineage of another model).
    #[error("{0}")]
    Instrument(String),
    /// A name the resolver should have resolved before any check ran.
    #[error("{what} `{name}` was not resolved")]
    Unresolved { what: &'static str, name: String },
}
