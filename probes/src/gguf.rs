//! A bounds-checked GGUF reader (v2 and v3).
//!
//! Every count and offset in a GGUF header is untrusted: lengths are checked against the bytes
//! that remain before anything is allocated, tensor sizes use checked arithmetic, and tensor
//! data must lie inside the file. The file is read once into memory and those bytes are both
//! hashed and parsed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::LoadError;

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer type as u64, if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in GGUF order (fastest-varying first).
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    /// Absolute byte range in the file.
    pub begin: usize,
    pub end: usize,
}

impl GgufTensorInfo {
    /// Shape in row-major (candle / PyTorch) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A validated GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LoadError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(LoadError::Truncated {
                path: self.path.to_path_buf(),
                detail: format!(
                    "{what} needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            });
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn len(&mut self, what: &str) -> Result<usize, LoadError> {
        let n = self.u64(what)?;
        let remaining = self.bytes.len() - self.pos;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= remaining)
            .ok_or_else(|| LoadError::Truncated {
                path: self.path.to_path_buf(),
                detail: format!("{what} claims length {n} but only {remaining} bytes remain"),
            })
    }
    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let n = self.len(what)?;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| LoadError::Header {
            path: self.path.to_path_buf(),
            detail: format!("{what} is not UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<GgufValue, LoadError> {
        use GgufValue as V;
        Ok(match ty {
            0 => V::U8(self.array::<1>(key)?[0]),
            1 => V::I8(self.array::<1>(key)?[0] as i8),
            2 => V::U16(u16::from_le_bytes(self.array(key)?)),
            3 => V::I16(i16::from_le_bytes(self.array(key)?)),
            4 => V::U32(self.u32(key)?),
            5 => V::I32(i32::from_le_bytes(self.array(key)?)),
            6 => V::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => return Err(self.header(format!("key `{key}`: bool byte {b}"))),
            },
            8 => V::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.header(format!("key `{key}`: arrays nested too deeply")));
                }
                let item_ty = self.u32(key)?;
                // Each item takes at least one byte, so `len` bounds the allocation.
                let n = self.len(key)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(self.u64(key)?),
            11 => V::I64(i64::from_le_bytes(self.array(key)?)),
            12 => V::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.header(format!("key `{key}`: unknown value type {t}"))),
        })
    }

    fn header(&self, detail: String) -> LoadError {
        LoadError::Header {
            path: self.path.to_path_buf(),
            detail,
        }
    }
}

fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

impl GgufFile {
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        let bytes = crate::files::read_regular(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, bytes)
    }

    /// Validate `bytes` as GGUF; `path` only labels errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        let mut c = Cursor {
            path,
            bytes: &bytes,
            pos: 0,
        };
        let magic = c.u32("magic")?;
        if magic != MAGIC {
            return Err(c.header(format!("bad magic {magic:#010x}, not a GGUF file")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.header(format!("GGUF version {version} (supported: 2, 3)")));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(c.header(format!("duplicate metadata key `{key}`")));
            }
        }
        let mut infos = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.header(format!("tensor `{name}`: {n_dims} dimensions")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                dims.push(
                    usize::try_from(d)
                        .map_err(|_| c.header(format!("tensor `{name}`: dim {d}")))?,
                );
            }
            let ty = c.u32(&name)?;
            let dtype = ggml_dtype(ty).ok_or_else(|| LoadError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                detail: format!("unsupported ggml type {ty}"),
            })?;
            let offset = c.u64(&name)?;
            infos.push((name, dims, dtype, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
                .ok_or_else(|| c.header(format!("general.alignment {v:?}")))?
                as usize,
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, dtype, offset) in infos {
            let terr = |detail: String| LoadError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                detail,
            };
            if !names.insert(name.clone()) {
                return Err(terr("duplicate tensor name".into()));
            }
            if dims.contains(&0) {
                return Err(terr(format!("dims {dims:?} hold a zero")));
            }
            let elems = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| terr(format!("dims {dims:?} overflow")))?;
            if elems % dtype.block_size() != 0 || dims[0] % dtype.block_size() != 0 {
                return Err(terr(format!(
                    "dims {dims:?} do not fit {dtype:?} blocks of {}",
                    dtype.block_size()
                )));
            }
            let size = (elems / dtype.block_size())
                .checked_mul(dtype.type_size())
                .ok_or_else(|| terr(format!("dims {dims:?} overflow")))?;
            if !offset.is_multiple_of(alignment as u64) {
                return Err(terr(format!(
                    "offset {offset} is not aligned to {alignment} bytes"
                )));
            }
            let begin = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .ok_or_else(|| terr(format!("offset {offset} overflows")))?;
            let end = begin
                .checked_add(size)
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| LoadError::Truncated {
                    path: path.to_path_buf(),
                    detail: format!(
                        "tensor `{name}` needs bytes {begin}..{} but the file has {}",
                        begin.saturating_add(size),
                        bytes.len()
                    ),
                })?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                dtype,
                begin,
                end,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            version,
            metadata,
            tensors,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn get(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Metadata value, or a config error naming the key.
    pub fn meta(&self, key: &str) -> Result<&GgufValue, LoadError> {
        self.metadata.get(key).ok_or_else(|| LoadError::Config {
            path: self.path.clone(),
            detail: format!("GGUF metadata key `{key}` is missing"),
        })
    }

    pub fn meta_usize(&self, key: &str) -> Result<usize, LoadError> {
        let v = self.meta(key)?;
        v.as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| LoadError::Config {
                path: self.path.clone(),
                detail: format!("GGUF metadata `{key}` = {v:?} is not an unsigned integer"),
            })
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64, LoadError> {
        let v = self.meta(key)?;
        v.as_f64().ok_or_else(|| LoadError::Config {
            path: self.path.clone(),
            detail: format!("GGUF metadata `{key}` = {v:?} is not a number"),
        })
    }

    pub fn meta_str(&self, key: &str) -> Result<&str, LoadError> {
        let v = self.meta(key)?;
        v.as_str().ok_or_else(|| LoadError::Config {
            path: self.path.clone(),
            detail: format!("GGUF metadata `{key}` is not a string"),
        })
    }

    /// The tensor as a candle quantized tensor (row-major shape).
    pub fn qtensor(&self, info: &GgufTensorInfo) -> Result<QTensor, LoadError> {
        let raw = &self.bytes[info.begin..info.end];
        // candle reinterprets the bytes as blocks; offsets are aligned within the file, and
        // the buffer itself comes from the allocator, which aligns to at least 16 bytes.
        if raw.as_ptr().align_offset(8) != 0 {
            return Err(LoadError::Tensor {
                path: self.path.clone(),
                tensor: info.name.clone(),
                detail: "tensor data is not 8-byte aligned in memory".into(),
            });
        }
        qtensor_from_ggml(info.dtype, raw, info.shape(), &Device::Cpu).map_err(
            |source: candle_core::Error| LoadError::Candle {
                path: self.path.clone(),
                context: format!("tensor `{}`", info.name),
                source: Box::new(source),
            },
        )
    }

    /// The tensor dequantized to f32, refusing NaN and Inf.
    pub fn load_f32(&self, info: &GgufTensorInfo) -> Result<Tensor, LoadError> {
        let t = self.qtensor(info)?.dequantize(&Device::Cpu).map_err(
            |source: candle_core::Error| LoadError::Candle {
                path: self.path.clone(),
                context: format!("dequantizing tensor `{}`", info.name),
                source: Box::new(source),
            },
        )?;
        crate::weights::check_finite(&self.path, &info.name, &t)?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut v = MAGIC.to_le_bytes().to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(n_tensors.to_le_bytes());
        v.extend(n_kv.to_le_bytes());
        v
    }

    #[test]
    fn lying_counts_are_truncation_not_allocation() {
        let bytes = header(u64::MAX, u64::MAX);
        let e = GgufFile::parse(Path::new("m.gguf"), bytes).unwrap_err();
        assert!(matches!(e, LoadError::Truncated { .. }), "{e}");
    }

    #[test]
    fn lying_string_length_is_refused() {
        let mut bytes = header(0, 1);
        bytes.extend((1u64 << 40).to_le_bytes());
        let e = GgufFile::parse(Path::new("m.gguf"), bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("claims length"), "{e}");
    }

    fn one_tensor(dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
        let mut b = header(1, 0);
        b.extend(1u64.to_le_bytes());
        b.push(b'w');
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + 4096, 0);
        b
    }

    /// Found by the fuzzer: candle multiplies dims in the other order and overflowed.
    #[test]
    fn regression_zero_dim_with_huge_dims() {
        let b = one_tensor(&[0, u64::MAX / 2, 3], 0, 0);
        let e = GgufFile::parse(Path::new("m.gguf"), b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("zero"), "{e}");
    }

    /// Found by the fuzzer: block data at a misaligned offset was reinterpreted in place.
    #[test]
    fn regression_misaligned_tensor_offset() {
        let b = one_tensor(&[32], 3, 3);
        let e = GgufFile::parse(Path::new("m.gguf"), b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("aligned"), "{e}");
        let ok = GgufFile::parse(Path::new("m.gguf"), one_tensor(&[32], 3, 32)).unwrap();
        assert_eq!(ok.load_f32(&ok.tensors[0]).unwrap().dims(), [32]);
    }

    #[test]
    fn bad_magic_is_named() {
        let e = GgufFile::parse(Path::new("m.gguf"), b"GGML\0\0\0\0".to_vec()).unwrap_err();
        assert!(e.to_string().contains("m.gguf") && e.to_string().contains("magic"));
    }
}
