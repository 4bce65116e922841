//! `drift`: how far each SAE latent's firing rate on a prompt set moved from a baseline (the
//! last passing audit of the model's lineage, or a saved result), with the same SAE.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{violated, Cx, Kind, Planner};
use crate::error::CheckError;
use crate::load::{Names, Validator};
use crate::result::{round, Evidence, Finding, LatentEvidence, Metric, RunResult, Status};

/// The fields of a `drift` check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub sae: Option<Spanned<String>>,
    pub prompts: Option<Spanned<String>>,
    /// `last-pass` (the last passing audit of the same model lineage) or a file holding a
    /// previous run's JSON result.
    pub baseline: Option<Spanned<String>>,
    pub max_rate_change: Option<f64>,
}

#[derive(Debug, Clone)]
pub enum Baseline {
    LastPass,
    /// A previous run's JSON result.
    File {
        path: PathBuf,
        rel: String,
    },
}

/// A validated drift check.
#[derive(Debug, Clone)]
pub struct Drift {
    pub sae: String,
    pub prompts: String,
    pub baseline: Baseline,
    pub max_rate_change: f64,
}

impl Kind for Drift {
    type Spec = Spec;

    fn validate(
        spec: Spec,
        v: &mut Validator<'_>,
        id: &Spanned<String>,
        n: &Names<'_>,
    ) -> Option<Self> {
        let s = v.required(id, "sae", &spec.sae)?;
        let sae = v.named("SAE", s, n.saes)?;
        let p = v.required(id, "prompts", &spec.prompts)?;
        let prompts = v.set(p, n.prompts)?;
        let b = v.required(id, "baseline", &spec.baseline)?;
        let baseline = if b.get_ref() == "last-pass" {
            Baseline::LastPass
        } else {
            let full = v.confined(b)?;
            v.read(b, "baseline")?;
            Baseline::File {
                path: full,
                rel: b.get_ref().clone(),
            }
        };
        let max_rate_change = *v.required(id, "max_rate_change", &spec.max_rate_change)?;
        if !(0.0..=1.0).contains(&max_rate_change) {
            v.err(
                id,
                "`max_rate_change` is a change in firing rate, within [0, 1]",
            );
        }
        Some(Drift {
            sae,
            prompts,
            baseline,
            max_rate_change,
        })
    }

    fn plan(&self, p: &mut Planner<'_, '_>) {
        plan(self, p)
    }

    fn evaluate(&self, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
        evaluate(self, cx)
    }
}

fn plan(k: &Drift, p: &mut Planner<'_, '_>) {
    let Drift { sae, prompts, .. } = k;
    if let Some(s) = p.instruments.sae_if_resolved(p.policy, sae) {
        p.want(prompts, s.hook);
    }
}

fn evaluate(k: &Drift, cx: &mut Cx<'_, '_>) -> Result<Finding, CheckError> {
    let Drift {
        sae: sae_name,
        prompts,
        baseline,
        max_rate_change: max_change,
    } = k;
    let max_change = *max_change;
    let (p, severity, check_id) = (cx.policy, cx.check.severity, cx.check.id.as_str());
    let s = cx.instruments.sae(p, sae_name)?;
    let t = cx.session.set_tokens(p, prompts)?;
    let rows = cx.session.sparse(&t, &s)?;
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    let mut n_tokens = 0usize;
    for prompt in rows.iter() {
        for row in &prompt[t.prefix.min(prompt.len())..] {
            n_tokens += 1;
            for (l, _) in row {
                *counts.entry(*l).or_default() += 1;
            }
        }
    }
    let rates: Vec<(u32, f64)> = counts
        .into_iter()
        .map(|(l, c)| (l, round(c as f64 / n_tokens.max(1) as f64)))
        .collect();
    let sae_digest = s.sae.manifest.root();
    let mut evidence = Evidence {
        firing_rates: rates.clone(),
        ..Evidence::default()
    };
    let loaded;
    let base: Option<&RunResult> = match baseline {
        Baseline::LastPass => cx.last_pass,
        Baseline::File { path, rel } => {
            let text = probes::files::read_regular(path)
                .map_err(|e| CheckError::Baseline(format!("baseline `{rel}`: {e}")))?;
            loaded = serde_json::from_slice::<RunResult>(&text).map_err(|e| {
                CheckError::Baseline(format!(
                    "baseline `{rel}` is not a mechwatch JSON result: {e}"
                ))
            })?;
            Some(&loaded)
        }
    };
    let Some(base) = base else {
        let metrics = vec![Metric {
            name: "latents firing".into(),
            value: rates.len() as f64,
            bound: String::new(),
        }];
        return Ok(Finding::new(Status::Warn, "no earlier passing audit of this model lineage to compare with; this run's firing rates are recorded as the baseline".into(), metrics, evidence));
    };
    let old = base
        .policies
        .iter()
        .filter(|bp| bp.name == p.name)
        .flat_map(|bp| bp.findings.iter())
        .find(|f| f.check == check_id)
        .ok_or_else(|| CheckError::Baseline("the baseline has no result for this check".into()))?;
    let base_sae = base
        .inputs
        .iter()
        .find(|i| i.policy == p.name && i.kind == "sae" && i.sha256 == sae_digest);
    if base_sae.is_none() {
        return Err(CheckError::Baseline(format!("the baseline was computed with a different SAE than `{sae_name}` ({sae_digest}); drift is only comparable with the same SAE")));
    }
    let old_rates: BTreeMap<u32, f64> = old.evidence.firing_rates.iter().copied().collect();
    let new_rates: BTreeMap<u32, f64> = rates.iter().copied().collect();
    let all: BTreeSet<u32> = old_rates.keys().chain(new_rates.keys()).copied().collect();
    let mut moved: Vec<(u32, f64, f64)> = all
        .into_iter()
        .map(|l| {
            (
                l,
                old_rates.get(&l).copied().unwrap_or(0.0),
                new_rates.get(&l).copied().unwrap_or(0.0),
            )
        })
        .filter(|(_, o, n)| (n - o).abs() > max_change)
        .collect();
    moved.sort_by(|a, b| {
        (b.2 - b.1)
            .abs()
            .total_cmp(&(a.2 - a.1).abs())
            .then(a.0.cmp(&b.0))
    });
    let max_seen = moved.first().map_or(0.0, |m| (m.2 - m.1).abs());
    let sets = [(&t, rows.as_slice())];
    for &(l, o, n) in moved.iter().take(10) {
        evidence.latents.push(LatentEvidence {
            sae: s.name.clone(),
            latent: l as usize,
            label: cx.session.label(&s, l, &sets),
            value: round(n - o),
            measure: format!("change in firing rate on `{prompts}` ({o:.4} -> {n:.4})"),
        });
    }
    let metrics = vec![
        Metric {
            name: "latents beyond the bound".into(),
            value: moved.len() as f64,
            bound: "<= 0".into(),
        },
        Metric {
            name: "largest firing-rate change".into(),
            value: round(max_seen),
            bound: format!("<= {max_change}"),
        },
    ];
    let (status, explanation) = if moved.is_empty() {
        (Status::Pass, format!("no latent's firing rate on `{prompts}` moved by more than {max_change} from the baseline"))
    } else {
        (violated(severity), format!("{} latents' firing rates on `{prompts}` moved by more than {max_change} from the baseline (largest {max_seen:.4})", moved.len()))
    };
    Ok(Finding::new(status, explanation, metrics, evidence))
}

#[cfg(test)]
mod tests {
    use crate::checks::testing::{metric, Tiny};
    use crate::result::Status;

    const DRIFT: &str = r#"
[[checks]]
id = "drift"
kind = "drift"
severity = "medium"
sae = "s"
prompts = "pos"
baseline = "last-pass"
max_rate_change = 0.0
"#;

    #[test]
    fn without_a_baseline_the_rates_are_recorded_with_a_warning() {
        let tiny = Tiny::new();
        let f = tiny.finding(DRIFT);
        assert_eq!(f.status, Status::Warn, "{f:?}");
        assert!(!f.evidence.firing_rates.is_empty());
        assert!(f
            .evidence
            .firing_rates
            .iter()
            .all(|(_, r)| (0.0..=1.0).contains(r)));
    }

    #[test]
    fn the_same_model_does_not_drift_from_its_own_audit() {
        let tiny = Tiny::new();
        let first = tiny.run(DRIFT, None);
        let second = tiny.run(DRIFT, Some(&first));
        let f = &second.policies[0].findings[0];
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert_eq!(metric(f, "latents beyond the bound"), 0.0);
    }

    #[test]
    fn two_runs_give_identical_results() {
        let tiny = Tiny::new();
        let a = serde_json::to_string(&tiny.run(DRIFT, None)).unwrap();
        let b = serde_json::to_string(&tiny.run(DRIFT, None)).unwrap();
        assert_eq!(a, b);
    }
}
