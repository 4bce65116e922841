//! What an ops team installs: the shell completions and man pages (`mechwatch completions`,
//! `mechwatch man`), and the .deb that `scripts/build-deb` makes, inspected with dpkg-deb and
//! unpacked into a scratch root whose binary then runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::*;

/// The visible subcommands, as `mechwatch --help` lists them.
fn subcommands() -> Vec<String> {
    let o = mechwatch(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    let list: Vec<String> = out
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "help")
        .map(str::to_string)
        .collect();
    assert!(
        list.len() >= 10 && list.iter().any(|c| c == "check"),
        "{out}"
    );
    list
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
    stdout(&o)
}

/// What bash's completion offers for `mechwatch WORD` (and the word before it), through the
/// generated script's own function.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let line = words.join(" ");
    let cword = words.len() - 1;
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT={}; \
         _mechwatch mechwatch '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        line.len(),
        words[cword],
        if cword > 0 { words[cword - 1] } else { "" },
    );
    run(Command::new("bash").args(["-c", &prog]))
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_bash_completion_parses_and_completes_subcommands_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("mechwatch.bash");
    std::fs::write(
        &script,
        run(Command::new(mechwatch_bin()).args(["completions", "bash"])),
    )
    .unwrap();
    run(Command::new("bash").arg("-n").arg(&script));
    let all = bash_complete(&script, &["mechwatch", ""]);
    for c in subcommands() {
        assert!(all.contains(&c), "{c} not offered: {all:?}");
    }
    assert_eq!(
        bash_complete(&script, &["mechwatch", "compl"]),
        ["completions"]
    );
    let flags = bash_complete(&script, &["mechwatch", "daemon", "--"]);
    assert!(flags.contains(&"--config".to_string()), "{flags:?}");
}

#[test]
fn every_shell_gets_a_script_naming_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let s = run(Command::new(mechwatch_bin()).args(["completions", shell]));
        for c in subcommands() {
            assert!(s.contains(&c), "{shell}: no {c}");
        }
    }
    let o = mechwatch(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("possible values"), "{}", stderr(&o));
}

/// Run `shell -c prog` and return its standard output.
fn shell(shell: &str, prog: &str) -> String {
    run(Command::new(shell).args(["-c", prog]))
}

#[test]
fn the_zsh_and_fish_completions_parse_and_fish_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let zsh = tmp.path().join("_mechwatch");
    std::fs::write(
        &zsh,
        run(Command::new(mechwatch_bin()).args(["completions", "zsh"])),
    )
    .unwrap();
    run(Command::new("zsh").arg("-n").arg(&zsh));
    let defined = shell(
        "zsh",
        &format!(
            "autoload -U compinit; compinit -u -D; source '{}'; print ${{+functions[_mechwatch]}}",
            zsh.display()
        ),
    );
    assert_eq!(defined.trim(), "1", "zsh: no _mechwatch function");

    let fish = tmp.path().join("mechwatch.fish");
    std::fs::write(
        &fish,
        run(Command::new(mechwatch_bin()).args(["completions", "fish"])),
    )
    .unwrap();
    run(Command::new("fish").arg("--no-execute").arg(&fish));
    let complete = |line: &str| -> Vec<String> {
        shell(
            "fish",
            &format!("source '{}'; complete -C '{line}'", fish.display()),
        )
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect()
    };
    let all = complete("mechwatch ");
    for c in subcommands() {
        assert!(all.contains(&c), "fish: {c} not offered: {all:?}");
    }
    assert_eq!(complete("mechwatch compl"), ["completions"]);
    let flags = complete("mechwatch daemon --");
    assert!(flags.contains(&"--config".to_string()), "{flags:?}");
}

/// A page rendered as a reader sees it, by groff (as `man` does).
fn render(page: &Path) -> String {
    let o = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .stdin(std::fs::File::open(page).unwrap())
        .output()
        .expect("groff (Debian's groff-base; scripts/test-all installs it)");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}: {}", page.display(), stderr(&o));
    // Drop the overstrike bold/underline groff writes for a terminal.
    let text = stdout(&o);
    let mut clean = String::new();
    for c in text.chars() {
        if c == '\u{8}' {
            clean.pop();
        } else {
            clean.push(c);
        }
    }
    clean
}

#[test]
fn the_man_pages_render_and_name_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    run(Command::new(mechwatch_bin()).args(["man", "--dir", dir.to_str().unwrap()]));
    let top = render(&dir.join("mechwatch.1"));
    // groff justifies lines, so compare with runs of white space collapsed.
    let flat = top.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("mechwatch - Safety-audit"), "{top}");
    for c in subcommands() {
        assert!(
            top.contains(&format!("mechwatch-{c}(1)")),
            "{c} not in mechwatch(1): {top}"
        );
        let page = render(&dir.join(format!("mechwatch-{c}.1")));
        assert!(page.contains(&format!("mechwatch-{c}")), "{page}");
    }
    // Nested subcommands get their own pages; hidden ones none.
    assert!(dir.join("mechwatch-log-verify.1").exists());
    assert!(!dir.join("mechwatch-daemon-audit.1").exists());
    let check = render(&dir.join("mechwatch-check.1"));
    assert!(check.contains("--policy"), "{check}");
    // Without --dir, mechwatch.1 goes to standard output.
    let stdout_page = run(Command::new(mechwatch_bin()).arg("man"));
    assert_eq!(
        stdout_page,
        std::fs::read_to_string(dir.join("mechwatch.1")).unwrap()
    );
}

/// A red team's: a page that was a symbolic link was written through, onto its target.
#[test]
fn man_pages_are_not_written_through_a_symbolic_link() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    std::fs::create_dir(&dir).unwrap();
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("mechwatch.1")).unwrap();
    let o = Command::new(mechwatch_bin())
        .args(["man", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("symbolic link"));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    run(Command::new("dpkg-deb").args(args).arg(deb))
}

/// Build the .deb once per test process.
fn deb() -> &'static Path {
    static DEB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DEB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let o = Command::new(root.join("scripts/build-deb"))
            .current_dir(root)
            .output()
            .unwrap();
        assert!(o.status.success(), "scripts/build-deb: {}", stderr(&o));
        PathBuf::from(stdout(&o).trim())
    })
}

fn repo_file(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)).unwrap()
}

#[test]
fn the_deb_holds_the_stripped_binary_unit_config_man_pages_and_completions() {
    let deb = deb();
    let fields = dpkg_deb(&["-f"], deb);
    assert!(fields.contains("Package: mechwatch\n"), "{fields}");
    assert!(fields.contains("Architecture: amd64\n"), "{fields}");
    let depends = fields
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends: {fields}"));
    assert!(
        depends.contains("libc6") && depends.contains("passwd"),
        "{depends}"
    );

    let files = dpkg_deb(&["-c"], deb);
    for f in [
        "./usr/bin/mechwatch",
        "./usr/lib/systemd/system/mechwatch.service",
        "./etc/mechwatch/mechwatch.toml",
        "./usr/share/mechwatch/mechwatch-before-253.conf",
        "./usr/share/bash-completion/completions/mechwatch",
        "./usr/share/zsh/vendor-completions/_mechwatch",
        "./usr/share/fish/vendor_completions.d/mechwatch.fish",
        "./usr/share/doc/mechwatch/daemon.md",
    ] {
        assert!(files.lines().any(|l| l.ends_with(f)), "no {f} in\n{files}");
    }
    let bin_line = files
        .lines()
        .find(|l| l.ends_with("./usr/bin/mechwatch"))
        .unwrap();
    assert!(bin_line.starts_with("-rwxr-xr-x 0/0"), "{bin_line}");
    for c in subcommands() {
        assert!(
            files.contains(&format!("man1/mechwatch-{c}.1")),
            "no page for {c}"
        );
    }

    // The config is a conffile: an upgrade keeps the admin's edits.
    let members = dpkg_deb(&["-I"], deb);
    for m in ["conffiles", "postinst", "postrm", "prerm"] {
        assert!(
            members
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == m)),
            "no {m}: {members}"
        );
    }
    let info = run(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(deb)
        .arg("conffiles"));
    assert_eq!(info.trim(), "/etc/mechwatch/mechwatch.toml");
    let postinst = run(Command::new("dpkg-deb")
        .args(["-I"])
        .arg(deb)
        .arg("postinst"));
    assert!(
        postinst.contains("useradd ") && postinst.contains("--system"),
        "{postinst}"
    );

    // Unpacked into a scratch root: the files are the repository's, and the binary is the
    // stripped build of this tree.
    let tmp = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(tmp.path()));
    let at = |rel: &str| tmp.path().join(rel);
    assert_eq!(
        std::fs::read(at("usr/lib/systemd/system/mechwatch.service")).unwrap(),
        repo_file("systemd/mechwatch.service")
    );
    assert_eq!(
        std::fs::read(at("etc/mechwatch/mechwatch.toml")).unwrap(),
        repo_file("systemd/mechwatch.toml")
    );
    let packaged = at("usr/bin/mechwatch");
    let packaged_size = std::fs::metadata(&packaged).unwrap().len();
    let built_size = std::fs::metadata(mechwatch_bin()).unwrap().len();
    assert!(
        packaged_size < built_size,
        "packaged {packaged_size} bytes, built {built_size}"
    );
    let sections = run(Command::new("readelf").arg("-S").arg(&packaged));
    // (.debug_gdb_scripts is loaded with the program, and stays.)
    for s in [".debug_info", ".debug_line", ".symtab"] {
        assert!(!sections.contains(s), "{s}: not stripped:\n{sections}");
    }
    let built = run(Command::new("readelf").arg("-S").arg(mechwatch_bin()));
    assert!(built.contains(".debug_line"), "{built}");
    let version = run(Command::new(&packaged).arg("--version"));
    assert_eq!(version, stdout(&mechwatch(&["--version"])));

    // The packaged man page renders.
    let man = at("usr/share/man/man1");
    let page = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("mechwatch.1")
        })
        .expect("mechwatch.1");
    let plain = tmp.path().join("mechwatch.1");
    if page.extension().is_some_and(|e| e == "gz") {
        let o = Command::new("gzip").arg("-dc").arg(&page).output().unwrap();
        std::fs::write(&plain, o.stdout).unwrap();
    } else {
        std::fs::copy(&page, &plain).unwrap();
    }
    assert!(render(&plain).contains("mechwatch-daemon(1)"));
}

/// A scratch root for `dpkg --root`: a package database that lists systemd at version
/// `systemd` (`None`: not installed), and empty account files. Maintainer scripts run outside
/// a chroot with `$DPKG_ROOT` set (`--force-script-chrootless`).
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new(systemd: Option<&str>) -> Root {
        let dir = tempfile::tempdir().unwrap();
        for d in ["etc", "var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        for f in ["etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let status = match systemd {
            Some(v) => format!(
                "Package: systemd\nStatus: install ok installed\nPriority: important\n\
                 Section: admin\nMaintainer: test\nArchitecture: amd64\nVersion: {v}\n\
                 Description: system and service manager\n\n"
            ),
            None => String::new(),
        };
        std::fs::write(dir.path().join("var/lib/dpkg/status"), status).unwrap();
        Root { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn dpkg(&self, args: &[&str]) -> String {
        run(Command::new("dpkg")
            .arg(format!("--root={}", self.dir.path().display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args))
    }

    fn passwd_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("etc/passwd"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

fn host_has_user(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .status()
        .unwrap()
        .success()
}

#[test]
fn dpkg_installs_upgrades_removes_and_purges_in_a_scratch_root() {
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "dpkg --root needs root (CI and scripts/test-all run as root)"
    );
    let deb = deb().to_str().unwrap();
    let host_user_before = host_has_user("mechwatch");
    let dropin = "etc/systemd/system/mechwatch.service.d/before-253.conf";
    let conf = "etc/mechwatch/mechwatch.toml";

    // systemd 252 does not know Type=notify-reload: postinst adds the drop-in. The version
    // is the root's systemd package, never the host's.
    let r = Root::new(Some("252.39-1~deb12u2"));
    r.dpkg(&["-i", deb]);
    let status = r.dpkg(&["-s", "mechwatch"]);
    assert!(status.contains("Status: install ok installed"), "{status}");
    let users = r.passwd_lines();
    assert_eq!(users.len(), 1, "{users:?}");
    assert!(
        users[0].starts_with("mechwatch:x:")
            && users[0].ends_with(":/var/lib/mechwatch:/usr/sbin/nologin"),
        "{users:?}"
    );
    assert_eq!(
        host_has_user("mechwatch"),
        host_user_before,
        "postinst touched the host's accounts"
    );
    assert_eq!(
        std::fs::read(r.path(dropin)).unwrap(),
        repo_file("systemd/mechwatch-before-253.conf")
    );
    let version = run(Command::new(r.path("usr/bin/mechwatch")).arg("--version"));
    assert_eq!(version, stdout(&mechwatch(&["--version"])));

    // Reinstalled over itself: the admin's edit of the conffile stays, the user is not added
    // twice.
    let edited = format!(
        "{}\n# edited by the admin\n",
        std::fs::read_to_string(r.path(conf)).unwrap()
    );
    std::fs::write(r.path(conf), &edited).unwrap();
    r.dpkg(&["-i", deb]);
    assert_eq!(std::fs::read_to_string(r.path(conf)).unwrap(), edited);
    assert_eq!(r.passwd_lines().len(), 1);

    // Removed: the binary goes, the configuration and the drop-in stay. Purged: they go too;
    // the user (who may own an audit log) stays.
    r.dpkg(&["-r", "mechwatch"]);
    assert!(!r.path("usr/bin/mechwatch").exists());
    assert!(r.path(conf).exists() && r.path(dropin).exists());
    r.dpkg(&["-P", "mechwatch"]);
    assert!(!r.path(conf).exists());
    assert!(!r.path(dropin).exists());
    assert!(!r.path("etc/systemd/system/mechwatch.service.d").exists());
    assert_eq!(r.passwd_lines().len(), 1);

    // systemd 253 and later, or no systemd in the root (whatever the host runs): no drop-in.
    for systemd in [Some("253.1-1"), Some("257~rc1-2"), None] {
        let r = Root::new(systemd);
        r.dpkg(&["-i", deb]);
        assert!(r.path("usr/bin/mechwatch").exists());
        assert!(!r.path(dropin).exists(), "{systemd:?}");
        assert_eq!(r.passwd_lines().len(), 1);
    }
}
