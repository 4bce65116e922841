//! The daemon's logs on standard error, shaped for journald. Under systemd, stderr is a
//! stream socket to the journal and `$JOURNAL_STREAM` names it (`DEVICE:INODE`); then each
//! line starts with its sd-daemon priority (`<3>` error, `<4>` warning, `<6>` info, `<7>`
//! debug), which journald strips and stores as the entry's priority, so
//! `journalctl -p warning -u mechwatch` shows warnings and errors only; and the line carries
//! no timestamp, since the journal adds its own. Anywhere else (a terminal, a file, a
//! variable inherited by a child whose stderr was redirected) lines carry a timestamp and no
//! prefix.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// Set up logging for `mechwatch daemon` and its audit children: `format` is `json` or text
/// (anything else); the level comes from `MECHWATCH_LOG` (default `info`).
pub fn init(format: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MECHWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journal = stderr_is_journal();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let line = tracing_subscriber::fmt::format().with_target(false);
    if format == Some("json") {
        b.json()
            .event_format(Prioritized::new(line.json(), journal))
            .init();
    } else if journal {
        b.event_format(Prioritized::new(line.without_time(), true))
            .init();
    } else {
        b.event_format(Prioritized::new(line, false)).init();
    }
}

/// Whether standard error is the journal stream `$JOURNAL_STREAM` names: the variable alone
/// is not enough, since a child inherits it even when its stderr goes elsewhere.
pub fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|v| parse_stream(&v))
    else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr())
        .map(|st| st.st_dev == dev && st.st_ino == ino)
        .unwrap_or(false)
}

/// `DEVICE:INODE`, both decimal, as systemd writes `$JOURNAL_STREAM`.
fn parse_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The sd-daemon priority (syslog level) of a tracing level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A line format with, when `on`, the `<N>` priority prefix in front.
struct Prioritized<F> {
    inner: F,
    on: bool,
}

impl<F> Prioritized<F> {
    fn new(inner: F, on: bool) -> Self {
        Self { inner, on }
    }
}

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.on {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_stream("2049:123456\n"), Some((2049, 123456)));
        assert_eq!(parse_stream("2049"), None);
        assert_eq!(parse_stream("a:1"), None);
        assert_eq!(parse_stream(""), None);
    }

    #[test]
    fn priorities_are_the_syslog_levels() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
