//! `mechwatch daemon` end to end: the real binary, real files copied in, real signals, the
//! real default model, and the signed log it writes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use audit_log::record::{RecordBody, Statement};
use e2e::*;

/// Daemon tests wait on real time (quiet periods, deadlines); run one at a time so that two
/// audits never share the 2 cores and stretch each other past the tests' time limits.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test site: a watched folder, a state folder, a key, a small policy and a config.
struct Site {
    tmp: tempfile::TempDir,
}

impl Site {
    /// `slow` adds a steering check that generates text, so an audit takes several seconds.
    fn new(quiet_secs: f64, slow: bool) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["models", "state", "policy/prompts"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("policy/prompts/pos.txt"), HARMFUL_SAMPLE).unwrap();
        std::fs::write(root.join("policy/prompts/neg.txt"), HARMLESS_SAMPLE).unwrap();
        let mut policy = String::from(
            "schema = 1\nname = \"small\"\nversion = \"1\"\n\n[prompts.pos]\nfile = \"prompts/pos.txt\"\n\n[prompts.neg]\nfile = \"prompts/neg.txt\"\n\n[directions.d]\nhook = \"blocks.10.hook_resid_post\"\npositive = \"pos\"\nnegative = \"neg\"\n\n[[checks]]\nid = \"separates\"\nkind = \"direction_probe\"\nseverity = \"high\"\ndirection = \"d\"\npositive = \"pos\"\nnegative = \"neg\"\nmin_auroc = 0.5\n",
        );
        if slow {
            policy.push_str("\n[[checks]]\nid = \"ablation\"\nkind = \"steering\"\nseverity = \"info\"\nprompts = \"pos\"\nintervention = { ablate = \"d\" }\nmetric = \"refusal_rate\"\nmax_tokens = 48\nbounds = { min_baseline = 0.0 }\n");
        }
        std::fs::write(root.join("policy/small.toml"), policy).unwrap();
        let key = root.join("key.pem");
        assert!(
            mechwatch(&["key", "generate", "--out", key.to_str().unwrap()])
                .status
                .success()
        );
        let site = Self { tmp };
        site.write_config(quiet_secs, "");
        site
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }
    fn config(&self) -> PathBuf {
        self.root().join("mechwatch.toml")
    }
    fn models(&self) -> PathBuf {
        self.root().join("models")
    }
    fn db(&self) -> PathBuf {
        self.root().join("state/audit.db")
    }

    fn write_config(&self, quiet_secs: f64, extra: &str) {
        let r = self.root().display();
        let deadline = if extra.contains("shutdown_deadline_secs") {
            ""
        } else {
            "shutdown_deadline_secs = 5\n"
        };
        std::fs::write(
            self.config(),
            format!(
                "state_dir = \"{r}/state\"\nkey = \"{r}/key.pem\"\nquiet_period_secs = {quiet_secs}\n{deadline}{extra}\n[[watch]]\npath = \"{r}/models\"\npolicies = \"{r}/policy\"\n"
            ),
        )
        .unwrap();
    }

    fn start(&self) -> DaemonProcess {
        let log = self.root().join("daemon.log");
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("daemon started")
            .count();
        let d = DaemonProcess::start(&self.config(), &log);
        wait_for(30, "the daemon to start", || {
            (d.logs().matches("daemon started").count() > before).then_some(())
        });
        d
    }

    /// Every record in the log, parsed.
    fn records(&self) -> Vec<RecordBody> {
        let Ok(conn) = audit_log::store::open_reader(&self.db()) else {
            return Vec::new();
        };
        audit_log::store::read_records_from(&conn, 0, 10_000)
            .unwrap_or_default()
            .iter()
            .map(|r| {
                serde_json::from_slice::<Statement>(&r.bytes)
                    .unwrap()
                    .predicate
                    .record
            })
            .collect()
    }

    fn wait_records(&self, n: usize, secs: u64) -> Vec<RecordBody> {
        wait_for(secs, &format!("{n} record(s)"), || {
            let r = self.records();
            (r.len() >= n).then_some(r)
        })
    }

    fn verify(&self) {
        let o = mechwatch(&[
            "log",
            "verify",
            "--db",
            self.db().to_str().unwrap(),
            "--pubkey",
            &format!("{}/key.pem.pub", self.root().display()),
        ]);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    }
}

fn input<'a>(r: &'a RecordBody, kind: &str) -> &'a str {
    let inputs = match r {
        RecordBody::Audit { inputs, .. } | RecordBody::Error { inputs, .. } => inputs,
        RecordBody::KeyRotation { .. } => panic!("a rotation"),
    };
    &inputs
        .iter()
        .find(|i| i.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} input"))
        .sha256
}

fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Copy `from` to `to` through a temporary name and a rename (how a complete file appears).
fn drop_atomically(from: &Path, to: &Path) {
    let tmp = to.with_extension("gguf.partial");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn a_slowly_copied_checkpoint_is_audited_once_for_its_final_digest() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(2.0, false);
    let d = site.start();
    // Written in place, in chunks, over several seconds: never quiet for 2 s until done.
    let bytes = std::fs::read(&model).unwrap();
    let dest = site.models().join("copied.gguf");
    let mut f = std::fs::File::create(&dest).unwrap();
    let chunks = 12;
    for c in bytes.chunks(bytes.len().div_ceil(chunks)) {
        f.write_all(c).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(f);
    let recs = site.wait_records(1, 120);
    std::thread::sleep(Duration::from_secs(4));
    let recs_after = site.records();
    assert_eq!(recs_after.len(), 1, "{}", d.logs());
    let RecordBody::Audit {
        verdict,
        model: subject,
        ..
    } = &recs[0]
    else {
        panic!("not an audit: {:?}", recs[0]);
    };
    assert_eq!(verdict, "pass");
    let digest = sha256_file(&dest);
    assert_eq!(subject.files[0].sha256, digest);
    assert!(input(&recs[0], "checkpoint").len() == 64);
    site.verify();
    assert_eq!(d.logs().matches("audit started").count(), 1, "{}", d.logs());

    // The same bytes under another name are not audited again.
    drop_atomically(&model, &site.models().join("again.gguf"));
    wait_for(60, "the duplicate to be skipped", || {
        d.logs().contains("already audited").then_some(())
    });
    assert_eq!(site.records().len(), 1);

    // `mechwatch status` shows the audit and the log head.
    let s = mechwatch(&["status", "--config", site.config().to_str().unwrap()]);
    assert!(s.status.success());
    let out = stdout(&s);
    assert!(
        out.contains("done     pass")
            && out.contains("copied.gguf")
            && out.contains("log: 1 record(s)"),
        "{out}"
    );
}

#[test]
fn a_corrupt_checkpoint_gets_an_error_record_and_the_daemon_carries_on() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, false);
    let d = site.start();
    // A GGUF whose header promises tensors the file does not hold.
    let bytes = std::fs::read(&model).unwrap();
    let bad = site.root().join("bad.bin");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    drop_atomically(&bad, &site.models().join("truncated.gguf"));
    let recs = site.wait_records(1, 60);
    let RecordBody::Error { stage, message, .. } = &recs[0] else {
        panic!("not an error record: {:?}", recs[0]);
    };
    assert_eq!(stage, "load_model");
    assert!(message.contains("truncated.gguf"), "{message}");
    // A good checkpoint dropped afterwards is still audited.
    drop_atomically(&model, &site.models().join("good.gguf"));
    let recs = site.wait_records(2, 120);
    assert!(
        matches!(&recs[1], RecordBody::Audit { verdict, .. } if verdict == "pass"),
        "{:?}",
        recs[1]
    );
    site.verify();
    drop(d);
}

#[test]
fn sigkill_during_an_audit_then_a_restart_gives_exactly_one_record() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(0.5, true);
    let d = site.start();
    drop_atomically(&model, &site.models().join("m.gguf"));
    wait_for(60, "the audit to start", || {
        d.logs().contains("audit started").then_some(())
    });
    wait_for(60, "the model to load", || {
        d.logs().contains("model loaded").then_some(())
    });
    std::thread::sleep(Duration::from_millis(800));
    d.signal(9);
    drop(d);
    assert_eq!(
        site.records().len(),
        0,
        "the audit finished before the kill; the test proves nothing"
    );
    let d = site.start();
    assert!(d.logs().contains("requeued=1"), "{}", d.logs());
    site.wait_records(1, 180);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(site.records().len(), 1, "{}", d.logs());
    site.verify();
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_and_sigterm_drains() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, false);
    let mut d = site.start();
    let good = std::fs::read_to_string(site.config()).unwrap();
    std::fs::write(site.config(), format!("{good}\nbogus_key = 1\n")).unwrap();
    d.signal(1);
    wait_for(30, "the failed reload", || {
        d.logs()
            .contains("reload failed; keeping the previous configuration")
            .then_some(())
    });
    assert!(d.logs().contains("bogus_key"), "{}", d.logs());
    // Still running on the old configuration: a new checkpoint is audited.
    drop_atomically(&model, &site.models().join("m.gguf"));
    site.wait_records(1, 120);
    // A valid new configuration is taken.
    std::fs::write(
        site.config(),
        good.replace("quiet_period_secs = 1", "quiet_period_secs = 2"),
    )
    .unwrap();
    d.signal(1);
    wait_for(30, "the reload", || {
        d.logs().contains("configuration reloaded").then_some(())
    });
    // SIGTERM: drains and exits cleanly.
    d.signal(15);
    assert_eq!(d.wait(Duration::from_secs(30)), Some(0), "{}", d.logs());
    assert!(d.logs().contains("drained; stopping"));
}

#[test]
fn systemd_notifications_come_from_the_work_loop() {
    let _serial = serial();
    use std::os::unix::net::UnixDatagram;
    let site = Site::new(1.0, false);
    let sock_path = site.root().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = std::fs::File::create(site.root().join("daemon.log")).unwrap();
    let mut child = std::process::Command::new(mechwatch_bin())
        .args(["daemon", "--config", site.config().to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(log)
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(30)
        && !(seen.iter().any(|m: &String| m == "READY=1")
            && seen.iter().filter(|m| m.as_str() == "WATCHDOG=1").count() >= 2)
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(seen.iter().any(|m| m == "READY=1"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|m| m.starts_with("STATUS=queue 0; auditing: nothing")),
        "{seen:?}"
    );
    assert!(
        seen.iter().filter(|m| m.as_str() == "WATCHDOG=1").count() >= 2,
        "{seen:?}"
    );
    assert!(status.success());
    // Stopping is announced.
    let mut rest = Vec::new();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        rest.iter().chain(&seen).any(|m| m == "STOPPING=1"),
        "{rest:?}"
    );
}

#[test]
fn a_checkpoint_changed_mid_audit_is_requeued_and_sigterm_abandons_after_its_deadline() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, true);
    site.write_config(1.0, "shutdown_deadline_secs = 0.5");
    let d = site.start();
    let dest = site.models().join("m.gguf");
    drop_atomically(&model, &dest);
    wait_for(60, "the model to load", || {
        d.logs().contains("model loaded").then_some(())
    });
    // Bytes appended while the policies run: the re-hash differs, the result is dropped.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&dest)
        .unwrap()
        .write_all(&[0u8; 4096])
        .unwrap();
    let t = std::time::Instant::now();
    while !d.logs().contains("changed during the audit") {
        assert!(t.elapsed() < Duration::from_secs(120), "{}", d.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let recs = site.wait_records(1, 180);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(site.records().len(), 1, "{}", d.logs());
    assert_eq!(
        input(&recs[0], "checkpoint"),
        site_digest(&dest),
        "the record is for the final bytes"
    );

    // SIGTERM during an audit with a 0.5 s deadline: abandoned, requeued, audited after restart.
    let mut d = d;
    drop_atomically(&model, &site.models().join("second.gguf"));
    let before = d.logs().matches("model loaded").count();
    wait_for(60, "the second audit", || {
        (d.logs().matches("model loaded").count() > before).then_some(())
    });
    d.signal(15);
    assert_eq!(d.wait(Duration::from_secs(20)), Some(0), "{}", d.logs());
    assert!(
        d.logs().contains("audit abandoned and requeued"),
        "{}",
        d.logs()
    );
    assert_eq!(site.records().len(), 1);
    let d = site.start();
    site.wait_records(2, 180);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(site.records().len(), 2, "{}", d.logs());
    site.verify();
}

/// The daemon's digest of a single-file checkpoint: sha256 over `sha256sum`'s line for the
/// file read as standard input (`<hex>  -`).
fn site_digest(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("{}  -\n", sha256_file(p))))
}

/// The default model with `n` zero bytes appended: still loadable, another digest.
fn model_variant(site: &Site, n: usize) -> PathBuf {
    let mut bytes = std::fs::read(default_model()).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, n));
    let p = site.root().join(format!("variant-{n}.bin"));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn mkfifo(p: &Path) {
    // The `mkfifo` command keeps the tests free of unsafe code.
    assert!(std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap()
        .success());
}

fn stop(mut d: DaemonProcess) {
    d.signal(15);
    assert_eq!(d.wait(Duration::from_secs(60)), Some(0), "{}", d.logs());
}

#[test]
fn the_daemon_trusts_unverified_rows() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, false);
    let d = site.start();
    drop_atomically(&model, &site.models().join("a.gguf"));
    let recs = site.wait_records(1, 120);
    stop(d);
    // A plain INSERT, unsigned, naming another checkpoint's digest as already audited.
    let other = model_variant(&site, 4096);
    let forged_digest = site_digest(&other);
    let conn = rusqlite::Connection::open(site.db()).unwrap();
    let (bytes, key_id): (Vec<u8>, String) = conn
        .query_row("SELECT bytes, key_id FROM records WHERE seq = 0", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    let forged = text.replace(input(&recs[0], "checkpoint"), &forged_digest);
    assert_ne!(forged, text);
    conn.execute(
        "INSERT INTO records (seq, bytes, sig, key_id, kind, subject) VALUES (1, ?1, ?2, ?3, 'audit', 'x')",
        rusqlite::params![forged.as_bytes(), vec![0u8; 64], key_id],
    )
    .unwrap();
    drop(conn);
    drop_atomically(&other, &site.models().join("other.gguf"));
    // The daemon refuses to start on a log that does not verify: exit 2, and says why.
    let mut d = DaemonProcess::start(&site.config(), &site.root().join("daemon.log"));
    assert_eq!(d.wait(Duration::from_secs(60)), Some(2), "{}", d.logs());
    assert!(
        d.logs().contains("does not verify") && d.logs().contains("seq 1: bad signature"),
        "{}",
        d.logs()
    );
    assert!(!d.logs().contains("audit skipped"), "{}", d.logs());
}

#[test]
fn some_checkpoints_are_never_seen() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, false);
    site.write_config(1.0, "reconcile_interval_secs = 2\n");
    let d = site.start();
    // A symlinked .gguf is followed.
    std::os::unix::fs::symlink(&model, site.models().join("link.gguf")).unwrap();
    let recs = site.wait_records(1, 120);
    assert!(
        matches!(&recs[0], RecordBody::Audit { .. }),
        "{:?}",
        recs[0]
    );
    // A checkpoint 9 directories deep is reported, once, however many scans pass.
    let mut deep = site.models();
    for i in 0..9 {
        deep.push(format!("d{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::copy(&model, deep.join("deep.gguf")).unwrap();
    wait_for(30, "the deep directory to be reported", || {
        d.logs().contains("more than 8 directories").then_some(())
    });
    std::thread::sleep(Duration::from_secs(5)); // at least two more reconciles
    assert_eq!(
        d.logs().matches("more than 8 directories").count(),
        1,
        "{}",
        d.logs()
    );
    assert!(d.logs().contains("d8"), "{}", d.logs());
    stop(d);

    // The watched directory removed and re-created: watched again at once, not at the next
    // reconcile (five minutes away here).
    site.write_config(1.0, "");
    let d = site.start();
    std::fs::remove_dir_all(site.models()).unwrap();
    wait_for(30, "the removal to be noticed", || {
        d.logs().contains("watched directory is gone").then_some(())
    });
    std::fs::create_dir_all(site.models()).unwrap();
    wait_for(30, "the new directory to be watched", || {
        d.logs()
            .contains("watched directory re-created; watching it again")
            .then_some(())
    });
    let variant = model_variant(&site, 4096);
    drop_atomically(&variant, &site.models().join("after.gguf"));
    let recs = site.wait_records(2, 120);
    assert!(
        matches!(&recs[1], RecordBody::Audit { model, .. } if model.path.ends_with("after.gguf")),
        "{:?}",
        recs[1]
    );
    site.verify();
}

#[test]
fn an_abort_kills_the_daemon() {
    let _serial = serial();
    let site = Site::new(1.0, false);
    // A second watched directory whose audits may use only 300 MB of address space: loading
    // the model there fails an allocation, which aborts the process.
    let cramped = site.root().join("cramped");
    std::fs::create_dir_all(&cramped).unwrap();
    let r = site.root().display();
    std::fs::write(
        site.config(),
        format!(
            "state_dir = \"{r}/state\"\nkey = \"{r}/key.pem\"\nquiet_period_secs = 1\nshutdown_deadline_secs = 5\n\n[[watch]]\npath = \"{r}/models\"\npolicies = \"{r}/policy\"\n\n[[watch]]\npath = \"{r}/cramped\"\npolicies = \"{r}/policy\"\naudit_memory_limit_mb = 300\n"
        ),
    )
    .unwrap();
    let d = site.start();
    let bad = model_variant(&site, 0);
    drop_atomically(&bad, &cramped.join("bad.gguf"));
    let good = model_variant(&site, 4096);
    drop_atomically(&good, &site.models().join("good.gguf"));
    let recs = site.wait_records(2, 240);
    // Queued together, so in either order.
    let error = recs
        .iter()
        .find(|r| matches!(r, RecordBody::Error { .. }))
        .unwrap_or_else(|| panic!("no error record: {recs:?}"));
    let RecordBody::Error { stage, message, .. } = error else {
        unreachable!()
    };
    assert_eq!(stage, "audit_process", "{message}");
    // Killed by the abort of a failed allocation, not a load error the child reported.
    assert!(
        message.contains("SIGABRT") && message.contains("300 MB"),
        "{message}"
    );
    assert_eq!(input(error, "checkpoint"), site_digest(&bad));
    assert!(
        recs.iter()
            .any(|r| matches!(r, RecordBody::Audit { verdict, .. } if verdict == "pass")),
        "{recs:?}"
    );
    assert!(d.logs().contains("audit recorded"), "{}", d.logs());
    stop(d);
    // A restart writes nothing new: the crashed checkpoint is quarantined by its digest.
    let d = site.start();
    wait_for(60, "both checkpoints to be skipped", || {
        (d.logs().matches("already audited").count() >= 2).then_some(())
    });
    assert_eq!(site.records().len(), 2, "{}", d.logs());
    site.verify();
}

#[test]
fn a_panic_writes_a_new_error_record_on_every_restart() {
    let _serial = serial();
    let site = Site::new(1.0, false);
    let d = site.start();
    // A checkpoint whose content cannot be hashed (a FIFO) is keyed by its state.
    mkfifo(&site.models().join("stuck.gguf"));
    let recs = site.wait_records(1, 60);
    let RecordBody::Error { stage, message, .. } = &recs[0] else {
        panic!("not an error record: {:?}", recs[0]);
    };
    assert_eq!(stage, "hash");
    assert!(
        message.contains("stuck.gguf") && message.contains("FIFO"),
        "{message}"
    );
    assert_eq!(input(&recs[0], "checkpoint_state").len(), 64);
    stop(d);
    for _ in 0..2 {
        let d = site.start();
        wait_for(60, "the checkpoint to be skipped", || {
            d.logs()
                .contains("unreadable checkpoint state already has an error record")
                .then_some(())
        });
        stop(d);
    }
    assert_eq!(site.records().len(), 1);
    site.verify();
}

#[test]
fn a_fifo_blocks_a_worker_forever() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, false);
    let d = site.start();
    mkfifo(&site.models().join("fifo.gguf"));
    drop_atomically(&model, &site.models().join("good.gguf"));
    let recs = site.wait_records(2, 120);
    let error = recs
        .iter()
        .find_map(|r| match r {
            RecordBody::Error { message, .. } => Some(message),
            _ => None,
        })
        .expect("an error record");
    assert!(error.contains("fifo.gguf"), "{error}");
    assert!(
        recs.iter()
            .any(|r| matches!(r, RecordBody::Audit { verdict, .. } if verdict == "pass")),
        "{recs:?}"
    );
    drop(d);
}

#[test]
fn an_hf_index_that_names_a_dot_file_shard_makes_a_requeue_loop() {
    let _serial = serial();
    let model = default_model();
    let site = Site::new(1.0, false);
    // The default model as an HF directory whose index names a hidden shard.
    let hf = site.root().join("hf");
    let o = mechwatch(&[
        "model",
        "convert",
        model.to_str().unwrap(),
        hf.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::rename(hf.join("model.safetensors"), hf.join(".hidden.safetensors")).unwrap();
    let bytes = std::fs::read(hf.join(".hidden.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .map(|k| (k.clone(), ".hidden.safetensors".into()))
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
    // A visible shard, so that the directory is a checkpoint to the scanner.
    std::fs::write(hf.join("unused.safetensors"), b"").unwrap();
    let d = site.start();
    std::fs::rename(&hf, site.models().join("hf")).unwrap();
    let recs = site.wait_records(1, 120);
    let RecordBody::Error { stage, message, .. } = &recs[0] else {
        panic!("not an error record: {:?}", recs[0]);
    };
    assert_eq!(stage, "manifest");
    assert!(message.contains(".hidden.safetensors"), "{message}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(site.records().len(), 1);
    assert_eq!(d.logs().matches("audit started").count(), 1, "{}", d.logs());
}

/// Without `--config` the daemon reads /etc/mechwatch/mechwatch.toml; missing, it says which
/// file and what to do, and exits 2.
#[test]
fn without_config_the_daemon_reads_etc_mechwatch() {
    if Path::new("/etc/mechwatch/mechwatch.toml").exists() {
        eprintln!("/etc/mechwatch/mechwatch.toml exists here (the .deb is installed); not starting a daemon on it");
        return;
    }
    let o = std::process::Command::new(mechwatch_bin())
        .arg("daemon")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("config /etc/mechwatch/mechwatch.toml does not exist")
            && err.contains("--config"),
        "{err}"
    );
}

/// Relative paths in the config resolve against the config's folder, not the working
/// directory (which is `/` under systemd); `mechwatch status --config` reads them the same way.
#[test]
fn relative_paths_in_the_config_resolve_against_its_folder() {
    let _serial = serial();
    let site = Site::new(1.0, false);
    std::fs::write(
        site.config(),
        "state_dir = \"state\"\nkey = \"key.pem\"\nquiet_period_secs = 1\nshutdown_deadline_secs = 5\n\
         [[watch]]\npath = \"models\"\npolicies = \"policy\"\n",
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let log = site.root().join("daemon.log");
    let mut child = std::process::Command::new(mechwatch_bin())
        .args(["daemon", "--config", site.config().to_str().unwrap()])
        .current_dir(elsewhere.path())
        .env("MECHWATCH_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(30, "the daemon to start", || {
        logs().contains("daemon started").then_some(())
    });
    assert!(site.db().exists(), "{}", logs());
    assert!(site.root().join("state/state.db").exists());
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    let s = std::process::Command::new(mechwatch_bin())
        .args(["status", "--config", "mechwatch.toml"])
        .current_dir(site.root())
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", stderr(&s));
    assert!(stdout(&s).contains("log: 0 record(s)"), "{}", stdout(&s));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success(), "{}", logs());
}

/// With stderr connected to the journal (`$JOURNAL_STREAM` names its device and inode) every
/// line starts with its sd-daemon priority and carries no timestamp; with the variable naming
/// another file, lines are plain and timestamped.
#[test]
fn under_journald_log_lines_carry_their_priority() {
    use std::os::unix::fs::MetadataExt;
    let _serial = serial();
    let site = Site::new(1.0, false);
    // A FIFO where a checkpoint should be: an error record, logged as a warning.
    mkfifo(&site.models().join("pipe.gguf"));
    let run = |stream: &dyn Fn(u64, u64) -> String, name: &str, reload: bool| -> String {
        let path = site.root().join(name);
        let file = std::fs::File::create(&path).unwrap();
        let meta = file.metadata().unwrap();
        let mut child = std::process::Command::new(mechwatch_bin())
            .args(["daemon", "--config", site.config().to_str().unwrap()])
            .env("MECHWATCH_LOG", "info")
            .env("JOURNAL_STREAM", stream(meta.dev(), meta.ino()))
            .stderr(file)
            .spawn()
            .unwrap();
        let logs = || std::fs::read_to_string(&path).unwrap_or_default();
        let started = std::time::Instant::now();
        // Killed if the test panics, so no daemon outlives it holding the test's pipes.
        struct KillOnDrop(u32);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &self.0.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let _guard = KillOnDrop(child.id());
        let warned = |l: &str| !reload || l.contains("could not check");
        while !(logs().contains("daemon started") && warned(&logs())) {
            assert!(
                started.elapsed().as_secs() < 30,
                "timed out after 30s waiting for the daemon to start; its log:\n{}",
                logs()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        if reload {
            let good = std::fs::read_to_string(site.config()).unwrap();
            std::fs::write(site.config(), format!("{good}\nbogus_key = 1\n")).unwrap();
            let _ = std::process::Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status();
            wait_for(30, "the failed reload", || {
                logs().contains("reload failed").then_some(())
            });
            std::fs::write(site.config(), good).unwrap();
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        assert!(child.wait().unwrap().success(), "{}", logs());
        logs()
    };
    let line = |logs: &str, what: &str| -> String {
        logs.lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` line in {logs}"))
            .to_string()
    };

    let journal = run(&|dev, ino| format!("{dev}:{ino}"), "journal.log", true);
    assert!(
        line(&journal, "daemon started").starts_with("<6>"),
        "{journal}"
    );
    assert!(
        line(&journal, "could not check").starts_with("<4>"),
        "{journal}"
    );
    assert!(
        line(&journal, "reload failed").starts_with("<3>"),
        "{journal}"
    );
    for l in journal.lines().filter(|l| !l.is_empty()) {
        let rest = l
            .strip_prefix(|c| c == '<')
            .and_then(|r| r.get(2..))
            .unwrap_or_else(|| panic!("no priority: {l}"));
        // No timestamp: the level comes first.
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG"]
                .iter()
                .any(|lv| rest.trim_start().starts_with(lv)),
            "{l}"
        );
    }

    // The variable names another file (a child whose stderr was redirected): no prefix.
    let plain = run(&|dev, ino| format!("{dev}:{}", ino + 1), "plain.log", false);
    let started = line(&plain, "daemon started");
    assert!(
        started.starts_with(|c: char| c.is_ascii_digit()),
        "timestamped, no priority: {plain}"
    );
    assert!(!plain.lines().any(|l| l.starts_with('<')), "{plain}");
}

/// CLOCK_BOOTTIME in µs, read from /proc/uptime (no unsafe code in the tests): never behind
/// CLOCK_MONOTONIC.
fn boottime_usec() -> u64 {
    let t = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = t.split_whitespace().next().unwrap().parse().unwrap();
    (secs * 1e6) as u64
}

/// SIGHUP: `RELOADING=1` with `MONOTONIC_USEC=` (what `Type=notify-reload` waits for), then
/// `READY=1` once the configuration is reloaded.
#[test]
fn sighup_sends_reloading_with_the_monotonic_time_then_ready() {
    let _serial = serial();
    use std::os::unix::net::UnixDatagram;
    let site = Site::new(1.0, false);
    let sock_path = site.root().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = site.root().join("daemon.log");
    let mut child = std::process::Command::new(mechwatch_bin())
        .args(["daemon", "--config", site.config().to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("MECHWATCH_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut next_until = |want: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no notification after {seen:?}: {e}"));
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = want(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    };
    next_until(&|m| m == "READY=1");
    let mut stamps = Vec::new();
    for _ in 0..2 {
        let before = boottime_usec();
        let _ = std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status();
        let seen = next_until(&|m| m.starts_with("RELOADING=1"));
        let reloading = seen.last().unwrap();
        let usec: u64 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{reloading:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("{reloading:?}: {e}"));
        // /proc/uptime has 10 ms steps.
        assert!(
            usec > 0 && usec <= boottime_usec() + 20_000,
            "MONOTONIC_USEC {usec}, boot time before the signal {before}"
        );
        stamps.push(usec);
        // READY=1 comes after the reload, nothing in between but STATUS lines.
        let after = next_until(&|m| m == "READY=1");
        assert!(
            after[..after.len() - 1]
                .iter()
                .all(|m| m.starts_with("STATUS=")),
            "{after:?}"
        );
    }
    assert!(stamps[1] > stamps[0], "{stamps:?}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logs.matches("configuration reloaded").count(), 2, "{logs}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success(), "{logs}");
}

/// A policy for tiny test checkpoints: a direction at block 1, probed with a bound that any
/// AUROC meets (the test is about which instruments measure, not what they find).
const TINY_POLICY: &str = "schema = 1\nname = \"tiny\"\nversion = \"1\"\n\n\
[prompts.pos]\nfile = \"prompts/pos.txt\"\nchat = false\n\n\
[prompts.neg]\nfile = \"prompts/neg.txt\"\nchat = false\n\n\
[directions.d]\nhook = \"blocks.1.hook_resid_post\"\npositive = \"pos\"\nnegative = \"neg\"\n\n\
[[checks]]\nid = \"separates\"\nkind = \"direction_probe\"\nseverity = \"high\"\n\
direction = \"d\"\npositive = \"pos\"\nnegative = \"neg\"\nmin_auroc = 0.0\n";

/// `base` in a `[[watch]]` (relative to the config's folder): the direction is computed on
/// the base, so the audit's signed record pins it with the base as its reference; a base that
/// does not load is a signed error record naming the config file and the base, never a pass.
#[test]
fn a_watch_with_a_base_measures_with_the_base_checkpoint_s_instruments() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for d in ["good", "broken", "state", "policy/prompts", "ref"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("policy/prompts/pos.txt"),
        "w1 w2 w3\nw1 w4 w5\nw1 w6 w7\n",
    )
    .unwrap();
    std::fs::write(
        root.join("policy/prompts/neg.txt"),
        "w9 w2 w3\nw9 w4 w5\nw9 w6 w7\n",
    )
    .unwrap();
    std::fs::write(root.join("policy/tiny.toml"), TINY_POLICY).unwrap();
    let base = probes::testing::llama_dir_deep(&root.join("ref"), "base", 8, 2);
    let base_digest = probes::testing::load(&base).manifest.root();
    probes::testing::llama_dir_deep(&root.join("good"), "nudged", 7, 2);
    probes::testing::llama_dir_deep(&root.join("broken"), "other", 9, 2);
    let key = root.join("key.pem");
    assert!(
        mechwatch(&["key", "generate", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    let config = root.join("mechwatch.toml");
    std::fs::write(
        &config,
        "state_dir = \"state\"\nkey = \"key.pem\"\nquiet_period_secs = 1\nshutdown_deadline_secs = 5\n\
         [[watch]]\npath = \"good\"\npolicies = \"policy\"\nbase = \"ref/base\"\n\
         [[watch]]\npath = \"broken\"\npolicies = \"policy\"\nbase = \"ref/missing\"\n",
    )
    .unwrap();
    let log = root.join("daemon.log");
    let mut child = std::process::Command::new(mechwatch_bin())
        .args(["daemon", "--config", config.to_str().unwrap()])
        .env("MECHWATCH_LOG", "info")
        .env("MECHWATCH_HOME", root.join("home"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let db = root.join("state/audit.db");
    let recs = wait_for(120, "2 records", || {
        let conn = audit_log::store::open_reader(&db).ok()?;
        let rows = audit_log::store::read_records_from(&conn, 0, 100).ok()?;
        (rows.len() >= 2).then(|| {
            rows.iter()
                .map(|r| {
                    serde_json::from_slice::<Statement>(&r.bytes)
                        .unwrap()
                        .predicate
                        .record
                })
                .collect::<Vec<_>>()
        })
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success(), "{}", logs());

    let audit = recs
        .iter()
        .find_map(|r| match r {
            RecordBody::Audit {
                result, verdict, ..
            } => Some((result, verdict)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no audit record: {recs:?}\n{}", logs()));
    let (result, verdict) = audit;
    assert_eq!(verdict, "pass", "{result}");
    assert!(
        result["model"]["path"]
            .as_str()
            .unwrap()
            .ends_with("good/nudged"),
        "{result}"
    );
    assert_ne!(result["model"]["digest"], base_digest.as_str());
    let pins = result["instruments"].as_array().unwrap();
    let direction = pins
        .iter()
        .find(|p| p["kind"] == "direction")
        .unwrap_or_else(|| panic!("no direction pinned: {result}"));
    assert_eq!(direction["reference"], base_digest.as_str(), "{result}");
    assert_eq!(direction["origin"], format!("built on {base_digest}"));

    let (stage, message) = recs
        .iter()
        .find_map(|r| match r {
            RecordBody::Error { stage, message, .. } => Some((stage, message)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no error record: {recs:?}\n{}", logs()));
    assert_eq!(stage, "load_base", "{message}");
    for part in [
        config.display().to_string(),
        root.join("ref/missing").display().to_string(),
        "does not load".to_string(),
    ] {
        assert!(message.contains(&part), "{part}: {message}");
    }
}
