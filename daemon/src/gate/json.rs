//! The JSON report: the full run result (every policy, finding, metric and evidence) with a
//! top-level `status` equal to the verdict; or, when the run could not check, an object with
//! `status` and `verdict` "error", the `stage` and the `error`. docs/cli.md documents both.

use serde_json::{json, Value};

use super::Outcome;

pub fn render(outcome: &Outcome) -> anyhow::Result<Value> {
    Ok(match outcome {
        Outcome::Checked(r) => {
            let mut v = json!({ "status": r.verdict });
            let Value::Object(fields) = serde_json::to_value(r)? else {
                anyhow::bail!("a run result serializes as a JSON object");
            };
            v.as_object_mut()
                .expect("built as an object")
                .extend(fields);
            v
        }
        Outcome::CouldNotCheck(e) => json!({
            "status": "error",
            "verdict": "error",
            "stage": e.stage,
            "error": e.message,
            "model": e.model.as_ref().map(|m| json!({ "path": m.path, "digest": m.root_sha256 })),
            "mechwatch_version": audit_log::BUILD_VERSION,
        }),
    })
}
