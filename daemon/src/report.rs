//! Reviewer reports: one self-contained HTML file (inline CSS and SVG, no network) or a
//! Markdown summary, rendered from signed records. Verification is computed when the report
//! is made; a record the verification does not vouch for is shown in red, never as valid.

use std::fmt::Write as _;

mod attention;
mod attribution;
mod intervention;
mod lens;
mod selection;
mod svg;

use audit_log::record::{RecordBody, Statement};
use policies::result::{Finding, RunResult, Status};
use svg::{range, AXIS, COLORS};

/// Whether the log verified when the report was made.
pub enum Verification {
    Verified {
        records: u64,
        checkpoints: usize,
        keys: Vec<String>,
    },
    /// Failed at `seq` (None: the database itself), for `reason`.
    Failed { seq: Option<u64>, reason: String },
}

impl Verification {
    /// Whether the record at `seq` is covered by a successful verification. After any
    /// failure nothing is: a later record may hang off a forged one.
    pub fn vouches_for(&self, _seq: u64) -> bool {
        match self {
            Verification::Verified { .. } => true,
            Verification::Failed { .. } => false,
        }
    }
}

/// One record as the report shows it.
pub struct Entry {
    pub seq: u64,
    pub statement: Option<Statement>,
    /// Why the record could not be read, if it could not.
    pub unreadable: Option<String>,
}

impl Entry {
    pub fn result(&self) -> Option<RunResult> {
        match &self.statement.as_ref()?.predicate.record {
            RecordBody::Audit { result, .. } => serde_json::from_value(result.clone()).ok(),
            _ => None,
        }
    }
}

/// Everything a report shows.
pub struct Input {
    pub db: String,
    pub verification: Verification,
    pub entries: Vec<Entry>,
    /// Audits of the same lineages (oldest first), for the drift-over-time plots.
    pub history: Vec<(u64, String, RunResult)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A string from a record as inert Markdown text: HTML-significant characters as entities,
/// every other ASCII punctuation character backslash-escaped (so no link, image, emphasis,
/// code span or table cell can start inside it), control characters shown escaped. Never
/// put inside a code span, where escapes do not apply.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in crate::text::terminal_safe(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c if c.is_ascii_punctuation() => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

const CSS: &str = "
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#fff}
main{max-width:1100px;margin:0 auto;padding:16px 24px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #d0d7de}h3{font-size:15px}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;margin:12px 0}
.ok{background:#dafbe1;color:#116329;border:1px solid #4ac26b}
.bad{background:#ffebe9;color:#a40e26;border:2px solid #cf222e}
table{border-collapse:collapse;width:100%;margin:8px 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
.pass{color:#116329;font-weight:600}.warn{color:#9a6700;font-weight:600}.fail,.error{color:#cf222e;font-weight:600}
code{font:12px ui-monospace,monospace;word-break:break-all}
.tok{white-space:pre-wrap;font:12px ui-monospace,monospace}
.tok span{border-radius:2px}
.check{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;margin:12px 0}
svg{background:#f6f8fa;border-radius:4px;margin:4px 8px 4px 0;vertical-align:top}
details.numbers{margin:2px 0 10px}details.numbers table{width:auto;font-size:12px}
.gen td{width:50%;white-space:pre-wrap;font:12px ui-monospace,monospace}
";

/// Opens the inputs of a record linked to by the URL fragment, and marks the page rendered.
const SCRIPT: &str = "
(function(){
  function open(){var t=document.getElementById(location.hash.slice(1));if(t){var d=t.closest('section');if(d){d.querySelectorAll('details').forEach(function(x){x.open=true;});}}}
  window.addEventListener('hashchange',open);open();
  document.documentElement.setAttribute('data-rendered','ok');
})();
";

/// The HTML report.
pub fn html(r: &Input) -> String {
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    s.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">");
    s.push_str("<title>mechwatch audit report</title><style>");
    s.push_str(CSS);
    s.push_str("</style></head><body><main>\n<h1>mechwatch audit report</h1>\n");
    verification_banner(&mut s, r);
    summary(&mut s, r);
    for e in &r.entries {
        record(&mut s, r, e);
    }
    drift(&mut s, r);
    s.push_str("</main><script>");
    s.push_str(SCRIPT);
    s.push_str("</script></body></html>\n");
    s
}

fn verification_banner(s: &mut String, r: &Input) {
    s.push_str("<section id=\"verification\">");
    match &r.verification {
        Verification::Verified {
            records,
            checkpoints,
            keys,
        } => {
            let _ = write!(
                s,
                "<div class=\"banner ok\">Verified when this report was made: all {records} records of <code>{}</code> — Ed25519 signatures, hash chain, {checkpoints} Merkle checkpoint(s); signing keys {}.</div>",
                esc(&r.db),
                esc(&keys.join(", "))
            );
        }
        Verification::Failed { seq, reason } => {
            let at = seq.map_or("the database".to_string(), |q| format!("record {q}"));
            let _ = write!(
                s,
                "<div class=\"banner bad\">VERIFICATION FAILED at {}: {}. Nothing in this report is vouched for by the log's signatures; every record below is shown as unverified.</div>",
                esc(&at),
                esc(reason)
            );
        }
    }
    s.push_str("</section>\n");
}

fn status_cell(st: &str) -> String {
    format!(
        "<span class=\"{}\">{}</span>",
        esc(st),
        esc(&st.to_uppercase())
    )
}

fn summary(s: &mut String, r: &Input) {
    s.push_str("<section id=\"summary\"><h2>Summary</h2><table><tr><th>record</th><th>verified</th><th>time</th><th>host</th><th>checkpoint</th><th>verdict</th></tr>");
    for e in &r.entries {
        let verified = r.verification.vouches_for(e.seq) && e.unreadable.is_none();
        let v = if verified {
            "<span class=\"pass\">yes</span>"
        } else {
            "<span class=\"fail\">NO</span>"
        };
        let (time, host, model, verdict) = match &e.statement {
            Some(st) => {
                let p = &st.predicate;
                let (model, verdict) = match &p.record {
                    RecordBody::Audit { model, verdict, .. } => (
                        format!(
                            "{} <code>sha256:{}</code>",
                            esc(&model.path),
                            esc(&model.root_sha256)
                        ),
                        status_cell(verdict),
                    ),
                    RecordBody::Error { model, stage, .. } => (
                        model.as_ref().map_or("-".into(), |m| {
                            format!(
                                "{} <code>sha256:{}</code>",
                                esc(&m.path),
                                esc(&m.root_sha256)
                            )
                        }),
                        format!("{} at {}", status_cell("error"), esc(stage)),
                    ),
                    RecordBody::KeyRotation { new_key_id, .. } => {
                        (format!("key rotation to {}", esc(new_key_id)), "-".into())
                    }
                };
                (esc(&p.time), esc(&p.host), model, verdict)
            }
            None => (
                "-".into(),
                "-".into(),
                esc(e.unreadable.as_deref().unwrap_or("unreadable")),
                status_cell("error"),
            ),
        };
        let _ = write!(s, "<tr><td><a href=\"#record-{0}\">{0}</a></td><td>{v}</td><td>{time}</td><td>{host}</td><td>{model}</td><td>{verdict}</td></tr>", e.seq);
    }
    s.push_str("</table>");
    for e in &r.entries {
        let Some(res) = e.result() else { continue };
        let _ = write!(s, "<h3>Record {} — verdict per policy and check</h3><table><tr><th>policy</th><th>version</th><th>policy sha256</th><th>check</th><th>severity</th><th>status</th></tr>", e.seq);
        for p in &res.policies {
            if !p.applies {
                let _ = write!(s, "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td colspan=3>does not apply to this model</td></tr>", esc(&p.name), esc(&p.version), esc(&p.digest));
            }
            for f in &p.findings {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td><a href=\"#{}\">{}</a></td><td>{:?}</td><td>{}</td></tr>",
                    esc(&p.name), esc(&p.version), esc(&p.digest), check_id(e.seq, &p.name, &f.check), esc(&f.check), f.severity, status_cell(f.status.as_str())
                );
            }
        }
        s.push_str("</table>");
    }
    s.push_str("</section>\n");
}

fn check_id(seq: u64, policy: &str, check: &str) -> String {
    format!("check-{seq}-{}-{}", slug(policy), slug(check))
}

fn record(s: &mut String, r: &Input, e: &Entry) {
    let verified = r.verification.vouches_for(e.seq) && e.unreadable.is_none();
    let _ = write!(
        s,
        "<section id=\"record-{}\" class=\"record\"><h2>Record {}</h2>",
        e.seq, e.seq
    );
    if !verified {
        s.push_str("<div class=\"banner bad\">This record is NOT verified.</div>");
    }
    let Some(st) = &e.statement else {
        let _ = write!(
            s,
            "<p>{}</p></section>",
            esc(e.unreadable.as_deref().unwrap_or("unreadable"))
        );
        return;
    };
    let p = &st.predicate;
    let _ = write!(
        s,
        "<p>time {} · host {} · mechwatch {} · key {} · log {} seq {}</p>",
        esc(&p.time),
        esc(&p.host),
        esc(&p.mechwatch_version),
        esc(&p.key_id),
        esc(&p.log.id),
        p.log.seq
    );
    match &p.record {
        RecordBody::Error {
            stage,
            message,
            inputs,
            ..
        } => {
            let _ = write!(
                s,
                "<p class=\"error\">Could not check (stage {}): {}</p>",
                esc(stage),
                esc(message)
            );
            inputs_table(s, inputs);
        }
        RecordBody::KeyRotation { new_key_id, .. } => {
            let _ = write!(s, "<p>Key rotation to {}.</p>", esc(new_key_id));
        }
        RecordBody::Audit { inputs, .. } => {
            if let Some(res) = e.result() {
                let _ = write!(s, "<p>model {} ({}, {} layers, d_model {}), lineage <code>{}</code>, <code>sha256:{}</code>; verdict {}</p>", esc(&res.model.path), esc(&res.model.architecture), res.model.n_layers, res.model.d_model, esc(&res.model.lineage), esc(&res.model.digest), status_cell(res.verdict.as_str()));
                record_plots(s, e.seq, &res);
                for pol in res.policies.iter().filter(|p| p.applies) {
                    for f in &pol.findings {
                        finding(s, e.seq, &pol.name, f);
                    }
                }
            }
            inputs_table(s, inputs);
        }
    }
    s.push_str("</section>\n");
}

/// The plots of a whole record: each selected direction's candidate map, and the steering
/// checks' metrics without and with their interventions.
fn record_plots(s: &mut String, seq: u64, res: &RunResult) {
    for i in &res.instruments {
        let Some(sel) = &i.selection else { continue };
        let _ = write!(
            s,
            "<div class=\"selection\" id=\"selection-{seq}-{}-{}\"><h3>Selection of direction {} / {}</h3>{}</div>",
            slug(&i.policy),
            slug(&i.name),
            esc(&i.policy),
            esc(&i.name),
            selection::map(&i.policy, &i.name, sel)
        );
    }
    let bars: Vec<intervention::Bars<'_>> = res
        .policies
        .iter()
        .filter(|p| p.applies)
        .flat_map(|p| {
            p.findings.iter().filter_map(move |f| {
                Some(intervention::Bars {
                    policy: &p.name,
                    check: &f.check,
                    means: f.evidence.intervention.as_ref()?,
                })
            })
        })
        .collect();
    if !bars.is_empty() {
        let _ = write!(
            s,
            "<div class=\"interventions\" id=\"interventions-{seq}\"><h3>Without and with the interventions</h3>{}</div>",
            intervention::charts(&bars)
        );
    }
}

fn inputs_table(s: &mut String, inputs: &[audit_log::record::InputDigest]) {
    s.push_str("<details><summary>Inputs and their digests</summary><table><tr><th>kind</th><th>path</th><th>sha256</th></tr>");
    for i in inputs {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&i.kind),
            esc(&i.path),
            esc(&i.sha256)
        );
    }
    s.push_str("</table></details>");
}

fn finding(s: &mut String, seq: u64, policy: &str, f: &Finding) {
    let _ = write!(
        s,
        "<div class=\"check\" id=\"{}\"><h3>{} / {} — {} <small>({:?}, {:?})</small></h3>",
        check_id(seq, policy, &f.check),
        esc(policy),
        esc(&f.check),
        status_cell(f.status.as_str()),
        f.kind,
        f.severity
    );
    if !f.description.is_empty() {
        let _ = write!(s, "<p><em>{}</em></p>", esc(&f.description));
    }
    let _ = write!(
        s,
        "<p>{}</p><table><tr><th>metric</th><th>value</th><th>required</th></tr>",
        esc(&f.explanation)
    );
    for m in &f.metrics {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&m.name),
            m.value,
            esc(&m.bound)
        );
    }
    s.push_str("</table>");
    let ev = &f.evidence;
    if !ev.distributions.is_empty() {
        s.push_str("<h4>Distribution over the prompt sets</h4>");
        s.push_str(&strip_plot(&ev.distributions));
    }
    if !ev.sweep.is_empty() {
        s.push_str("<h4>Coefficient sweep</h4>");
        let pts: Vec<(f64, f64)> = ev.sweep.iter().map(|p| (p.coeff, p.value)).collect();
        s.push_str(&line_plot(
            "sweep",
            "The metric at each swept coefficient",
            &[("metric", pts)],
            "coefficient",
        ));
    }
    if !ev.patterns.is_empty() {
        s.push_str("<h4>Attention patterns of the top heads</h4>");
        s.push_str(&attention::patterns(&ev.patterns));
    }
    if !ev.components.is_empty() || ev.attribution_map.is_some() {
        s.push_str("<h4>Attribution estimates and real patching</h4>");
        s.push_str(&attribution::plots(ev, &f.metrics));
    }
    if !ev.latents.is_empty() {
        s.push_str("<h4>SAE latents</h4><table><tr><th>SAE</th><th>latent</th><th>label</th><th>value</th><th>real effect</th><th>measure</th></tr>");
        for l in &ev.latents {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&l.sae),
                l.latent,
                esc(&l.label),
                l.value,
                l.effect.map(|e| e.to_string()).unwrap_or_default(),
                esc(&l.measure)
            );
        }
        s.push_str("</table>");
    }
    if !ev.prompts.is_empty() {
        s.push_str("<h4>Prompts</h4>");
        for p in &ev.prompts {
            let _ = write!(
                s,
                "<p><b>{}#{}</b> ({}; value {}): {}</p>",
                esc(&p.set),
                p.index + 1,
                esc(&p.why),
                p.value,
                esc(&p.text)
            );
            if !p.tokens.is_empty() {
                let max = svg::max_abs(p.tokens.iter().map(|t| t.value));
                s.push_str("<div class=\"tok\">");
                for t in &p.tokens {
                    let _ = write!(
                        s,
                        "<span title=\"{}\" style=\"background:{}\">{}</span>",
                        t.value,
                        svg::signed(t.value, max),
                        esc(&t.token)
                    );
                }
                s.push_str("</div>");
            }
        }
    }
    if !ev.lens.is_empty() {
        s.push_str("<h4>Logit lens at the last token (top tokens per layer)</h4>");
        s.push_str(&lens::heatmaps(&ev.lens));
    }
    if !ev.generations.is_empty() {
        s.push_str("<h4>Generations without and with the intervention</h4><table class=\"gen\"><tr><th>without</th><th>with</th></tr>");
        for g in &ev.generations {
            let _ = write!(
                s,
                "<tr><td colspan=2><b>{}</b></td></tr><tr><td>{}{}</td><td>{}{}</td></tr>",
                esc(&g.prompt),
                if g.baseline_refused { "[refused] " } else { "" },
                esc(&g.baseline),
                if g.intervened_refused {
                    "[refused] "
                } else {
                    ""
                },
                esc(&g.intervened)
            );
        }
        s.push_str("</table>");
    }
    s.push_str("</div>");
}

/// One row of dots per prompt set on a shared horizontal axis.
fn strip_plot(dists: &[policies::result::Distribution]) -> String {
    let (w, row, left) = (760.0, 34.0, 220.0);
    let h = row * dists.len() as f64 + 30.0;
    let (lo, hi) = range(dists.iter().flat_map(|d| d.values.iter().copied()));
    let x = |v: f64| left + (v - lo) / (hi - lo) * (w - left - 20.0);
    let sets: Vec<&str> = dists.iter().map(|d| d.set.as_str()).collect();
    let mut s = svg::open(
        "distribution",
        w,
        h,
        &format!(
            "Each prompt's score, one row per prompt set ({}), from {lo:.3} to {hi:.3}",
            sets.join(", ")
        ),
    );
    for (i, d) in dists.iter().enumerate() {
        let y = 20.0 + row * i as f64;
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            s,
            "<text x=\"4\" y=\"{}\" font-size=\"11\">{}</text>",
            y + 4.0,
            esc(&d.set)
        );
        for (j, v) in d.values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let jitter = ((j * 7919) % 13) as f64 - 6.0;
            let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\" fill-opacity=\"0.6\"><title>{v}</title></circle>", x(*v), y + jitter);
        }
    }
    let _ = write!(s, "<text x=\"{left}\" y=\"{}\" font-size=\"10\">{lo:.3}</text><text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{hi:.3}</text></svg>", h - 4.0, w - 20.0, h - 4.0);
    s
}

/// Lines through `(x, y)` points, one per series.
fn line_plot(kind: &str, title: &str, series: &[(&str, Vec<(f64, f64)>)], xlabel: &str) -> String {
    let (w, h, pad) = (520.0, 220.0, 40.0);
    let (x0, x1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let (y0, y1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let x = |v: f64| pad + (v - x0) / (x1 - x0) * (w - 2.0 * pad);
    let y = |v: f64| h - pad - (v - y0) / (y1 - y0) * (h - 2.0 * pad);
    let mut s = svg::open(kind, w, h, title);
    let _ = write!(s, "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"{AXIS}\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"{AXIS}\"/>", h - pad, w - pad);
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let _ = write!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>", path.join(" "), esc(name));
        for p in pts.iter().filter(|p| p.1.is_finite()) {
            let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\"><title>{}: {} at {}</title></circle>", x(p.0), y(p.1), esc(name), p.1, p.0);
        }
    }
    let _ = write!(s, "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{} ({x0} to {x1})</text><text x=\"4\" y=\"{}\" font-size=\"10\">{y1:.3}</text><text x=\"4\" y=\"{}\" font-size=\"10\">{y0:.3}</text></svg>", w / 2.0, h - 8.0, esc(xlabel), pad, h - pad);
    s
}

/// Each check's first metric across the audits of the lineage, oldest first.
fn drift(s: &mut String, r: &Input) {
    s.push_str("<section id=\"drift\"><h2>Across checkpoints of the lineage</h2>");
    if r.history.len() < 2 {
        let _ = write!(
            s,
            "<p>{} audit(s) of this lineage in the log; a trend needs two.</p>",
            r.history.len()
        );
    }
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for (_, _, res) in &r.history {
        for p in &res.policies {
            for f in &p.findings {
                if let Some(m) = f.metrics.first() {
                    let k = (p.name.clone(), f.check.clone(), m.name.clone());
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
        }
    }
    for (policy, check, metric) in keys {
        let pts: Vec<(f64, f64)> = r
            .history
            .iter()
            .filter_map(|(seq, _, res)| {
                let f = res
                    .policies
                    .iter()
                    .find(|p| p.name == policy)?
                    .findings
                    .iter()
                    .find(|f| f.check == check)?;
                Some((
                    *seq as f64,
                    f.metrics.iter().find(|m| m.name == metric)?.value,
                ))
            })
            .collect();
        let _ = write!(
            s,
            "<h3>{} / {}: {}</h3>",
            esc(&policy),
            esc(&check),
            esc(&metric)
        );
        s.push_str(&line_plot(
            "drift",
            &format!("{policy} / {check}: {metric} across the audits of the lineage, by record"),
            &[(metric.as_str(), pts)],
            "record seq",
        ));
    }
    s.push_str("</section>\n");
}

/// The Markdown summary, for a release ticket.
pub fn markdown(r: &Input) -> String {
    let mut s = String::from("# mechwatch audit report\n\n");
    match &r.verification {
        Verification::Verified {
            records,
            checkpoints,
            ..
        } => {
            let _ = writeln!(s, "**Log verified** when this report was made: {records} records, signatures, hash chain and {checkpoints} checkpoint(s).\n");
        }
        Verification::Failed { seq, reason } => {
            let _ = writeln!(
                s,
                "**VERIFICATION FAILED** at {}: {}. Nothing below is vouched for.\n",
                seq.map_or("the database".into(), |q| format!("record {q}")),
                md(reason)
            );
        }
    }
    for e in &r.entries {
        let Some(st) = &e.statement else {
            let _ = writeln!(
                s,
                "## Record {} — unreadable\n\n{}\n",
                e.seq,
                md(e.unreadable.as_deref().unwrap_or_default())
            );
            continue;
        };
        let p = &st.predicate;
        let _ = writeln!(
            s,
            "## Record {} ({}, {})\n",
            e.seq,
            md(&p.time),
            md(&p.host)
        );
        match &p.record {
            RecordBody::Error { stage, message, .. } => {
                let _ = writeln!(
                    s,
                    "Could not check (stage {}): {}\n",
                    md(stage),
                    md(message)
                );
            }
            RecordBody::KeyRotation { new_key_id, .. } => {
                let _ = writeln!(s, "Key rotation to {}.\n", md(new_key_id));
            }
            RecordBody::Audit { .. } => {
                if let Some(res) = e.result() {
                    let _ = writeln!(
                        s,
                        "Model {} sha256 {} — verdict **{}**\n",
                        md(&res.model.path),
                        md(&res.model.digest),
                        res.verdict.as_str().to_uppercase()
                    );
                    s.push_str("| policy | check | severity | status | explanation |\n| --- | --- | --- | --- | --- |\n");
                    for pol in res.policies.iter().filter(|p| p.applies) {
                        for f in &pol.findings {
                            let _ = writeln!(
                                s,
                                "| {} | {} | {:?} | {} | {} |",
                                md(&pol.name),
                                md(&f.check),
                                f.severity,
                                f.status.as_str(),
                                md(&f.explanation)
                            );
                        }
                    }
                    s.push('\n');
                    let flagged = res.flagged();
                    if flagged.iter().any(|(_, f)| f.status >= Status::Fail) {
                        s.push_str("Failing checks:\n\n");
                        for (pol, f) in flagged.iter().filter(|(_, f)| f.status >= Status::Fail) {
                            let _ = writeln!(
                                s,
                                "- {}/{}: {}",
                                md(&pol.name),
                                md(&f.check),
                                md(&f.explanation)
                            );
                        }
                        s.push('\n');
                    }
                }
            }
        }
    }
    s
}
