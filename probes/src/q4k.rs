//! A checkpoint's own Q4_K blocks, for decode steps.
//!
//! A decode step multiplies one row (or a few) by every weight matrix, so it is bound by the
//! bytes it reads. A Q4_K file's blocks hold 4.5 bits a weight; the Q8_0 copy that decode steps
//! otherwise use holds 8.5. This module keeps the file's Q4_K blocks, with their 6-bit scales
//! and mins unpacked (4.75 bits a weight), and multiplies them by activations quantised per
//! 256 values to 8 bits, as llama.cpp does with the same blocks (ggml's `Q8_K`).
//!
//! The kernel needs AVX2 and FMA (every x86-64-v3 CPU, which the release build targets);
//! [`supported`] says whether this CPU has them. Where it does not, nothing is kept and decode
//! steps use the Q8_0 copy as before. Every output is
//! one row of weights dotted with one row of activations, in the same order whatever the
//! number of rows or threads, so a row's result does not depend on its batch.

use rayon::prelude::*;

/// Values per Q4_K super-block.
pub(crate) const QK_K: usize = 256;
/// Bytes of one Q4_K block in a GGUF file: `d`, `dmin` (f16), 12 bytes of packed 6-bit
/// scales and mins, 128 bytes of 4-bit quants.
pub(crate) const GGML_BLOCK_BYTES: usize = 144;
/// Weight rows a thread takes at a time.
const ROWS_PER_TASK: usize = 64;

/// One super-block of one weight row, its scales and mins unpacked.
///
/// `qs` is as in the file: byte `32c + l` holds value `l` of sub-block `2c` in its low nibble
/// and value `l` of sub-block `2c + 1` in its high one. `scales` is in the order the kernel
/// reads them, `[s0, s2, s1, s3, s4, s6, s5, s7]`; `mins` in natural order.
#[derive(Clone, Copy)]
#[repr(C)]
struct Block {
    d: f32,
    dmin: f32,
    scales: [u8; 8],
    mins: [u8; 8],
    qs: [u8; 128],
}

/// The order in which a 64-byte load's low and high nibbles meet the sub-blocks: load `p`
/// holds chunks `2p` and `2p + 1`, so its low nibbles are sub-blocks `4p` and `4p + 2`.
const KERNEL_ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// A weight matrix `[rows, cols]` as Q4_K blocks, row by row.
pub struct Q4kMatrix {
    rows: usize,
    cols: usize,
    blocks: Vec<Block>,
}

/// Whether this CPU runs the kernel.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// ggml's unpacking of sub-block `j`'s 6-bit scale and min from a block's 12 bytes.
fn scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl Q4kMatrix {
    /// The blocks of a `[rows, cols]` Q4_K tensor as a GGUF file stores them. `None` when the
    /// byte count does not match the shape, a row is not whole blocks, or a scale is not
    /// finite.
    pub fn from_ggml(raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(QK_K) {
            return None;
        }
        let n = rows.checked_mul(cols / QK_K)?;
        if raw.len() != n.checked_mul(GGML_BLOCK_BYTES)? {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        for b in raw.chunks_exact(GGML_BLOCK_BYTES) {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
            if !d.is_finite() || !dmin.is_finite() {
                return None;
            }
            let packed: &[u8; 12] = b[4..16].try_into().ok()?;
            let mut scales = [0u8; 8];
            let mut mins = [0u8; 8];
            for (j, min) in mins.iter_mut().enumerate() {
                let (s, m) = scale_min(j, packed);
                *min = m;
                let at = KERNEL_ORDER.iter().position(|&k| k == j)?;
                scales[at] = s;
            }
            blocks.push(Block {
                d,
                dmin,
                scales,
                mins,
                qs: b[16..].try_into().ok()?,
            });
        }
        Some(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK_K
    }

    fn row(&self, r: usize) -> &[Block] {
        let k = self.blocks_per_row();
        &self.blocks[r * k..(r + 1) * k]
    }

    /// The values the blocks hold, `[rows, cols]` row-major, computed as ggml (and candle)
    /// dequantize them, so they equal the f32 weights loaded from the same tensor.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in &self.blocks {
            for c in 0..4 {
                for half in 0..2 {
                    let sub = 2 * c + half;
                    let at = KERNEL_ORDER[sub];
                    let d = b.d * b.scales[at] as f32;
                    let m = b.dmin * b.mins[sub] as f32;
                    out.extend(b.qs[32 * c..32 * c + 32].iter().map(|q| {
                        let q = if half == 0 { q & 0xF } else { q >> 4 };
                        d * q as f32 - m
                    }));
                }
            }
        }
        out
    }

    /// The rows in the order given (`order[i]` is the source row of row `i`).
    pub fn gather_rows(&self, order: &[usize]) -> Option<Self> {
        let mut blocks = Vec::with_capacity(order.len() * self.blocks_per_row());
        for &r in order {
            if r >= self.rows {
                return None;
            }
            blocks.extend_from_slice(self.row(r));
        }
        Some(Self {
            rows: order.len(),
            cols: self.cols,
            blocks,
        })
    }

    /// The matrices' rows one after another, as one matrix. `None` if their widths differ.
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        })
    }

    /// `x W^T` for `x` of `m` rows of `cols` values: `m * rows` outputs, row by row.
    /// Panics if `x.len() != m * cols`. Where [`supported`] does not hold it computes the
    /// same sums in scalar code (slowly; nothing keeps these blocks then).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "Q4_K product: input of the wrong size"
        );
        let acts: Vec<Vec<ActBlock>> = x.chunks_exact(self.cols).map(quantize_row).collect();
        let mut by_weight_row = vec![0f32; self.rows * m];
        by_weight_row
            .par_chunks_mut(ROWS_PER_TASK * m.max(1))
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                for (i, out_r) in out.chunks_exact_mut(m.max(1)).enumerate() {
                    let w = self.row(first + i);
                    for (o, a) in out_r.iter_mut().zip(&acts) {
                        *o = dot(w, a);
                    }
                }
            });
        if m == 1 {
            return by_weight_row;
        }
        let mut out = vec![0f32; self.rows * m];
        for (r, col) in by_weight_row.chunks_exact(m).enumerate() {
            for (i, v) in col.iter().enumerate() {
                out[i * self.rows + r] = *v;
            }
        }
        out
    }
}

/// 256 activations quantised to 8 bits (ggml's `Q8_K`), laid out for the kernel.
#[derive(Clone, Copy)]
#[repr(C)]
struct ActBlock {
    /// Sub-blocks of 32 in [`KERNEL_ORDER`].
    qs: [i8; QK_K],
    /// The sum of each sub-block's quants, natural order.
    bsums: [i16; 8],
    d: f32,
}

/// ggml's `quantize_row_q8_K`: per 256 values, the scale that maps the value largest in
/// magnitude to -127, rounded to nearest.
fn quantize_row(x: &[f32]) -> Vec<ActBlock> {
    x.chunks_exact(QK_K)
        .map(|xs| {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in xs {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let mut block = ActBlock {
                qs: [0; QK_K],
                bsums: [0; 8],
                d: 0.0,
            };
            if amax == 0.0 {
                return block;
            }
            let iscale = -127f32 / max;
            for (at, &sub) in KERNEL_ORDER.iter().enumerate() {
                let mut sum = 0i32;
                for l in 0..32 {
                    let q = (iscale * xs[sub * 32 + l]).round().clamp(-128.0, 127.0) as i8;
                    block.qs[at * 32 + l] = q;
                    sum += q as i32;
                }
                block.bsums[sub] = sum as i16;
            }
            block.d = 1.0 / iscale;
            block
        })
        .collect()
}

fn dot(w: &[Block], a: &[ActBlock]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if supported_cached() {
        // SAFETY: the CPU has the features `avx2::dot` is compiled for.
        #[allow(unsafe_code)]
        return unsafe { avx2::dot(w, a) };
    }
    dot_reference(w, a)
}

/// [`supported`], asked once.
#[cfg(target_arch = "x86_64")]
fn supported_cached() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(supported)
}
/// The same sum in scalar code: the integer parts exactly, the scaling in another order.
fn dot_reference(w: &[Block], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let (mut isum, mut msum) = (0i32, 0i32);
        for (at, &sub) in KERNEL_ORDER.iter().enumerate() {
            let chunk = sub / 2;
            let mut s = 0i32;
            for l in 0..32 {
                let byte = wb.qs[chunk * 32 + l];
                let q = if sub % 2 == 0 { byte & 0xF } else { byte >> 4 };
                s += q as i32 * ab.qs[at * 32 + l] as i32;
            }
            isum += wb.scales[at] as i32 * s;
            msum += wb.mins[sub] as i32 * ab.bsums[sub] as i32;
        }
        sum += wb.d * ab.d * isum as f32 - wb.dmin * ab.d * msum as f32;
    }
    sum
}

// The one place in the workspace that opts out of `unsafe_code = "deny"`: the intrinsics
// below are unsafe to call (target features, unaligned loads). Every load reads inside a
// block's own arrays: 32 bytes at offsets 0, 32, 64 and 96 of 128 quants, 8 bytes of 8
// scales and of 8 mins, 32 bytes at multiples of 32 below 256 of 256 activation quants, 16
// bytes of 8 sums.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{ActBlock, Block, KERNEL_ORDER};
    use core::arch::x86_64::*;

    /// Byte-shuffle control that copies i16 lane `k` of a 128-bit lane to all eight.
    fn lane_broadcast(k: usize) -> [i8; 32] {
        std::array::from_fn(|i| (2 * k + i % 2) as i8)
    }

    /// One weight row dotted with one activation row.
    ///
    /// Per block, per 32-value sub-block: the u4 x i8 products summed in pairs to i16
    /// (`vpmaddubsw`), times the sub-block's scale and summed in pairs to i32 (`vpmaddwd`);
    /// then `d * dx` times the block's i32 sums in f32. The mins' term `dmin * dx *
    /// sum(min_j * bsum_j)` is summed apart and subtracted at the end.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(w: &[Block], a: &[ActBlock]) -> f32 {
        let controls: [__m256i; 8] =
            std::array::from_fn(|k| _mm256_loadu_si256(lane_broadcast(k).as_ptr() as *const _));
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut min_acc = _mm_setzero_ps();
        for (wb, ab) in w.iter().zip(a) {
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(
                wb.scales.as_ptr() as *const _,
            )));
            let mut isum = _mm256_setzero_si256();
            for c in 0..4 {
                let q = _mm256_loadu_si256(wb.qs.as_ptr().add(32 * c) as *const _);
                let halves = [
                    _mm256_and_si256(q, nibble),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble),
                ];
                for (h, w4) in halves.into_iter().enumerate() {
                    // Sub-block 2c + h, at position KERNEL_ORDER[2c + h] (the order is its
                    // own inverse) among the activations and the scales.
                    let at = KERNEL_ORDER[2 * c + h];
                    let x = _mm256_loadu_si256(ab.qs.as_ptr().add(32 * at) as *const _);
                    let scale = _mm256_shuffle_epi8(scales, controls[at]);
                    let pairs = _mm256_maddubs_epi16(w4, x);
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, scale));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(wb.d * ab.d), acc);
            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(wb.mins.as_ptr() as *const _));
            let bsums = _mm_loadu_si128(ab.bsums.as_ptr() as *const _);
            min_acc = _mm_fmadd_ps(
                _mm_cvtepi32_ps(_mm_madd_epi16(mins, bsums)),
                _mm_set1_ps(wb.dmin * ab.d),
                min_acc,
            );
        }
        let sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let sum = _mm_sub_ps(sum, min_acc);
        let sum = _mm_hadd_ps(sum, sum);
        _mm_cvtss_f32(_mm_hadd_ps(sum, sum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// A `[rows, cols]` Q4_K tensor quantised by candle from seeded values, with its bytes.
    fn q4k_tensor(rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<f32>) {
        let mut state = seed;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // A few outlying columns, as real weights have.
                if i % 97 == 0 {
                    u * 8.0
                } else {
                    u
                }
            })
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let deq = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (q, deq)
    }

    fn inputs(m: usize, cols: usize) -> Vec<f32> {
        (0..m * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * if i % 61 == 0 { 6.0 } else { 1.0 })
            .collect()
    }

    #[test]
    fn the_kernel_sums_what_ggml_sums() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX2 and FMA; decode uses the Q8_0 copy");
            return;
        }
        let (rows, cols, m) = (96, 512, 3);
        let (q, deq) = q4k_tensor(rows, cols, 7);
        let raw = q.data().unwrap().to_vec();
        let w = Q4kMatrix::from_ggml(&raw, rows, cols).unwrap();
        let x = inputs(m, cols);
        let ours = w.matmul(&x, m);

        // candle's Q4_K product quantises the activations the same way (ggml's Q8_K), so
        // only the order of the float scaling differs.
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        let theirs = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale,
                "output {i}: ours {a}, candle {b}"
            );
        }

        // The scalar sum, and the f32 product of the dequantized weights (the activations'
        // rounding alone apart).
        let acts: Vec<Vec<ActBlock>> = x.chunks_exact(cols).map(quantize_row).collect();
        for i in 0..m {
            for r in 0..rows {
                let reference = dot_reference(w.row(r), &acts[i]);
                let got = ours[i * rows + r];
                assert!((got - reference).abs() <= 1e-5 * scale, "({i}, {r})");
                let exact: f32 = (0..cols).map(|c| deq[r * cols + c] * x[i * cols + c]).sum();
                assert!(
                    (got - exact).abs() <= 2e-2 * scale,
                    "({i}, {r}): {got} vs f32 {exact}"
                );
            }
        }
    }

    #[test]
    fn a_row_is_the_same_bits_alone_and_in_a_batch() {
        if !supported() {
            return;
        }
        let (rows, cols) = (200, 256);
        let (q, _) = q4k_tensor(rows, cols, 11);
        let w = Q4kMatrix::from_ggml(q.data().unwrap().as_ref(), rows, cols).unwrap();
        let x = inputs(5, cols);
        let batch = w.matmul(&x, 5);
        for i in 0..5 {
            let alone = w.matmul(&x[i * cols..(i + 1) * cols], 1);
            assert_eq!(alone, batch[i * rows..(i + 1) * rows].to_vec(), "row {i}");
        }
    }

    #[test]
    fn rows_gather_and_stack_as_their_blocks() {
        let (q, _) = q4k_tensor(4, 256, 3);
        let w = Q4kMatrix::from_ggml(q.data().unwrap().as_ref(), 4, 256).unwrap();
        let g = w.gather_rows(&[3, 0]).unwrap();
        assert_eq!(g.rows(), 2);
        assert_eq!(g.row(0)[0].qs, w.row(3)[0].qs);
        let s = Q4kMatrix::stack(&[&w, &g]).unwrap();
        assert_eq!(s.rows(), 6);
        assert_eq!(s.row(5)[0].qs, w.row(0)[0].qs);
        assert!(w.gather_rows(&[4]).is_none());
        assert!(Q4kMatrix::from_ggml(&[0u8; 143], 1, 256).is_none());
        assert!(Q4kMatrix::from_ggml(&[0u8; 144], 1, 128).is_none());
    }
}
