//! Differentiable collectives and the data-parallel pieces built on them.

use super::Collective;
use crate::nn::{Module, Slot};
use crate::ops::with_backward;
use crate::{no_grad, Error, Result, Tensor};
use std::sync::Arc;

/// The sum of every rank's `x`, with gradient: the backward all-reduces the output
/// gradient, so each rank's `x` receives the gradient of every rank's use of the sum
/// (with the final averaging, exactly its share of the global loss's gradient).
pub fn all_reduce_sum(x: &Tensor, group: &Arc<dyn Collective>) -> Result<Tensor> {
    let y = group.all_reduce_sum(&x.detach())?;
    let g = group.clone();
    Ok(with_backward(&y, "all_reduce_sum", &[x], move |dy, _| Ok(vec![Some(g.all_reduce_sum(dy)?)])))
}

/// Every rank's `x` concatenated along dim 0, with gradient: each rank's `x` receives
/// the sum over ranks of the gradient at its rows.
pub fn all_gather(x: &Tensor, group: &Arc<dyn Collective>) -> Result<Tensor> {
    let y = group.all_gather(&x.detach())?;
    let (g, n, rank) = (group.clone(), x.dims().first().copied().unwrap_or(1), group.rank());
    let shape = x.dims().to_vec();
    Ok(with_backward(&y, "all_gather", &[x], move |dy, _| {
        let mine = g.all_reduce_sum(dy)?.narrow(0, rank * n, n)?.contiguous()?.reshape(&shape)?;
        Ok(vec![Some(mine)])
    }))
}

/// For each `x` of `xs`, `(sum over the ranks of x reduced over dims(x), number of
/// elements reduced)`: one collective carries every sum and count, so ranks may hold
/// shares of different sizes and many tensors cost one call.
fn global_sums(xs: &[Tensor], dims: impl Fn(&Tensor) -> Vec<usize>, group: &Arc<dyn Collective>) -> Result<Vec<(Tensor, f32)>> {
    let mut parts = vec![];
    let mut shapes = vec![];
    for x in xs {
        let d = dims(x);
        let s = x.sum(&d, false)?;
        let count: usize = d.iter().map(|&a| x.dims()[a]).product();
        shapes.push(s.dims().to_vec());
        parts.push(s.reshape(&[s.elem_count()])?);
        parts.push(Tensor::full(count as f32, &[1], x.device())?);
    }
    let total = all_reduce_sum(&Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)?, group)?;
    let mut at = 0;
    let mut out = vec![];
    for shape in shapes {
        let len: usize = shape.iter().product();
        let n = no_grad(|| total.narrow(0, at + len, 1)?.to_scalar())?;
        out.push((total.narrow(0, at, len)?.reshape(&shape)?, n));
        at += len + 1;
    }
    Ok(out)
}

/// The axes of `[n, c, ...]` a per-channel statistic reduces.
fn all_but_channels(x: &Tensor) -> Vec<usize> {
    (0..x.rank()).filter(|&d| d != 1).collect()
}

/// Per-channel mean and biased variance of `[n, c, ...]` over the whole global batch
/// (two passes: the variance is of the centred input, as in `channel_stats`).
pub fn global_channel_stats(x: &Tensor, group: &Arc<dyn Collective>) -> Result<(Tensor, Tensor)> {
    Ok(global_channel_stats_many(std::slice::from_ref(x), group)?.remove(0))
}

/// `global_channel_stats` of several tensors in two collective calls in all (the
/// BN-statistics loss needs every BN layer's: one call per layer and pass would be
/// latency-bound on a GPU).
pub fn global_channel_stats_many(xs: &[Tensor], group: &Arc<dyn Collective>) -> Result<Vec<(Tensor, Tensor)>> {
    Ok(global_channel_stats_counts(xs, group)?.into_iter().map(|(m, v, _)| (m, v)).collect())
}

fn global_channel_stats_counts(xs: &[Tensor], group: &Arc<dyn Collective>) -> Result<Vec<(Tensor, Tensor, f32)>> {
    let bshape = |x: &Tensor| -> Vec<usize> { (0..x.rank()).map(|d| if d == 1 { x.dims()[1] } else { 1 }).collect() };
    let means: Vec<(Tensor, f32)> = global_sums(xs, all_but_channels, group)?.into_iter().map(|(s, m)| Ok((s.scale(1.0 / m)?, m))).collect::<Result<_>>()?;
    let squares: Vec<Tensor> = xs.iter().zip(&means).map(|(x, (mean, _))| x.sub(&mean.reshape(&bshape(x))?)?.sqr()).collect::<Result<_>>()?;
    let sq = global_sums(&squares, all_but_channels, group)?;
    means.into_iter().zip(sq).map(|((mean, m), (s, _))| Ok((mean, s.scale(1.0 / m)?, m))).collect()
}

/// The mean over dim 0 of every rank's rows together (a batch-mean prediction).
pub fn global_batch_mean(x: &Tensor, group: &Arc<dyn Collective>) -> Result<Tensor> {
    let (sum, n) = global_sums(std::slice::from_ref(x), |_| vec![0], group)?.remove(0);
    sum.scale(1.0 / n)
}

impl Tensor {
    /// Training-mode BatchNorm with the statistics of the whole global batch
    /// (PyTorch's `SyncBatchNorm`): the result on each rank's rows equals
    /// `batch_norm` on the concatenated batch, and the running statistics stay equal
    /// on every rank.
    pub fn batch_norm_synced(
        &self,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        momentum: f32,
        eps: f32,
        group: &Arc<dyn Collective>,
    ) -> Result<Tensor> {
        let c = self.dims()[1];
        let mut bshape = vec![1; self.rank()];
        bshape[1] = c;
        let (mean, var, m) = global_channel_stats_counts(std::slice::from_ref(self), group)?.remove(0);
        no_grad(|| -> Result<()> {
            let unbiased = var.scale(m / (m - 1.0).max(1.0))?;
            running_mean.assign(&running_mean.scale(1.0 - momentum)?.add(&mean.scale(momentum)?)?)?;
            running_var.assign(&running_var.scale(1.0 - momentum)?.add(&unbiased.scale(momentum)?)?)
        })?;
        let scale = var.add_scalar(eps)?.sqrt()?.recip()?.mul(gamma)?;
        self.sub(&mean.reshape(&bshape)?)?.mul(&scale.reshape(&bshape)?)?.add(&beta.reshape(&bshape)?)
    }
}

/// Makes every parameter and buffer of `module` equal to rank 0's.
pub fn broadcast_module(module: &dyn Module, group: &Arc<dyn Collective>) -> Result<()> {
    let mut result = Ok(());
    module.visit("", &mut |name, slot| {
        if let (Slot::Parameter(t) | Slot::Buffer(t), true) = (slot, result.is_ok()) {
            result = group.broadcast(t, 0).and_then(|r| t.assign(&r)).map_err(|e| Error::Msg(format!("broadcasting `{name}`: {e}")));
        }
    });
    result
}

/// Makes every buffer of `module` (BatchNorm running statistics...) equal to rank 0's,
/// in one collective call: what keeps ranks identical when each normalises with its
/// own share (`parallel.sync_batch_norm = false`; DDP's `broadcast_buffers`).
pub fn broadcast_buffers(module: &dyn Module, group: &Arc<dyn Collective>) -> Result<()> {
    let mut buffers = vec![];
    module.visit("", &mut |_, slot| {
        if let Slot::Buffer(t) = slot {
            buffers.push(t.clone());
        }
    });
    if buffers.is_empty() {
        return Ok(());
    }
    let flat: Vec<Tensor> = buffers.iter().map(|b| b.contiguous()?.reshape(&[b.elem_count()])).collect::<Result<_>>()?;
    let all = group.broadcast(&Tensor::cat(&flat.iter().collect::<Vec<_>>(), 0)?, 0)?;
    let mut at = 0;
    for b in &buffers {
        b.assign(&all.narrow(0, at, b.elem_count())?.reshape(b.dims())?)?;
        at += b.elem_count();
    }
    Ok(())
}
