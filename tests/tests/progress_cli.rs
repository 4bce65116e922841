//! Progress on stderr, from the real binary doing real work (`check` on the default model,
//! `model fetch` hashing the cached copy): sparse plain lines when stderr is a file, a bar
//! redrawn in place under a pseudo-terminal, plain lines on a dumb one, nothing with
//! `--quiet`.

use std::process::{Command, Stdio};

use e2e::*;

/// `check` on the default model with stderr written to a file; the file's text.
fn check_with_stderr_in_a_file(extra: &[&str]) -> String {
    default_model();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let o = Command::new(mechwatch_bin())
        .args(["check", "--model", "default"])
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .expect("running mechwatch");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(matches!(o.code(), Some(0 | 1)), "{text}");
    text
}

/// `12.3s`, `2m03s`, `1h05m` as seconds.
fn seconds(s: &str) -> f64 {
    let num = |t: &str| {
        t.parse::<f64>()
            .unwrap_or_else(|_| panic!("not a duration: {s:?}"))
    };
    if let Some((h, m)) = s.strip_suffix('m').and_then(|t| t.split_once('h')) {
        return num(h) * 3600.0 + num(m) * 60.0;
    }
    let t = s
        .strip_suffix('s')
        .unwrap_or_else(|| panic!("not a duration: {s:?}"));
    match t.split_once('m') {
        Some((m, sec)) => num(m) * 60.0 + num(sec),
        None => num(t),
    }
}

#[test]
fn progress_in_a_log_is_a_start_line_sparse_updates_and_an_end_line() {
    let text = check_with_stderr_in_a_file(&[]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");
    // Each task: its start line, then its end line with the elapsed time.
    for (label, start) in [
        ("loading model default", "loading model default: started"),
        ("running the checks", "running the checks ("),
    ] {
        let first = lines
            .iter()
            .position(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no start line for {label}:\n{text}"));
        let end = lines
            .iter()
            .position(|l| l.starts_with(&format!("{label}: done in ")))
            .unwrap_or_else(|| panic!("no end line for {label}:\n{text}"));
        assert!(first < end, "{text}");
        let took = seconds(lines[end].rsplit(' ').next().unwrap());
        // In between, lines at least 30 s apart (by their own elapsed times), and one at least
        // every minute, so a run that took over 70 s has some.
        let elapsed: Vec<f64> = lines[first + 1..end]
            .iter()
            .filter(|l| l.starts_with(&format!("{label}: ")))
            .map(|l| {
                let at = l.find(" elapsed").expect("an elapsed time");
                seconds(l[..at].rsplit(' ').next().unwrap())
            })
            .collect();
        for pair in elapsed.windows(2) {
            assert!(pair[1] - pair[0] >= 29.0, "lines closer than 30 s:\n{text}");
        }
        if took > 70.0 {
            assert!(!elapsed.is_empty(), "silent for {took} s:\n{text}");
        }
        assert!(
            elapsed.len() as f64 <= took / 30.0 + 1.0,
            "too many lines:\n{text}"
        );
    }
}

/// A policy with one direction probe: a run of a few seconds.
fn small_policy(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(dir.join("pos.txt"), HARMFUL_SAMPLE).unwrap();
    std::fs::write(dir.join("neg.txt"), HARMLESS_SAMPLE).unwrap();
    let path = dir.join("small.toml");
    std::fs::write(
        &path,
        r#"schema = 1
name = "small"
version = "1"

[prompts.pos]
file = "pos.txt"

[prompts.neg]
file = "neg.txt"

[directions.d]
hook = "blocks.10.hook_resid_post"
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
"#,
    )
    .unwrap();
    path
}

/// `command` run by `script` on a pseudo-terminal with `TERM` set; what it wrote there.
fn on_a_terminal(command: &str, term: &str) -> (std::process::ExitStatus, String) {
    let o = Command::new("script")
        .args(["-qfec", command, "/dev/null"])
        .env("TERM", term)
        .env("COLUMNS", "100")
        .stdin(Stdio::null())
        .output()
        .expect("running script (util-linux)");
    (o.status, String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn quiet_prints_no_progress() {
    let path = default_model();
    let o = mechwatch(&["model", "fetch", "default", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    assert_eq!(stdout(&o).trim(), path.to_str().unwrap());
    let o = mechwatch(&["model", "fetch", "default"]);
    assert!(
        stderr(&o).contains("verifying the cached copy"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn on_a_terminal_the_bar_is_redrawn_in_place_and_erased() {
    default_model();
    let dir = tempfile::tempdir().unwrap();
    let policy = small_policy(dir.path());
    let cmd = format!(
        "{} check --model default --policy {} --format json --out /dev/null",
        mechwatch_bin().display(),
        policy.display()
    );
    let (status, out) = on_a_terminal(&cmd, "xterm");
    assert!(matches!(status.code(), Some(0 | 1)), "{out}");
    // Redraws: carriage return, the bar, erase to the end of the line.
    let draws: Vec<&str> = out
        .split('\r')
        .filter_map(|d| d.strip_suffix("\x1b[K"))
        .filter(|d| !d.is_empty())
        .collect();
    let bars: Vec<&&str> = draws
        .iter()
        .filter(|d| d.starts_with("running the checks ["))
        .collect();
    // The spinner while the model loads, then the checks' bar: drawn in place, not a line each.
    assert!(draws.len() >= 3, "{} draws: {out:?}", draws.len());
    assert!(!bars.is_empty(), "{out:?}");
    assert!(
        draws.iter().any(|d| d.contains(" loading model default ")),
        "{out:?}"
    );
    assert!(out.matches('\n').count() < draws.len(), "{out:?}");
    assert!(bars.iter().all(|b| b.contains("% (")), "{out:?}");
    assert!(draws.iter().all(|d| d.chars().count() <= 99), "{out:?}");
    // No colours: the only escape sequence is erase-line.
    assert_eq!(out.matches('\x1b').count(), out.matches("\x1b[K").count());
    // The bar is erased before the end line.
    assert!(
        out.contains("\r\x1b[Krunning the checks: done in "),
        "{out:?}"
    );
}

#[test]
fn a_dumb_terminal_gets_plain_lines() {
    default_model();
    let cmd = format!("{} model fetch default", mechwatch_bin().display());
    let (status, out) = on_a_terminal(&cmd, "dumb");
    assert!(status.success(), "{out}");
    assert!(!out.contains('\x1b'), "{out:?}");
    assert!(out.contains("verifying the cached copy"), "{out}");
    assert!(out.contains(": done in "), "{out}");
}
