//! The shipped systemd unit: the directives ops teams rely on are there, and
//! `systemd-analyze verify` accepts it where systemd is installed.

use std::path::Path;

fn unit() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/mechwatch.service"),
    )
    .unwrap()
}

fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix(&format!("{key}="))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn the_unit_has_the_required_directives() {
    let u = unit();
    let one = |k: &str| values(&u, k).pop().unwrap_or_else(|| panic!("no {k}="));
    assert_eq!(one("Type"), "notify");
    assert!(one("WatchdogSec").parse::<u64>().unwrap() > 0);
    assert!(one("ExecReload").contains("-HUP"));
    assert_eq!(one("StateDirectory"), "mechwatch");
    assert_eq!(one("ConfigurationDirectory"), "mechwatch");
    assert!(one("LoadCredential").starts_with("mechwatch-signing-key:"));
    assert_eq!(one("ProtectSystem"), "strict");
    assert!(!one("ReadOnlyPaths").is_empty());
    for k in ["NoNewPrivileges", "PrivateTmp", "ProtectHome"] {
        assert_eq!(one(k), "yes", "{k}");
    }
    assert!(one("RestrictAddressFamilies")
        .split_whitespace()
        .any(|f| f == "AF_UNIX"));
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed; only the directives were checked");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mechwatch.service");
    let bin = e2e::mechwatch_bin();
    std::fs::write(
        &path,
        unit().replace("/usr/local/bin/mechwatch", bin.to_str().unwrap()),
    )
    .unwrap();
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
