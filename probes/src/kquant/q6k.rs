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

// One of the three places in the workspace that opt out of `unsafe_code = "deny"` (with
// `q4k` and the call in `Blocks::dot`): the intrinsics below are unsafe to call (target
// features, unaligned loads).
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

    /// One weight row dotted with one activation row, as ggml's AVX2 kernel sums it.
    ///
    /// Per block, per 32-value group: the u6 x i8 products summed in pairs to i16
    /// (`vpmaddubsw`), less 32 x the activations' pair sums (the quants' offset), times the
    /// group's two scales and summed in pairs to i32 (`vpmaddwd`); then `d * dx` times the
    /// block's i32 sums in f32.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::kquant) unsafe fn dot(w: &[Block], a: &[ActBlock]) -> f32 {
        let controls: [__m128i; 8] =
            std::array::from_fn(|k| _mm_loadu_si128(scale_pair(k).as_ptr() as *const _));
        let low4 = _mm256_set1_epi8(0x0F);
        let low2 = _mm256_set1_epi8(3);
        let offset = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_ps();
        for (wb, ab) in w.iter().zip(a) {
            let scales = _mm_loadu_si128(wb.scales.as_ptr() as *const _);
            let mut isum = _mm256_setzero_si256();
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(wb.ql.as_ptr().add(64 * h) as *const _);
                let ql1 = _mm256_loadu_si256(wb.ql.as_ptr().add(64 * h + 32) as *const _);
                let qh = _mm256_loadu_si256(wb.qh.as_ptr().add(32 * h) as *const _);
                // Each value's two high bits, moved to bits 4-5.
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4);
                let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
                let h3 = _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30));
                let quants = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low4), h0),
                    _mm256_or_si256(_mm256_and_si256(ql1, low4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4), h3),
                ];
                for (g, q) in quants.into_iter().enumerate() {
                    let x = _mm256_loadu_si256(ab.qs.as_ptr().add(128 * h + 32 * g) as *const _);
                    let pairs = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(q, x),
                        _mm256_maddubs_epi16(offset, x),
                    );
                    let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, controls[4 * h + g]));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, scale));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(wb.d * ab.d), acc);
        }
        let sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let sum = _mm_hadd_ps(sum, sum);
        _mm_cvtss_f32(_mm_hadd_ps(sum, sum))
    }
}
