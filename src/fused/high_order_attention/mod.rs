//! MHA's element-wise parts, fused (kernels/high_order_attention.cu), either side of the
//! grouped 1x1 convolution of the `V_r` projections: the per-order products and the
//! combine. Their composition with the convolution equals
//! `pipeline::attention::high_order_attention` (tests/attention_fused.rs).

mod cpu;
mod gpu;

use super::{operands, FusedOp, Gpu, Input, Pass};
use crate::backend::CpuStorage;
use crate::ops::from_op;
use crate::{bail, Layout, Result, Tensor};

/// Forward: `z` `[n, R(R+1)/2 * c, ...]` (the stacked `W_{r,k}` outputs) -> `h`
/// `[n, R * c, ...]`, `h[r] = relu(prod_k z[r][k])`. Backward: `(z, dh)` -> `dz`.
/// Inputs contiguous, f32 or bf16; outputs in their dtype.
#[derive(Clone, Copy, Debug)]
pub struct HoaProducts {
    /// R, the highest order.
    pub order: usize,
}

/// Forward: `(u, f)`, `u` `[n, R * c, ...]` (the `V_r` outputs) and `f` `[n, c, ...]`
/// -> `f * (1/R) sum_r sigmoid(u[r])`. Backward: `(u, f, dy)` -> `(du, df)`.
#[derive(Clone, Copy, Debug)]
pub struct HoaCombine {
    pub order: usize,
}

impl FusedOp for HoaProducts {
    const NAME: &'static str = "hoa_products";
    const BACKWARD_NAME: &'static str = "hoa_products_backward";
    const VERSIONS: &'static [(&'static str, &'static [u32])] = &[("hoa_products_fwd", &[1, 2]), ("hoa_products_bwd", &[1])];

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        Ok(vec![match pass {
            Pass::Forward => {
                let [(z, l)] = operands(Self::NAME, x)?;
                cpu::products_storage(z, l, self.order)?
            }
            Pass::Backward => {
                let [(z, l), (dh, dh_l)] = operands(Self::BACKWARD_NAME, x)?;
                cpu::products_backward_storage(z, l, dh, dh_l, self.order)?
            }
        }])
    }

    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        Ok(vec![match pass {
            Pass::Forward => {
                let [(z, l)] = operands(Self::NAME, x)?;
                gpu::products(g, z, l, self.order)?
            }
            Pass::Backward => {
                let [(z, l), (dh, dh_l)] = operands(Self::BACKWARD_NAME, x)?;
                gpu::products_backward(g, z, l, dh, dh_l, self.order)?
            }
        }])
    }
}

impl FusedOp for HoaCombine {
    const NAME: &'static str = "hoa_combine";
    const BACKWARD_NAME: &'static str = "hoa_combine_backward";
    const VERSIONS: &'static [(&'static str, &'static [u32])] = &[("hoa_combine_fwd", &[1, 2]), ("hoa_combine_bwd", &[1])];

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        match pass {
            Pass::Forward => {
                let [(u, l), (f, f_l)] = operands(Self::NAME, x)?;
                Ok(vec![cpu::combine_storage(u, l, f, f_l, self.order)?])
            }
            Pass::Backward => {
                let [(u, l), (f, f_l), (dy, dy_l)] = operands(Self::BACKWARD_NAME, x)?;
                let (du, df) = cpu::combine_backward_storage(u, l, f, f_l, dy, dy_l, self.order)?;
                Ok(vec![du, df])
            }
        }
    }

    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        match pass {
            Pass::Forward => {
                let [(u, l), (f, f_l)] = operands(Self::NAME, x)?;
                Ok(vec![gpu::combine(g, u, l, f, f_l, self.order)?])
            }
            Pass::Backward => {
                let [(u, l), (f, f_l), (dy, dy_l)] = operands(Self::BACKWARD_NAME, x)?;
                let (du, df) = gpu::combine_backward(g, u, l, f, f_l, dy, dy_l, self.order)?;
                Ok(vec![du, df])
            }
        }
    }
}

/// High-order attention of order R over `n` samples; `chw` is the size of one slice of
/// one sample: `C/4 * h * w` for the products, `C * h * w` for the combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HighOrder {
    pub order: usize,
    pub n: usize,
    pub chw: usize,
}

impl HighOrder {
    /// Slices of the products' input: one per `W_{r,k}`, R(R+1)/2.
    pub fn slices(order: usize) -> usize {
        order * (order + 1) / 2
    }

    /// `z` is `[n, R(R+1)/2 * cq, ...]` (the stacked 1x1-conv output).
    pub fn products(op: &str, z: &Layout, order: usize) -> Result<HighOrder> {
        let s = z.shape();
        if order == 0 || s.len() < 2 || !s[1].is_multiple_of(HighOrder::slices(order)) {
            bail!("{op}: order {order} needs [n, R(R+1)/2 * c, ...] with R >= 1, got {s:?}");
        }
        super::contiguous_start(z, op)?;
        Ok(HighOrder { order, n: s[0], chw: z.elem_count() / s[0].max(1) / HighOrder::slices(order) })
    }
    /// The products' output (and gradient) shape.
    pub fn products_out_shape(&self, z_shape: &[usize]) -> Vec<usize> {
        let mut s = z_shape.to_vec();
        s[1] = s[1] / HighOrder::slices(self.order) * self.order;
        s
    }

    /// `u` is `[n, R * c, ...]` (the V projections' outputs), `f` is `[n, c, ...]`.
    pub fn combine(op: &str, u: &Layout, f: &Layout, order: usize) -> Result<HighOrder> {
        let (su, sf) = (u.shape(), f.shape());
        let ok = order > 0 && su.len() >= 2 && su.len() == sf.len() && su[0] == sf[0] && su[1] == order * sf[1] && su[2..] == sf[2..];
        if !ok {
            bail!("{op}: order {order} needs u [n, R * c, ...] and f [n, c, ...], got {su:?} and {sf:?}");
        }
        super::contiguous_start(u, op)?;
        super::contiguous_start(f, op)?;
        Ok(HighOrder { order, n: sf[0], chw: f.elem_count() / sf[0].max(1) })
    }
    /// Elements of the output: one slice per sample.
    pub fn out_len(&self) -> usize {
        self.n * self.chw
    }
}

impl Tensor {
    /// MHA's per-order products: `self` = z `[n, R(R+1)/2 * c, h, w]`, the stacked
    /// `W_{r,k}` outputs in order-major order (order r owns slices r(r-1)/2 ..
    /// r(r-1)/2 + r - 1); returns `relu(prod_k z[r][k])` for r = 1..R, `[n, R * c, h, w]`.
    pub fn hoa_products(&self, order: usize) -> Result<Tensor> {
        let op = HoaProducts { order };
        let z = self.contiguous()?;
        let [h] = op.forward(&[(&*z.storage(), z.layout())])?;
        let g = HighOrder::products("hoa_products", z.layout(), order)?;
        let shape = g.products_out_shape(z.dims());
        Ok(from_op(h, &shape, "hoa_products", &[&z], {
            let z = z.clone();
            move |dh, _| {
                let dh = dh.contiguous()?;
                let [dz] = op.backward(&[(&*z.storage(), z.layout()), (&*dh.storage(), dh.layout())])?;
                Ok(vec![Some(Tensor::from_storage(dz, z.dims()))])
            }
        }))
    }

    /// MHA's output: `self` = u `[n, R * c, h, w]` (the `V_r` projections stacked by
    /// order), `f` `[n, c, h, w]`: `f * (1/R) sum_r sigmoid(u[r])`.
    pub fn hoa_combine(&self, f: &Tensor, order: usize) -> Result<Tensor> {
        let op = HoaCombine { order };
        let (u, f) = (self.contiguous()?, f.contiguous()?);
        let [y] = op.forward(&[(&*u.storage(), u.layout()), (&*f.storage(), f.layout())])?;
        Ok(from_op(y, f.dims(), "hoa_combine", &[&u, &f], {
            let (u, f) = (u.clone(), f.clone());
            move |dy, _| {
                let dy = dy.contiguous()?;
                let [du, df] = op.backward(&[(&*u.storage(), u.layout()), (&*f.storage(), f.layout()), (&*dy.storage(), dy.layout())])?;
                Ok(vec![Some(Tensor::from_storage(du, u.dims())), Some(Tensor::from_storage(df, f.dims()))])
            }
        }))
    }
}
