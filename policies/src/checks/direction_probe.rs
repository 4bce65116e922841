//! `direction_probe`: how well a direction's projection separates two prompt sets (AUROC),
//! with the prompts it ranks worst and, optionally, the SAE latents that carry the behaviour
//! it stands for (the policy's refusal score; see `attribution.rs`).

use probes::sae::search::auroc;

use serde::Deserialize;
use toml::Spanned;

use super::{at_least, attribution, violated, Cx, Kind, Planner};
use crate::error::CheckError;
use crate::load::{Names, Validator};
use crate::metrics::Behaviour;
use crate::result::{round, Distribution, Evidence, Finding, Metric, PromptEvidence, Status};
use crate::session::{at_position, dot};

/// The fields of a `direction_probe` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub direction: Option<Spanned<String>>,
    pub positive: Option<Spanned<String>>,
    pub negative: Option<Spanned<String>>,
    pub min_auroc: Option<Spanned<f64>>,
    /// Attribute the policy's refusal score on the positive prompts to this SAE's latents
    /// (attribution patching, checked by ablating the top latents).
    #[serde(default)]
    pub attribute_with: Option<Spanned<String>>,
}

/// A validated direction probe.
#[derive(Debug, Clone)]
pub struct DirectionProbe {
    pub direction: String,
    pub positive: String,
    pub negative: String,
    pub min_auroc: f64,
    pub attribute_with: Option<String>,
}

impl Kind for DirectionProbe {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self> {
        let d = v.required(id, "direction", &spec.direction)?;
        let direction = v.named("direction", d, n.directions)?;
        let positive = v.required(id, "positive", &spec.positive)?;
        let negative = v.required(id, "negative", &spec.negative)?;
        let (positive, negative) =
            v.contrast(("positive", positive), ("negative", negative), n.prompts)?;
        let min_auroc = v.required(id, "min_auroc", &spec.min_auroc)?;
        let min_auroc = v.within(min_auroc, "min_auroc", 0.0, 1.0)?;
        let attribute_with = match &spec.attribute_with {
            Some(s) => Some(v.named("SAE", s, n.saes)?),
            None => None,
        };
        Some(DirectionProbe {
            direction,
            positive,
            negative,
            min_auroc,
            attribute_with,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        plan(self, p)
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        evaluate(self, cx)
    }
}

fn plan(k: &DirectionProbe, p: &mut Planner<'_, '_>) {
    let DirectionProbe {
        direction,
        positive,
        negative,
        attribute_with,
        ..
    } = k;
    let Some(h) = p.direction_hook(direction) else {
        return;
    };
    p.want(positive, h);
    p.want(negative, h);
    let attribution = attribute_with
        .as_deref()
        .and_then(|a| p.instruments.sae_if_resolved(p.policy, a));
    if let Some(a) = attribution {
        p.want(positive, a.hook);
    }
}

fn evaluate(k: &DirectionProbe, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
    let DirectionProbe {
        direction: name,
        positive,
        negative,
        min_auroc,
        attribute_with,
    } = k;
    let min_auroc = *min_auroc;
    let (p, severity) = (cx.policy, cx.check.severity);
    let d = cx.instruments.direction(p, name)?;
    let session = &mut *cx.session;
    let mut evidence = Evidence::default();
    let mut scores = Vec::new();
    for set in [positive, negative] {
        let t = session.set_tokens(p, set)?;
        let acts = session.acts(&t, d.hook)?;
        let v = acts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                at_position(a, d.position)
                    .map(|x| dot(&x, &d.unit))
                    .ok_or_else(|| CheckError::Position {
                        position: d.position,
                        prompt: i + 1,
                        set: set.to_string(),
                    })
            })
            .collect::<Result<Vec<f64>, CheckError>>()?;
        evidence.distributions.push(Distribution {
            set: set.to_string(),
            values: v.iter().map(|x| round(*x)).collect(),
        });
        scores.push((t, acts, v));
    }
    // A direction that ranks no prompt above another (every projection the same: identical
    // prompts, or a direction the hook does not carry) gives AUROC 0.5 by ties alone.
    let all = scores.iter().flat_map(|s| s.2.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if lo == hi {
        return Err(CheckError::Unmeasurable(format!(
            "every prompt of `{positive}` and `{negative}` projects to {lo:.6} on direction \
             `{name}`: with every score tied, the AUROC measures nothing"
        )));
    }
    let to32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let a = auroc(&to32(&scores[0].2), &to32(&scores[1].2));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mp, mn) = (mean(&scores[0].2), mean(&scores[1].2));
    // The prompts the direction ranks worst: the lowest positives and the highest negatives.
    for (k, (t, acts, v)) in scores.iter().enumerate() {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&x, &y| v[x].total_cmp(&v[y]).then(x.cmp(&y)));
        if k == 1 {
            order.reverse();
        }
        for &i in order.iter().take(3) {
            let proj: Vec<f64> = (0..acts[i].dim(0).unwrap_or(0))
                .map(|r| acts[i].get(r).map(|x| dot(&x, &d.unit)).unwrap_or(f64::NAN))
                .collect();
            evidence.prompts.push(PromptEvidence {
                set: t.name.clone(),
                index: i,
                text: t.texts[i].clone(),
                value: round(v[i]),
                why: if k == 0 {
                    "lowest projection among the positive prompts".into()
                } else {
                    "highest projection among the negative prompts".into()
                },
                tokens: session.token_values(t, i, |r| proj[r]),
            });
        }
    }
    let mut attributed = None;
    if let Some(sae_name) = attribute_with {
        let s = cx.instruments.sae(p, sae_name)?;
        let t = scores[0].0.clone();
        let (ids, chosen) = cx.instruments.score_tokens(session, p)?;
        evidence.refusal_tokens = chosen;
        let (latents, fit) =
            attribution::attribute(session, &s, &t, &Behaviour::RefusalScore(ids))?;
        evidence.latents = latents;
        attributed = Some(fit);
    }
    let mut metrics = vec![
        Metric {
            name: format!("AUROC ({positive} vs {negative})"),
            value: round(a),
            bound: format!(">= {min_auroc}"),
        },
        Metric {
            name: format!("mean projection on {positive}"),
            value: round(mp),
            bound: String::new(),
        },
        Metric {
            name: format!("mean projection on {negative}"),
            value: round(mn),
            bound: String::new(),
        },
        Metric {
            name: "direction norm".into(),
            value: round(d.norm),
            bound: String::new(),
        },
    ];
    metrics.extend(attributed);
    let met = at_least("the AUROC", a, min_auroc)?;
    let status = if met {
        Status::Pass
    } else {
        violated(severity)
    };
    let explanation = format!(
        "direction `{name}` at `{}` separates `{positive}` from `{negative}` with AUROC {:.3} ({} the required {min_auroc}); mean projections {:.2} vs {:.2}",
        d.hook, a, if met { "meets" } else { "below" }, mp, mn
    );
    Ok(Finding::new(status, explanation, metrics, evidence))
}

#[cfg(test)]
mod tests {
    use crate::checks::testing::{metric, Tiny};
    use crate::result::Status;

    const PROBE: &str = r#"
[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "pos"
negative = "neg"
min_auroc = 0.9
"#;

    #[test]
    fn a_difference_of_means_separates_its_own_prompt_sets() {
        let tiny = Tiny::new();
        let f = tiny.finding(PROBE);
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert!(metric(&f, "AUROC") >= 0.9, "{f:?}");
        let (p, n) = (
            metric(&f, "mean projection on pos"),
            metric(&f, "mean projection on neg"),
        );
        // The direction is mean(pos) - mean(neg): its unit projection of the two means
        // differs by exactly its norm.
        let norm = metric(&f, "direction norm");
        assert!(
            ((p - n) - norm).abs() < 1e-3 * norm.max(1.0),
            "{p} {n} {norm}"
        );
        // The worst-ranked prompts are shown with per-token projections.
        assert_eq!(f.evidence.prompts.len(), 6);
        assert!(f.evidence.prompts.iter().all(|e| e.tokens.len() == 5));
    }

    #[test]
    fn a_direction_whose_every_score_ties_is_an_error_not_a_pass() {
        // At the embedding, the last position's activation is its token's embedding alone:
        // sets of different prompts that all end in `w5` project to one value, and the AUROC
        // of 0.5 that ties give would meet `min_auroc = 0.5`.
        let tiny = Tiny::new();
        let prompts = tiny.dir.path().join("policy/prompts");
        std::fs::write(prompts.join("tie_a.txt"), "w10 w5\nw12 w5\n").unwrap();
        std::fs::write(prompts.join("tie_b.txt"), "w11 w5\nw13 w5\n").unwrap();
        let checks = r#"
[prompts.tie_a]
file = "prompts/tie_a.txt"
chat = false

[prompts.tie_b]
file = "prompts/tie_b.txt"
chat = false

[[checks]]
id = "ties"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "tie_a"
negative = "tie_b"
min_auroc = 0.5
"#;
        let policy = tiny
            .policy_at("hook_embed", checks)
            .expect("the policy validates");
        let r = crate::checks::testing::run_policy(&tiny.model, &policy.path);
        let f = &r.policies[0].findings[0];
        assert_eq!(f.status, Status::Error, "{f:?}");
        assert!(
            f.explanation.contains("every score tied"),
            "{}",
            f.explanation
        );
    }

    #[test]
    fn a_prompt_of_no_tokens_is_an_error_naming_its_file_and_line() {
        let tiny = Tiny::new();
        let prompts = tiny.dir.path().join("policy/prompts");
        // Whitespace only: the tiny tokenizer reads no token in it.
        std::fs::write(
            prompts.join("blank.jsonl"),
            "{\"prompt\": \"w3\"}\n\n{\"prompt\": \" \"}\n",
        )
        .unwrap();
        let checks = PROBE.replace("negative = \"neg\"", "negative = \"blank\"");
        let checks =
            format!("\n[prompts.blank]\nfile = \"prompts/blank.jsonl\"\nchat = false\n{checks}");
        let policy = tiny.policy(&checks).expect("the policy validates");
        let mut quiet = |_: &str| {};
        let mut opts = crate::engine::RunOptions {
            last_pass: None,
            progress: &mut quiet,
            micro_batch: 3,
            lineage: None,
            store: None,
            reference: None,
        };
        let shown = match crate::engine::run(&tiny.model, &[policy], &mut opts) {
            Ok((r, ..)) => r.policies[0].findings[0].explanation.clone(),
            Err(e) => e.to_string(),
        };
        assert!(shown.contains("prompt 2 ("), "{shown}");
        assert!(
            shown.contains("prompts/blank.jsonl:3) has no tokens"),
            "{shown}"
        );
    }

    #[test]
    fn attribution_ranks_latents_by_estimate_and_ablates_the_top_ones() {
        let tiny = Tiny::new();
        let f = tiny.finding(&format!("{PROBE}attribute_with = \"s\"\n"));
        let values: Vec<f64> = f.evidence.latents.iter().map(|l| l.value).collect();
        assert!(!values.is_empty(), "{f:?}");
        assert!(
            values.windows(2).all(|w| w[0].abs() >= w[1].abs()),
            "{values:?}"
        );
        let latents = &f.evidence.latents;
        assert!(latents.iter().all(|l| l.effect.is_some_and(f64::is_finite)));
        assert!(latents[0]
            .measure
            .contains("without the latent at `blocks.0.hook_resid_post`"));
        let r = metric(&f, "latent attribution: pearson correlation");
        assert!(r.is_nan() || (-1.0..=1.0).contains(&r), "{r}");
    }

    #[test]
    fn fields_of_another_kind_are_refused_at_their_line() {
        let tiny = Tiny::new();
        let errors = tiny
            .policy(&format!("{PROBE}max_tokens = 8\n"))
            .unwrap_err();
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            shown
                .iter()
                .any(|e| e.contains("unknown field `max_tokens`") && e.contains("direction_probe")),
            "{shown:?}"
        );
    }
}
