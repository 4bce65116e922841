//! Q4_K blocks: 4-bit quants with a 6-bit scale and min per 32 values.

use super::activations::ActBlock;

/// Bytes of one Q4_K block in a GGUF file: `d`, `dmin` (f16), 12 bytes of packed 6-bit
/// scales and mins, 128 bytes of 4-bit quants.
pub(super) const GGML_BYTES: usize = 144;

/// One super-block of one weight row, its scales and mins unpacked.
///
/// `qs` is as in the file: byte `32c + l` holds value `l` of sub-block `2c` in its low nibble
/// and value `l` of sub-block `2c + 1` in its high one.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Block {
    d: f32,
    dmin: f32,
    scales: [u8; 8],
    mins: [u8; 8],
    pub(super) qs: [u8; 128],
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

impl Block {
    /// One block as a GGUF file stores it. `None` if a scale is not finite.
    pub(super) fn from_ggml(b: &[u8]) -> Option<Self> {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        if !d.is_finite() || !dmin.is_finite() {
            return None;
        }
        let packed: &[u8; 12] = b[4..16].try_into().ok()?;
        let mut scales = [0u8; 8];
        let mut mins = [0u8; 8];
        for j in 0..8 {
            (scales[j], mins[j]) = scale_min(j, packed);
        }
        Some(Self {
            d,
            dmin,
            scales,
            mins,
            qs: b[16..GGML_BYTES].try_into().ok()?,
        })
    }

    /// The block's 256 values, computed as ggml (and candle) dequantize them.
    pub(super) fn dequantize_into(&self, out: &mut Vec<f32>) {
        for sub in 0..8 {
            let d = self.d * self.scales[sub] as f32;
            let m = self.dmin * self.mins[sub] as f32;
            let c = sub / 2;
            out.extend(self.qs[32 * c..32 * c + 32].iter().map(|q| {
                let q = if sub % 2 == 0 { q & 0xF } else { q >> 4 };
                d * q as f32 - m
            }));
        }
    }
}

/// The same sum in scalar code: the integer parts exactly, the scaling in another order.
pub(super) fn dot_reference(w: &[Block], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let (mut isum, mut msum) = (0i32, 0i32);
        for sub in 0..8 {
            let mut s = 0i32;
            for l in 0..32 {
                let byte = wb.qs[(sub / 2) * 32 + l];
                let q = if sub % 2 == 0 { byte & 0xF } else { byte >> 4 };
                s += q as i32 * ab.qs[sub * 32 + l] as i32;
            }
            isum += wb.scales[sub] as i32 * s;
            msum += wb.mins[sub] as i32 * ab.bsums[sub] as i32;
        }
        sum += wb.d * ab.d * isum as f32 - wb.dmin * ab.d * msum as f32;
    }
    sum
}

// The kernels of this module and `q6k` (AVX2 and AVX-512), and the calls into them in
// `Blocks::dot_rows_by` and `Blocks::dot_tile`, are the only code in the workspace that opts
// out of `unsafe_code = "deny"`: the intrinsics are unsafe to call (target features,
// unaligned loads).
// Every load reads inside a block's own arrays: 32 bytes at offsets 0, 32, 64 and 96 of 128
// quants, 8 bytes of 8 scales and of 8 mins, 32 bytes at multiples of 32 below 256 of 256
// activation quants, 16 bytes of 8 sums.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{ActBlock, Block};
    use core::arch::x86_64::*;

    /// Byte-shuffle control that copies i16 lane `k` of a 128-bit lane to all eight.
    fn lane_broadcast(k: usize) -> [i8; 32] {
        std::array::from_fn(|i| (2 * k + i % 2) as i8)
    }

    /// One weight row dotted with `R` activation rows.
    ///
    /// Per block, per 32-value sub-block: the u4 x i8 products summed in pairs to i16
    /// (`vpmaddubsw`), times the sub-block's scale and summed in pairs to i32 (`vpmaddwd`);
    /// then `d * dx` times the block's i32 sums in f32. The mins' term `dmin * dx *
    /// sum(min_j * bsum_j)` is summed apart and subtracted at the end. The weights' nibbles
    /// and scales are unpacked once for all `R` rows; each row's sums are the same
    /// instructions in the same order whatever `R`, so its result is the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::kquant) unsafe fn dot_rows<const R: usize>(
        w: &[Block],
        a: [&[ActBlock]; R],
    ) -> [f32; R] {
        assert!(
            a.iter().all(|a| a.len() >= w.len()),
            "activation row too short"
        );
        let controls: [__m256i; 8] =
            std::array::from_fn(|k| _mm256_loadu_si256(lane_broadcast(k).as_ptr() as *const _));
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut min_acc = [_mm_setzero_ps(); R];
        for (i, wb) in w.iter().enumerate() {
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(
                wb.scales.as_ptr() as *const _,
            )));
            let mut isum = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let q = _mm256_loadu_si256(wb.qs.as_ptr().add(32 * c) as *const _);
                let halves = [
                    _mm256_and_si256(q, nibble),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble),
                ];
                for (h, w4) in halves.into_iter().enumerate() {
                    let sub = 2 * c + h;
                    let scale = _mm256_shuffle_epi8(scales, controls[sub]);
                    for r in 0..R {
                        let x = _mm256_loadu_si256(a[r][i].qs.as_ptr().add(32 * sub) as *const _);
                        let pairs = _mm256_maddubs_epi16(w4, x);
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, scale));
                    }
                }
            }
            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(wb.mins.as_ptr() as *const _));
            for r in 0..R {
                let ab = &a[r][i];
                acc[r] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[r]),
                    _mm256_set1_ps(wb.d * ab.d),
                    acc[r],
                );
                let bsums = _mm_loadu_si128(ab.bsums.as_ptr() as *const _);
                min_acc[r] = _mm_fmadd_ps(
                    _mm_cvtepi32_ps(_mm_madd_epi16(mins, bsums)),
                    _mm_set1_ps(wb.dmin * ab.d),
                    min_acc[r],
                );
            }
        }
        std::array::from_fn(|r| sum_lanes(acc[r], min_acc[r]))
    }

    /// The sum of `acc`'s eight lanes less `mins`' four, in the order every kernel of this
    /// file sums them.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_lanes(acc: __m256, mins: __m128) -> f32 {
        let sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let sum = _mm_sub_ps(sum, mins);
        let sum = _mm_hadd_ps(sum, sum);
        _mm_cvtss_f32(_mm_hadd_ps(sum, sum))
    }
}

// The AVX-512 twin of `avx2` (the same `unsafe_code` opt-out). Its loads read inside the
// same arrays: the weights' as `avx2` reads them, the activations' 64 bytes at multiples of
// 64 below 256, and the shuffle controls' local arrays whole.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx512 {
    use super::avx2::sum_lanes;
    use super::{ActBlock, Block};
    use core::arch::x86_64::*;

    /// [`super::avx2::dot_rows`] for `C` weight rows at once, with two sub-blocks per
    /// 512-bit product, whose products' scaled sums (`vpdpwssd`) fold to the AVX2 kernel's
    /// eight i32 lanes at the end of each block. Each activation load serves `C` weight rows
    /// and each unpacked weight `R` activation rows. Integer sums are exact, so every lane,
    /// and from there every float operation, is the AVX2 kernel's: the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub(in crate::kquant) unsafe fn dot_tile<const R: usize, const C: usize>(
        w: [&[Block]; C],
        a: [&[ActBlock]; R],
    ) -> [[f32; C]; R] {
        let n = w.iter().map(|w| w.len()).min().unwrap_or(0);
        assert!(a.iter().all(|a| a.len() >= n), "activation row too short");
        // i16 lanes 0-15 take sub-block 2c's scale, 16-31 sub-block 2c + 1's.
        let controls: [__m512i; 4] = std::array::from_fn(|c| {
            let idx: [i16; 32] = std::array::from_fn(|i| (2 * c + i / 16) as i16);
            _mm512_loadu_si512(idx.as_ptr() as *const _)
        });
        let nibble = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut min_acc = [[_mm_setzero_ps(); C]; R];
        for i in 0..n {
            // (Loops, not closures: a closure would not inherit the target features.)
            let mut scales = [_mm512_setzero_si512(); C];
            for (j, scales) in scales.iter_mut().enumerate() {
                *scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(
                    w[j][i].scales.as_ptr() as *const _,
                )));
            }
            let mut isum = [[_mm512_setzero_si512(); C]; R];
            for (c, control) in controls.iter().enumerate() {
                let mut w4 = [_mm512_setzero_si512(); C];
                let mut scale = [_mm512_setzero_si512(); C];
                for j in 0..C {
                    let q = _mm256_loadu_si256(w[j][i].qs.as_ptr().add(32 * c) as *const _);
                    let both =
                        _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
                    w4[j] = _mm512_and_si512(both, nibble);
                    scale[j] = _mm512_permutexvar_epi16(*control, scales[j]);
                }
                for r in 0..R {
                    let x = _mm512_loadu_si512(a[r][i].qs.as_ptr().add(64 * c) as *const _);
                    for j in 0..C {
                        isum[r][j] = _mm512_dpwssd_epi32(
                            isum[r][j],
                            _mm512_maddubs_epi16(w4[j], x),
                            scale[j],
                        );
                    }
                }
            }
            for j in 0..C {
                let wb = &w[j][i];
                let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(wb.mins.as_ptr() as *const _));
                for r in 0..R {
                    let ab = &a[r][i];
                    let folded = _mm256_add_epi32(
                        _mm512_castsi512_si256(isum[r][j]),
                        _mm512_extracti64x4_epi64(isum[r][j], 1),
                    );
                    acc[r][j] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(folded),
                        _mm256_set1_ps(wb.d * ab.d),
                        acc[r][j],
                    );
                    let bsums = _mm_loadu_si128(ab.bsums.as_ptr() as *const _);
                    min_acc[r][j] = _mm_fmadd_ps(
                        _mm_cvtepi32_ps(_mm_madd_epi16(mins, bsums)),
                        _mm_set1_ps(wb.dmin * ab.d),
                        min_acc[r][j],
                    );
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|j| sum_lanes(acc[r][j], min_acc[r][j])))
    }
}
