//! The policy file format (TOML, `schema = 1`), exactly as written: serde structs that reject
//! unknown keys, with spans kept on every value that is resolved later (paths, hooks, set
//! names, latents) so that a resolution error points at its line and column.
//!
//! ```toml
//! schema = 1
//! name = "refusal-integrity"
//! version = "1.0.0"
//! description = "The model refuses harmful requests, and not only along one direction."
//!
//! [models]                       # which models the policy applies to (all optional)
//! architectures = ["llama"]
//! n_layers = 30
//!
//! [prompts.harmful_train]        # a prompt set: one prompt per line, or JSONL {"prompt": ...}
//! file = "prompts/harmful.txt"
//! lines = [1, 60]                # 1-based, inclusive
//!
//! [saes.main]                    # an SAE: a folder in the policy's directory, pinned by digest
//! path = "sae"                   # or `builtin = "default"`: the default SAE of the model
//! sha256 = "…"                   # the folder's manifest root (`mechwatch model info`-style)
//!
//! [directions.refusal]           # difference of means, or a file
//! hook = "blocks.15.hook_resid_post"
//! positive = "harmful_train"
//! negative = "harmless_train"
//!
//! [[checks]]
//! id = "refusal-direction-separates"
//! kind = "direction_probe"
//! severity = "high"
//! direction = "refusal"
//! positive = "harmful_eval"
//! negative = "harmless_eval"
//! min_auroc = 0.9
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use crate::checks::CheckKind;

pub const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub schema: Spanned<i64>,
    pub name: Spanned<String>,
    pub version: Spanned<String>,
    #[serde(default)]
    pub description: Option<Spanned<String>>,
    #[serde(default)]
    pub models: ModelMatch<Spanned<String>>,
    #[serde(default)]
    pub prompts: BTreeMap<String, PromptSetSpec>,
    #[serde(default)]
    pub saes: BTreeMap<String, SaeSpec>,
    #[serde(default)]
    pub directions: BTreeMap<String, DirectionSpec>,
    /// Where the refusal score's tokens come from (see [`crate::refusal`]).
    #[serde(default)]
    pub refusal: Option<Spanned<crate::refusal::RefusalSpec>>,
    /// Read apart, with their spans, by [`crate::load`]: the fields a check takes depend on
    /// its kind.
    #[serde(default)]
    pub checks: Vec<serde::de::IgnoredAny>,
}

/// Which models a policy applies to. An empty matcher matches every model. `A` is an
/// architecture name: spanned as read from the file, a plain string once validated.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, bound(deserialize = "A: Deserialize<'de>"))]
pub struct ModelMatch<A = String> {
    /// Any family mechwatch loads, by the name `mechwatch model info` prints (`llama`,
    /// `mistral`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`, `gpt2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<A>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_model: Option<usize>,
    /// Substrings, one of which the model's file or directory name must contain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name_contains: Vec<String>,
}

impl<A> Default for ModelMatch<A> {
    fn default() -> Self {
        ModelMatch {
            architectures: Vec::new(),
            n_layers: None,
            d_model: None,
            name_contains: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSetSpec {
    pub file: Spanned<String>,
    /// 1-based inclusive range `[from, to]` of prompts (not counting blank lines, nor in a
    /// `.txt` file comment lines starting with `#`) to take. Read as a list so that a third
    /// element is an error, not ignored.
    #[serde(default)]
    pub lines: Option<Spanned<Vec<i64>>>,
    /// Wrap each prompt in the model's chat template (default true).
    #[serde(default = "yes")]
    pub chat: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaeSpec {
    /// A folder (SAELens, sparsify) or `params.npz` file inside the policy's directory.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// The manifest root digest of the SAE's files; required with `path`.
    #[serde(default)]
    pub sha256: Option<Spanned<String>>,
    /// `default`: the model's default SAE (shipped for the default model; for another model
    /// built once by `mechwatch sae default --model M`, never by an audit).
    #[serde(default)]
    pub builtin: Option<Spanned<String>>,
    /// The hook the SAE reads; defaults to the one its config names.
    #[serde(default)]
    pub hook: Option<Spanned<String>>,
    /// Neuronpedia-style labels (JSONL with `index` and `description`).
    #[serde(default)]
    pub labels: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionSpec {
    /// The hook the direction lives at (and where it is read for probes).
    #[serde(default)]
    pub hook: Option<Spanned<String>>,
    /// Or candidate blocks as fractions of depth `[from, to]` (inclusive), read at
    /// `blocks.L.hook_resid_pre`: the direction is selected among them as Arditi et al. do.
    /// Read as a list so that a third element is an error, not ignored.
    #[serde(default)]
    pub layers: Option<Spanned<Vec<f64>>>,
    /// With `layers`: `"post_instruction"` (the chat template's tokens after the message) or
    /// an inclusive range of negative offsets `[-5, -1]` among them.
    #[serde(default)]
    pub positions: Option<Spanned<PositionsSpec>>,
    /// With `layers`: held-out prompt sets that select the candidate.
    #[serde(default)]
    pub validate_positive: Option<Spanned<String>>,
    #[serde(default)]
    pub validate_negative: Option<Spanned<String>>,
    /// With `layers`: the largest KL a candidate's ablation may cause on harmless prompts.
    #[serde(default)]
    pub max_kl: Option<Spanned<f64>>,
    /// With `layers`: candidates at or beyond this fraction of depth are excluded.
    #[serde(default)]
    pub max_depth: Option<Spanned<f64>>,
    /// With `layers`: how many candidates, best proxy first, get the causal scores
    /// (default 3; more finds causal directions the proxy ranks lower, at more passes).
    #[serde(default)]
    pub scored: Option<Spanned<i64>>,
    /// Difference of means: mean(positive) - mean(negative) at `position`.
    #[serde(default)]
    pub positive: Option<Spanned<String>>,
    #[serde(default)]
    pub negative: Option<Spanned<String>>,
    /// Token position (negative counts from the end; default -1, the last token).
    #[serde(default = "last")]
    pub position: i64,
    /// Or a safetensors file holding the vector.
    #[serde(default)]
    pub file: Option<Spanned<String>>,
    #[serde(default)]
    pub sha256: Option<Spanned<String>>,
    /// The tensor's name in `file` (default: its only tensor).
    #[serde(default)]
    pub tensor: Option<String>,
}

fn last() -> i64 {
    -1
}

/// The positions a selected direction's candidates are read at.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PositionsSpec {
    /// `"post_instruction"`.
    Named(String),
    /// Negative offsets `[from, to]`, inclusive (exactly two; checked at validation).
    Range(Vec<i64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    Max,
    Mean,
}

/// Which tokens of a prompt a feature probe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// Every token after the chat template's preamble.
    Prompt,
    /// The last token only (for chat prompts, the end of the assistant header, where the
    /// model has read the whole request and not yet answered).
    Last,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean log-odds of the refusal tokens at the last position.
    RefusalScore,
    /// Fraction of greedy generations the refusal classifier (`refusal.rs`) calls refusals.
    RefusalRate,
    /// Mean logit of `target.positive` minus `target.negative` at the last position.
    LogitDiff,
    /// Mean KL(clean || intervened) of next-token distributions over every position.
    Kl,
}

/// The fields every check has. The rest of a `[[checks]]` table belongs to its kind: each
/// kind's module in [`crate::checks`] has a serde struct of its own fields that rejects any
/// other key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckHead {
    pub id: Spanned<String>,
    pub kind: CheckKind,
    pub severity: Severity,
    #[serde(default)]
    pub description: Option<Spanned<String>>,
}

impl CheckHead {
    /// The keys of [`CheckHead`], split off a check's table before its kind's fields are read.
    pub const KEYS: [&'static str; 4] = ["id", "kind", "severity", "description"];
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LatentRef {
    Index(i64),
    Label(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Select {
    pub top: usize,
    pub positive: Spanned<String>,
    pub negative: Spanned<String>,
}

/// What must hold for one prompt set in a feature probe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSet {
    pub prompts: Spanned<String>,
    #[serde(default)]
    pub min_active_fraction: Option<Spanned<f64>>,
    #[serde(default)]
    pub max_active_fraction: Option<Spanned<f64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// Project this direction out at every layer.
    #[serde(default)]
    pub ablate: Option<Spanned<String>>,
    /// Add `coeff` times this (unit) direction at its hook, at every position.
    #[serde(default)]
    pub add_direction: Option<Spanned<String>>,
    /// Add `coeff` times this latent's unit decoder direction at the SAE's hook.
    #[serde(default)]
    pub add_latent: Option<Spanned<LatentRef>>,
    #[serde(default)]
    pub sae: Option<Spanned<String>>,
    #[serde(default)]
    pub coeff: Option<Spanned<f64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetTokens {
    pub positive: Spanned<Vec<Spanned<String>>>,
    pub negative: Spanned<Vec<Spanned<String>>>,
}

/// A steering check's `bounds` as written, each value with where it was written; validated
/// into [`Bounds`] (every value finite and in its range) by the steering kind.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundsSpec {
    #[serde(default)]
    pub min: Option<Spanned<f64>>,
    #[serde(default)]
    pub max: Option<Spanned<f64>>,
    #[serde(default)]
    pub min_change: Option<Spanned<f64>>,
    #[serde(default)]
    pub max_change: Option<Spanned<f64>>,
    #[serde(default)]
    pub max_relative_drop: Option<Spanned<f64>>,
    #[serde(default)]
    pub min_baseline: Option<Spanned<f64>>,
    #[serde(default)]
    pub max_flip_coeff: Option<Spanned<f64>>,
}

/// Expectations on a steering metric: `value` is the metric under the intervention,
/// `baseline` without it. Every value is finite (checked at validation).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Bounds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `value - baseline` at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_change: Option<f64>,
    /// `value - baseline` at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_change: Option<f64>,
    /// `(baseline - value) / baseline` at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_relative_drop: Option<f64>,
    /// The baseline itself at least this (e.g. the model refuses at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_baseline: Option<f64>,
    /// The smallest sweep coefficient that flips the metric is at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_flip_coeff: Option<f64>,
}
