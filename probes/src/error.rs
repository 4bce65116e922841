//! Typed errors for loading checkpoints and running the model.
//!
//! Every variant names the file, tensor or hook involved, so that an operator can act on it
//! without reading the source.

use std::path::PathBuf;

/// An error while reading or validating a checkpoint (safetensors, GGUF, config, tokenizer).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be opened or read (missing, permissions, I/O failure).
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file ends before its header says it should: usually a half-copied checkpoint.
    #[error("{path}: truncated: {detail}")]
    Truncated { path: PathBuf, detail: String },
    /// The header of a safetensors or GGUF file is malformed or inconsistent with the data.
    #[error("{path}: invalid header: {detail}")]
    Header { path: PathBuf, detail: String },
    /// A tensor's declared dtype, shape or byte range is inconsistent.
    #[error("{path}: tensor `{tensor}`: {detail}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    /// A tensor the architecture needs is absent from every shard.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor has a shape that disagrees with the model configuration.
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, config.json implies {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A weight holds NaN or infinite values; the model would produce garbage.
    #[error("{path}: tensor `{tensor}` holds {count} non-finite values (NaN or Inf)")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        count: usize,
    },
    /// The configuration (config.json or GGUF metadata) is missing a field or holds a bad value.
    #[error("{path}: config: {detail}")]
    Config { path: PathBuf, detail: String },
    /// The architecture is not one mechwatch can run.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    /// No usable tokenizer: `tokenizer.json` is absent or the GGUF has no tokenizer metadata.
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    /// A known model could not be fetched, verified or found in the cache.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// A tensor operation failed while materialising weights.
    #[error("{path}: {context}: {source}")]
    Candle {
        path: PathBuf,
        context: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// An error while running the model: bad hook names, shape mismatches, tokenizer failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The hook name is not one this model has (an unknown name, or a block beyond the
    /// model's last); the message lists the valid forms.
    #[error("unknown hook `{name}`: valid hooks are {valid}")]
    UnknownHook { name: String, valid: String },
    /// The hook's block is malformed or a fraction of depth outside [0, 1]; `why` says which.
    #[error("hook `{name}`: {why}")]
    BadBlock { name: String, why: String },
    /// An intervention's vector does not match the hook's activation width.
    #[error(
        "intervention at `{hook}`: vector has {actual} elements, the hook has width {expected}"
    )]
    InterventionShape {
        hook: String,
        expected: usize,
        actual: usize,
    },
    /// The intervention's vector or the activation holds NaN or Inf.
    #[error("intervention at `{hook}`: {detail}")]
    Intervention { hook: String, detail: String },
    /// The prompt batch is empty or a prompt has no tokens.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A token position outside the prompt (negative positions count from its end).
    #[error(
        "position {position} is outside the prompt's {len} tokens (0 to {last} from the start, \
         -1 to -{len} from the end)",
        last = len.saturating_sub(1)
    )]
    Position { position: i64, len: usize },
    /// A logit-lens request the model cannot answer (top-k or token out of range).
    #[error("logit lens: {0}")]
    Lens(String),
    /// Tokenisation or chat-template rendering failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A gradient pass or a per-head decomposition this model cannot give.
    #[error("gradient: {0}")]
    Gradient(String),
    /// A tensor operation failed.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// Attach context to candle errors without repeating `map_err` closures everywhere.
pub(crate) trait CandleContext<T> {
    fn run_ctx(self, context: &str) -> Result<T, RunError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn run_ctx(self, context: &str) -> Result<T, RunError> {
        self.map_err(|source: candle_core::Error| RunError::Candle {
            context: context.to_string(),
            source: Box::new(source),
        })
    }
}
