//! Logit-lens evidence for flagged findings, added in one place for every check kind: when a
//! finding warns or fails and its evidence names prompts, the lens at each of the first
//! [`PROMPTS`] prompts' last token (the position whose next-token prediction the model
//! makes) shows per layer the [`TOP`] most probable tokens. A person sees at which depth the
//! model settled on, say, a refusal.
//!
//! The lens is evidence, not a verdict: a prompt whose lens cannot be read is logged and left
//! out, and the finding's status never changes.

use probes::lens::{logit_lens, LensOptions};

use crate::load::Policy;
use crate::result::{round, Finding, LensEvidence, LensLayer, Status, TokenValue};
use crate::session::Session;

/// Prompts of a finding's evidence that get a lens.
pub const PROMPTS: usize = 3;
/// Tokens per layer.
pub const TOP: usize = 3;

/// Add the lens of the first prompts of `f`'s evidence, if `f` warns or fails.
pub(crate) fn attach(session: &mut Session<'_>, policy: &Policy, f: &mut Finding) {
    if !matches!(f.status, Status::Warn | Status::Fail) {
        return;
    }
    let mut seen: Vec<(String, usize)> = Vec::new();
    for pe in &f.evidence.prompts {
        if seen.len() == PROMPTS {
            break;
        }
        let key = (pe.set.clone(), pe.index);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        match lens_of(session, policy, &pe.set, pe.index, &pe.text) {
            Ok(l) => f.evidence.lens.push(l),
            Err(e) => tracing::warn!(
                policy = %policy.name,
                set = %pe.set,
                prompt = pe.index + 1,
                error = %e,
                "no logit lens for this prompt"
            ),
        }
    }
}

/// The lens at the last token of prompt `index` of set `set`.
fn lens_of(
    session: &mut Session<'_>,
    policy: &Policy,
    set: &str,
    index: usize,
    text: &str,
) -> Result<LensEvidence, String> {
    let t = session.set_tokens(policy, set).map_err(|e| e.to_string())?;
    let ids = t
        .ids
        .get(index)
        .filter(|_| t.texts.get(index).is_some_and(|s| s == text))
        .ok_or_else(|| format!("prompt {} of `{set}` is not the one shown", index + 1))?;
    let opts = LensOptions {
        position: -1,
        top: TOP,
        token: None,
    };
    let lens = logit_lens(&session.model.transformer, ids, &opts).map_err(|e| e.to_string())?;
    let last = *ids.last().expect("logit_lens refuses an empty prompt");
    Ok(LensEvidence {
        set: set.to_string(),
        index,
        token: session.token_text(last),
        layers: lens
            .layers
            .iter()
            .map(|l| LensLayer {
                layer: l.label(),
                top: l
                    .top
                    .iter()
                    .map(|r| TokenValue {
                        token: session.token_text(r.id),
                        value: round(r.prob),
                    })
                    .collect(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use crate::checks::testing::Tiny;
    use crate::result::Status;

    /// A direction probe held to separate the sets the wrong way round: it fails.
    const REVERSED: &str = r#"
[[checks]]
id = "reversed"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "neg"
negative = "pos"
min_auroc = 0.9
"#;

    #[test]
    fn a_failing_finding_gets_the_lens_of_its_first_prompts() {
        let tiny = Tiny::new();
        let f = tiny.finding(REVERSED);
        assert_eq!(f.status, Status::Fail, "{f:?}");
        assert_eq!(f.evidence.lens.len(), super::PROMPTS, "{f:?}");
        let n_layers = tiny.model.config().n_layers;
        for (l, p) in f.evidence.lens.iter().zip(&f.evidence.prompts) {
            assert_eq!((&l.set, l.index), (&p.set, p.index));
            assert_eq!(l.layers.len(), n_layers + 1);
            assert_eq!(l.layers[0].layer, "embed");
            assert_eq!(l.layers[n_layers].layer, (n_layers - 1).to_string());
            for layer in &l.layers {
                assert_eq!(layer.top.len(), super::TOP);
                assert!(layer.top.windows(2).all(|w| w[0].value >= w[1].value));
            }
        }
        // The last layer's top token is the model's own greedy prediction.
        let t = tiny
            .model
            .encode_prompt(&f.evidence.prompts[0].text, false)
            .unwrap();
        let out = tiny
            .model
            .transformer
            .forward(
                &[t],
                probes::Padding::Right,
                &probes::Hooks::new(),
                probes::Unembed::Last,
            )
            .unwrap();
        let logits: Vec<f32> = out.logits.unwrap().get(0).unwrap().to_vec1().unwrap();
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap();
        let top = &f.evidence.lens[0].layers[n_layers].top[0];
        assert_eq!(top.token, tiny.model.codec.token_text(best as u32));
        // Deterministic: the same run gives the same lens.
        assert_eq!(tiny.finding(REVERSED).evidence.lens, f.evidence.lens);
    }

    #[test]
    fn a_passing_finding_gets_no_lens() {
        let tiny = Tiny::new();
        let f = tiny.finding(&REVERSED.replace(
            "= \"neg\"\nnegative = \"pos\"",
            "= \"pos\"\nnegative = \"neg\"",
        ));
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert!(!f.evidence.prompts.is_empty() && f.evidence.lens.is_empty());
    }
}
