//! Bounded reads of the files mechwatch is handed: keys, checkpoints, head witnesses and
//! exports. Each must be a regular file (a FIFO would block forever, `/dev/zero` never
//! ends), opened without blocking so that one swapped in after the check cannot hang the
//! read either; small files are read up to [`MAX_SMALL_FILE`], exports line by line up to
//! [`MAX_EXPORT_LINE`] a line.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use crate::error::LogError;

/// The most a key, public key, checkpoint note or head witness may hold: each is a few
/// hundred bytes.
pub const MAX_SMALL_FILE: u64 = 64 * 1024;

/// The most one line of an export (one DSSE envelope: a record, base64) may hold.
pub const MAX_EXPORT_LINE: u64 = 64 * 1024 * 1024;

fn refused(path: &Path, detail: String) -> LogError {
    LogError::Input {
        path: path.to_path_buf(),
        detail,
    }
}

/// Open `path` for reading if it is a regular file (after following symlinks).
pub fn open_regular(path: &Path) -> Result<std::fs::File, std::io::Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, what));
    }
    Ok(file)
}

/// The whole of a small file, refused when it is larger than [`MAX_SMALL_FILE`] or not a
/// regular file. "No such file" keeps its `NotFound` kind, for callers that explain it.
pub fn read_small(path: &Path, what: &str) -> Result<Vec<u8>, LogError> {
    let file = open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => refused(path, format!("{e}; expected {what}")),
        _ => LogError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(refused(
            path,
            format!("larger than {} KiB, so not {what}", MAX_SMALL_FILE / 1024),
        ));
    }
    Ok(bytes)
}

/// [`read_small`] as UTF-8 text.
pub fn read_small_text(path: &Path, what: &str) -> Result<String, LogError> {
    String::from_utf8(read_small(path, what)?)
        .map_err(|_| refused(path, format!("not text, so not {what}")))
}

/// The non-empty lines of an export, each at most [`MAX_EXPORT_LINE`] bytes.
pub struct Lines {
    path: PathBuf,
    reader: std::io::BufReader<std::fs::File>,
    number: u64,
}

impl Lines {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = open_regular(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => refused(path, format!("{e}; expected an export")),
            _ => LogError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: std::io::BufReader::new(file),
            number: 0,
        })
    }
}

impl Iterator for Lines {
    type Item = Result<String, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let mut line = Vec::new();
            self.number += 1;
            let read = (&mut self.reader)
                .take(MAX_EXPORT_LINE + 1)
                .read_until(b'\n', &mut line);
            match read {
                Err(source) => {
                    return Some(Err(LogError::Io {
                        path: self.path.clone(),
                        source,
                    }))
                }
                Ok(0) => return None,
                Ok(_) if line.len() as u64 > MAX_EXPORT_LINE => {
                    return Some(Err(refused(
                        &self.path,
                        format!(
                            "line {} is longer than {} MiB, so not an export line",
                            self.number,
                            MAX_EXPORT_LINE >> 20
                        ),
                    )))
                }
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            if !text.trim().is_empty() {
                return Some(Ok(text.trim_end_matches(['\n', '\r']).to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_and_large_files_are_refused() {
        let e = read_small(Path::new("/dev/zero"), "a key").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let e = read_small(&fifo, "a key").unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let big = tmp.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_SMALL_FILE as usize + 1]).unwrap();
        let e = read_small(&big, "a checkpoint").unwrap_err();
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
        std::fs::write(&big, "x\n\n y \n").unwrap();
        let lines: Vec<String> = Lines::open(&big).unwrap().map(Result::unwrap).collect();
        assert_eq!(lines, ["x", " y "]);
    }
}
