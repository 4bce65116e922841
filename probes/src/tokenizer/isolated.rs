//! Rendering chat templates in a forked child whose address space is capped.
//!
//! A template is code from the checkpoint. Fuel bounds its instructions and the output is
//! bounded, but neither bounds the values it builds: forty doublings of a string
//! (`{% set ns.s = ns.s ~ ns.s %}` in a loop) ask for a terabyte in forty instructions, and a
//! failed allocation aborts the process. So templates render in a child made by `fork`, with
//! [`CHILD_MEMORY`] more address space than the parent had; an allocation past it aborts the
//! child alone, and the parent reports it. One child renders a whole batch of prompts, so an
//! audit forks a few times, not once per prompt.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The address space a render may add to what the process already maps: 1 GiB.
pub const CHILD_MEMORY: u64 = 1 << 30;

/// Run `f` in a forked child limited to [`CHILD_MEMORY`] of new address space and return its
/// result, or why the child gave none (killed by a signal, or out of memory).
pub fn run<T: Serialize + DeserializeOwned>(f: impl FnOnce() -> T) -> Result<T, String> {
    let (mut reader, writer) =
        std::io::pipe().map_err(|e| format!("making a pipe to the template renderer: {e}"))?;
    let limit = mapped_bytes().saturating_add(CHILD_MEMORY);
    match fork() {
        Err(e) => Err(format!("starting the template renderer: {e}")),
        Ok(None) => {
            // The child: cap the address space, keep the abort message of an allocation past
            // it off the terminal, render, write the result and leave without running the
            // parent's destructors or exit handlers.
            let ok = cap_address_space(limit) && silence_stderr();
            let code = if ok {
                let out = f();
                let mut w = std::io::BufWriter::new(writer);
                let written = serde_json::to_writer(&mut w, &out).is_ok()
                    && std::io::Write::flush(&mut w).is_ok();
                if written {
                    0
                } else {
                    2
                }
            } else {
                3
            };
            exit_now(code)
        }
        Ok(Some(pid)) => {
            drop(writer);
            let mut bytes = Vec::new();
            let read = reader.read_to_end(&mut bytes);
            let status = wait(pid)?;
            match status {
                Exit::Code(0) if read.is_ok() => serde_json::from_slice(&bytes)
                    .map_err(|e| format!("reading the template renderer's result: {e}")),
                Exit::Code(3) => Err("the template renderer could not limit its memory".into()),
                Exit::Code(c) => Err(format!("the template renderer exited with status {c}")),
                Exit::Signal(libc::SIGABRT) => Err(format!(
                    "rendering used more than {} MiB of memory (the template builds values too \
                     large to hold) and was stopped",
                    CHILD_MEMORY >> 20
                )),
                Exit::Signal(s) => Err(format!("the template renderer was killed by signal {s}")),
            }
        }
    }
}

enum Exit {
    Code(i32),
    Signal(i32),
}

/// The bytes of address space this process maps now (`/proc/self/statm`'s first field).
fn mapped_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |pages| pages.saturating_mul(4096))
}

/// `fork()`: `Ok(None)` in the child, `Ok(Some(pid))` in the parent.
#[allow(unsafe_code)]
fn fork() -> std::io::Result<Option<libc::pid_t>> {
    // SAFETY: the child only renders a template (allocating through the C library's malloc,
    // which stays usable after fork), writes to a pipe and calls `_exit`.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid)),
    }
}

/// Lower the soft address-space limit to `bytes` (never above the hard limit).
#[allow(unsafe_code)]
fn cap_address_space(bytes: u64) -> bool {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_AS, &mut cur) != 0 {
            return false;
        }
        let soft = bytes.min(cur.rlim_max);
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: cur.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_AS, &new) == 0
    }
}

/// Point standard error at `/dev/null`.
#[allow(unsafe_code)]
fn silence_stderr() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return false;
    };
    // SAFETY: dup2 on two open descriptors.
    unsafe { libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO) != -1 }
}

/// Leave the child at once.
#[allow(unsafe_code)]
fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` ends the process without running anything of the parent's.
    unsafe { libc::_exit(code) }
}

/// Wait for child `pid` to end.
#[allow(unsafe_code)]
fn wait(pid: libc::pid_t) -> Result<Exit, String> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status of our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waiting for the template renderer: {e}"));
        }
    }
    if libc::WIFEXITED(status) {
        Ok(Exit::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Ok(Exit::Signal(libc::WTERMSIG(status)))
    } else {
        Err(format!("the template renderer ended with status {status}"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_result_comes_back_and_a_runaway_allocation_is_an_error() {
        assert_eq!(super::run(|| vec![1u32, 2, 3]).unwrap(), vec![1, 2, 3]);
        let e = super::run(|| {
            let mut v: Vec<u8> = Vec::new();
            v.resize(8 << 30, 1);
            v.len()
        })
        .unwrap_err();
        assert!(e.contains("more than 1024 MiB"), "{e}");
    }
}
