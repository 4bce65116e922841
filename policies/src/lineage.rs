//! A model lineage's instruments. The SAEs and directions of a run are pinned in its record
//! ([`PinnedInstrument`]); a later run of the same lineage reuses the pins of the lineage's
//! last passing audit instead of computing its own, so that drift and probes compare
//! checkpoints with the same instruments. Here: which pin a definition reuses, whether the
//! lineage's reference can share instruments with this checkpoint at all, and the digest of
//! each instrument's definition.

use probes::digest::sha256_hex;
use probes::{HookPoint, Model};
use serde_json::json;

use crate::load::{Direction, DirectionSource, Policy};
use crate::result::{PinnedInstrument, RefusalToken, RunResult};

/// The pins a run may reuse, read from its lineage's last passing audit.
#[derive(Debug, Default)]
pub(crate) struct Lineage {
    pub name: String,
    pins: Vec<PinnedInstrument>,
    /// Why this checkpoint cannot use the lineage's instruments (another architecture, width
    /// or tokenizer: the lineage name was reused for an unrelated model).
    pub unrelated: Option<String>,
}

impl Lineage {
    /// The lineage `name` of `model`, whose last passing audit is `last_pass`.
    pub fn new(name: &str, last_pass: Option<&RunResult>, model: &Model) -> Self {
        let Some(base) = last_pass else {
            return Self {
                name: name.to_string(),
                ..Self::default()
            };
        };
        let info = model.info();
        let b = &base.model;
        let vocab_differs = b.vocab_size != 0 && b.vocab_size != info.vocab_size;
        // Records written before the tokenizer's digest was recorded leave it empty.
        let tokenizer = model.codec.digest();
        let tokenizer_differs = !b.tokenizer_digest.is_empty() && b.tokenizer_digest != tokenizer;
        let unrelated = (b.architecture != info.architecture
            || b.n_layers != info.n_layers
            || b.d_model != info.d_model
            || vocab_differs
            || tokenizer_differs)
            .then(|| {
                let tokenizers = if tokenizer_differs {
                    format!(
                        ", and its tokenizer (sha256 {}) is not this checkpoint's (sha256 \
                         {tokenizer})",
                        b.tokenizer_digest
                    )
                } else {
                    String::new()
                };
                format!(
                    "the lineage `{name}` was last audited on {} ({}), a {} model with {} layers, \
                     d_model {} and {} tokens; this checkpoint is a {} model with {} layers, \
                     d_model {} and {} tokens{tokenizers}, so it cannot share that lineage's \
                     instruments. A lineage holds checkpoints of one model: audit this one \
                     under its own `--lineage`",
                    b.path,
                    b.digest,
                    b.architecture,
                    b.n_layers,
                    b.d_model,
                    b.vocab_size,
                    info.architecture,
                    info.n_layers,
                    info.d_model,
                    info.vocab_size
                )
            });
        Self {
            name: name.to_string(),
            pins: base.instruments.clone(),
            unrelated,
        }
    }

    /// The pin of `policy`'s instrument `name` of `kind`, if its definition is unchanged.
    pub fn pin(
        &self,
        policy: &str,
        name: &str,
        kind: &str,
        recipe: &str,
    ) -> Option<&PinnedInstrument> {
        self.pins
            .iter()
            .find(|i| i.policy == policy && i.name == name && i.kind == kind && i.recipe == recipe)
    }
}

/// The digest of a policy's measured refusal tokens' definition: the text of the prompt sets
/// they are chosen from, the reply length, the classifier and the ratio that keeps a token.
pub(crate) fn refusal_tokens_recipe(
    p: &Policy,
    refusing: &str,
    complying: &str,
    max_tokens: usize,
) -> String {
    let recipe = json!({
        "refusing": set_definition(p, refusing),
        "complying": set_definition(p, complying),
        "max_tokens": max_tokens,
        "classifier": "markers",
        "min_ratio": crate::refusal::MIN_RATIO,
    });
    sha256_hex(recipe.to_string().as_bytes())
}

/// The definition of `p`'s prompt set `name` in a recipe: its text and whether it is chatted.
pub(crate) fn set_definition(p: &Policy, name: &str) -> Option<serde_json::Value> {
    p.prompt_sets
        .get(name)
        .map(|s| json!({"chat": s.chat, "prompts": s.prompts}))
}

/// The digest that names an instrument a pin carries itself (its canonical JSON).
pub fn content_digest(content: &impl serde::Serialize) -> String {
    sha256_hex(json!(content).to_string().as_bytes())
}

/// The digest that names a set of chosen refusal tokens (their canonical JSON).
pub fn refusal_tokens_digest(tokens: &[RefusalToken]) -> String {
    content_digest(&tokens)
}

/// The digest of a builtin SAE's definition (the hook it is read at, if the policy says).
pub(crate) fn builtin_sae_recipe(hook: Option<&str>) -> String {
    sha256_hex(
        json!({"builtin": "default", "hook": hook})
            .to_string()
            .as_bytes(),
    )
}

/// The digest of a direction's definition: its hook as resolved on the model (so a fraction of
/// depth and the block it names are the same definition), position and the text of its
/// prompt sets (or its vector).
pub(crate) fn direction_recipe(p: &Policy, d: &Direction, hook: Option<HookPoint>) -> String {
    let set = |name: &str| {
        p.prompt_sets
            .get(name)
            .map(|s| json!({"chat": s.chat, "prompts": s.prompts}))
    };
    let source = match &d.source {
        DirectionSource::Contrast {
            positive,
            negative,
            position,
        } => json!({"positive": set(positive), "negative": set(negative), "position": position}),
        DirectionSource::File { vector } => json!({"vector": vector}),
    };
    // A fixed hook as resolved on the model; a selected direction has none until chosen.
    let mut recipe = json!({"hook": hook.map(|h| h.to_string()), "source": source});
    if let Some(sel) = &d.select {
        recipe["select"] = json!({
            "layers": sel.layers.value,
            "positions": sel.positions.value,
            "validate_positive": set(&sel.validate_positive),
            "validate_negative": set(&sel.validate_negative),
            "max_kl": sel.max_kl,
            "max_depth": sel.max_depth,
            "scored": sel.scored,
            "scored_prompts": crate::selection::SCORED_PROMPTS,
        });
    }
    sha256_hex(recipe.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::Tiny;

    const PROBE: &str = r#"
[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "pos"
negative = "neg"
min_auroc = 0.5
"#;

    #[test]
    fn a_lineage_of_another_width_is_unrelated() {
        let tiny = Tiny::new();
        let mut base = tiny.run(PROBE, None);
        assert!(Lineage::new("t", Some(&base), &tiny.model)
            .unrelated
            .is_none());
        base.model.d_model += 1;
        let why = Lineage::new("t", Some(&base), &tiny.model)
            .unrelated
            .expect("another width is unrelated");
        assert!(
            why.contains("lineage `t`") && why.contains("--lineage"),
            "{why}"
        );
    }

    #[test]
    fn a_lineage_with_another_tokenizer_is_unrelated() {
        let tiny = Tiny::new();
        let mut base = tiny.run(PROBE, None);
        assert_eq!(base.model.tokenizer_digest, tiny.model.codec.digest());
        assert_eq!(base.model.tokenizer_digest.len(), 64);
        // The same vocabulary size and shape, another tokenizer.
        let ours = base.model.tokenizer_digest.clone();
        base.model.tokenizer_digest = "0".repeat(64);
        let why = Lineage::new("t", Some(&base), &tiny.model)
            .unrelated
            .expect("another tokenizer is unrelated");
        assert!(
            why.contains("lineage `t`") && why.contains(&"0".repeat(64)) && why.contains(&ours),
            "{why}"
        );
    }

    #[test]
    fn a_record_without_a_tokenizer_digest_is_not_unrelated() {
        let tiny = Tiny::new();
        let base = tiny.run(PROBE, None);
        let mut json = serde_json::to_value(&base).unwrap();
        json["model"]
            .as_object_mut()
            .unwrap()
            .remove("tokenizer_digest")
            .expect("the digest is recorded");
        let old: RunResult = serde_json::from_value(json).unwrap();
        assert!(old.model.tokenizer_digest.is_empty());
        assert!(!serde_json::to_string(&old.model)
            .unwrap()
            .contains("tokenizer_digest"));
        assert!(Lineage::new("t", Some(&old), &tiny.model)
            .unrelated
            .is_none());
    }

    #[test]
    fn a_changed_definition_is_not_reused() {
        let tiny = Tiny::new();
        let p = tiny.policy(PROBE).unwrap();
        let d = &p.directions["d"];
        let r = direction_recipe(&p, d, Some(HookPoint::ResidPost(1)));
        assert_ne!(direction_recipe(&p, d, Some(HookPoint::ResidPost(0))), r);
        let mut elsewhere = d.clone();
        if let DirectionSource::Contrast { position, .. } = &mut elsewhere.source {
            *position = 0;
        }
        assert_ne!(
            direction_recipe(&p, &elsewhere, Some(HookPoint::ResidPost(1))),
            r
        );
        assert_eq!(direction_recipe(&p, d, Some(HookPoint::ResidPost(1))), r);
    }
}
