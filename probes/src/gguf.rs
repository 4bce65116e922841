//! A bounds-checked GGUF reader (v2 and v3).
//!
//! Every count and offset in a GGUF header is untrusted: lengths are checked against the bytes
//! that remain before anything is allocated, tensor sizes use checked arithmetic, tensor data
//! must lie inside the file and tensors must not overlap. The file is read once into memory and
//! those bytes are both hashed and parsed.
//!
//! Memory bound: besides the file's own bytes, parsing the header allocates at most
//! [`HEAP_PER_FILE_BYTE`] bytes per byte of file, plus [`HEAP_ALLOWANCE`]. Arrays are held as
//! typed vectors (a `u8` array costs one byte per element, as in the file), and every
//! allocation is charged against that budget *before* it is made; a header that would exceed
//! it is refused with an error naming the metadata key or tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::LoadError;

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian

/// Heap bytes the header parser may allocate per byte of file.
pub const HEAP_PER_FILE_BYTE: usize = 8;
/// Heap bytes the header parser may allocate whatever the file's size.
pub const HEAP_ALLOWANCE: usize = 1 << 20;
/// Allocator bookkeeping charged per heap allocation (glibc: 32-byte minimum chunks, 16-byte
/// rounding with an 8-byte header).
const ALLOC_OVERHEAD: usize = 32;
/// Longest tensor name, as in ggml (`GGML_MAX_NAME` including the terminator).
const MAX_TENSOR_NAME: usize = 63;
/// Longest metadata key, as in the GGUF specification.
const MAX_KEY: usize = 65_535;
/// Arrays of arrays of arrays is as deep as any GGUF writer goes.
const MAX_ARRAY_DEPTH: u32 = 2;

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
    Array(GgufArray),
}

/// A metadata array, held as a vector of its element type (not of [`GgufValue`], which would
/// cost 32 bytes per one-byte element).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// Element `i` of an integer array as u64, if it exists and is non-negative.
    pub fn u64_at(&self, i: usize) -> Option<u64> {
        match self {
            Self::U8(v) => v.get(i).map(|&x| x.into()),
            Self::U16(v) => v.get(i).map(|&x| x.into()),
            Self::U32(v) => v.get(i).map(|&x| x.into()),
            Self::U64(v) => v.get(i).copied(),
            Self::I8(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Self::I16(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Self::I32(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Self::I64(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            _ => None,
        }
    }
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

    pub fn as_array(&self) -> Option<&GgufArray> {
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
    /// Heap bytes the parser may still allocate.
    budget: usize,
}

/// Bytes one array element of GGUF type `ty` takes in the file, at least, and the heap bytes
/// its slot takes in the typed vector.
fn element_sizes(ty: u32) -> Option<(usize, usize)> {
    use std::mem::size_of;
    Some(match ty {
        0 | 1 | 7 => (1, 1),
        2 | 3 => (2, 2),
        4..=6 => (4, 4),
        10..=12 => (8, 8),
        8 => (8, size_of::<String>()),
        9 => (12, size_of::<GgufArray>()),
        _ => return None,
    })
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

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

    /// Charge `n` heap bytes for `what` before allocating them.
    fn charge(&mut self, n: Option<usize>, what: &str) -> Result<(), LoadError> {
        match n.filter(|&n| n <= self.budget) {
            Some(n) => {
                self.budget -= n;
                Ok(())
            }
            None => Err(self.header(format!(
                "{what}: the header needs more memory than {HEAP_PER_FILE_BYTE} bytes per byte \
                 of file (plus {HEAP_ALLOWANCE}) allows"
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        let raw = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(raw);
        Ok(out)
    }
    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count of items each taking at least `min_bytes` of the file.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize, LoadError> {
        let n = self.u64(what)?;
        let remaining = self.remaining();
        usize::try_from(n)
            .ok()
            .filter(|&n| n.checked_mul(min_bytes).is_some_and(|b| b <= remaining))
            .ok_or_else(|| LoadError::Truncated {
                path: self.path.to_path_buf(),
                detail: format!(
                    "{what} claims {n} items of at least {min_bytes} bytes but only {remaining} \
                     bytes remain"
                ),
            })
    }
    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let n = self.count(what, 1)?;
        let raw = self.take(n, what)?;
        let heap = if n == 0 { 0 } else { n + ALLOC_OVERHEAD };
        self.charge(Some(heap), what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| LoadError::Header {
            path: self.path.to_path_buf(),
            detail: format!("{what} is not UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue, LoadError> {
        use GgufValue as V;
        Ok(match ty {
            0 => V::U8(self.array::<1>(key)?[0]),
            1 => V::I8(self.array::<1>(key)?[0] as i8),
            2 => V::U16(u16::from_le_bytes(self.array(key)?)),
            3 => V::I16(i16::from_le_bytes(self.array(key)?)),
            4 => V::U32(self.u32(key)?),
            5 => V::I32(i32::from_le_bytes(self.array(key)?)),
            6 => V::F32(f32::from_le_bytes(self.array(key)?)),
            7 => V::Bool(self.bool(key)?),
            8 => V::String(self.string(key)?),
            9 => V::Array(self.gguf_array(key, 0)?),
            10 => V::U64(self.u64(key)?),
            11 => V::I64(i64::from_le_bytes(self.array(key)?)),
            12 => V::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.header(format!("key `{key}`: unknown value type {t}"))),
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool, LoadError> {
        match self.array::<1>(key)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.header(format!("key `{key}`: bool byte {b}"))),
        }
    }

    /// `n` fixed-size numbers of `N` bytes each, decoded by `f`.
    fn numbers<T, const N: usize>(
        &mut self,
        n: usize,
        key: &str,
        f: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, LoadError> {
        let raw = self.take(n * N, key)?;
        Ok(raw
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }

    fn gguf_array(&mut self, key: &str, depth: u32) -> Result<GgufArray, LoadError> {
        use GgufArray as A;
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.header(format!("key `{key}`: arrays nested too deeply")));
        }
        let ty = self.u32(key)?;
        let (file_size, heap_size) = element_sizes(ty)
            .ok_or_else(|| self.header(format!("key `{key}`: unknown array item type {ty}")))?;
        let n = self.count(key, file_size)?;
        // The vector's slots, charged before the vector exists.
        self.charge(
            n.checked_mul(heap_size)
                .and_then(|b| b.checked_add(ALLOC_OVERHEAD)),
            &format!("key `{key}`"),
        )?;
        Ok(match ty {
            0 => A::U8(self.numbers(n, key, |[b]| b)?),
            1 => A::I8(self.numbers(n, key, |[b]| b as i8)?),
            2 => A::U16(self.numbers(n, key, u16::from_le_bytes)?),
            3 => A::I16(self.numbers(n, key, i16::from_le_bytes)?),
            4 => A::U32(self.numbers(n, key, u32::from_le_bytes)?),
            5 => A::I32(self.numbers(n, key, i32::from_le_bytes)?),
            6 => A::F32(self.numbers(n, key, f32::from_le_bytes)?),
            10 => A::U64(self.numbers(n, key, u64::from_le_bytes)?),
            11 => A::I64(self.numbers(n, key, i64::from_le_bytes)?),
            12 => A::F64(self.numbers(n, key, f64::from_le_bytes)?),
            7 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                A::Bool(v)
            }
            8 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(key)?);
                }
                A::String(v)
            }
            _ => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.gguf_array(key, depth + 1)?);
                }
                A::Array(v)
            }
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
            budget: bytes
                .len()
                .saturating_mul(HEAP_PER_FILE_BYTE)
                .saturating_add(HEAP_ALLOWANCE),
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
        // A key-value pair takes at least 13 bytes (key length, type, one-byte value) and a
        // tensor entry at least 33 (name length, one name byte, rank, one dim, type, offset).
        let n_kv = c.count("metadata count", 13)?;
        let header_room = c.remaining().saturating_sub(n_kv * 13) as u64;
        if n_tensors.checked_mul(33).is_none_or(|b| b > header_room) {
            return Err(LoadError::Truncated {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor count {n_tensors} needs at least 33 bytes each but only \
                     {header_room} bytes remain after the metadata"
                ),
            });
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            if key.is_empty() || key.len() > MAX_KEY || key.chars().any(char::is_control) {
                return Err(c.header(format!(
                    "metadata key #{i} {key:?} is empty, longer than {MAX_KEY} bytes or holds \
                     control characters"
                )));
            }
            // A B-tree node slot, with nodes at least half full.
            c.charge(
                Some(2 * std::mem::size_of::<(String, GgufValue)>() + ALLOC_OVERHEAD),
                &format!("metadata key `{key}`"),
            )?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key)?;
            if metadata.contains_key(&key) {
                return Err(c.header(format!("duplicate metadata key `{key}`")));
            }
            metadata.insert(key, value);
        }
        // Bounded by the check above: at most one entry per 33 bytes of file.
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            if name.is_empty() || name.len() > MAX_TENSOR_NAME {
                return Err(c.header(format!(
                    "tensor name #{i} {name:?} is empty or longer than {MAX_TENSOR_NAME} bytes"
                )));
            }
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.header(format!("tensor `{name}`: {n_dims} dimensions")));
            }
            c.charge(
                // Its slot in `infos` and in `tensors`, its dims, and its index when sorting.
                Some(
                    std::mem::size_of::<GgufTensorInfo>()
                        + std::mem::size_of::<(String, Vec<usize>, GgmlDType, u64)>()
                        + 5 * std::mem::size_of::<usize>()
                        + ALLOC_OVERHEAD,
                ),
                &format!("tensor `{name}`"),
            )?;
            let mut dims = Vec::with_capacity(n_dims as usize);
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
                detail: format!(
                    "unsupported ggml type {ty} (weights may be F32, F16, BF16, Q4_0, Q4_1, \
                     Q5_0, Q5_1, Q8_0 or Q2_K to Q6_K: the types candle dequantizes)"
                ),
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
        for (name, dims, dtype, offset) in infos {
            let terr = |detail: String| LoadError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                detail,
            };
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
        // Names are unique and data ranges disjoint: two names for one tensor, or one byte in
        // two tensors, would make the digest cover weights other than those that run.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
        for w in order.windows(2) {
            if tensors[w[0]].name == tensors[w[1]].name {
                return Err(LoadError::Tensor {
                    path: path.to_path_buf(),
                    tensor: tensors[w[1]].name.clone(),
                    detail: "duplicate tensor name".into(),
                });
            }
        }
        order.sort_by_key(|&i| (tensors[i].begin, tensors[i].end));
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if b.begin < a.end {
                return Err(LoadError::Tensor {
                    path: path.to_path_buf(),
                    tensor: b.name.clone(),
                    detail: format!(
                        "data {}..{} overlaps tensor `{}` at {}..{}",
                        b.begin, b.end, a.name, a.begin, a.end
                    ),
                });
            }
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
        bytes.extend([0u8; 16]);
        let e = GgufFile::parse(Path::new("m.gguf"), bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("claims 1099511627776"), "{e}");
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

    fn kv(b: &mut Vec<u8>, key: &str, ty: u32, value: &[u8]) {
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }

    /// A one-byte array element cost a 32-byte `GgufValue`: 100 MB of file, 3 GB of memory.
    #[test]
    fn regression_metadata_array_is_held_at_its_element_size() {
        let n = 1usize << 22;
        let mut b = header(0, 1);
        let mut v = 0u32.to_le_bytes().to_vec(); // u8 items
        v.extend((n as u64).to_le_bytes());
        v.resize(v.len() + n, 7);
        kv(&mut b, "big", 9, &v);
        let g = GgufFile::parse(Path::new("m.gguf"), b).unwrap();
        match g.metadata["big"].as_array() {
            Some(GgufArray::U8(v)) => assert_eq!(v.len(), n),
            other => panic!("{other:?}"),
        }
    }

    /// Many tiny keys cost more heap (a map slot each) than the bound allows: refused by the
    /// accounting, before the map outgrows it.
    #[test]
    fn metadata_beyond_the_memory_bound_is_refused() {
        let n = 200_000u64;
        let mut b = header(0, n);
        for i in 0..n {
            let k = [
                b'a' + (i % 26) as u8,
                b'a' + (i / 26 % 26) as u8,
                b'a' + (i / 676 % 26) as u8,
                b'0' + (i / 17576) as u8,
            ];
            kv(&mut b, std::str::from_utf8(&k).unwrap(), 0, &[1]);
        }
        let e = GgufFile::parse(Path::new("m.gguf"), b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more memory than 8 bytes per byte"), "{e}");
    }

    #[test]
    fn overlapping_tensors_and_bad_names_are_refused() {
        let mut b = header(2, 0);
        for name in ["a", "b"] {
            b.extend(1u64.to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(1u32.to_le_bytes());
            b.extend(8u64.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + 64, 0);
        let e = GgufFile::parse(Path::new("m.gguf"), b)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor `b`") && e.contains("overlaps tensor `a`"),
            "{e}"
        );

        let mut b = header(0, 1);
        kv(&mut b, "", 0, &[1]);
        let e = GgufFile::parse(Path::new("m.gguf"), b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("metadata key #0"), "{e}");

        let long = "x".repeat(64);
        let mut b = header(1, 0);
        b.extend((long.len() as u64).to_le_bytes());
        b.extend(long.as_bytes());
        b.resize(b.len() + 64, 0);
        let e = GgufFile::parse(Path::new("m.gguf"), b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than 63 bytes"), "{e}");
    }

    #[test]
    fn bad_magic_is_named() {
        let e = GgufFile::parse(Path::new("m.gguf"), b"GGML\0\0\0\0".to_vec()).unwrap_err();
        assert!(e.to_string().contains("m.gguf") && e.to_string().contains("magic"));
    }
}
