//! Standard output for every command. `println!` panics when the reader has gone away
//! (`mechwatch log proof ... | head -c1`: "failed printing to stdout: Broken pipe"), so
//! main.rs replaces `print!` and `println!` crate-wide with macros that write through
//! [`print`], and `main` treats a broken pipe from a command's own `writeln!` the same way:
//! the process ends quietly with [`EXIT_CLOSED`], as a tool killed by SIGPIPE does.
//! `eprint!` and `eprintln!` are replaced the same way with [`eprint`], which never panics.

use std::io::Write;

/// The exit status when standard output was closed early: 128 + SIGPIPE, what the shell
/// reports for `cat` or `grep` in the same place.
pub const EXIT_CLOSED: u8 = 141;

/// Write to standard output; a closed pipe ends the process quietly, another error with
/// exit 2 (could not do what was asked).
pub fn print(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_CLOSED.into());
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(2);
    }
}

/// Write to standard error. A closed or failing standard error loses the message instead of
/// panicking as `eprintln!` does (`policy check ... 2>&1 | head`): the exit status still says
/// what happened.
pub fn eprint(args: std::fmt::Arguments) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// Whether `e` is, or was caused by, writing to a pipe whose reader has gone.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
