//! SARIF 2.1.0: one rule per check (`ruleId` = `policy/check`), one result per finding that is
//! not a pass, and one invocation that says whether the run could check. A run that could not
//! check has no results, `executionSuccessful: false`, exit code 2 and the error as a
//! tool execution notification.

use policies::result::{RunResult, Status};
use serde_json::{json, Value};

use super::Outcome;

pub fn render(outcome: &Outcome) -> Value {
    let (rules, results, invocation, properties) = match outcome {
        Outcome::Checked(r) => (
            rules(r),
            results(r),
            json!({ "executionSuccessful": true }),
            json!({ "verdict": r.verdict }),
        ),
        Outcome::CouldNotCheck(e) => {
            let mut notification = json!({
                "level": "error",
                "message": { "text": format!("could not check ({}): {}", e.stage, e.message) },
                "descriptor": { "id": e.stage },
            });
            if let Some(m) = &e.model {
                notification["locations"] = json!([{
                    "physicalLocation": { "artifactLocation": { "uri": uri(&m.path) } }
                }]);
            }
            (
                Vec::new(),
                Vec::new(),
                json!({
                    "executionSuccessful": false,
                    "exitCode": 2,
                    "toolExecutionNotifications": [notification],
                }),
                json!({ "verdict": "error", "stage": e.stage }),
            )
        }
    };
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
            "invocations": [invocation],
            "results": results,
            "properties": properties,
        }]
    })
}

fn rules(r: &RunResult) -> Vec<Value> {
    r.policies
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
        .collect()
}

fn results(r: &RunResult) -> Vec<Value> {
    r.policies
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
        .collect()
}

/// A relative or file URI for a model path.
fn uri(path: &str) -> String {
    if path.starts_with('/') {
        format!("file://{path}")
    } else {
        path.to_string()
    }
}
