//! Activations quantised for the K-quant kernels: ggml's `Q8_K`.

use super::QK_K;

/// 256 activations quantised to 8 bits, in their natural order.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct ActBlock {
    pub(super) qs: [i8; QK_K],
    /// The sum of each 32 values' quants.
    pub(super) bsums: [i16; 8],
    pub(super) d: f32,
}

/// ggml's `quantize_row_q8_K`: per 256 values, the scale that maps the value largest in
/// magnitude to -127, rounded to nearest. `x.len()` is a multiple of 256.
pub(super) fn quantize_row(x: &[f32]) -> Vec<ActBlock> {
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
            for (sub, sum) in block.bsums.iter_mut().enumerate() {
                let mut s = 0i32;
                let range = 32 * sub..32 * sub + 32;
                for (q, &v) in block.qs[range.clone()].iter_mut().zip(&xs[range]) {
                    *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
                    s += *q as i32;
                }
                *sum = s as i16;
            }
            block.d = 1.0 / iscale;
            block
        })
        .collect()
}
