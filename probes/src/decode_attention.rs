//! Attention for a pass of one query per row (a decode step), on the CPU, in plain loops.
//!
//! Each row attends over its own real keys only, in a fixed order of arithmetic that does not
//! depend on the batch, so a generation is the same bits alone as in any batch (as the general
//! path in `transformer.rs` guarantees with per-row matmuls). The general path issues about
//! fifteen small tensor operations per row and layer, each with its allocation and thread
//! hand-off; a batched decode step spent most of its time there. Here a whole layer is one
//! loop over rows, run in parallel.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// The shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Multiplies the scores before the soft-cap.
    pub scale: f32,
    /// Gemma 2's attention-logit soft-cap.
    pub softcap: Option<f32>,
}

/// One row's real keys: positions `start..start + len` of the key axis, and whether the row has
/// a real query at all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowKeys {
    pub start: usize,
    pub len: usize,
    pub query: bool,
}

/// Whether [`attend`] can run on these tensors: f32 on the CPU.
pub(crate) fn applies(q: &Tensor) -> bool {
    matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32
}

/// Attention output `[batch, 1, n_heads * head_dim]` for queries `q` `[batch, n_heads, 1,
/// head_dim]` over keys and values `[batch, n_kv_heads, keys, head_dim]` (any strides, last
/// dimension contiguous). `mask` holds each row's additive mask over the key axis `[batch,
/// keys]` (0 or -inf). Rows without a real query get zeros.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &[RowKeys],
    mask: &[f32],
    h: Heads,
) -> candle_core::Result<Tensor> {
    let (b, _, _, hd) = q.dims4()?;
    let keys = k.dim(2)?;
    let width = h.n_heads * hd;
    let groups = h.n_heads / h.n_kv_heads;
    let mut out = vec![0f32; b * width];
    with_strided(q, |qd, qs| {
        with_strided(k, |kd, ks| {
            with_strided(v, |vd, vs| {
                out.par_chunks_mut(width)
                    .zip(rows.par_iter())
                    .enumerate()
                    .for_each(|(r, (out, row))| {
                        if !row.query {
                            return;
                        }
                        let mut scores = vec![0f32; row.len];
                        for head in 0..h.n_heads {
                            let g = head / groups;
                            let qrow = &qd[qs.at(r, head, 0)..][..hd];
                            for (j, s) in scores.iter_mut().enumerate() {
                                let key = row.start + j;
                                let x = dot(qrow, &kd[ks.at(r, g, key)..][..hd]) * h.scale;
                                let x = match h.softcap {
                                    Some(cap) => (x / cap).tanh() * cap,
                                    None => x,
                                };
                                *s = x + mask[r * keys + key];
                            }
                            softmax(&mut scores);
                            let o = &mut out[head * hd..(head + 1) * hd];
                            for (j, p) in scores.iter().enumerate() {
                                let vrow = &vd[vs.at(r, g, row.start + j)..][..hd];
                                for (o, x) in o.iter_mut().zip(vrow) {
                                    *o += p * x;
                                }
                            }
                        }
                    });
            })
        })
    })???;
    Tensor::from_vec(out, (b, 1, width), q.device())
}

/// Strides of a rank-4 tensor and its offset into its storage.
#[derive(Debug, Clone, Copy)]
struct Strides {
    offset: usize,
    s: [usize; 3],
}

impl Strides {
    /// Where row `r`, head `h`, position `p` starts.
    fn at(&self, r: usize, h: usize, p: usize) -> usize {
        self.offset + r * self.s[0] + h * self.s[1] + p * self.s[2]
    }
}

/// Run `f` on the storage of a CPU f32 tensor of rank 4 whose last dimension is contiguous,
/// with its strides; other tensors are made contiguous first.
fn with_strided<R>(t: &Tensor, f: impl FnOnce(&[f32], Strides) -> R) -> candle_core::Result<R> {
    let t = match t.stride().last() {
        Some(1) => t.clone(),
        _ => t.contiguous()?,
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("decode attention runs on the CPU only");
    };
    let data = cpu.as_slice::<f32>()?;
    let st = layout.stride();
    let [s0, s1, s2, _] = st[..] else {
        candle_core::bail!("decode attention takes rank-4 tensors, got strides {st:?}");
    };
    Ok(f(
        data,
        Strides {
            offset: layout.start_offset(),
            s: [s0, s1, s2],
        },
    ))
}

/// `a . b` in eight interleaved partial sums, combined in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let whole = a.len() / 8 * 8;
    for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        s += x * y;
    }
    s
}

/// Softmax in place, shifted by the maximum.
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_equals_the_plain_sum_to_rounding() {
        let a: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32 * 0.11).cos()).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
        assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-5);
    }

    #[test]
    fn softmax_ignores_masked_keys() {
        let mut x = [1.0, f32::NEG_INFINITY, 1.0];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.0, 0.5]);
    }
}
