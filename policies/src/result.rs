//! The result of a run: one serde structure that the audit log signs, the gate prints and the
//! reports render. Numbers are rounded to 6 significant digits so that the same inputs give
//! byte-identical JSON.

use serde::{Deserialize, Serialize};

use crate::load::InputFile;
use crate::schema::{CheckKind, ModelMatch, Severity};

/// The outcome of one check, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    /// Could not check. Never a pass.
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRef {
    /// Checkpoints of one lineage are compared with each other (drift, trends).
    pub lineage: String,
    pub path: String,
    pub digest: String,
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    /// The tokenizer's vocabulary size (0 in records written before it was recorded).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vocab_size: usize,
    /// sha256 of the tokenizer's canonical content (vocabulary, merges, special tokens; see
    /// `probes::tokenizer::TextCodec::digest`); empty in records written before it was
    /// recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tokenizer_digest: String,
    /// The arithmetic the checks ran in (`policies::engine::AUDIT_PRECISION`); empty in
    /// records written before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub precision: String,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub model: ModelRef,
    /// The worst status of every check of every applicable policy.
    pub verdict: Status,
    /// Every file read, with its digest (policies, prompt sets, SAEs, labels, directions).
    pub inputs: Vec<InputRecord>,
    /// The instruments the checks measured with (SAEs, directions, refusal tokens, selected
    /// latents), pinned to the lineage's reference checkpoint; later checkpoints of the
    /// lineage reuse exactly these (see [`crate::lineage`]). Absent in records written before instruments were pinned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instruments: Vec<PinnedInstrument>,
    pub policies: Vec<PolicyResult>,
}

/// One instrument a run measured with, as the signed record names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PinnedInstrument {
    pub policy: String,
    /// The policy's own name for it (`[saes.NAME]`, `[directions.NAME]`), or for an
    /// instrument a check defines, the check's id.
    pub name: String,
    /// `sae`, `direction`, `refusal-tokens` or `latent-selection`.
    pub kind: String,
    /// The instrument's content: an SAE's manifest root, the sha256 of the direction's file
    /// in the instrument store, or for content the pin carries (refusal tokens, selected
    /// latents) the digest of its canonical JSON.
    pub sha256: String,
    /// sha256 of the policy's definition it was computed from (hook, position, the prompt
    /// sets' text); a changed definition is computed afresh rather than reused.
    pub recipe: String,
    /// The digest of the checkpoint it was computed on (empty for an instrument read from a
    /// policy's own file).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reference: String,
    /// Where it came from: `shipped`, `built on <digest>` or `file`.
    pub origin: String,
    /// For a direction selected among candidates: the choice and every candidate's scores,
    /// from the run that selected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<SelectionRecord>,
    /// For measured refusal-score tokens: the tokens themselves, with the counts that chose
    /// them (`sha256` is their digest, [`crate::lineage::refusal_tokens_digest`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusal_tokens: Vec<RefusalToken>,
    /// For a feature probe's selected latents (`latent-selection`): the latents in the order
    /// chosen, with what each added (`sha256` is their digest,
    /// [`crate::lineage::content_digest`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latents: Vec<SelectedLatent>,
}

/// A latent a feature probe selected to separate two prompt sets: its label, and how many
/// prompts of each set the latents chosen up to it cover (a prompt is covered when any of
/// them fires on it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct SelectedLatent {
    pub latent: u32,
    pub label: String,
    pub positive_covered: usize,
    pub positive_prompts: usize,
    pub negative_covered: usize,
    pub negative_prompts: usize,
}

/// How a direction was selected among its candidates (Arditi et al. 2024): every candidate's
/// proxy score, the causal scores of the best few, and the filter that rejected each.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelectionRecord {
    /// The chosen candidate's hook (`blocks.L.hook_resid_pre`) and position.
    pub hook: String,
    pub position: i64,
    /// How many blocks' best candidates (best proxy first, within the depth limit) got causal
    /// scores.
    pub scored: usize,
    /// Validation prompts per set the causal scores average over.
    pub prompts: usize,
    /// The mean refusal scores of those prompts without any intervention: a candidate's
    /// ablation must lower the harmful one and its addition raise the harmless one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmful_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harmless_score: Option<f64>,
    /// Every candidate, by layer then position.
    pub candidates: Vec<CandidateRecord>,
}

impl SelectionRecord {
    /// A total order over every field (scores by their bits: records never hold NaN).
    fn key(&self) -> impl Ord + '_ {
        let bits = |x: Option<f64>| x.map(f64::to_bits);
        (
            &self.hook,
            self.position,
            self.scored,
            self.prompts,
            bits(self.harmful_score),
            bits(self.harmless_score),
            &self.candidates,
        )
    }
}

impl PartialEq for SelectionRecord {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for SelectionRecord {}

impl PartialOrd for SelectionRecord {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SelectionRecord {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// One candidate's scores. `proxy`: separation (Cohen's d) of the validation sets'
/// projections; `bypass`: mean refusal score on harmful prompts with it ablated everywhere;
/// `induce`: mean refusal score on harmless prompts with it added at its layer; `kl`: mean
/// last-position KL on harmless prompts, ablated against clean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateRecord {
    pub layer: usize,
    pub position: i64,
    pub proxy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bypass: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub induce: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// `chosen`, `kept` (passed every filter, a higher bypass score than the chosen), or why
    /// it was rejected (`depth`, `not scored`, `bypass`, `induce`, `kl`, `zero length`, with
    /// figures).
    pub outcome: String,
}

impl CandidateRecord {
    /// A total order over every field (scores by their bits: records never hold NaN).
    fn key(&self) -> impl Ord + '_ {
        let bits = |x: Option<f64>| x.map(f64::to_bits);
        (
            self.layer,
            self.position,
            self.proxy.to_bits(),
            bits(self.bypass),
            bits(self.induce),
            bits(self.kl),
            &self.outcome,
        )
    }
}

impl PartialEq for CandidateRecord {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for CandidateRecord {}

impl PartialOrd for CandidateRecord {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CandidateRecord {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct InputRecord {
    pub policy: String,
    pub kind: String,
    pub path: String,
    pub sha256: String,
}

impl InputRecord {
    pub fn new(policy: &str, f: &InputFile) -> Self {
        Self {
            policy: policy.to_string(),
            kind: f.kind.clone(),
            path: f.path.clone(),
            sha256: f.sha256.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyResult {
    pub name: String,
    pub version: String,
    pub description: String,
    /// sha256 of the policy file.
    pub digest: String,
    pub models: ModelMatch,
    /// False when the policy's `[models]` matcher excludes this model; it then has no findings.
    pub applies: bool,
    pub verdict: Status,
    pub findings: Vec<Finding>,
}

/// What one check found, with the evidence behind it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub check: String,
    pub kind: CheckKind,
    pub severity: Severity,
    pub status: Status,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Why the status is what it is, in one or two sentences a person can read.
    pub explanation: String,
    /// The numbers the status was decided on, by name.
    pub metrics: Vec<Metric>,
    #[serde(default)]
    pub evidence: Evidence,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    pub name: String,
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    /// The bound it was held to, e.g. `>= 0.9`, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bound: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Evidence {
    /// The prompts behind the finding (those that violated an expectation first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<PromptEvidence>,
    /// SAE latents, by attribution to the checked behaviour or as the probe's own latents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latents: Vec<LatentEvidence>,
    /// Per prompt set, each prompt's score (for distribution plots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distributions: Vec<Distribution>,
    /// Steering: the metric at each swept coefficient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<SweepPoint>,
    /// Steering: greedy generations with and without the intervention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub generations: Vec<GenerationPair>,
    /// Steering: the metric's mean over the prompt set without and with the intervention
    /// (absent in records written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intervention: Option<InterventionMeans>,
    /// Drift: every latent's firing rate on the check's prompts (sparse), for later baselines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firing_rates: Vec<(u32, f64)>,
    /// Induction: attention heads with their scores, the best induction heads first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heads: Vec<HeadScores>,
    /// Induction: the attention patterns of the top heads on one sequence, downsampled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<AttentionPattern>,
    /// Warn and fail findings: the logit lens at the last token of the first prompts shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lens: Vec<LensEvidence>,
    /// Steering: the refusal score's tokens as chosen from the model's own replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusal_tokens: Vec<RefusalToken>,
    /// Attribution patching: the components patched for real, the largest estimate first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentEffect>,
    /// Attribution patching: the residual stream's estimates, layer x position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution_map: Option<AttributionMap>,
}

/// A first token kept for the refusal score, with how many of the model's refusals and
/// compliant replies to the policy's training prompts start with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefusalToken {
    pub token: String,
    pub id: u32,
    pub refusals: usize,
    pub compliant: usize,
}

/// One component of an attribution-patching check (see `checks/attribution_patching.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ComponentEffect {
    /// Its hook's name, with the position or head in brackets
    /// (`blocks.3.hook_resid_pre[4]`, `blocks.3.attn.hook_result[5]`, `blocks.3.hook_mlp_out`).
    pub component: String,
    /// `grad(metric at corrupted) . (clean - corrupted)`, mean over the pairs.
    #[serde(deserialize_with = "nan_if_null")]
    pub estimate: f64,
    /// The metric's change when the component is patched for real, mean over the pairs.
    #[serde(deserialize_with = "nan_if_null")]
    pub effect: f64,
}

/// The residual stream's attribution estimates, for the layer x position plot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttributionMap {
    /// The hook of every row (`hook_resid_pre`).
    pub hook: String,
    /// The first clean prompt's tokens, one per column.
    pub tokens: Vec<String>,
    /// `rows[layer][position]`: the mean estimate over the pairs.
    pub rows: Vec<Vec<f64>>,
}

/// One attention head's scores on repeated random tokens (see `checks/induction.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadScores {
    pub layer: usize,
    pub head: usize,
    /// Mean attention from each second-repeat token to the token after its first occurrence.
    #[serde(deserialize_with = "nan_if_null")]
    pub induction: f64,
    /// Mean attention from each token to the one before it.
    #[serde(deserialize_with = "nan_if_null")]
    pub previous_token: f64,
    /// Mean attention from each second-repeat token to its first occurrence.
    #[serde(deserialize_with = "nan_if_null")]
    pub duplicate_token: f64,
}

/// A head's attention pattern on one sequence, mean-pooled over `stride` x `stride` blocks
/// of (query, key) positions so that a record stays small.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttentionPattern {
    pub layer: usize,
    pub head: usize,
    /// The sequence's index among the check's random sequences.
    pub sequence: usize,
    /// Positions per cell along each axis.
    pub stride: usize,
    /// `rows[query cell][key cell]`: mean attention in that block.
    pub rows: Vec<Vec<f64>>,
}

/// The logit lens at the last token of one prompt of the evidence: per layer, the most
/// probable next tokens read from the residual stream through the model's final norm and
/// unembedding (the model as it is, without any intervention of the check).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LensEvidence {
    pub set: String,
    pub index: usize,
    /// The token read: the templated prompt's last.
    pub token: String,
    /// The embedding first, then one per block.
    pub layers: Vec<LensLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LensLayer {
    /// `embed` or the block's index.
    pub layer: String,
    /// The most probable tokens, most probable first; `value` is the probability.
    pub top: Vec<TokenValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptEvidence {
    pub set: String,
    pub index: usize,
    pub text: String,
    /// The prompt's score for this check (activation, projection or metric).
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    /// Why this prompt is shown, e.g. "harmful prompt on which no probe latent fired".
    pub why: String,
    /// Per token (of the templated prompt): its text and the score there, for highlighting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenValue {
    pub token: String,
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatentEvidence {
    pub sae: String,
    pub latent: usize,
    /// From the SAE's labels file, or `auto: …` built from the tokens it fires on most.
    pub label: String,
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    /// For attributed latents: the behaviour's real drop when the latent is removed, beside
    /// the estimate in `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<f64>,
    /// How `value` (and `effect`) were computed.
    pub measure: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Distribution {
    pub set: String,
    #[serde(deserialize_with = "nans_if_null")]
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepPoint {
    pub coeff: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
}

/// A steering check's metric on its prompt set, without and with the intervention: the
/// figures of its first two metrics, with the set and the metric named for plotting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterventionMeans {
    /// The prompt set.
    pub set: String,
    /// The metric, as the finding's metrics name it (`refusal rate`, `refusal score`, ...).
    pub metric: String,
    #[serde(deserialize_with = "nan_if_null")]
    pub without: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub with: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationPair {
    pub prompt: String,
    pub baseline: String,
    pub intervened: String,
    pub baseline_refused: bool,
    pub intervened_refused: bool,
}

/// JSON has no NaN: serde_json writes it as `null`, read back here as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn nans_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// `x` rounded to 6 significant digits (non-finite values are kept as they are, and never
/// reach a pass).
pub fn round(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let digits = 6 - 1 - x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits.clamp(-300, 300));
    (x * scale).round() / scale
}

impl RunResult {
    /// The failing, warning and erroring findings with their policy, worst first.
    pub fn flagged(&self) -> Vec<(&PolicyResult, &Finding)> {
        let mut v: Vec<_> = self
            .policies
            .iter()
            .flat_map(|p| p.findings.iter().map(move |f| (p, f)))
            .filter(|(_, f)| f.status != Status::Pass)
            .collect();
        v.sort_by(|a, b| {
            b.1.status
                .cmp(&a.1.status)
                .then(b.1.severity.cmp(&a.1.severity))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_six_significant_digits() {
        assert_eq!(round(0.123456789), 0.123457);
        assert_eq!(round(123456.789), 123457.0);
        assert_eq!(round(-2.5e-8), -2.5e-8);
        assert!(round(f64::NAN).is_nan());
    }

    #[test]
    fn nan_survives_a_json_round_trip() {
        let m = Metric {
            name: "flip coefficient".into(),
            value: f64::NAN,
            bound: "<= 4".into(),
        };
        let back: Metric = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert!(back.value.is_nan());
    }

    #[test]
    fn error_is_worse_than_fail() {
        assert!(Status::Error > Status::Fail && Status::Fail > Status::Warn);
    }
}
