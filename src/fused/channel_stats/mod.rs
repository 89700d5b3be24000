//! The BN-statistics loss's batch statistics, fused (kernels/batch_norm.cu's
//! `channel_stats_f32` and `channel_stats_bwd_f32`): per channel of `[n, c, ...]` the
//! mean and the biased variance in one op, without normalising. The math is batch
//! norm's own two-pass statistics (`backend::cpu::batch_norm`, shared with
//! `batch_norm_train`), so it stays there; this folder is the op.

mod cpu;
mod gpu;

use super::{operands, FusedOp, Gpu, Input, Pass};
use crate::backend::CpuStorage;
use crate::{Result, Tensor};

/// Forward: `x`, contiguous f32 `[n, c, ...]` -> f32 `[2, c]`: per channel the mean,
/// then the biased variance. Backward: `(x, stats, dstats)` -> dx.
#[derive(Clone, Copy, Debug)]
pub struct ChannelStats;

impl FusedOp for ChannelStats {
    const NAME: &'static str = "channel_stats";
    const BACKWARD_NAME: &'static str = "channel_stats_backward";

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>> {
        Ok(vec![match pass {
            Pass::Forward => {
                let [(x, l)] = operands(Self::NAME, x)?;
                cpu::forward(x, l)?
            }
            Pass::Backward => {
                let [(x, l), (stats, _), (dstats, _)] = operands(Self::BACKWARD_NAME, x)?;
                cpu::backward(x, l, stats, dstats)?
            }
        }])
    }

    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>> {
        Ok(vec![match pass {
            Pass::Forward => {
                let [(x, l)] = operands(Self::NAME, x)?;
                gpu::forward(g, x, l)?
            }
            Pass::Backward => {
                let [(x, l), (stats, _), (dstats, _)] = operands(Self::BACKWARD_NAME, x)?;
                gpu::backward(g, x, l, stats, dstats)?
            }
        }])
    }
}

impl Tensor {
    /// Per-channel batch mean and biased variance of `[n, c, ...]` (no running update):
    /// what DeepInversion's BN-statistics loss compares with the running statistics.
    pub fn channel_stats(&self) -> Result<(Tensor, Tensor)> {
        if self.rank() < 2 || self.dtype() != crate::DType::F32 {
            // the composition: any dtype, and [n] vectors
            let dims: Vec<usize> = (0..self.rank()).filter(|&d| d != 1).collect();
            return Ok((self.mean(&dims, false)?, self.var(&dims, false, false)?));
        }
        // one fused op with both results as the rows of `[2, c]` (mean; var)
        let x = self.contiguous()?;
        let c = x.dims()[1];
        let [both] = ChannelStats.forward(&[(&*x.storage(), x.layout())])?;
        let stats = crate::ops::from_op_saving_output(both, &[2, c], "channel_stats", &[&x], |stats| {
            let x = x.clone();
            move |g: &Tensor, _: &[bool]| {
                let g = g.contiguous()?;
                let [dx] = ChannelStats.backward(&[(&*x.storage(), x.layout()), (&*stats.storage(), stats.layout()), (&*g.storage(), g.layout())])?;
                Ok(vec![Some(Tensor::from_storage(dx, x.dims()))])
            }
        });
        Ok((stats.narrow(0, 0, 1)?.reshape(&[c])?, stats.narrow(0, 1, 1)?.reshape(&[c])?))
    }
}
