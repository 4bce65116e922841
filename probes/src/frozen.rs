//! A product with frozen weights, `x Wᵀ`, for the differentiable pass: its backward gives the
//! gradient with respect to `x` only.
//!
//! candle's matmul backward computes both operands' gradients, whether or not an operand
//! tracks one: every linear layer of a gradient pass would also compute the gradient of its
//! weight matrix (as many multiply-adds again as the layer's forward) and allocate a zeroed
//! weight-sized buffer to add it into, the unembedding's 49,152 x 576 included. Attribution
//! never reads weight gradients. Wrapped in this op, the forward is the same arithmetic as
//! the plain product ([`crate::transformer`]'s blocked-kernel route, bit for bit), and the
//! backward is one product of the output gradient with `W`.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

/// `x Wᵀ` for `x` `[batch, pos, in]`, with `W` `[out, in]` held constant.
pub(crate) struct FrozenProduct {
    pub w: Tensor,
    /// The plain product, `(w, x) -> x Wᵀ`.
    pub product: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-weight-product"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("frozen-weight-product: the input is not contiguous");
        };
        let x = match s {
            CpuStorage::F32(v) => {
                Tensor::from_slice(&v[start..end], l.shape().clone(), &Device::Cpu)?
            }
            CpuStorage::F64(v) => {
                Tensor::from_slice(&v[start..end], l.shape().clone(), &Device::Cpu)?
            }
            _ => bail!("frozen-weight-product: only f32 and f64 inputs"),
        };
        let y = (self.product)(&self.w, &x)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let storage = match y.dtype() {
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            _ => CpuStorage::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        };
        Ok((storage, shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, out) = grad.dims3()?;
        let w = self.w.to_dtype(grad.dtype())?;
        let d_in = w.dim(1)?;
        let g = grad.reshape((b * t, out))?;
        // `g W`; a weight stored `[in, out]` is read row-major as the left operand of
        // `(W_stored gᵀ)ᵀ` instead of being repacked as a right one.
        let wt = w.t()?;
        let x_grad = if wt.is_contiguous() {
            wt.matmul(&g.t()?)?.t()?
        } else {
            g.matmul(&w)?
        };
        Ok(Some(x_grad.reshape((b, t, d_in))?))
    }
}
