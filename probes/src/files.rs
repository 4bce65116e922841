//! Reading untrusted input files: only regular files, without ever blocking on one.
//!
//! A FIFO, socket or device standing where a weight, tokenizer, config or prompt file is
//! expected would block `open` or `read` forever (a FIFO waits for a writer) or stream without
//! end (`/dev/zero`). Every file is therefore opened with `O_NONBLOCK`, which makes `open`
//! return at once whatever the file is, then checked through the open descriptor (so a swap
//! between the check and the read cannot slip a special file in), and refused unless it is a
//! regular file. Symbolic links are followed: the file they name is what is checked.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Open `path` for reading if it is a regular file; any other kind of file is an
/// `InvalidInput` error that says what it is.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind_of(kind)),
        ))
    }
}

/// The most bytes a text file a checkpoint or policy names (a config, tokenizer, chat
/// template, policy or prompt file) may hold: 128 MiB, about four times the largest real
/// `tokenizer.json` we know (Gemma 3's, 33 MB).
pub const TEXT_LIMIT: u64 = 128 << 20;

/// The whole content of the regular file at `path` (see [`open_regular`]), refused when it is
/// larger than this machine's physical memory or memory for it cannot be had: a weight file is
/// read whole, and a huge or sparse file must be an error, not an abort.
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    read_at_most(path, physical_memory())
}

/// [`read_regular`] for a text file: at most [`TEXT_LIMIT`] bytes.
pub fn read_text_file(path: &Path) -> io::Result<Vec<u8>> {
    read_at_most(path, TEXT_LIMIT)
}

/// The whole content of the regular file at `path` if it holds at most `limit` bytes, with its
/// memory reserved fallibly before reading.
pub fn read_at_most(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    let too_big = |n: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} bytes is more than the {limit} this file may hold"),
        )
    };
    if len > limit {
        return Err(too_big(len));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(usize::try_from(len).unwrap_or(usize::MAX))
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot reserve memory for its {len} bytes"),
            )
        })?;
    // A file that grows while it is read stops one byte past the limit.
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_text_file`] as UTF-8 text.
pub fn read_regular_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read_text_file(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// This machine's memory in bytes, from `/proc/meminfo` (no limit where it cannot be read).
pub fn physical_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(u64::MAX)
}

/// What kind of file this is, in words with an article ("a FIFO").
pub fn kind_of(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = read_regular(&fifo).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn devices_and_directories_are_refused_and_regular_files_read() {
        let err = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        assert!(read_regular(dir.path())
            .unwrap_err()
            .to_string()
            .contains("directory"));
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "text").unwrap();
        assert_eq!(read_regular_to_string(&f).unwrap(), "text");
    }

    #[test]
    fn a_sparse_file_beyond_the_limit_is_an_error_before_any_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("model.gguf");
        // 1 TiB of holes: no disk is used, and reading it whole would abort.
        std::fs::File::create(&f).unwrap().set_len(1 << 40).unwrap();
        let err = read_regular(&f).unwrap_err();
        assert!(err.to_string().contains("1099511627776 bytes"), "{err}");
        let err = read_text_file(&f).unwrap_err();
        assert!(err.to_string().contains(&TEXT_LIMIT.to_string()), "{err}");
        std::fs::write(&f, "four").unwrap();
        assert_eq!(read_at_most(&f, 4).unwrap(), b"four");
        assert!(read_at_most(&f, 3).is_err());
    }
}
