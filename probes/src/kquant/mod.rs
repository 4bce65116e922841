//! A checkpoint's own K-quant blocks (Q4_K and Q6_K), for quantized generation: its decode
//! steps and its prefill.
//!
//! A decode step multiplies one row (or a few) by every weight matrix, so it is bound by the
//! bytes it reads. A prefill multiplies tens of rows, so the kernels unpack a weight row once
//! for several activation rows, and with AVX-512 VNNI take a tile of weight rows per
//! activation load. A Q4_K_M file's blocks hold 4.5 (Q4_K) and 6.56 (Q6_K) bits a weight; the
//! Q8_0 copy that decode steps otherwise use holds 8.5. This module keeps the file's blocks,
//! Q4_K's 6-bit scales and mins unpacked (4.75 bits a weight), and multiplies them by
//! activations quantised per 256 values to 8 bits, as llama.cpp does with the same blocks
//! (ggml's `Q8_K`). A matrix may mix the two kinds by rows, as a fused q/k/v projection does
//! when the file stores `attn_v` in Q6_K and `attn_q` in Q4_K.
//!
//! The kernels need AVX2 and FMA (every x86-64-v3 CPU, which the release build targets);
//! [`supported`] says whether this CPU has them. Where it does not, nothing is kept and
//! generation uses f32 and the Q8_0 copy as before. Every output is one row of weights dotted
//! with one row of activations, in the same order whatever the number of rows, threads or
//! kernel (the AVX-512 kernels' integer lanes fold exactly to the AVX2 kernels'), so a row's
//! result does not depend on its batch or its CPU's vector width.

mod activations;
mod q4k;
mod q6k;

use activations::{quantize_row, ActBlock};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

/// Values per K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Weight rows a thread takes at a time (whole tiles of [`WEIGHT_ROWS_PER_TILE`]).
const ROWS_PER_TASK: usize = 63;
/// Activation rows that share one unpacking of a weight row's blocks.
const ACT_ROWS_PER_LOAD: usize = 4;
/// Activation rows every weight row of a task passes over before the next ones (a long
/// prompt's rows would not stay in cache).
const ACT_ROWS_PER_CHUNK: usize = 32;
/// Weight rows that share one load of an activation row (by the AVX-512 kernels).
const WEIGHT_ROWS_PER_TILE: usize = 3;

/// The block kinds this module multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KQuant {
    Q4K,
    Q6K,
}

impl KQuant {
    /// The kind of a GGUF tensor type, if this module reads it.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    fn ggml_bytes(self) -> usize {
        match self {
            Self::Q4K => q4k::GGML_BYTES,
            Self::Q6K => q6k::GGML_BYTES,
        }
    }
}

/// Consecutive rows' blocks, all of one kind.
#[derive(Clone)]
enum Blocks {
    Q4k(Vec<q4k::Block>),
    Q6k(Vec<q6k::Block>),
}

impl Blocks {
    fn kind(&self) -> KQuant {
        match self {
            Self::Q4k(_) => KQuant::Q4K,
            Self::Q6k(_) => KQuant::Q6K,
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Q4k(b) => b.len(),
            Self::Q6k(b) => b.len(),
        }
    }

    fn empty(kind: KQuant) -> Self {
        match kind {
            KQuant::Q4K => Self::Q4k(Vec::new()),
            KQuant::Q6K => Self::Q6k(Vec::new()),
        }
    }

    /// Append blocks `range` of `other`, which is of the same kind.
    fn extend_from(&mut self, other: &Self, range: std::ops::Range<usize>) {
        match (self, other) {
            (Self::Q4k(a), Self::Q4k(b)) => a.extend_from_slice(&b[range]),
            (Self::Q6k(a), Self::Q6k(b)) => a.extend_from_slice(&b[range]),
            _ => unreachable!("blocks extended only from blocks of their kind"),
        }
    }

    /// Blocks `range` dotted with `R` activation rows by the fastest kernel this CPU runs. A
    /// row's result is the same bits for every `R` and every kernel but the scalar one.
    fn dot_rows<const R: usize>(
        &self,
        range: std::ops::Range<usize>,
        a: [&[ActBlock]; R],
    ) -> [f32; R] {
        self.dot_rows_by(Kernel::best(), range, a)
    }

    /// The same by `kernel`, which the CPU must run ([`Kernel::runs_here`]).
    fn dot_rows_by<const R: usize>(
        &self,
        kernel: Kernel,
        range: std::ops::Range<usize>,
        a: [&[ActBlock]; R],
    ) -> [f32; R] {
        assert!(
            kernel.runs_here(),
            "{kernel:?} kernels need CPU features this one lacks"
        );
        // SAFETY: `kernel` is one this CPU has the features for (`Kernel::best` or a
        // caller's check of `runs_here`).
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        match (kernel, self) {
            (Kernel::Avx2, Self::Q4k(b)) => return unsafe { q4k::avx2::dot_rows(&b[range], a) },
            (Kernel::Avx2, Self::Q6k(b)) => return unsafe { q6k::avx2::dot_rows(&b[range], a) },
            (Kernel::Avx512, Self::Q4k(b)) => {
                return unsafe { q4k::avx512::dot_tile([&b[range]], a).map(|[v]| v) }
            }
            (Kernel::Avx512, Self::Q6k(b)) => {
                return unsafe { q6k::avx512::dot_tile([&b[range]], a).map(|[v]| v) }
            }
            (Kernel::Scalar, _) => {}
        }
        a.map(|a| self.dot_reference(range.clone(), a))
    }

    /// Blocks `ranges` (one weight row each) dotted with `R` activation rows: `[r][j]` is
    /// activation row `r` with weight row `j`, the same bits as [`Blocks::dot_rows`] gives.
    fn dot_tile<const R: usize, const C: usize>(
        &self,
        ranges: [std::ops::Range<usize>; C],
        a: [&[ActBlock]; R],
    ) -> [[f32; C]; R] {
        #[cfg(target_arch = "x86_64")]
        if Kernel::best() == Kernel::Avx512 {
            // SAFETY: `Kernel::best` found the kernel's features on this CPU.
            #[allow(unsafe_code)]
            return unsafe {
                match self {
                    Self::Q4k(b) => q4k::avx512::dot_tile(ranges.map(|r| &b[r]), a),
                    Self::Q6k(b) => q6k::avx512::dot_tile(ranges.map(|r| &b[r]), a),
                }
            };
        }
        let by_weight_row = ranges.map(|range| self.dot_rows(range, a));
        std::array::from_fn(|r| std::array::from_fn(|j| by_weight_row[j][r]))
    }

    /// The same sums in scalar code.
    fn dot_reference(&self, range: std::ops::Range<usize>, a: &[ActBlock]) -> f32 {
        match self {
            Self::Q4k(b) => q4k::dot_reference(&b[range], a),
            Self::Q6k(b) => q6k::dot_reference(&b[range], a),
        }
    }

    fn dequantize_into(&self, out: &mut Vec<f32>) {
        match self {
            Self::Q4k(b) => b.iter().for_each(|b| b.dequantize_into(out)),
            Self::Q6k(b) => b.iter().for_each(|b| b.dequantize_into(out)),
        }
    }
}

/// A weight matrix `[rows, cols]` as K-quant blocks, row by row, in runs of one kind.
#[derive(Clone)]
pub struct KMatrix {
    rows: usize,
    cols: usize,
    /// Runs of consecutive rows; no two neighbours of the same kind.
    parts: Vec<Blocks>,
}

/// Whether this CPU runs the kernels.
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

/// The kernels, slowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kernel {
    /// Scalar code (slow; nothing keeps K-quant blocks where only this runs).
    Scalar,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW and VNNI: two 32-value groups per product, the AVX2 kernel's bits.
    Avx512,
}

impl Kernel {
    /// Whether this CPU has the kernel's features.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Self::Scalar => true,
                Self::Avx2 => supported(),
                Self::Avx512 => {
                    supported() && has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Scalar
        }
    }

    /// The fastest kernel this CPU runs, asked once.
    fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Avx512, Self::Avx2]
                .into_iter()
                .find(|k| k.runs_here())
                .unwrap_or(Self::Scalar)
        })
    }
}

impl KMatrix {
    /// The blocks of a `[rows, cols]` tensor of `kind` as a GGUF file stores them. `None`
    /// when the byte count does not match the shape, a row is not whole blocks, or a scale is
    /// not finite.
    pub fn from_ggml(kind: KQuant, raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(QK_K) {
            return None;
        }
        let n = rows.checked_mul(cols / QK_K)?;
        if raw.len() != n.checked_mul(kind.ggml_bytes())? {
            return None;
        }
        let chunks = raw.chunks_exact(kind.ggml_bytes());
        let blocks = match kind {
            KQuant::Q4K => Blocks::Q4k(chunks.map(q4k::Block::from_ggml).collect::<Option<_>>()?),
            KQuant::Q6K => Blocks::Q6k(chunks.map(q6k::Block::from_ggml).collect::<Option<_>>()?),
        };
        Some(Self {
            rows,
            cols,
            parts: vec![blocks],
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The kinds of blocks held, in row order.
    pub fn kinds(&self) -> Vec<KQuant> {
        self.parts.iter().map(Blocks::kind).collect()
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / QK_K
    }

    /// Append the rows of `src` blocks `range`, joining the last run where the kinds match.
    fn push(&mut self, src: &Blocks, range: std::ops::Range<usize>) {
        self.rows += range.len() / self.blocks_per_row();
        match self.parts.last_mut() {
            Some(last) if last.kind() == src.kind() => last.extend_from(src, range),
            _ => {
                let mut run = Blocks::empty(src.kind());
                run.extend_from(src, range);
                self.parts.push(run);
            }
        }
    }

    /// The run holding row `r` and the row's block range within it.
    fn locate(&self, mut r: usize) -> Option<(&Blocks, std::ops::Range<usize>)> {
        let k = self.blocks_per_row();
        for part in &self.parts {
            let rows = part.len() / k;
            if r < rows {
                return Some((part, r * k..(r + 1) * k));
            }
            r -= rows;
        }
        None
    }

    /// The values the blocks hold, `[rows, cols]` row-major, computed as ggml (and candle)
    /// dequantize them, so they equal the f32 weights loaded from the same tensors.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for part in &self.parts {
            part.dequantize_into(&mut out);
        }
        out
    }

    /// The rows in the order given (`order[i]` is the source row of row `i`).
    pub fn gather_rows(&self, order: &[usize]) -> Option<Self> {
        let mut out = Self {
            rows: 0,
            cols: self.cols,
            parts: Vec::new(),
        };
        for &r in order {
            let (part, range) = self.locate(r)?;
            out.push(part, range);
        }
        Some(out)
    }

    /// The matrices' rows one after another, as one matrix. `None` if their widths differ.
    pub fn stack(matrices: &[&Self]) -> Option<Self> {
        let cols = matrices.first()?.cols;
        let mut out = Self {
            rows: 0,
            cols,
            parts: Vec::new(),
        };
        for m in matrices {
            if m.cols != cols {
                return None;
            }
            for part in &m.parts {
                out.push(part, 0..part.len());
            }
        }
        Some(out)
    }

    /// `x W^T` for `x` of `m` rows of `cols` values: `m * rows` outputs, row by row.
    /// Panics if `x.len() != m * cols`. Where [`supported`] does not hold it computes the
    /// same sums in scalar code (slowly; nothing keeps these blocks then).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "K-quant product: input of the wrong size"
        );
        let acts: Vec<Vec<ActBlock>> = x.chunks_exact(self.cols).map(quantize_row).collect();
        let k = self.blocks_per_row();
        let per_row = m.max(1);
        let mut by_weight_row = vec![0f32; self.rows * per_row];
        let mut rest = by_weight_row.as_mut_slice();
        for part in &self.parts {
            let (out, tail) = rest.split_at_mut(part.len() / k * per_row);
            rest = tail;
            out.par_chunks_mut(ROWS_PER_TASK * per_row)
                .enumerate()
                .for_each(|(task, out)| {
                    let first = task * ROWS_PER_TASK;
                    let rows = out.len() / per_row;
                    // Activation rows a chunk at a time, so that they stay in cache while
                    // every weight row of the task passes over them.
                    for (c, chunk) in acts.chunks(ACT_ROWS_PER_CHUNK).enumerate() {
                        let at = c * ACT_ROWS_PER_CHUNK;
                        let block_range = |r: usize| (first + r) * k..(first + r + 1) * k;
                        let mut r = 0;
                        while r + WEIGHT_ROWS_PER_TILE <= rows {
                            let blocks: [_; WEIGHT_ROWS_PER_TILE] =
                                std::array::from_fn(|j| block_range(r + j));
                            let out = &mut out[r * per_row..(r + WEIGHT_ROWS_PER_TILE) * per_row];
                            fill_tile(part, blocks, chunk, at, out);
                            r += WEIGHT_ROWS_PER_TILE;
                        }
                        for r in r..rows {
                            let blocks: [_; 1] = std::array::from_fn(|_| block_range(r));
                            fill_tile(
                                part,
                                blocks,
                                chunk,
                                at,
                                &mut out[r * per_row..(r + 1) * per_row],
                            );
                        }
                    }
                });
        }
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

/// Into `out` (`C` weight rows' outputs, `per_row` values each, `per_row = out.len() / C`):
/// the blocks `blocks` of `part` dotted with activation rows `at..at + acts.len()`,
/// `ACT_ROWS_PER_LOAD` at a time.
fn fill_tile<const C: usize>(
    part: &Blocks,
    blocks: [std::ops::Range<usize>; C],
    acts: &[Vec<ActBlock>],
    at: usize,
    out: &mut [f32],
) {
    let per_row = out.len() / C;
    let mut groups = acts.chunks_exact(ACT_ROWS_PER_LOAD);
    let mut i = at;
    for a in &mut groups {
        let a: [&[ActBlock]; ACT_ROWS_PER_LOAD] = std::array::from_fn(|r| a[r].as_slice());
        let tile = part.dot_tile(blocks.clone(), a);
        for (r, row) in tile.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                out[j * per_row + i + r] = *v;
            }
        }
        i += ACT_ROWS_PER_LOAD;
    }
    for a in groups.remainder() {
        let [row] = part.dot_tile(blocks.clone(), [a.as_slice()]);
        for (j, v) in row.iter().enumerate() {
            out[j * per_row + i] = *v;
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests;
