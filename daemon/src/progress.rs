//! Progress on stderr for steps that take more than a moment: a live bar on a terminal,
//! sparse plain lines in a log or CI, nothing with `--quiet`.
//!
//! Libraries report through [`probes::progress::Report`] (or their own callbacks, which the
//! commands forward here); only this module draws. A task has a label, optionally a total
//! count of units (then a percentage and an ETA are shown) and an up-front notice of its cost.
//! Tasks nest: a phase that starts inside a task (the default SAE trained while policies are
//! resolved) is shown until it ends, then the outer task again.
//!
//! Plain lines, per task: one at the start (with the notice), one at the end with the elapsed
//! time, and in between a line only when both 30 s have passed since the last one and the task
//! has crossed another tenth of its total, or else when 60 s have passed (a heartbeat, also
//! for tasks without a total). So a task prints at most a line per 30 s and is never silent
//! for more than a minute.
//!
//! The bar is redrawn at most 10 times a second, in place (carriage return, erase to the end
//! of the line), has no colours, and is erased when its task ends. It is used when stderr is a
//! terminal and `TERM` is not `dumb`.
//!
//! The clock is a parameter: [`Screen`] takes the time as `now` (time since an origin), so the
//! throttling and the ETA are tested with a made-up clock.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the bar may be redrawn.
const REDRAW: Duration = Duration::from_millis(100);
/// The least time between two plain progress lines of a task.
const LINE_GAP: Duration = Duration::from_secs(30);
/// The most time without a plain line while a task runs.
const HEARTBEAT: Duration = Duration::from_secs(60);

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress at all, for the whole process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A bar redrawn in place (a terminal).
    Bar,
    /// Sparse plain lines (a log, CI, journald).
    Lines,
    /// Nothing (`--quiet`).
    Off,
}

impl Style {
    /// From `--quiet`, whether stderr is a terminal, and `TERM`.
    pub fn detect() -> Style {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if quiet() {
            Style::Off
        } else if std::io::stderr().is_terminal() && !dumb {
            Style::Bar
        } else {
            Style::Lines
        }
    }
}

/// One task being shown.
#[derive(Debug)]
struct Task {
    label: String,
    unit: String,
    total: Option<u64>,
    done: u64,
    /// Steps begun, for tasks counted by [`Screen::step`].
    steps: u64,
    message: String,
    started: Duration,
    /// The first count seen and when: the rate (and so the ETA) counts from there, so work
    /// resumed from a checkpoint does not make the rate look faster than it is.
    base: Option<(u64, Duration)>,
    last_line: Duration,
    last_line_tenth: u64,
}

impl Task {
    fn fraction(&self) -> Option<f64> {
        let total = self.total.filter(|t| *t > 0)?;
        Some((self.done.min(total)) as f64 / total as f64)
    }

    fn tenth(&self) -> u64 {
        self.fraction().map_or(0, |f| (f * 10.0).floor() as u64)
    }

    /// The time left, from the rate since the first count; none until a second has passed.
    fn eta(&self, now: Duration) -> Option<Duration> {
        let total = self.total?;
        let (base, at) = self.base?;
        let spent = now.checked_sub(at)?;
        if spent < Duration::from_secs(1) || self.done <= base {
            return None;
        }
        let rate = (self.done - base) as f64 / spent.as_secs_f64();
        let left = total.saturating_sub(self.done) as f64 / rate;
        Some(Duration::from_secs_f64(left.min(1e7)))
    }

    /// `45% (1234/5000 tokens)`, or `1234 tokens`, or nothing.
    fn count(&self) -> String {
        match (self.total, self.fraction()) {
            (Some(total), Some(f)) => format!(
                "{:.0}% ({}/{})",
                f * 100.0,
                amount(self.done, &self.unit, false),
                amount(total, &self.unit, true)
            ),
            _ if self.done > 0 => amount(self.done, &self.unit, true),
            _ => String::new(),
        }
    }

    /// A plain progress line.
    fn line(&self, now: Duration) -> String {
        let mut parts = Vec::new();
        let count = self.count();
        if !count.is_empty() {
            parts.push(count);
        }
        parts.push(format!(
            "{} elapsed",
            duration(now.saturating_sub(self.started))
        ));
        if let Some(eta) = self.eta(now) {
            parts.push(format!("ETA {}", duration(eta)));
        }
        let mut line = format!("{}: {}", self.label, parts.join(", "));
        if !self.message.is_empty() {
            line.push_str(&format!(" ({})", self.message));
        }
        line
    }

    /// The bar, at most `width` characters.
    fn bar(&self, now: Duration, width: usize) -> String {
        let elapsed = now.saturating_sub(self.started);
        let mut s = match self.fraction() {
            Some(f) => {
                let filled = (f * 20.0).round() as usize;
                format!(
                    "{} [{}{}] {}",
                    self.label,
                    "#".repeat(filled),
                    "-".repeat(20 - filled.min(20)),
                    self.count()
                )
            }
            None => {
                let spin = ["|", "/", "-", "\\"][(elapsed.as_millis() / 250 % 4) as usize];
                let count = self.count();
                if count.is_empty() {
                    format!("{spin} {}", self.label)
                } else {
                    format!("{spin} {} {count}", self.label)
                }
            }
        };
        s.push_str(&format!(" {}", duration(elapsed)));
        if let Some(eta) = self.eta(now) {
            s.push_str(&format!(" ETA {}", duration(eta)));
        }
        if !self.message.is_empty() {
            s.push_str(&format!(" {}", self.message));
        }
        s.chars().take(width).collect()
    }
}

/// The progress display: a stack of tasks and where they are drawn. Every method takes the
/// current time.
#[derive(Debug)]
pub struct Screen<W: Write> {
    style: Style,
    out: W,
    width: usize,
    tasks: Vec<Task>,
    /// When the bar was last drawn; `None` when no bar is on screen.
    drawn: Option<Duration>,
}

impl<W: Write> Screen<W> {
    pub fn new(style: Style, out: W, width: usize) -> Self {
        Screen {
            style,
            out,
            width: width.max(20),
            tasks: Vec::new(),
            drawn: None,
        }
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out
    }

    /// A task starts: `total` units of `unit` when known, and its cost up front in `notice`.
    pub fn begin(
        &mut self,
        label: &str,
        total: Option<u64>,
        unit: &str,
        notice: Option<&str>,
        now: Duration,
    ) {
        let task = Task {
            label: label.to_string(),
            unit: unit.to_string(),
            total,
            done: 0,
            steps: 0,
            message: String::new(),
            started: now,
            base: None,
            last_line: now,
            last_line_tenth: 0,
        };
        let mut first = label.to_string();
        if let Some(total) = total {
            first.push_str(&format!(" ({})", amount(total, unit, true)));
        }
        match notice {
            Some(n) => first.push_str(&format!(": {n}")),
            None => first.push_str(": started"),
        }
        match self.style {
            Style::Off => {}
            Style::Lines => self.write_line(&first),
            Style::Bar => {
                self.erase();
                if notice.is_some() {
                    self.write_line(&first);
                }
            }
        }
        self.tasks.push(task);
        self.tick(now);
    }

    /// `done` units of the current task are done.
    pub fn advance(&mut self, done: u64, now: Duration) {
        let Some(t) = self.tasks.last_mut() else {
            return;
        };
        t.done = done;
        if t.base.is_none() {
            t.base = Some((done, now));
        }
        self.tick(now);
    }

    /// The current task moves on to its next step, `what`: the steps begun before it are done.
    pub fn step(&mut self, what: &str, now: Duration) {
        let Some(t) = self.tasks.last_mut() else {
            return;
        };
        t.steps += 1;
        t.message = what.to_string();
        let done = t.steps - 1;
        self.advance(done, now);
    }

    /// What the current task is doing now, shown beside its count.
    pub fn message(&mut self, what: &str, now: Duration) {
        if let Some(t) = self.tasks.last_mut() {
            t.message = what.to_string();
        }
        self.tick(now);
    }

    /// A line of its own (above the bar on a terminal).
    pub fn note(&mut self, line: &str, now: Duration) {
        if self.style != Style::Off {
            self.erase();
            self.write_line(line);
        }
        self.tick(now);
    }

    /// The current task ends (`ok`: it finished; otherwise it stopped on an error).
    pub fn end(&mut self, ok: bool, now: Duration) {
        let Some(t) = self.tasks.pop() else {
            return;
        };
        let elapsed = duration(now.saturating_sub(t.started));
        let line = if ok {
            format!("{}: done in {elapsed}", t.label)
        } else {
            format!("{}: stopped after {elapsed}", t.label)
        };
        if self.style != Style::Off {
            self.erase();
            self.write_line(&line);
        }
        self.tick(now);
    }

    /// Redraw the bar, or write a plain line, if one is due.
    pub fn tick(&mut self, now: Duration) {
        let Some(t) = self.tasks.last_mut() else {
            return;
        };
        match self.style {
            Style::Off => {}
            Style::Lines => {
                let since = now.saturating_sub(t.last_line);
                let tenth = t.tenth();
                let moved = since >= LINE_GAP && tenth > t.last_line_tenth;
                if moved || since >= HEARTBEAT {
                    t.last_line = now;
                    t.last_line_tenth = tenth;
                    let line = t.line(now);
                    self.write_line(&line);
                }
            }
            Style::Bar => {
                let due = self
                    .drawn
                    .is_none_or(|at| now.saturating_sub(at) >= REDRAW || now < at);
                if due {
                    let bar = t.bar(now, self.width - 1);
                    let _ = write!(self.out, "\r{bar}\x1b[K");
                    let _ = self.out.flush();
                    self.drawn = Some(now);
                }
            }
        }
    }

    /// Erase the bar, if one is drawn.
    fn erase(&mut self) {
        if self.drawn.take().is_some() {
            let _ = write!(self.out, "\r\x1b[K");
        }
    }

    fn write_line(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }
}

/// The progress display on stderr, with a thread that redraws the bar and writes the
/// heartbeat lines while the work itself reports nothing.
pub struct Progress {
    screen: Arc<Mutex<Screen<std::io::Stderr>>>,
    origin: Instant,
    ticker: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Progress {
    /// Progress on stderr in the [`Style`] this process should use.
    pub fn stderr() -> Progress {
        Progress::with_style(Style::detect())
    }

    /// For commands that print results on stdout while they work: plain lines where stdout
    /// is a terminal too, so that the bar does not run into those results.
    pub fn stderr_beside_stdout() -> Progress {
        match Style::detect() {
            Style::Bar if std::io::stdout().is_terminal() => Progress::with_style(Style::Lines),
            style => Progress::with_style(style),
        }
    }

    fn with_style(style: Style) -> Progress {
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(80);
        let screen = Arc::new(Mutex::new(Screen::new(style, std::io::stderr(), width)));
        let origin = Instant::now();
        let period = match style {
            Style::Off => None,
            Style::Bar => Some(REDRAW),
            Style::Lines => Some(Duration::from_secs(1)),
        };
        let ticker = period.map(|period| {
            let (tx, rx) = mpsc::channel::<()>();
            let screen = Arc::clone(&screen);
            let handle = std::thread::spawn(move || loop {
                match rx.recv_timeout(period) {
                    Err(RecvTimeoutError::Timeout) => lock(&screen).tick(origin.elapsed()),
                    _ => return,
                }
            });
            (tx, handle)
        });
        Progress {
            screen,
            origin,
            ticker,
        }
    }

    fn with(&self, f: impl FnOnce(&mut Screen<std::io::Stderr>, Duration)) {
        f(&mut lock(&self.screen), self.origin.elapsed());
    }

    pub fn begin(&self, label: &str, total: Option<u64>, unit: &str, notice: Option<&str>) {
        self.with(|s, now| s.begin(label, total, unit, notice, now));
    }

    pub fn advance(&self, done: u64) {
        self.with(|s, now| s.advance(done, now));
    }

    pub fn message(&self, what: &str) {
        self.with(|s, now| s.message(what, now));
    }

    pub fn note(&self, line: &str) {
        self.with(|s, now| s.note(line, now));
    }

    pub fn end(&self, ok: bool) {
        self.with(|s, now| s.end(ok, now));
    }

    /// Run `f` as one task without a count: `label` (and `notice`) shown while it runs, then
    /// its time.
    pub fn run<T, E>(
        &self,
        label: &str,
        notice: Option<&str>,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.begin(label, None, "", notice);
        let r = f();
        self.end(r.is_ok());
        r
    }
}

impl Drop for Progress {
    /// Tasks still open (an error left them) end as stopped, and the bar is erased.
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.ticker.take() {
            drop(tx);
            let _ = handle.join();
        }
        let now = self.origin.elapsed();
        let mut s = lock(&self.screen);
        while !s.tasks.is_empty() {
            s.end(false, now);
        }
        s.erase();
    }
}

impl probes::progress::Report for Progress {
    fn step(&mut self, what: &str) {
        self.with(|s, now| s.step(what, now));
    }

    fn phase(&mut self, what: &str, total: Option<u64>, unit: &str, notice: Option<&str>) {
        self.begin(what, total, unit, notice);
    }

    fn advance(&mut self, done: u64) {
        Progress::advance(self, done);
    }

    fn phase_done(&mut self) {
        self.end(true);
    }
}

/// The screen, even if a thread panicked while drawing (a torn bar is no reason to stop).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `12.3s`, `2m03s`, `1h05m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = s.round() as u64 / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// `n` units: bytes as MB; other units by name (with the name only if `named`).
fn amount(n: u64, unit: &str, named: bool) -> String {
    if unit == "bytes" {
        format!("{:.1}{}", n as f64 / 1e6, if named { " MB" } else { "" })
    } else if named && !unit.is_empty() {
        format!("{n} {unit}")
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn lines(screen: Screen<Vec<u8>>) -> Vec<String> {
        String::from_utf8(screen.into_inner())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn plain_lines_are_a_start_a_line_per_tenth_and_30s_and_an_end() {
        let mut sc = Screen::new(Style::Lines, Vec::new(), 80);
        sc.begin(
            "training",
            Some(1000),
            "tokens",
            Some("about 25 min"),
            s(0.0),
        );
        // Fast progress: one update a tenth of a second for 100 s, 1% a second.
        for i in 1..=1000u64 {
            sc.advance(i, s(i as f64 / 10.0));
        }
        sc.end(true, s(100.0));
        let out = lines(sc);
        assert_eq!(out[0], "training (1000 tokens): about 25 min");
        // 30 s and 60 s and 90 s: three lines in 100 s, not one a second.
        assert_eq!(out.len(), 5, "{out:#?}");
        assert_eq!(
            out[1],
            "training: 30% (300/1000 tokens), 30.0s elapsed, ETA 1m10s"
        );
        assert_eq!(out[4], "training: done in 1m40s");
    }

    #[test]
    fn slow_progress_gets_a_heartbeat_each_minute_and_no_more() {
        let mut sc = Screen::new(Style::Lines, Vec::new(), 80);
        sc.begin("hashing", None, "", None, s(0.0));
        // Ticks each second for 5 min 30 s, no count at all.
        for i in 1..=330 {
            sc.tick(s(i as f64));
        }
        sc.end(true, s(330.0));
        let out = lines(sc);
        assert_eq!(out.first().unwrap(), "hashing: started");
        assert_eq!(out.len(), 7, "{out:#?}");
        assert_eq!(out[1], "hashing: 1m00s elapsed");
        assert_eq!(out[5], "hashing: 5m00s elapsed");
        assert_eq!(out[6], "hashing: done in 5m30s");
    }

    #[test]
    fn a_line_needs_a_new_tenth_even_after_30s() {
        let mut sc = Screen::new(Style::Lines, Vec::new(), 80);
        sc.begin("corpus", Some(100), "samples", None, s(0.0));
        sc.advance(5, s(31.0)); // still in the first tenth: no line
        sc.advance(12, s(40.0)); // a new tenth, 40 s on: a line
        sc.advance(13, s(45.0)); // too soon
        let out = lines(sc);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(out[1].starts_with("corpus: 12% (12/100 samples), 40.0s elapsed"));
    }

    #[test]
    fn eta_counts_from_the_first_count_seen() {
        let mut sc = Screen::new(Style::Lines, Vec::new(), 80);
        sc.begin("train", Some(1000), "tokens", None, s(0.0));
        // Resumed at 500: 100 tokens in 10 s is 10 tokens/s, so 400 left take 40 s.
        sc.advance(500, s(0.0));
        sc.advance(600, s(10.0));
        let t = sc.tasks.last().unwrap();
        assert_eq!(t.eta(s(10.0)), Some(s(40.0)));
        // No ETA before the first count, nor without a total.
        sc.begin("inner", None, "", None, s(10.0));
        assert_eq!(sc.tasks.last().unwrap().eta(s(20.0)), None);
    }

    #[test]
    fn the_bar_redraws_at_most_ten_times_a_second_and_is_erased_at_the_end() {
        let mut sc = Screen::new(Style::Bar, Vec::new(), 80);
        sc.begin("checks", Some(4), "checks", None, s(0.0));
        // 100 updates in one second.
        for i in 0..100u64 {
            sc.step(&format!("check {i}"), s(i as f64 / 100.0));
        }
        sc.end(true, s(1.0));
        let out = String::from_utf8(sc.into_inner()).unwrap();
        let redraws = out.matches("\x1b[K").count();
        // At 0.0, 0.1, ... 0.9 s, and the erase before the end line.
        assert!((9..=12).contains(&redraws), "{redraws} redraws: {out:?}");
        assert!(out.ends_with("\r\x1b[Kchecks: done in 1.0s\n"), "{out:?}");
        assert!(out
            .lines()
            .all(|l| !l.contains('\x1b') || l.starts_with('\r')));
    }

    #[test]
    fn the_bar_fits_the_width_and_a_nested_phase_shows_its_notice() {
        let mut sc = Screen::new(Style::Bar, Vec::new(), 60);
        sc.begin("resolving policies", None, "", None, s(0.0));
        sc.begin("training", Some(10), "steps", Some("about 25 min"), s(0.5));
        sc.advance(5, s(2.0));
        sc.end(true, s(3.0));
        sc.end(true, s(4.0));
        let out = String::from_utf8(sc.into_inner()).unwrap();
        assert!(
            out.contains("\r\x1b[Ktraining (10 steps): about 25 min\n"),
            "{out:?}"
        );
        for draw in out.split('\r').filter(|d| d.ends_with("\x1b[K")) {
            assert!(draw.chars().count() <= 59 + 3, "{draw:?}");
        }
        assert!(out.contains("training [##########----------] 50% (5/10 steps)"));
        assert!(out.ends_with("resolving policies: done in 4.0s\n"));
    }

    #[test]
    fn quiet_writes_nothing() {
        let mut sc = Screen::new(Style::Off, Vec::new(), 80);
        sc.begin("x", Some(10), "", Some("long"), s(0.0));
        sc.advance(5, s(100.0));
        sc.end(false, s(200.0));
        assert!(sc.into_inner().is_empty());
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(duration(s(4.26)), "4.3s");
        assert_eq!(duration(s(123.0)), "2m03s");
        assert_eq!(duration(s(3725.0)), "1h02m");
    }
}
