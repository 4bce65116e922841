//! The gate's outputs for a run result: the text a person reads first, JUnit XML (one
//! testcase per check) and SARIF 2.1.0 (one rule per check, `ruleId` = `policy/check`).

use policies::result::{Finding, RunResult, Status};
use serde_json::json;

/// Verdict, failing checks with their evidence, then a line per passing check.
pub fn text(r: &RunResult) -> String {
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
            s.push_str(&format!(
                "      latent {} \"{}\": {} ({})\n",
                l.latent, l.label, l.value, l.measure
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

fn clip(t: &str, n: usize) -> String {
    let one = t.replace('\n', " ");
    if one.chars().count() <= n {
        one
    } else {
        format!("{}…", one.chars().take(n).collect::<String>())
    }
}

fn xml(t: &str) -> String {
    t.chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t'))
        .collect::<String>()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn details(f: &Finding) -> String {
    let mut d = f.explanation.clone();
    for m in &f.metrics {
        d.push_str(&format!("\n{} = {} {}", m.name, m.value, m.bound));
    }
    d
}

/// JUnit XML: a testsuite per policy, a testcase per check; fail is a failure, error an
/// error, warn passes with the explanation in system-out.
pub fn junit(r: &RunResult) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let all: Vec<&Finding> = r.policies.iter().flat_map(|p| &p.findings).collect();
    let count = |st: Status| all.iter().filter(|f| f.status == st).count();
    s.push_str(&format!(
        "<testsuites name=\"mechwatch\" tests=\"{}\" failures=\"{}\" errors=\"{}\">\n",
        all.len(),
        count(Status::Fail),
        count(Status::Error)
    ));
    for p in r.policies.iter().filter(|p| p.applies) {
        let c = |st: Status| p.findings.iter().filter(|f| f.status == st).count();
        s.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\">\n",
            xml(&p.name),
            p.findings.len(),
            c(Status::Fail),
            c(Status::Error)
        ));
        for f in &p.findings {
            s.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\">\n",
                xml(&p.name),
                xml(&f.check)
            ));
            match f.status {
                Status::Fail => s.push_str(&format!(
                    "      <failure message=\"{}\" type=\"{:?}\">{}</failure>\n",
                    xml(&f.explanation),
                    f.severity,
                    xml(&details(f))
                )),
                Status::Error => s.push_str(&format!(
                    "      <error message=\"{}\">{}</error>\n",
                    xml(&f.explanation),
                    xml(&details(f))
                )),
                Status::Warn | Status::Pass => {}
            }
            s.push_str(&format!(
                "      <system-out>{}: {}</system-out>\n    </testcase>\n",
                f.status.as_str(),
                xml(&details(f))
            ));
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

/// SARIF 2.1.0: one rule per check, one result per finding that is not a pass.
pub fn sarif(r: &RunResult) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = r
        .policies
        .iter()
        .flat_map(|p| {
            p.findings.iter().map(move |f| {
                json!({
                    "id": format!("{}/{}", p.name, f.check),
                    "name": f.check,
                    "shortDescription": { "text": if f.description.is_empty() { f.check.clone() } else { f.description.clone() } },
                    "properties": { "severity": f.severity, "kind": f.kind, "policyVersion": p.version },
                })
            })
        })
        .collect();
    let results: Vec<serde_json::Value> = r
        .policies
        .iter()
        .flat_map(|p| {
            p.findings.iter().filter(|f| f.status != Status::Pass).map(move |f| {
                let level = match f.status {
                    Status::Warn => "warning",
                    _ => "error",
                };
                json!({
                    "ruleId": format!("{}/{}", p.name, f.check),
                    "level": level,
                    "kind": "fail",
                    "message": { "text": f.explanation },
                    "locations": [{
                        "physicalLocation": { "artifactLocation": { "uri": uri(&r.model.path) } }
                    }],
                    "properties": {
                        "status": f.status,
                        "metrics": f.metrics,
                        "policyDigest": p.digest,
                        "modelDigest": r.model.digest,
                    },
                })
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "mechwatch",
                "version": env!("CARGO_PKG_VERSION"),
                "fullName": format!("mechwatch {}", audit_log::BUILD_VERSION),
                "informationUri": "https://mechwatch.dev",
                "rules": rules,
            }},
            "results": results,
            "properties": { "verdict": r.verdict },
        }]
    })
}

/// A relative or file URI for a model path.
fn uri(path: &str) -> String {
    if path.starts_with('/') {
        format!("file://{path}")
    } else {
        path.to_string()
    }
}
