//! The text report: the verdict, failing checks with their evidence, then a line per passing
//! check; or, when the run could not check, the stage and the error.

use policies::result::{RunResult, Status};

use super::{clip, Outcome};

pub fn render(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Checked(r) => checked(r),
        Outcome::CouldNotCheck(e) => {
            let mut s = String::from("mechwatch verdict: ERROR (could not check)\n");
            if let Some(m) = &e.model {
                s.push_str(&format!("model: {} (sha256:{})\n", m.path, m.root_sha256));
            }
            s.push_str(&format!("stage: {}\nerror: {}\n", e.stage, e.message));
            s
        }
    }
}

fn checked(r: &RunResult) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "mechwatch verdict: {}\nmodel: {} ({}, sha256:{})\n",
        r.verdict.as_str().to_uppercase(),
        r.model.path,
        r.model.architecture,
        &r.model.digest
    ));
    let flagged = r.flagged();
    if !flagged.is_empty() {
        s.push('\n');
    }
    for (p, f) in &flagged {
        s.push_str(&format!(
            "{:<5} {}/{} [{:?}]\n      {}\n",
            f.status.as_str().to_uppercase(),
            p.name,
            f.check,
            f.severity,
            f.explanation
        ));
        for m in &f.metrics {
            let bound = if m.bound.is_empty() {
                String::new()
            } else {
                format!("  (required {})", m.bound)
            };
            s.push_str(&format!("      {} = {}{bound}\n", m.name, m.value));
        }
        for l in f.evidence.latents.iter().take(5) {
            let effect = l
                .effect
                .map(|e| format!(", real effect {e}"))
                .unwrap_or_default();
            s.push_str(&format!(
                "      latent {} \"{}\": {}{effect} ({})\n",
                l.latent, l.label, l.value, l.measure
            ));
        }
        for h in f.evidence.heads.iter().take(3) {
            s.push_str(&format!(
                "      head {}.{}: induction {}, previous-token {}, duplicate-token {}\n",
                h.layer, h.head, h.induction, h.previous_token, h.duplicate_token
            ));
        }
        for e in f.evidence.prompts.iter().take(3) {
            s.push_str(&format!(
                "      prompt {}#{} ({}): {}\n",
                e.set,
                e.index + 1,
                e.why,
                clip(&e.text, 90)
            ));
        }
        for g in f.evidence.generations.iter().take(2) {
            s.push_str(&format!(
                "      \"{}\"\n        without: {}\n        with:    {}\n",
                clip(&g.prompt, 70),
                clip(&g.baseline, 90),
                clip(&g.intervened, 90)
            ));
        }
    }
    s.push('\n');
    for p in &r.policies {
        if !p.applies {
            s.push_str(&format!(
                "skip  {} (does not apply to this model)\n",
                p.name
            ));
            continue;
        }
        for f in p.findings.iter().filter(|f| f.status == Status::Pass) {
            s.push_str(&format!(
                "PASS  {}/{}: {}\n",
                p.name, f.check, f.explanation
            ));
        }
    }
    s
}
