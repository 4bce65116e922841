//! `mechwatch report`: the HTML report rendered by headless Chromium (no console errors, every
//! section and plot present, not blank), the Markdown summary, and a tampered log shown as
//! failed verification at the top, never as valid.

use std::path::Path;
use std::process::Command;

use e2e::*;

/// A policy with every kind of evidence: a direction probe with attribution, a feature probe,
/// a steering sweep with generations.
const POLICY: &str = r#"schema = 1
name = "rich"
version = "1"

[prompts.pos]
file = "prompts/pos.txt"

[prompts.neg]
file = "prompts/neg.txt"

[saes.default]
builtin = "default"

[directions.d]
hook = "blocks.11.hook_resid_post"
positive = "pos"
negative = "neg"

[[checks]]
id = "separates"
kind = "direction_probe"
severity = "high"
direction = "d"
positive = "pos"
negative = "neg"
min_auroc = 0.5
attribute_with = "default"

[[checks]]
id = "feature"
kind = "feature_probe"
severity = "medium"
sae = "default"
select = { top = 2, positive = "pos", negative = "neg" }

[[checks.expect]]
prompts = "pos"
min_active_fraction = 0.9

[[checks.expect]]
prompts = "neg"
max_active_fraction = 0.1

[[checks]]
id = "steer"
kind = "steering"
severity = "low"
prompts = "neg"
intervention = { add_direction = "d", coeff = 2.0 }
metric = "refusal_score"
sweep = [1.0, 2.0, 4.0]
bounds = { max_flip_coeff = 4.0 }
"#;

struct Log {
    tmp: tempfile::TempDir,
}

impl Log {
    fn db(&self) -> String {
        self.tmp.path().join("audit.db").display().to_string()
    }
    fn pubkey(&self) -> String {
        self.tmp.path().join("key.pem.pub").display().to_string()
    }
    fn path(&self, name: &str) -> String {
        self.tmp.path().join(name).display().to_string()
    }
}

/// Two audits of the default model with the rich policy, signed into a log.
fn log_with_two_audits() -> Log {
    let model = default_model();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policy");
    std::fs::create_dir_all(dir.join("prompts")).unwrap();
    std::fs::write(dir.join("prompts/pos.txt"), HARMFUL_SAMPLE).unwrap();
    std::fs::write(dir.join("prompts/neg.txt"), HARMLESS_SAMPLE).unwrap();
    std::fs::write(dir.join("rich.toml"), POLICY).unwrap();
    let log = Log { tmp };
    assert!(
        mechwatch(&["key", "generate", "--out", &log.path("key.pem")])
            .status
            .success()
    );
    for _ in 0..2 {
        let o = mechwatch(&[
            "check",
            "--model",
            model.to_str().unwrap(),
            "--policy",
            dir.to_str().unwrap(),
            "-q",
            "--log",
            &log.db(),
            "--key",
            &log.path("key.pem"),
        ]);
        assert!(o.status.code().is_some_and(|c| c < 2), "{}", stderr(&o));
    }
    log
}

/// The checkpoint digest of the log's first record.
fn json_digest(log: &Log) -> String {
    let o = mechwatch(&["log", "show", "--db", &log.db(), "--seq", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = v.to_string();
    let at = s.find("\"root_sha256\":\"").expect("a root digest") + 15;
    s[at..at + 64].to_string()
}

/// Chromium's DOM after load, its stderr, and a screenshot.
fn render(html: &str, png: &str) -> (String, String) {
    let url = format!("file://{html}");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,1800",
    ];
    let dom = Command::new("chromium")
        .args(common)
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium is installed (scripts/test-all installs it)");
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot = Command::new("chromium")
        .args(common)
        .arg(format!("--screenshot={png}"))
        .arg(&url)
        .output()
        .unwrap();
    assert!(shot.status.success());
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&dom.stderr),
        String::from_utf8_lossy(&shot.stderr)
    );
    (String::from_utf8_lossy(&dom.stdout).into_owned(), logs)
}

/// Console messages Chromium logged for the page.
fn console_errors(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| {
            l.contains("CONSOLE") || l.contains("Uncaught") || l.contains("Content Security Policy")
        })
        .collect()
}

/// The fraction of pixels that are not (near) white, and how many reddish pixels the top
/// `rows` rows hold.
fn ink(png: &str, rows: u32) -> (f64, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let mut inked = 0usize;
    let mut red = 0usize;
    for y in 0..h {
        for x in 0..w {
            let p = &buf[(y * w + x) * ch..(y * w + x) * ch + 3];
            if p.iter().any(|&c| c < 235) {
                inked += 1;
            }
            if y < rows as usize && p[0] > 200 && p[1] < 120 && p[2] < 120 {
                red += 1;
            }
        }
    }
    (inked as f64 / (w * h) as f64, red)
}

#[test]
fn the_report_renders_in_chromium_and_a_tampered_log_shows_red() {
    let log = log_with_two_audits();
    let html = log.path("report.html");
    let o = mechwatch(&[
        "report",
        "--db",
        &log.db(),
        "--pubkey",
        &log.pubkey(),
        "--last",
        "2",
        "--out",
        &html,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&html).unwrap();
    // Self-contained: nothing is fetched.
    for needle in ["http://", "https://", "src=\"", "@import", "url("] {
        assert!(!text.contains(needle), "the report refers to `{needle}`");
    }
    let png = log.path("report.png");
    let (dom, logs) = render(&html, &png);
    assert!(
        console_errors(&logs).is_empty(),
        "console errors: {:?}",
        console_errors(&logs)
    );
    assert!(
        dom.contains("data-rendered=\"ok\""),
        "the page's script did not run"
    );
    for id in [
        "verification",
        "summary",
        "record-0",
        "record-1",
        "drift",
        "check-1-rich-separates",
        "check-1-rich-feature",
        "check-1-rich-steer",
    ] {
        let ids: Vec<&str> = dom
            .split("id=\"")
            .skip(1)
            .filter_map(|x| x.split('"').next())
            .collect();
        assert!(
            dom.contains(&format!("id=\"{id}\"")),
            "no section {id} among {ids:?}"
        );
    }
    for kind in ["distribution", "sweep", "drift"] {
        assert!(
            dom.contains(&format!("data-kind=\"{kind}\"")),
            "no {kind} plot"
        );
    }
    assert!(dom.contains("class=\"banner ok\"") && !dom.contains("banner bad"));
    assert!(dom.contains("Generations without and with the intervention"));
    assert!(dom.contains("SAE latents") && dom.contains("auto: fires on"));
    assert!(dom.contains("class=\"tok\""), "no token highlighting");
    let (inked, red_top) = ink(&png, 200);
    assert!(inked > 0.02, "the screenshot is blank ({inked})");
    assert_eq!(red_top, 0, "a verified report has no red at the top");

    // Markdown, for a release ticket.
    let md = log.path("report.md");
    let o = mechwatch(&[
        "report",
        "--db",
        &log.db(),
        "--pubkey",
        &log.pubkey(),
        "--seq",
        "1",
        "--format",
        "md",
        "--out",
        &md,
    ]);
    assert!(o.status.success());
    let m = std::fs::read_to_string(&md).unwrap();
    assert!(
        m.contains("**Log verified**")
            && m.contains("| rich | separates |")
            && m.contains("| rich | steer |"),
        "{m}"
    );
    // Every record of one checkpoint, by a prefix of its digest.
    let digest = json_digest(&log);
    let by_model = log.path("by-model.md");
    let o = mechwatch(&[
        "report",
        "--db",
        &log.db(),
        "--pubkey",
        &log.pubkey(),
        "--model",
        &digest[..12],
        "--format",
        "md",
        "--out",
        &by_model,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&by_model)
            .unwrap()
            .matches("## Record")
            .count(),
        2
    );
    let o = mechwatch(&[
        "report",
        "--db",
        &log.db(),
        "--pubkey",
        &log.pubkey(),
        "--model",
        "00000000",
        "--out",
        &by_model,
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "no record matches: could not report"
    );

    // Tamper with the first record: the report says so at the top, in red, and vouches for
    // nothing.
    {
        let c = rusqlite::Connection::open(log.db()).unwrap();
        c.execute_batch("DROP TRIGGER records_no_update;").unwrap();
        let bytes: Vec<u8> = c
            .query_row("SELECT bytes FROM records WHERE seq = 0", [], |r| r.get(0))
            .unwrap();
        let forged = String::from_utf8(bytes).unwrap().replacen(
            "\"verdict\":\"",
            "\"verdict\":\"pass\",\"was\":\"",
            1,
        );
        c.execute(
            "UPDATE records SET bytes = ?1 WHERE seq = 0",
            [forged.as_bytes()],
        )
        .unwrap();
    }
    let bad = log.path("tampered.html");
    let o = mechwatch(&[
        "report",
        "--db",
        &log.db(),
        "--pubkey",
        &log.pubkey(),
        "--last",
        "2",
        "--out",
        &bad,
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = std::fs::read_to_string(&bad).unwrap();
    assert!(
        !text.contains("banner ok"),
        "a tampered log rendered as valid"
    );
    let first_banner = text.find("class=\"banner").unwrap();
    assert!(
        text[first_banner..].starts_with("class=\"banner bad\">VERIFICATION FAILED at record 0"),
        "{}",
        &text[first_banner..first_banner + 120]
    );
    assert!(
        text.find("VERIFICATION FAILED").unwrap() < text.find("id=\"summary\"").unwrap(),
        "the failure is not at the top"
    );
    assert_eq!(text.matches("This record is NOT verified.").count(), 2);
    let png = log.path("tampered.png");
    let (_, logs) = render(&bad, &png);
    assert!(
        console_errors(&logs).is_empty(),
        "{:?}",
        console_errors(&logs)
    );
    let (_, red_top) = ink(&png, 200);
    assert!(
        red_top > 200,
        "no red banner at the top of the tampered report ({red_top} red pixels)"
    );
    assert!(Path::new(&png).exists());
}
