//! SFCL's NT-Xent, fused (kernels/contrastive.cu): two ops either side of the similarity
//! GEMM, which runs through the backend's matmul (cuBLAS on a GPU). Equals the
//! composition `pipeline::attention::contrastive_loss` (tests/attention_fused.rs,
//! tests/sfcl.rs).

mod cpu;
mod gpu;

use super::{operands, whole, FusedOp, Gpu, Input, Pass};
use crate::backend::CpuStorage;
use crate::ops::from_op;
use crate::{bail, DType, Layout, Result, Tensor};

/// The normalisation floor of the contrastive loss (PyTorch's `F.normalize` default).
const NORM_EPS: f32 = 1e-12;

/// Forward: `(t, s)`, `[n, d]` each, f32 or bf16 -> `zhat = [t; s]` with rows divided
/// by `max(norm, eps)` (f32 `[2n, d]`) and the norms (f32 `[2n]`). Backward: `(zhat,
/// norms, dzhat)`, `dzhat` laid out as `zhat` -> `(dt, ds)` in `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct ContrastiveNormalize {
    pub eps: f32,
    /// The dtype of `t` and `s`, which their gradients take.
    pub dtype: DType,
}

/// Forward: `sim` `[n, 2n]` (f32 dot products of zhat's first n rows with all 2n) ->
/// the NT-Xent loss of each anchor row and its log-sum-exp (f32 `[n]` each). Backward:
/// `(sim, lse, dloss)` -> `S` (f32 `[2n, 2n]`) with `dzhat = S zhat`.
#[derive(Clone, Copy, Debug)]
pub struct ContrastiveRows {
    pub tau: f32,
}

impl FusedOp for ContrastiveNormalize {
    const NAME: &'static str = "contrastive_normalize";
    const BACKWARD_NAME: &'static str = "contrastive_normalize_backward";

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        let (p, q) = match pass {
            Pass::Forward => {
                let [(t, l), (s, s_l)] = operands(Self::NAME, x)?;
                cpu::normalize_storage(t, l, s, s_l, self.eps)?
            }
            Pass::Backward => {
                let [(z, l), (norms, _), (dz, dz_l)] = operands(Self::BACKWARD_NAME, x)?;
                cpu::normalize_backward_storage(z, l, norms, dz, dz_l, self.eps, self.dtype)?
            }
        };
        Ok(vec![p, q])
    }

    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        let (p, q) = match pass {
            Pass::Forward => {
                let [(t, l), (s, s_l)] = operands(Self::NAME, x)?;
                gpu::normalize(g, t, l, s, s_l, self.eps)?
            }
            Pass::Backward => {
                let [(z, l), (norms, _), (dz, dz_l)] = operands(Self::BACKWARD_NAME, x)?;
                gpu::normalize_backward(g, z, l, norms, dz, dz_l, self.eps, self.dtype)?
            }
        };
        Ok(vec![p, q])
    }
}

impl FusedOp for ContrastiveRows {
    const NAME: &'static str = "contrastive_rows";
    const BACKWARD_NAME: &'static str = "contrastive_sym";
    const VERSIONS: &'static [(&'static str, &'static [u32])] = &[("contrastive_rows", &[1, 2]), ("contrastive_sym", &[1])];

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        match pass {
            Pass::Forward => {
                let [(sim, l)] = operands(Self::NAME, x)?;
                let (loss, lse) = cpu::rows_storage(sim, l, self.tau)?;
                Ok(vec![loss, lse])
            }
            Pass::Backward => {
                let [(sim, l), (lse, _), (dloss, dloss_l)] = operands(Self::BACKWARD_NAME, x)?;
                Ok(vec![cpu::sym_storage(sim, l, lse, dloss, dloss_l, self.tau)?])
            }
        }
    }

    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        match pass {
            Pass::Forward => {
                let [(sim, l)] = operands(Self::NAME, x)?;
                let (loss, lse) = gpu::rows(g, sim, l, self.tau)?;
                Ok(vec![loss, lse])
            }
            Pass::Backward => {
                let [(sim, l), (lse, _), (dloss, dloss_l)] = operands(Self::BACKWARD_NAME, x)?;
                Ok(vec![gpu::sym(g, sim, l, lse, dloss, dloss_l, self.tau)?])
            }
        }
    }
}

/// `t` and `s` are `[n, d]` feature rows, contiguous.
pub fn contrastive_rows(op: &str, t: &Layout, s: &Layout) -> Result<(usize, usize)> {
    match (t.shape(), s.shape()) {
        (&[n, d], &[n2, d2]) if n == n2 && d == d2 && n > 0 && d > 0 => {
            super::contiguous_start(t, op)?;
            super::contiguous_start(s, op)?;
            Ok((n, d))
        }
        (a, b) => bail!("{op}: expected two [n, d] feature batches of one shape (n, d > 0), got {a:?} and {b:?}"),
    }
}

impl Tensor {
    /// SFCL's NT-Xent, fused: `self` = teacher features t and `s` the student's, `[n, d]`
    /// each, unnormalised. Equals `pipeline::attention::contrastive_loss`. The
    /// similarity GEMM (and the one of the backward pass) runs through the backend's
    /// matmul (cuBLAS on a GPU); the rest is one kernel per step.
    pub fn nt_xent_fused(&self, s: &Tensor, tau: f32) -> Result<Tensor> {
        let (t, s) = (self.contiguous()?, s.contiguous()?);
        let (n, d) = contrastive_rows("nt_xent", t.layout(), s.layout())?;
        let normalize = ContrastiveNormalize { eps: NORM_EPS, dtype: t.dtype() };
        let rows_op = ContrastiveRows { tau };
        let [z, norms] = normalize.forward(&[(&*t.storage(), t.layout()), (&*s.storage(), s.layout())])?;
        // sim = zhat[:n] zhatᵀ, as [1, n, d] x [1, d, 2n] views of zhat
        let anchors = Layout::new(vec![1, n, d], vec![0, d, 1], 0);
        let all_t = Layout::new(vec![1, d, 2 * n], vec![0, 1, d], 0);
        let sim = z.matmul(&anchors, &z, &all_t)?;
        let sim_l = Layout::contiguous(&[n, 2 * n]);
        let [loss, lse] = rows_op.forward(&[(&sim, &sim_l)])?;
        let rows = from_op(loss, &[n], "nt_xent", &[&t, &s], move |g, _| {
            let g = g.contiguous()?;
            let [sym] = rows_op.backward(&[(&sim, &sim_l), (&lse, &whole(&lse)), (&*g.storage(), g.layout())])?;
            // dzhat = S zhat: both factors of sim in one GEMM (kernels/contrastive.cu)
            let (sym_l, z_l) = (Layout::contiguous(&[1, 2 * n, 2 * n]), Layout::contiguous(&[1, 2 * n, d]));
            let dz = sym.matmul(&sym_l, &z, &z_l)?;
            let zhat_l = Layout::contiguous(&[2 * n, d]);
            let [dt, ds] = normalize.backward(&[(&z, &zhat_l), (&norms, &whole(&norms)), (&dz, &zhat_l)])?;
            Ok(vec![Some(Tensor::from_storage(dt, &[n, d])), Some(Tensor::from_storage(ds, &[n, d]))])
        });
        rows.mean_all()
    }
}
