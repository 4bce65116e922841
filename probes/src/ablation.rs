//! Directional ablation of CPU f32 activations in one pass: each row of `x` loses its
//! component along a unit direction `u`, `x - (x . u) u`, where the position mask says so.
//!
//! An ablation at every layer (Arditi et al.) edits three hooks per block. Done with tensor
//! ops, each edit allocated and swept three full-size temporaries (the products, the
//! projection times the direction, the difference), which made an ablated pass cost about
//! 1.7x a plain one. Here each row is read once and written once.
//!
//! The arithmetic is the tensor ops' own, so every output keeps its bits: the products `x_i
//! u_i` are summed in four interleaved groups of eight lanes folded pairwise (candle 0.11's
//! AVX sum of a row), the sum is multiplied by the mask's 0 or 1, and each element is
//! `x_i - (p * u_i)`, rounded step by step.

use candle_core::{DType, Storage, Tensor};

/// `x` (`[.., d]`) with its component along the unit vector `unit` (`[d]`) removed from each
/// row whose `mask` value (`[..]` of 0/1, one per row) is 1. `None` where this kernel does not
/// apply (not an f32 CPU tensor), for the caller to use tensor ops.
pub(crate) fn ablate_rows(
    x: &Tensor,
    unit: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let u: Vec<f32> = unit.to_dtype(DType::F32)?.to_vec1()?;
    let keep: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if u.len() != d || keep.len() * d != x.elem_count() {
        candle_core::bail!(
            "ablation: direction of {} and mask of {} rows for activations {:?}",
            u.len(),
            keep.len(),
            x.dims()
        );
    }
    let x = x.contiguous()?;
    let out = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        let data = &cpu.as_slice::<f32>()?[start..start + x.elem_count()];
        let mut out = vec![0f32; data.len()];
        for ((row, y), m) in data.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(&keep) {
            let p = dot(row, &u) * m;
            for ((y, x), u) in y.iter_mut().zip(row).zip(&u) {
                *y = x - p * u;
            }
        }
        out
    };
    Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
}

/// `a . b`: products summed in four interleaved groups of eight lanes over each 32 values,
/// the groups folded pairwise (0+1, 2+3, then both), the eight lanes folded as the AVX
/// horizontal adds do, then any remainder added in order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0f32; 8]; 4];
    let whole = a.len() / 32 * 32;
    for (ca, cb) in a[..whole].chunks_exact(32).zip(b[..whole].chunks_exact(32)) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, s) in lanes.iter_mut().enumerate() {
                *s += ca[8 * j + l] * cb[8 * j + l];
            }
        }
    }
    let mut x = [0f32; 8];
    for (l, x) in x.iter_mut().enumerate() {
        *x = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    let t = [x[0] + x[4], x[1] + x[5], x[2] + x[6], x[3] + x[7]];
    let mut s = (t[0] + t[1]) + (t[2] + t[3]);
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, D};

    /// The ablation as tensor ops, as `transformer::apply_edit` computed it before.
    fn by_tensor_ops(x: &Tensor, u: &Tensor, mask: &Tensor) -> Tensor {
        let proj = x.broadcast_mul(u).unwrap().sum_keepdim(D::Minus1).unwrap();
        let proj = (proj * mask.to_dtype(x.dtype()).unwrap()).unwrap();
        (x - proj.broadcast_mul(u).unwrap()).unwrap()
    }

    #[test]
    fn the_fused_ablation_gives_the_tensor_ops_bits() {
        let dev = Device::Cpu;
        // Widths with and without a remainder past the 32-value groups.
        for d in [576usize, 896, 45, 7] {
            let x = Tensor::randn(0f32, 3.0, (3, 5, d), &dev).unwrap();
            let u = Tensor::randn(0f32, 1.0, d, &dev).unwrap();
            let norm = u.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
            let u = u.broadcast_div(&norm).unwrap();
            let m: Vec<u8> = (0..15).map(|i| u8::from(i % 4 != 1)).collect();
            let mask = Tensor::from_vec(m, (3, 5, 1), &dev).unwrap();
            let fused = super::ablate_rows(&x, &u, &mask).unwrap().unwrap();
            let want = by_tensor_ops(&x, &u, &mask);
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.into_iter().map(f32::to_bits).collect()
            };
            assert_eq!(bits(&fused), bits(&want), "width {d}");
            // Masked-out rows are left as they were; the others lose their component.
            let first: Vec<f32> = fused.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
            let orig: Vec<f32> = x.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
            assert_eq!(first, orig);
            let left = (fused.get(0).unwrap().get(0).unwrap() * &u)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(left.abs() < 1e-4, "width {d}: {left}");
        }
    }
}
