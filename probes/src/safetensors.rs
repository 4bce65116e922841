//! A strict safetensors reader.
//!
//! It rejects everything the reference parser rejects (oversized or out-of-file headers,
//! offsets that are not sorted and contiguous from 0, sizes that disagree with shape x dtype,
//! trailing bytes) and, unlike it, duplicate JSON keys at any depth (two tensors of one name,
//! or two `"shape"`s in one tensor's entry). The bytes parsed are the bytes hashed:
//! the whole file is read once into memory, so a writer changing the file cannot make the
//! digest and the weights disagree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::error::LoadError;

/// Largest header accepted, as in the reference implementation.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub begin: usize,
    pub end: usize,
}

/// A validated safetensors file held in memory.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Read and validate `path`.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let bytes = crate::files::read_regular(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, bytes)
    }

    /// Validate `bytes` as a safetensors file; `path` only labels errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        let (header, data_start) = parse_header(path, &bytes)?;
        Ok(Self {
            path: path.to_path_buf(),
            data_start,
            tensors: header.tensors,
            metadata: header.metadata,
            bytes,
        })
    }

    /// The exact bytes that were validated.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Materialise one tensor as f32 on `device`, refusing NaN and Inf.
    pub fn load_f32(&self, info: &TensorInfo, device: &Device) -> Result<Tensor, LoadError> {
        let raw = &self.bytes[self.data_start + info.begin..self.data_start + info.end];
        let candle_err = |source: candle_core::Error| LoadError::Candle {
            path: self.path.clone(),
            context: format!("tensor `{}`", info.name),
            source: Box::new(source),
        };
        let tensor = Tensor::from_raw_buffer(raw, info.dtype, &info.shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(candle_err)?;
        crate::weights::check_finite(&self.path, &info.name, &tensor)?;
        tensor.to_device(device).map_err(candle_err)
    }
}

struct Header {
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
}

fn header_err(path: &Path, detail: impl Into<String>) -> LoadError {
    LoadError::Header {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn parse_dtype(s: &str) -> Option<(DType, usize)> {
    Some(match s {
        "F32" => (DType::F32, 4),
        "F16" => (DType::F16, 2),
        "BF16" => (DType::BF16, 2),
        "F64" => (DType::F64, 8),
        "I64" => (DType::I64, 8),
        "U32" => (DType::U32, 4),
        "U8" => (DType::U8, 1),
        _ => return None,
    })
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Header, usize), LoadError> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| LoadError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        })?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(header_err(
            path,
            format!("header length {n} exceeds 100 MB"),
        ));
    }
    let data_start = 8 + n as usize;
    if data_start > bytes.len() {
        return Err(LoadError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "header claims {n} bytes but the file has only {} after the length",
                bytes.len() - 8
            ),
        });
    }
    let json = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| header_err(path, format!("header is not UTF-8: {e}")))?;
    let entries = parse_unique_object(json).map_err(|e| header_err(path, e))?;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            let map: BTreeMap<String, String> = serde_json::from_value(value)
                .map_err(|e| header_err(path, format!("__metadata__: {e}")))?;
            metadata = map;
            continue;
        }
        tensors.push(parse_entry(path, &name, value)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0usize;
    for t in &tensors {
        if t.begin != expected {
            return Err(LoadError::Tensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                detail: format!(
                    "data_offsets start at {} but the previous tensor ends at {expected} \
                     (offsets must be contiguous from 0)",
                    t.begin
                ),
            });
        }
        expected = t.end;
    }
    let data_len = bytes.len() - data_start;
    if expected < data_len {
        return Err(header_err(
            path,
            format!(
                "{} trailing bytes after the last tensor",
                data_len - expected
            ),
        ));
    }
    if expected > data_len {
        return Err(LoadError::Truncated {
            path: path.to_path_buf(),
            detail: format!("tensor data needs {expected} bytes but the file holds {data_len}"),
        });
    }
    Ok((Header { tensors, metadata }, data_start))
}

fn parse_entry(path: &Path, name: &str, value: serde_json::Value) -> Result<TensorInfo, LoadError> {
    let err = |detail: String| LoadError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        detail,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [usize; 2],
    }
    let entry: Entry = serde_json::from_value(value).map_err(|e| err(format!("bad entry: {e}")))?;
    let (dtype, elem) = parse_dtype(&entry.dtype)
        .ok_or_else(|| err(format!("unsupported dtype {}", entry.dtype)))?;
    let [begin, end] = entry.data_offsets;
    if end < begin {
        return Err(err(format!("data_offsets [{begin}, {end}] are reversed")));
    }
    let size = entry
        .shape
        .iter()
        .try_fold(elem, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {:?} overflows", entry.shape)))?;
    if size != end - begin {
        return Err(err(format!(
            "shape {:?} x {} needs {size} bytes but data_offsets span {}",
            entry.shape,
            entry.dtype,
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape: entry.shape,
        begin,
        end,
    })
}

/// Parse a JSON object into its entries, refusing duplicate keys at every depth (serde_json
/// keeps the last one, which lets two parsers disagree about the same file). A duplicate inside
/// an entry (two `"shape"`s in one tensor) names the entry and the key.
pub fn parse_unique_object(json: &str) -> Result<Vec<(String, serde_json::Value)>, String> {
    struct UniqueMap;
    impl<'de> Visitor<'de> for UniqueMap {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                if !seen.insert(k.clone()) {
                    return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
                }
                let what = if k == "__metadata__" { "" } else { "tensor " };
                let v = map
                    .next_value::<UniqueValue>()
                    .map_err(|e| serde::de::Error::custom(format!("{what}`{k}`: {e}")))?;
                out.push((k, v.0));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let entries = (&mut de)
        .deserialize_map(UniqueMap)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(entries)
}

/// A JSON value whose objects, at any depth, hold each key once.
struct UniqueValue(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueValueVisitor).map(UniqueValue)
    }
}

struct UniqueValueVisitor;

impl<'de> Visitor<'de> for UniqueValueVisitor {
    type Value = serde_json::Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<UniqueValue>()? {
            out.push(v.0);
        }
        Ok(out.into())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate key `{k}`")));
            }
            let v = map.next_value::<UniqueValue>()?;
            out.insert(k, v.0);
        }
        Ok(out.into())
    }
}

/// Write tensors (F16 as F16, U32 token ids as U32, anything else as F32) as a safetensors
/// file, atomically.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let candle_err = |source: candle_core::Error| LoadError::Candle {
            path: path.to_path_buf(),
            context: format!("tensor `{name}`"),
            source: Box::new(source),
        };
        let flat = t.flatten_all().map_err(candle_err)?;
        let (dtype, bytes): (&str, Vec<u8>) = match t.dtype() {
            DType::U32 => (
                "U32",
                flat.to_vec1::<u32>()
                    .map_err(candle_err)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                "F16",
                flat.to_vec1::<half::f16>()
                    .map_err(candle_err)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            _ => (
                "F32",
                flat.to_dtype(DType::F32)
                    .and_then(|f| f.to_vec1::<f32>())
                    .map_err(candle_err)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut json = serde_json::to_vec(&header).expect("header serialises");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    use std::io::Write;
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    for blob in blobs {
        out.write_all(&blob).map_err(io)?;
    }
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn parse(bytes: Vec<u8>) -> Result<SafetensorsFile, LoadError> {
        SafetensorsFile::parse(Path::new("x.safetensors"), bytes)
    }

    #[test]
    fn accepts_a_valid_file() {
        let h =
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#;
        let f = parse(file(h, &[0u8; 8])).unwrap();
        assert_eq!(f.tensors.len(), 1);
        assert_eq!(f.metadata["k"], "v");
    }

    #[test]
    fn rejects_duplicate_keys() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = parse(file(h, &[0u8; 8])).unwrap_err().to_string();
        assert!(e.contains("duplicate key `a`"), "{e}");
    }

    /// The docs promised duplicate keys are rejected, but two `"shape"`s inside one tensor's
    /// entry went through serde_json, which keeps the last.
    #[test]
    fn regression_duplicate_key_inside_a_tensor_entry() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"shape":[2],"data_offsets":[0,8]}}"#;
        let e = parse(file(h, &[0u8; 8])).unwrap_err().to_string();
        assert!(
            e.contains("tensor `a`") && e.contains("duplicate key `shape`"),
            "{e}"
        );
        let h = r#"{"__metadata__":{"k":"v","k":"w"}}"#;
        let e = parse(file(h, &[])).unwrap_err().to_string();
        assert!(e.contains("`__metadata__`: duplicate key `k`"), "{e}");
    }

    #[test]
    fn rejects_trailing_bytes() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = parse(file(h, &[0u8; 12])).unwrap_err().to_string();
        assert!(e.contains("4 trailing bytes"), "{e}");
    }

    #[test]
    fn rejects_size_that_disagrees_with_shape() {
        let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let e = parse(file(h, &[0u8; 8])).unwrap_err().to_string();
        assert!(
            e.contains("tensor `a`") && e.contains("needs 12 bytes"),
            "{e}"
        );
    }

    #[test]
    fn rejects_gaps_and_overlaps() {
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        let e = parse(file(h, &[0u8; 12])).unwrap_err().to_string();
        assert!(e.contains("contiguous"), "{e}");
    }

    #[test]
    fn rejects_truncation_and_huge_headers() {
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let e = parse(file(h, &[0u8; 8])).unwrap_err();
        assert!(matches!(e, LoadError::Truncated { .. }), "{e}");
        let mut huge = (u64::MAX).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(parse(huge).unwrap_err().to_string().contains("exceeds"));
        assert!(matches!(
            parse(vec![1, 2]).unwrap_err(),
            LoadError::Truncated { .. }
        ));
    }

    #[test]
    fn rejects_overflowing_shapes() {
        let h = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#;
        assert!(parse(file(h, &[0u8; 8]))
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }
}
