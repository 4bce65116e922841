//! JUnit XML: a testsuite per policy, a testcase per check; fail is a failure, error an
//! error, warn passes with the explanation in system-out. A run that could not check is one
//! `mechwatch/check` testcase with an `<error>`.

use policies::result::{Finding, RunResult, Status};

use super::Outcome;

pub fn render(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Checked(r) => checked(r),
        Outcome::CouldNotCheck(e) => {
            let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
            s.push_str("<testsuites name=\"mechwatch\" tests=\"1\" failures=\"0\" errors=\"1\">\n");
            s.push_str(
                "  <testsuite name=\"mechwatch\" tests=\"1\" failures=\"0\" errors=\"1\">\n",
            );
            s.push_str("    <testcase classname=\"mechwatch\" name=\"check\">\n");
            let model = e
                .model
                .as_ref()
                .map(|m| format!("\nmodel: {} (sha256:{})", m.path, m.root_sha256))
                .unwrap_or_default();
            s.push_str(&format!(
                "      <error message=\"could not check: {}\" type=\"{}\">{}</error>\n",
                xml(&e.message),
                xml(&e.stage),
                xml(&format!("stage: {}\nerror: {}{model}", e.stage, e.message))
            ));
            s.push_str("    </testcase>\n  </testsuite>\n</testsuites>\n");
            s
        }
    }
}

fn checked(r: &RunResult) -> String {
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
