//! The shipped systemd unit: the directives ops teams rely on are there, and
//! `systemd-analyze verify` accepts it where systemd is installed: as it is on systemd 253 and
//! later, with the `mechwatch-before-253.conf` drop-in on older systemd.

use std::path::Path;

fn systemd_file(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../systemd")
            .join(name),
    )
    .unwrap()
}

fn unit() -> String {
    systemd_file("mechwatch.service")
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
    assert_eq!(one("Type"), "notify-reload");
    // notify-reload sends SIGHUP itself; an ExecReload= would be run as well.
    assert!(values(&u, "ExecReload").is_empty());
    assert!(one("ExecStart").starts_with("/usr/bin/mechwatch daemon"));
    assert!(one("WatchdogSec").parse::<u64>().unwrap() > 0);
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
fn the_drop_in_for_systemd_before_253_makes_it_notify_with_exec_reload() {
    let d = systemd_file("mechwatch-before-253.conf");
    assert_eq!(values(&d, "Type"), ["notify"]);
    assert_eq!(values(&d, "ExecReload"), ["/bin/kill -HUP $MAINPID"]);
}

/// The version `systemd-analyze --version` reports ("systemd 252 (252.39-1~deb12u2)").
fn systemd_version() -> Option<u32> {
    let o = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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
        unit().replace("/usr/bin/mechwatch", bin.to_str().unwrap()),
    )
    .unwrap();
    let version = systemd_version().expect("systemd-analyze --version");
    let old = version < 253;
    if old {
        // What the .deb's postinst installs on such systems.
        let dir = tmp.path().join("mechwatch.service.d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("before-253.conf"),
            systemd_file("mechwatch-before-253.conf"),
        )
        .unwrap();
    }
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // systemd before 253 ignores the unknown type (the drop-in sets one it knows); from 253 on,
    // nothing is ignored.
    for l in err.lines() {
        assert!(
            old && l.ends_with("Failed to parse service type, ignoring: notify-reload"),
            "systemd {version}: {l}"
        );
    }
}
