//! MHAD's distance, fused (kernels/normalized_distance.cu): per sample (row),
//! `|| a / max(|a|, eps) - b / max(|b|, eps) ||^2`. Equals the composition
//! `pipeline::losses::normalized_distance` (tests/attention_fused.rs).

mod cpu;
mod gpu;

use super::{operands, whole, FusedOp, Gpu, Input, Pass};
use crate::backend::CpuStorage;
use crate::ops::from_op;
use crate::{bail, Layout, Result, Tensor};

/// Forward: `(a, b)`, `[n, ...]` each -> the distance per row, `[n]` in the inputs'
/// dtype, and `[|a|, |b|, a.b]` per row (f32 `[n, 3]`). Backward: `(a, b, stats, g)`
/// with `g` the rows' gradient `[n]` -> `(da, db)`. Inputs contiguous.
#[derive(Clone, Copy, Debug)]
pub struct NormalizedDistance {
    /// The norms' floor.
    pub eps: f32,
}

impl FusedOp for NormalizedDistance {
    const NAME: &'static str = "normalized_distance";
    const BACKWARD_NAME: &'static str = "normalized_distance_backward";

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        let (p, q) = match pass {
            Pass::Forward => {
                let [(a, l), (b, b_l)] = operands(Self::NAME, x)?;
                cpu::forward_storage(a, l, b, b_l, self.eps)?
            }
            Pass::Backward => {
                let [(a, l), (b, b_l), (stats, _), (g, g_l)] = operands(Self::BACKWARD_NAME, x)?;
                cpu::backward_storage(a, l, b, b_l, stats, g, g_l, self.eps)?
            }
        };
        Ok(vec![p, q])
    }

    fn gpu<G: Gpu>(&self, gpu: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        let (p, q) = match pass {
            Pass::Forward => {
                let [(a, l), (b, b_l)] = operands(Self::NAME, x)?;
                gpu::forward(gpu, a, l, b, b_l, self.eps)?
            }
            Pass::Backward => {
                let [(a, l), (b, b_l), (stats, _), (g, g_l)] = operands(Self::BACKWARD_NAME, x)?;
                gpu::backward(gpu, a, l, b, b_l, stats, g, g_l, self.eps)?
            }
        };
        Ok(vec![p, q])
    }
}

/// `a` and `b` are `[n, ...]` of one shape, contiguous: `n` rows of `d` values.
pub fn distance_rows(op: &str, a: &Layout, b: &Layout) -> Result<(usize, usize)> {
    if a.shape() != b.shape() || a.rank() < 1 {
        bail!("{op}: expected two [n, ...] tensors of one shape, got {:?} and {:?}", a.shape(), b.shape());
    }
    super::contiguous_start(a, op)?;
    super::contiguous_start(b, op)?;
    let n = a.shape()[0];
    Ok((n, a.elem_count().checked_div(n).unwrap_or(0)))
}

impl Tensor {
    /// MHAD's distance, fused: `self` = a and `b`, `[n, ...]` each: per sample (row),
    /// `|| a / max(|a|, eps) - b / max(|b|, eps) ||^2`, `[n]`. Equals
    /// `pipeline::losses::normalized_distance` (two `l2_normalize`, a difference, its
    /// square and a sum) in one pass each way (kernels/normalized_distance.cu).
    pub fn normalized_distance(&self, b: &Tensor, eps: f32) -> Result<Tensor> {
        let op = NormalizedDistance { eps };
        let (a, b) = (self.contiguous()?, b.contiguous()?);
        let (n, _) = distance_rows("normalized_distance", a.layout(), b.layout())?;
        let [dist, stats] = op.forward(&[(&*a.storage(), a.layout()), (&*b.storage(), b.layout())])?;
        Ok(from_op(dist, &[n], "normalized_distance", &[&a, &b], {
            let (a, b) = (a.clone(), b.clone());
            move |g, _| {
                let g = g.contiguous()?;
                let [da, db] =
                    op.backward(&[(&*a.storage(), a.layout()), (&*b.storage(), b.layout()), (&stats, &whole(&stats)), (&*g.storage(), g.layout())])?;
                Ok(vec![Some(Tensor::from_storage(da, a.dims())), Some(Tensor::from_storage(db, b.dims()))])
            }
        }))
    }
}
