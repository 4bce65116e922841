//! A minimal, bounds-checked reader of `.npy` arrays inside `.npz` archives (Gemma Scope).

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::SaeError;

fn format_err(path: &Path, entry: &str, detail: impl Into<String>) -> SaeError {
    SaeError::Tensor {
        path: path.to_path_buf(),
        tensor: entry.to_string(),
        detail: detail.into(),
    }
}

/// What an `.npy` header says: where the data starts, its dtype and shape, and its bytes.
struct NpyHeader {
    data_start: usize,
    dtype: candle_core::DType,
    shape: Vec<usize>,
    data_bytes: usize,
}

/// Parse the header at the start of `bytes` (which need hold no more than the header).
fn parse_header(path: &Path, name: &str, bytes: &[u8]) -> Result<NpyHeader, SaeError> {
    let err = |d: &str| format_err(path, name, d.to_string());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err("not an .npy array"));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        v => return Err(err(&format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| err("truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next());
    let (elem, dtype): (usize, _) = match descr {
        Some("<f4") => (4, candle_core::DType::F32),
        Some("<f8") => (8, candle_core::DType::F64),
        Some("<f2") => (2, candle_core::DType::F16),
        d => {
            return Err(err(&format!(
                "unsupported dtype {d:?} (expected <f4, <f8 or <f2)"
            )))
        }
    };
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err(err("Fortran-ordered arrays are not supported"));
    }
    let shape_str = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| err("no shape"))?;
    let shape: Vec<usize> = shape_str
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| err(&format!("bad shape ({shape_str})")))
        })
        .collect::<Result<_, _>>()?;
    let data_bytes = shape
        .iter()
        .try_fold(elem, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err("shape overflows"))?;
    Ok(NpyHeader {
        data_start: start + header_len,
        dtype,
        shape,
        data_bytes,
    })
}

/// Parse one `.npy` blob: little-endian f4/f8/f2, C order.
pub fn parse_npy(path: &Path, name: &str, bytes: &[u8]) -> Result<Tensor, SaeError> {
    let h = parse_header(path, name, bytes)?;
    let n = h.data_bytes;
    let data = bytes
        .get(h.data_start..)
        .filter(|d| d.len() == n)
        .ok_or_else(|| {
            format_err(
                path,
                name,
                format!(
                    "data holds {} bytes, shape needs {n}",
                    bytes.len().saturating_sub(h.data_start)
                ),
            )
        })?;
    Tensor::from_raw_buffer(data, h.dtype, &h.shape, &Device::Cpu)
        .map_err(super::candle("reading .npy"))
}

/// The most of an entry read before its `.npy` header is parsed: the header must lie within.
const HEADER_PREFIX: u64 = 1 << 20;

/// The named arrays of an archive and the archive's bytes (for digesting).
pub type NpzContents = (Vec<(String, Tensor)>, Vec<u8>);

/// Every array of an `.npz` archive, with the archive's bytes for digesting.
pub fn read_npz(path: &Path) -> Result<NpzContents, SaeError> {
    let bytes = crate::files::read_regular(path).map_err(|source| SaeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((parse_npz(path, &bytes)?, bytes))
}

/// The most an archive's entries may inflate to, in total, per byte of the archive. Deflate
/// cannot exceed about 1,032:1; stored entries are 1:1.
const MAX_INFLATION: u64 = 1_100;

/// Every array of the `.npz` archive `bytes`; `path` only labels errors. Entry sizes are
/// never trusted for allocation: an entry is read as far as it really inflates, and all
/// entries together may not inflate past [`MAX_INFLATION`] times the archive's size.
pub fn parse_npz(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, SaeError> {
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| SaeError::Format {
            path: path.to_path_buf(),
            detail: format!("not an .npz (zip) archive: {e}"),
        })?;
    let mut budget = (bytes.len() as u64).saturating_mul(MAX_INFLATION);
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index(i)
            .map_err(|e| format_err(path, "?", e.to_string()))?;
        let name = f.name().trim_end_matches(".npy").to_string();
        // The header first, then no more data than its shape holds (plus one byte, to tell
        // an entry that holds more): a member that inflates past its own shape stops there.
        let mut blob = Vec::new();
        let mut f = f.take(budget.saturating_add(1));
        (&mut f)
            .take(HEADER_PREFIX.min(budget.saturating_add(1)))
            .read_to_end(&mut blob)
            .map_err(|e| format_err(path, &name, e.to_string()))?;
        let h = parse_header(path, &name, &blob)?;
        let whole = h.data_start.saturating_add(h.data_bytes) as u64;
        if (blob.len() as u64) <= whole {
            (&mut f)
                .take(whole + 1 - blob.len() as u64)
                .read_to_end(&mut blob)
                .map_err(|e| format_err(path, &name, e.to_string()))?;
        }
        if blob.len() as u64 > whole {
            return Err(format_err(
                path,
                &name,
                format!(
                    "the entry holds more than the {} data bytes its shape {:?} needs",
                    h.data_bytes, h.shape
                ),
            ));
        }
        if blob.len() as u64 > budget {
            return Err(format_err(
                path,
                &name,
                format!(
                    "the archive inflates past {MAX_INFLATION} times its own size (a zip bomb?)"
                ),
            ));
        }
        budget -= blob.len() as u64;
        out.push((name.clone(), parse_npy(path, &name, &blob)?));
    }
    Ok(out)
}

/// Write arrays as an `.npz` (used by tests to produce Gemma Scope files).
pub fn write_npz(path: &Path, arrays: &[(&str, &Tensor)]) -> std::io::Result<()> {
    use std::io::Write;
    let f = std::fs::File::create(path)?;
    let mut zip = zip::ZipWriter::new(f);
    for (name, t) in arrays {
        zip.start_file(
            format!("{name}.npy"),
            zip::write::SimpleFileOptions::default(),
        )?;
        let shape: Vec<String> = t.dims().iter().map(ToString::to_string).collect();
        let shape = if shape.len() == 1 {
            format!("({},)", shape[0])
        } else {
            format!("({})", shape.join(", "))
        };
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        zip.write_all(b"\x93NUMPY\x01\x00")?;
        zip.write_all(&(header.len() as u16).to_le_bytes())?;
        zip.write_all(header.as_bytes())?;
        let v: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        for x in v {
            zip.write_all(&x.to_le_bytes())?;
        }
    }
    zip.finish()?;
    Ok(())
}
