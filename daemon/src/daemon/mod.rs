//! `mechwatch daemon`: watch checkpoint directories and audit each complete checkpoint once.
//!
//! One thread runs the main loop: it receives filesystem events (debounced), signals and
//! worker results on one channel, blocking with a timeout (no polling while idle); it scans,
//! queues, dispatches, appends records (the log's single writer) and talks to systemd. Worker
//! threads run audits, each in a child process (see [`audit`]). State that must survive a
//! restart lives in SQLite: the job queue in `state.db`, the records in `audit.db`; which
//! checkpoints were audited is read from the log, verified as a whole at start (a log that
//! does not verify stops the daemon from starting), and kept up to date by the daemon as the
//! log's single writer.
//!
//! What the scan passes over (symlinked directories, directories too deep, special files) is
//! logged once per path and reason. A watched directory that is removed and re-created is
//! watched again as soon as it reappears (the kernel watch died with the old directory).

pub mod audit;
pub mod config;
pub mod jobs;
pub mod logging;
pub mod scan;
pub mod sd_notify;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use audit_log::store::AuditLog;
use notify::RecursiveMode;
use tracing::{error, info, warn};

use self::audit::{Audited, Children, Outcome};
use self::config::{Config, LoadedWatch};
use self::jobs::{Job, Jobs};
use self::scan::Snapshot;

enum Msg {
    Fs(notify_debouncer_full::DebounceEventResult),
    Signal(i32),
    Progress { job: i64, step: String },
    Done(Outcome),
}

/// What the scanner knows of one checkpoint.
struct Seen {
    snapshot: Snapshot,
    since: Instant,
    /// The snapshot a job was queued for, so a settled checkpoint is queued once.
    queued: Option<Snapshot>,
}

struct Running {
    path: String,
    step: String,
    last_progress: Instant,
    started: Instant,
    /// When the last "audit in progress" line was logged, and at which step.
    logged: (Instant, String),
}

pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    watches: Vec<LoadedWatch>,
    jobs: Jobs,
    log: AuditLog,
    log_db: PathBuf,
    /// The key the log verifies against (its first signing key).
    trusted: ed25519_dalek::VerifyingKey,
    audited: Audited,
    seen: HashMap<PathBuf, Seen>,
    running: HashMap<i64, Running>,
    children: Children,
    /// Scan skips already logged.
    warned: HashSet<scan::Skip>,
    /// Identity (device, inode) of each watched directory when it was watched; `None` while
    /// it is missing.
    roots: Vec<Option<(u64, u64)>>,
    /// Requeues of one checkpoint state: (path, digest) -> count.
    requeues: HashMap<(String, String), u32>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    work_tx: Option<Sender<(Job, audit::Context)>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    notifier: sd_notify::Notifier,
    _debouncer: Option<
        notify_debouncer_full::Debouncer<
            notify::RecommendedWatcher,
            notify_debouncer_full::RecommendedCache,
        >,
    >,
}

/// Run until SIGTERM or SIGINT. Returns after draining (or abandoning) running audits.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let mut d = Daemon::start(config_path)?;
    d.main_loop()
}

impl Daemon {
    fn start(config_path: &Path) -> anyhow::Result<Self> {
        let (config, watches) = Config::load(config_path)?;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let jobs = Jobs::open(&config.state_dir.join("state.db"))?;
        let requeued = jobs.requeue_running()?;
        let log_db = config.state_dir.join("audit.db");
        let signer = crate::cmd::key::load_signer(config.key.as_deref())?;
        let configured = match &config.trusted_pubkey {
            Some(p) => Some(
                audit_log::keys::load_public(p)
                    .with_context(|| format!("reading trusted_pubkey {}", p.display()))?,
            ),
            None => None,
        };
        let trusted = configured.unwrap_or_else(|| signer.public());
        // The writer verifies the whole log before its first append, from the trusted key.
        let log = match &configured {
            Some(k) => AuditLog::open_trusting(&log_db, signer, k),
            None => AuditLog::open(&log_db, Some(signer)),
        }
        .with_context(|| format!("opening {}", log_db.display()))?;
        let audited = Arc::new(Mutex::new(audit::audited_from_log(
            log.connection(),
            &log_db,
            &trusted,
        )?));
        let (tx, rx) = channel();
        let mut d = Self {
            config_path: config_path.to_path_buf(),
            config,
            watches,
            jobs,
            log,
            log_db,
            trusted,
            audited,
            seen: HashMap::new(),
            running: HashMap::new(),
            children: Arc::new(Mutex::new(HashMap::new())),
            warned: HashSet::new(),
            roots: Vec::new(),
            requeues: HashMap::new(),
            tx,
            rx,
            work_tx: None,
            workers: Vec::new(),
            notifier: sd_notify::Notifier::from_env(),
            _debouncer: None,
        };
        d.spawn_workers();
        d.watch()?;
        let sig_tx = d.tx.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ])?;
        std::thread::spawn(move || {
            for s in signals.forever() {
                if sig_tx.send(Msg::Signal(s)).is_err() {
                    break;
                }
            }
        });
        info!(
            config = %config_path.display(),
            watches = d.watches.len(),
            records = d.log.len()?,
            requeued,
            "daemon started"
        );
        Ok(d)
    }

    fn spawn_workers(&mut self) {
        let (work_tx, work_rx) = channel::<(Job, audit::Context)>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..self.config.concurrency {
            let rx = Arc::clone(&work_rx);
            let tx = self.tx.clone();
            self.workers.push(std::thread::spawn(move || loop {
                let next = rx.lock().map(|r| r.recv());
                let Ok(Ok((job, ctx))) = next else { break };
                let id = job.id;
                let ptx = tx.clone();
                let mut progress = |step: &str| {
                    let _ = ptx.send(Msg::Progress {
                        job: id,
                        step: step.to_string(),
                    });
                };
                let outcome = audit::run(job, &ctx, &mut progress);
                if tx.send(Msg::Done(outcome)).is_err() {
                    break;
                }
            }));
        }
        self.work_tx = Some(work_tx);
    }

    /// (Re)create the filesystem watcher for the configured directories. A directory that is
    /// missing is left out and watched once it reappears.
    fn watch(&mut self) -> anyhow::Result<()> {
        self._debouncer = None;
        let tx = self.tx.clone();
        let mut deb = notify_debouncer_full::new_debouncer(
            Duration::from_millis(500),
            None,
            move |r: notify_debouncer_full::DebounceEventResult| {
                let _ = tx.send(Msg::Fs(r));
            },
        )?;
        self.roots.clear();
        for w in &self.watches {
            let id = identity(&w.watch.path);
            if id.is_some() {
                deb.watch(&w.watch.path, RecursiveMode::Recursive)
                    .with_context(|| format!("watching {}", w.watch.path.display()))?;
            }
            self.roots.push(id);
        }
        self._debouncer = Some(deb);
        Ok(())
    }

    /// Watch again any watched directory that was removed and re-created (or replaced);
    /// whether one is missing now. True in `.1` when the watches were renewed.
    fn check_roots(&mut self) -> (bool, bool) {
        let now: Vec<_> = self
            .watches
            .iter()
            .map(|w| identity(&w.watch.path))
            .collect();
        let missing = now.iter().any(Option::is_none);
        if now == self.roots {
            return (missing, false);
        }
        for ((w, before), after) in self.watches.iter().zip(&self.roots).zip(&now) {
            match (before, after) {
                (Some(_), None) => {
                    warn!(dir = %w.watch.path.display(), "watched directory is gone; watching for it to reappear")
                }
                (_, Some(_)) if before != after => {
                    info!(dir = %w.watch.path.display(), "watched directory re-created; watching it again")
                }
                _ => {}
            }
        }
        if let Err(e) = self.watch() {
            error!(error = %format!("{e:#}"), "cannot watch the directories again");
        }
        (missing, true)
    }

    fn main_loop(&mut self) -> anyhow::Result<()> {
        self.check_roots();
        self.scan_all();
        self.notifier.send("READY=1");
        let watchdog = sd_notify::Notifier::watchdog_interval();
        let mut last_reconcile = Instant::now();
        let mut last_ping = Instant::now();
        let mut draining: Option<Instant> = None;
        let mut dirty = false;
        loop {
            self.promote();
            if draining.is_none() {
                self.dispatch()?;
            }
            self.status(draining.is_some());
            if let Some(deadline) = draining {
                if self.running.is_empty() {
                    info!("drained; stopping");
                    break;
                }
                if Instant::now() >= deadline {
                    if let Ok(mut children) = self.children.lock() {
                        for (_, mut c) in children.drain() {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                    for (id, r) in self.running.drain() {
                        warn!(job = id, checkpoint = %r.path, "shutdown deadline passed; audit abandoned and requeued");
                        self.jobs.requeue(id, "abandoned at shutdown")?;
                    }
                    break;
                }
            }
            // Sleep until something happens, or the next timer: the watchdog, a checkpoint
            // settling, or reconciliation.
            let mut timeout = self
                .config
                .reconcile_interval()
                .saturating_sub(last_reconcile.elapsed());
            if let Some(w) = watchdog {
                timeout = timeout.min(w.saturating_sub(last_ping.elapsed()));
            }
            if self
                .seen
                .values()
                .any(|s| s.queued.as_ref() != Some(&s.snapshot))
            {
                timeout = timeout.min(Duration::from_millis(500));
            }
            if let Some(d) = draining {
                timeout = timeout.min(d.saturating_duration_since(Instant::now()));
            }
            if self.roots.iter().any(Option::is_none) {
                // A watched directory is gone: look for it again every second.
                timeout = timeout.min(Duration::from_secs(1));
            }
            match self.rx.recv_timeout(timeout.max(Duration::from_millis(10))) {
                Ok(Msg::Fs(Ok(events))) => {
                    if events.iter().any(|e| e.need_rescan()) {
                        warn!("filesystem event queue overflowed; rescanning");
                    }
                    dirty = true;
                }
                Ok(Msg::Fs(Err(errors))) => {
                    for e in errors {
                        warn!(error = %e, "watcher error; rescanning");
                    }
                    dirty = true;
                }
                Ok(Msg::Signal(s)) if s == signal_hook::consts::SIGHUP => self.reload(),
                Ok(Msg::Signal(_)) => {
                    if draining.is_none() {
                        info!(
                            running = self.running.len(),
                            "stopping: draining running audits"
                        );
                        self.notifier.send("STOPPING=1");
                        draining = Some(Instant::now() + self.config.shutdown_deadline());
                    }
                }
                Ok(Msg::Progress { job, step }) => {
                    if let Some(r) = self.running.get_mut(&job) {
                        r.step = step;
                        r.last_progress = Instant::now();
                    }
                }
                Ok(Msg::Done(outcome)) => self.finish(outcome)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.log_progress();
            if self.check_roots().1 {
                dirty = true;
            }
            if dirty || last_reconcile.elapsed() >= self.config.reconcile_interval() {
                self.scan_all();
                dirty = false;
                last_reconcile = Instant::now();
            } else {
                self.rescan_pending();
            }
            if let Some(w) = watchdog {
                if last_ping.elapsed() >= w && self.healthy() {
                    self.notifier.send("WATCHDOG=1");
                    last_ping = Instant::now();
                }
            }
        }
        self.work_tx = None;
        Ok(())
    }

    /// A line per running audit when it moved on to another step and 30 s have passed since
    /// its last line, or when 60 s have passed: sparse in the journal, never silent long.
    fn log_progress(&mut self) {
        for (job, r) in &mut self.running {
            let since = r.logged.0.elapsed();
            if since >= Duration::from_secs(60)
                || (since >= Duration::from_secs(30) && r.step != r.logged.1)
            {
                info!(
                    checkpoint = %r.path,
                    job,
                    step = %r.step,
                    elapsed = %crate::progress::duration(r.started.elapsed()),
                    "audit in progress"
                );
                r.logged = (Instant::now(), r.step.clone());
            }
        }
    }

    /// No running audit has been silent longer than the stall timeout.
    fn healthy(&self) -> bool {
        let limit = self.config.stall_timeout();
        self.running
            .values()
            .all(|r| r.last_progress.elapsed() < limit)
    }

    fn status(&self, stopping: bool) {
        let queued = self.jobs.queued().unwrap_or(0);
        let current: Vec<String> = self
            .running
            .values()
            .map(|r| format!("{} ({})", r.path, r.step))
            .collect();
        let s = format!(
            "STATUS={}queue {queued}; auditing: {}",
            if stopping { "stopping; " } else { "" },
            if current.is_empty() {
                "nothing".into()
            } else {
                current.join(", ")
            }
        );
        self.notifier.send(&s);
    }

    fn scan_all(&mut self) {
        // A set: a folder of ten thousand files made `retain` below quadratic, holding the
        // main loop (signals, records, watchdog pings) for minutes.
        let mut present = HashSet::new();
        let mut skipped = HashSet::new();
        for w in &self.watches {
            let found = scan::checkpoints(&w.watch.path);
            present.extend(found.checkpoints);
            skipped.extend(found.skipped);
        }
        self.seen.retain(|p, _| present.contains(p));
        for p in present {
            self.observe(p);
        }
        for s in self.seen.values() {
            skipped.extend(s.snapshot.skipped.iter().cloned());
        }
        for s in &skipped {
            if !self.warned.contains(s) {
                warn!(path = %s.path.display(), reason = %s.reason, "scan skipped a path");
            }
        }
        // Forget what is no longer skipped, so it is reported again if it comes back.
        self.warned = skipped;
    }

    /// Re-stat the checkpoints that have not settled yet.
    fn rescan_pending(&mut self) {
        let pending: Vec<PathBuf> = self
            .seen
            .iter()
            .filter(|(_, s)| s.queued.as_ref() != Some(&s.snapshot))
            .map(|(p, _)| p.clone())
            .collect();
        for p in pending {
            self.observe(p);
        }
    }

    fn observe(&mut self, path: PathBuf) {
        let Some(snap) = scan::snapshot(&path) else {
            self.seen.remove(&path);
            return;
        };
        match self.seen.get_mut(&path) {
            Some(s) if s.snapshot == snap => {}
            Some(s) => {
                s.snapshot = snap;
                s.since = Instant::now();
            }
            None => {
                self.seen.insert(
                    path,
                    Seen {
                        snapshot: snap,
                        since: Instant::now(),
                        queued: None,
                    },
                );
            }
        }
    }

    /// Queue every checkpoint that is complete and was not queued in this state.
    fn promote(&mut self) {
        let quiet = self.config.quiet_period();
        let mut ready = Vec::new();
        for (p, s) in &self.seen {
            if s.queued.as_ref() == Some(&s.snapshot) || s.snapshot.writing {
                continue;
            }
            if s.since.elapsed() >= quiet || scan::marked_ready(p) {
                ready.push(p.clone());
            }
        }
        if ready.is_empty() {
            return;
        }
        let jobs: Vec<(String, usize)> = ready
            .iter()
            .map(|p| {
                let watch = self
                    .watches
                    .iter()
                    .position(|w| p.starts_with(&w.watch.path))
                    .unwrap_or(0);
                (p.display().to_string(), watch)
            })
            .collect();
        let queued = match self.jobs.enqueue_all(&jobs) {
            Ok(q) => q,
            Err(e) => {
                error!(error = %e, "cannot queue jobs");
                return;
            }
        };
        for ((p, (path, _)), new) in ready.iter().zip(&jobs).zip(queued) {
            if new {
                info!(checkpoint = %path, "checkpoint complete; queued");
            }
            if let Some(s) = self.seen.get_mut(p) {
                s.queued = Some(s.snapshot.clone());
            }
        }
    }

    fn dispatch(&mut self) -> anyhow::Result<()> {
        while self.running.len() < self.config.concurrency {
            let Some(job) = self.jobs.start_next()? else {
                break;
            };
            let Some(watch) = self.watches.get(job.watch).cloned() else {
                self.jobs.finish(
                    job.id,
                    "failed",
                    None,
                    None,
                    Some("its watch entry is gone from the config"),
                )?;
                continue;
            };
            info!(checkpoint = %job.path, job = job.id, "audit started");
            self.running.insert(
                job.id,
                Running {
                    path: job.path.clone(),
                    step: "queued".into(),
                    last_progress: Instant::now(),
                    started: Instant::now(),
                    logged: (Instant::now(), "queued".into()),
                },
            );
            let config = self.config.clone();
            let w = watch.watch.clone();
            let ctx = audit::Context {
                watch,
                audited: Arc::clone(&self.audited),
                children: Arc::clone(&self.children),
                log_db: self.log_db.clone(),
                trusted: self.trusted,
                memory_limit_mb: self.config.memory_limit_mb,
                audit_memory_limit_mb: Arc::new(move |need| config.audit_memory_limit_mb(&w, need)),
                log_format: self.config.log_format.clone(),
            };
            if let Some(tx) = &self.work_tx {
                tx.send((job, ctx)).context("the workers are gone")?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, outcome: Outcome) -> anyhow::Result<()> {
        match outcome {
            Outcome::Record {
                job,
                body,
                verdict,
                key,
            } => {
                self.running.remove(&job.id);
                self.requeues.retain(|(p, _), _| *p != job.path);
                let receipt = self.log.append(*body)?;
                if let Ok(mut a) = self.audited.lock() {
                    a.insert(key);
                }
                let state = if verdict == "error" { "failed" } else { "done" };
                self.jobs
                    .finish(job.id, state, Some(&verdict), Some(receipt.seq), None)?;
                if verdict == "error" {
                    warn!(checkpoint = %job.path, seq = receipt.seq, "could not check; error record appended");
                } else {
                    info!(checkpoint = %job.path, verdict = %verdict, seq = receipt.seq, "audit recorded");
                }
            }
            Outcome::Skipped { job, why } => {
                self.running.remove(&job.id);
                info!(checkpoint = %job.path, reason = %why, "audit skipped");
                self.jobs
                    .finish(job.id, "skipped", None, None, Some(&why))?;
            }
            Outcome::Requeue {
                job,
                why,
                key,
                give_up,
            } => {
                let n = self
                    .requeues
                    .entry((job.path.clone(), key.0.clone()))
                    .or_insert(0);
                *n += 1;
                if *n > audit::MAX_REQUEUES {
                    self.requeues.remove(&(job.path.clone(), key.0.clone()));
                    return self.finish(Outcome::Record {
                        job,
                        body: give_up,
                        verdict: "error".into(),
                        key,
                    });
                }
                self.running.remove(&job.id);
                warn!(checkpoint = %job.path, reason = %why, "audit aborted; queued again once the checkpoint settles");
                self.jobs
                    .finish(job.id, "skipped", None, None, Some(&why))?;
                // Wait for the checkpoint to settle again before auditing it.
                if let Some(s) = self.seen.get_mut(Path::new(&job.path)) {
                    s.queued = None;
                    s.since = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// SIGHUP: load the config and policies again; keep the old ones if the new are invalid.
    fn reload(&mut self) {
        self.notifier.reloading();
        match Config::load(&self.config_path) {
            Ok((config, watches)) => {
                if config.state_dir != self.config.state_dir
                    || config.concurrency != self.config.concurrency
                {
                    warn!("state_dir and concurrency changes take effect at the next restart");
                }
                let state_dir = self.config.state_dir.clone();
                let concurrency = self.config.concurrency;
                self.config = Config {
                    state_dir,
                    concurrency,
                    ..config
                };
                self.watches = watches;
                if let Err(e) = self.watch() {
                    error!(error = %format!("{e:#}"), "cannot watch the new directories");
                }
                self.scan_all();
                info!(watches = self.watches.len(), "configuration reloaded");
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload failed; keeping the previous configuration");
            }
        }
        self.notifier.send("READY=1");
    }
}

/// The (device, inode) of a directory, or `None` if it is not one now.
fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}
