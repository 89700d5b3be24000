//! SAM's last line, fused (kernels/spatial_attention.cu): with `a` the attention logits
//! and `f` the features, both `[n, c, h, w]`, `y = f + k * softmax_hw(a) * f`. Equals
//! the composition `pipeline::attention::spatial_attention`, which stays the reference
//! (tests/attention_fused.rs).

mod cpu;
mod gpu;

use super::{operands, whole, FusedOp, Gpu, Input, Pass};
use crate::backend::CpuStorage;
use crate::ops::from_op;
use crate::{bail, Layout, Result, Tensor};

/// Forward: `(a, f)` -> `(y, stats)`, `y` in the inputs' dtype (f32 or bf16) and, per
/// plane, `(max, 1/sum)` of the softmax (f32 `[n * c * 2]`). Backward: `(a, f, dy,
/// stats)` -> `(da, df)`. Inputs contiguous.
#[derive(Clone, Copy, Debug)]
pub struct SpatialAttention {
    /// The scale of the attention term: `lambda`, times `h * w` when scaled.
    pub k: f32,
}

impl FusedOp for SpatialAttention {
    const NAME: &'static str = "spatial_attention";
    const BACKWARD_NAME: &'static str = "spatial_attention_backward";
    const VERSIONS: &'static [(&'static str, &'static [u32])] = &[("spatial_attention_fwd", &[1, 2, 3]), ("spatial_attention_bwd", &[1, 2])];

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        match pass {
            Pass::Forward => {
                let [(a, l), (f, f_l)] = operands(Self::NAME, x)?;
                let (y, stats) = cpu::forward_storage(a, l, f, f_l, self.k)?;
                Ok(vec![y, stats])
            }
            Pass::Backward => {
                let [(a, l), (f, f_l), (dy, dy_l), (stats, _)] = operands(Self::BACKWARD_NAME, x)?;
                let (da, df) = cpu::backward_storage(a, l, f, f_l, dy, dy_l, stats, self.k)?;
                Ok(vec![da, df])
            }
        }
    }

    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        match pass {
            Pass::Forward => {
                let [(a, l), (f, f_l)] = operands(Self::NAME, x)?;
                let (y, stats) = gpu::forward(g, a, l, f, f_l, self.k)?;
                Ok(vec![y, stats])
            }
            Pass::Backward => {
                let [(a, l), (f, f_l), (dy, dy_l), (stats, _)] = operands(Self::BACKWARD_NAME, x)?;
                let (da, df) = gpu::backward(g, a, l, f, f_l, dy, dy_l, stats, self.k)?;
                Ok(vec![da, df])
            }
        }
    }
}

/// Spatial attention works on `planes` planes of `hw` values: `[n, c, h, w]` (or any
/// `[n, c, ...]`) has n*c planes of h*w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planes {
    pub planes: usize,
    pub hw: usize,
}

impl Planes {
    /// Checks that every layout has the same `[n, c, ...]` shape and is contiguous.
    pub fn new(op: &str, ls: &[&Layout]) -> Result<Planes> {
        let shape = ls[0].shape();
        if shape.len() < 3 {
            bail!("{op}: expected [n, c, h, w], got shape {shape:?}");
        }
        for l in ls {
            if l.shape() != shape {
                bail!("{op}: shapes {:?} and {shape:?} differ", l.shape());
            }
            super::contiguous_start(l, op)?;
        }
        Ok(Planes { planes: shape[0] * shape[1], hw: shape[2..].iter().product() })
    }
    pub fn len(&self) -> usize {
        self.planes * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Tensor {
    /// SAM's last line, fused: with `self` the attention logits `a` and `f` the
    /// features (both `[n, c, h, w]`), `f + lambda * s * softmax_hw(a) * f` where
    /// `s = h * w` when `scaled`, else 1. Equals `pipeline::attention::spatial_attention`.
    pub fn spatial_attention_fused(&self, f: &Tensor, lambda: f32, scaled: bool) -> Result<Tensor> {
        let [_, _, h, w] = f.dims4("spatial_attention")?;
        if self.dims() != f.dims() {
            bail!("spatial_attention: attention {:?} and features {:?} differ", self.dims(), f.dims());
        }
        let op = SpatialAttention { k: lambda * if scaled { (h * w) as f32 } else { 1.0 } };
        let (a, f) = (self.contiguous()?, f.contiguous()?);
        let [y, stats] = op.forward(&[(&*a.storage(), a.layout()), (&*f.storage(), f.layout())])?;
        Ok(from_op(y, a.dims(), "spatial_attention", &[&a, &f], {
            let (a, f) = (a.clone(), f.clone());
            move |dy, _| {
                let dy = dy.contiguous()?;
                let [da, df] =
                    op.backward(&[(&*a.storage(), a.layout()), (&*f.storage(), f.layout()), (&*dy.storage(), dy.layout()), (&stats, &whole(&stats))])?;
                Ok(vec![Some(Tensor::from_storage(da, a.dims())), Some(Tensor::from_storage(df, a.dims()))])
            }
        }))
    }
}
