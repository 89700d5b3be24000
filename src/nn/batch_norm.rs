//! `nn.BatchNorm2d` with PyTorch's defaults (momentum 0.1, eps 1e-5, affine, tracked stats).

use super::init::param;
use super::{join, Counter, Ctx, Module, Slot};
use crate::{Device, Result, Tensor};

pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// Only counted and checkpointed: with a fixed momentum PyTorch never reads it.
    pub num_batches_tracked: Counter,
    pub momentum: f32,
    pub eps: f32,
}

impl BatchNorm2d {
    /// Weight 1, bias 0, running mean 0, running variance 1, as PyTorch initialises them.
    pub fn new(channels: usize) -> Result<BatchNorm2d> {
        let dev = Device::Cpu;
        Ok(BatchNorm2d {
            weight: param(Tensor::ones(&[channels], dev)?)?,
            bias: param(Tensor::zeros(&[channels], dev)?)?,
            running_mean: Tensor::zeros(&[channels], dev)?,
            running_var: Tensor::ones(&[channels], dev)?,
            num_batches_tracked: Counter::default(),
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    /// Training mode normalises with the batch statistics and updates the running ones
    /// in place; evaluation mode uses the running ones. Records its input in `ctx`.
    /// On a rank of a data-parallel group the batch is the global one (`SyncBatchNorm`),
    /// unless `parallel::sync_batch_norm` is off.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        ctx.record_bn(x, &self.running_mean, &self.running_var);
        let (w, b, rm, rv) = (&self.weight, &self.bias, &self.running_mean, &self.running_var);
        let y = match crate::parallel::current() {
            Some(group) if ctx.train && crate::parallel::sync_batch_norm() => x.batch_norm_synced(w, b, rm, rv, self.momentum, self.eps, &group)?,
            _ => x.batch_norm(w, b, rm, rv, ctx.train, self.momentum, self.eps)?,
        };
        if ctx.train {
            self.num_batches_tracked.increment();
        }
        Ok(y)
    }
}

impl Module for BatchNorm2d {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Parameter(&self.weight));
        f(&join(prefix, "bias"), Slot::Parameter(&self.bias));
        f(&join(prefix, "running_mean"), Slot::Buffer(&self.running_mean));
        f(&join(prefix, "running_var"), Slot::Buffer(&self.running_var));
        f(&join(prefix, "num_batches_tracked"), Slot::Counter(&self.num_batches_tracked));
    }
}
