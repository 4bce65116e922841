//! Q6_K blocks: 6-bit quants with an 8-bit scale per 16 values.

use super::activations::ActBlock;
use super::QK_K;

/// Bytes of one Q6_K block in a GGUF file: 128 bytes of the quants' low 4 bits, 64 of their
/// high 2 bits, 16 signed scales, `d` (f16).
pub(super) const GGML_BYTES: usize = 210;

/// One super-block of one weight row, as in the file but for `d`, widened to f32.
///
/// For half `h` of the block and `l < 32`, value `128h + 32g + l` has its low nibble in
/// `ql[64h + l]` (groups 0, 2: low, high nibble) or `ql[64h + 32 + l]` (groups 1, 3), its high
/// bits in bits `2g..2g + 2` of `qh[32h + l]`, and its scale in `scales[8h + 2g + l / 16]`;
/// the value is `d * scale * (q - 32)`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Block {
    pub(super) ql: [u8; 128],
    qh: [u8; 64],
    scales: [i8; 16],
    d: f32,
}

impl Block {
    /// One block as a GGUF file stores it. `None` if its scale is not finite.
    pub(super) fn from_ggml(b: &[u8]) -> Option<Self> {
        let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
        if !d.is_finite() {
            return None;
        }
        Some(Self {
            ql: b[..128].try_into().ok()?,
            qh: b[128..192].try_into().ok()?,
            scales: std::array::from_fn(|i| b[192 + i] as i8),
            d,
        })
    }

    /// Value `i` of the block as its 6-bit quant, 0..64.
    fn quant(&self, i: usize) -> u8 {
        let (h, g, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = self.ql[64 * h + 32 * (g % 2) + l];
        let low = if g < 2 { low & 0xF } else { low >> 4 };
        low | (((self.qh[32 * h + l] >> (2 * g)) & 3) << 4)
    }

    fn scale(&self, i: usize) -> i8 {
        self.scales[i / 16]
    }

    /// The block's 256 values, computed as ggml (and candle) dequantize them.
    pub(super) fn dequantize_into(&self, out: &mut Vec<f32>) {
        out.extend(
            (0..QK_K).map(|i| self.d * self.scale(i) as f32 * (self.quant(i) as i8 - 32) as f32),
        );
    }
}

/// The same sum in scalar code: the integer parts exactly, the scaling in another order.
pub(super) fn dot_reference(w: &[Block], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let isum: i32 = (0..QK_K)
            .map(|i| wb.scale(i) as i32 * (wb.quant(i) as i32 - 32) * ab.qs[i] as i32)
            .sum();
        sum += wb.d * ab.d * isum as f32;
    }
    sum
}

// The kernels of this module and `q4k` (AVX2 and AVX-512), and the calls into them in
// `Blocks::dot_rows_by` and `Blocks::dot_tile`, are the only code in the workspace that opts
// out of `unsafe_code = "deny"`: the intrinsics are unsafe to call (target features,
// unaligned loads).
// Every load reads inside a block's own arrays: 32 bytes at offsets 0, 32, 64 and 96 of 128
// low quants, at 0 and 32 of 64 high bits, 16 bytes of 16 scales, 32 bytes at multiples of
// 32 below 256 of 256 activation quants.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{ActBlock, Block};
    use core::arch::x86_64::*;

    /// Byte-shuffle control that puts scale `2k` in bytes 0-7 and `2k + 1` in bytes 8-15:
    /// widened to i16, the scales of a 32-value group's two halves.
    fn scale_pair(k: usize) -> [i8; 16] {
        std::array::from_fn(|i| (2 * k + i / 8) as i8)
    }

    /// One weight row dotted with `R` activation rows, each as ggml's AVX2 kernel sums it.
    ///
    /// Per block, per 32-value group: the u6 x i8 products summed in pairs to i16
    /// (`vpmaddubsw`), less 32 x the activations' pair sums (the quants' offset), times the
    /// group's two scales and summed in pairs to i32 (`vpmaddwd`); then `d * dx` times the
    /// block's i32 sums in f32. The weights' quants and scales are unpacked once for all `R`
    /// rows; each row's sums are the same instructions in the same order whatever `R`, so its
    /// result is the same bits.
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
        let controls: [__m128i; 8] =
            std::array::from_fn(|k| _mm_loadu_si128(scale_pair(k).as_ptr() as *const _));
        let offset = _mm256_set1_epi8(32);
        let mut acc = [_mm256_setzero_ps(); R];
        for (i, wb) in w.iter().enumerate() {
            let scales = _mm_loadu_si128(wb.scales.as_ptr() as *const _);
            let mut isum = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                let quants = unpack_half(wb, h);
                for (g, q) in quants.into_iter().enumerate() {
                    let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, controls[4 * h + g]));
                    for r in 0..R {
                        let x = _mm256_loadu_si256(
                            a[r][i].qs.as_ptr().add(128 * h + 32 * g) as *const _
                        );
                        let pairs = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(q, x),
                            _mm256_maddubs_epi16(offset, x),
                        );
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, scale));
                    }
                }
            }
            for r in 0..R {
                let d = _mm256_set1_ps(wb.d * a[r][i].d);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), d, acc[r]);
            }
        }
        std::array::from_fn(|r| sum_lanes(acc[r]))
    }

    /// Half `h` of a block's 6-bit quants as four 32-value groups (group `g` is values
    /// `128h + 32g ..`), each value's two high bits moved to bits 4-5.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn unpack_half(wb: &Block, h: usize) -> [__m256i; 4] {
        let low4 = _mm256_set1_epi8(0x0F);
        let low2 = _mm256_set1_epi8(3);
        let ql0 = _mm256_loadu_si256(wb.ql.as_ptr().add(64 * h) as *const _);
        let ql1 = _mm256_loadu_si256(wb.ql.as_ptr().add(64 * h + 32) as *const _);
        let qh = _mm256_loadu_si256(wb.qh.as_ptr().add(32 * h) as *const _);
        let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4);
        let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4);
        let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
        let h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30));
        [
            _mm256_or_si256(_mm256_and_si256(ql0, low4), h0),
            _mm256_or_si256(_mm256_and_si256(ql1, low4), h1),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), h2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4), h3),
        ]
    }

    /// The sum of `acc`'s eight lanes, in the order every kernel of this file sums them.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_lanes(acc: __m256) -> f32 {
        let sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
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
    use super::avx2::{sum_lanes, unpack_half};
    use super::{ActBlock, Block};
    use core::arch::x86_64::*;

    /// [`super::avx2::dot_rows`] for `C` weight rows at once, with two 32-value groups per
    /// 512-bit product, whose scaled sums (`vpdpwssd`) fold to the AVX2 kernel's eight i32
    /// lanes at the end of each block. Each activation load serves `C` weight rows and each
    /// unpacked weight `R` activation rows. Integer sums are exact, so every lane, and from
    /// there every float operation, is the AVX2 kernel's: the same bits.
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
        // For groups 2p and 2p + 1 of half h: scales 8h + 4p .. 8h + 4p + 4, each 8 times.
        let controls: [__m256i; 4] = std::array::from_fn(|k| {
            let idx: [i8; 32] = std::array::from_fn(|i| (4 * k + i / 8) as i8);
            _mm256_loadu_si256(idx.as_ptr() as *const _)
        });
        let offset = _mm512_set1_epi8(32);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for i in 0..n {
            let mut isum = [[_mm512_setzero_si512(); C]; R];
            for h in 0..2 {
                // Per weight row, groups (0, 1) and (2, 3) of this half as 64 bytes each.
                // (Loops, not closures: a closure would not inherit the target features.)
                let mut quants = [[_mm512_setzero_si512(); 2]; C];
                for (j, quants) in quants.iter_mut().enumerate() {
                    let [g0, g1, g2, g3] = unpack_half(&w[j][i], h);
                    quants[0] = _mm512_inserti64x4(_mm512_castsi256_si512(g0), g1, 1);
                    quants[1] = _mm512_inserti64x4(_mm512_castsi256_si512(g2), g3, 1);
                }
                for p in 0..2 {
                    let mut scale = [_mm512_setzero_si512(); C];
                    for (j, scale) in scale.iter_mut().enumerate() {
                        let scales = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            w[j][i].scales.as_ptr() as *const _,
                        ));
                        *scale =
                            _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(scales, controls[2 * h + p]));
                    }
                    for r in 0..R {
                        let x = _mm512_loadu_si512(
                            a[r][i].qs.as_ptr().add(128 * h + 64 * p) as *const _
                        );
                        let offset_sums = _mm512_maddubs_epi16(offset, x);
                        for j in 0..C {
                            let pairs = _mm512_sub_epi16(
                                _mm512_maddubs_epi16(quants[j][p], x),
                                offset_sums,
                            );
                            isum[r][j] = _mm512_dpwssd_epi32(isum[r][j], pairs, scale[j]);
                        }
                    }
                }
            }
            for j in 0..C {
                for r in 0..R {
                    let folded = _mm256_add_epi32(
                        _mm512_castsi512_si256(isum[r][j]),
                        _mm512_extracti64x4_epi64(isum[r][j], 1),
                    );
                    let d = _mm256_set1_ps(w[j][i].d * a[r][i].d);
                    acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(folded), d, acc[r][j]);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|j| sum_lanes(acc[r][j])))
    }
}
