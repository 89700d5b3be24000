//! Batch normalisation: fused in training mode, an affine map in evaluation mode.

use super::from_op;
use crate::autograd::no_grad;
use crate::{bail, Result, Tensor};

impl Tensor {
    /// Batch norm over `[n, c, ...]`, per channel. In training mode it normalises with
    /// the batch statistics and updates the running ones in place (`momentum` as in
    /// PyTorch, unbiased running variance); in evaluation mode it uses the running ones.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm(
        &self,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<Tensor> {
        if self.rank() < 2 {
            bail!("batch_norm: expected [n, c, ...], got shape {:?}", self.dims());
        }
        let c = self.dims()[1];
        for (name, t) in [("weight", gamma), ("bias", beta), ("running_mean", running_mean), ("running_var", running_var)] {
            if t.dims() != [c] {
                bail!("batch_norm: {name} has shape {:?}, expected [{c}]", t.dims());
            }
        }
        if !training {
            let scale = gamma.div(&running_var.add_scalar(eps)?.sqrt()?)?;
            let shift = beta.sub(&running_mean.mul(&scale)?)?;
            return self.channel_affine(&scale, &shift);
        }
        let x = self.contiguous()?;
        let (g, b) = (gamma.contiguous()?, beta.contiguous()?);
        let (y, mean, invstd) = x.storage().batch_norm_train(x.layout(), &g.storage(), &b.storage(), eps)?;
        let (mean, invstd) = (Tensor::from_storage(mean, &[c]), Tensor::from_storage(invstd, &[c]));
        let m = (x.elem_count() / c) as f32;
        no_grad(|| -> Result<()> {
            let var = invstd.sqr()?.recip()?.add_scalar(-eps)?.scale(m / (m - 1.0).max(1.0))?;
            running_mean.assign(&running_mean.scale(1.0 - momentum)?.add(&mean.scale(momentum)?)?)?;
            running_var.assign(&running_var.scale(1.0 - momentum)?.add(&var.scale(momentum)?)?)
        })?;
        let (xs, gs) = (x.clone(), g.clone());
        Ok(from_op(y, self.dims(), "batch_norm", &[&x, &g, &b], move |dy, _| {
            let dy = dy.contiguous()?;
            let (dx, dg, db) = xs.storage().batch_norm_backward(xs.layout(), &dy.storage(), &mean.storage(), &invstd.storage(), &gs.storage())?;
            let sh = xs.dims().to_vec();
            Ok(vec![Some(Tensor::from_storage(dx, &sh)), Some(Tensor::from_storage(dg, &[c])), Some(Tensor::from_storage(db, &[c]))])
        }))
    }

    /// `x * scale[c] + shift[c]` for `x` `[n, c, ...]` and `scale`, `shift` `[c]`: batch
    /// norm in evaluation mode, one pass (two broadcast ops otherwise). Gradients reach
    /// `scale` and `shift` too (a model fine-tuned in evaluation mode).
    pub fn channel_affine(&self, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let c = self.dims().get(1).copied().unwrap_or(0);
        let f32s = [self, scale, shift].iter().all(|t| t.dtype() == crate::DType::F32);
        if self.rank() < 2 || !f32s || scale.dims() != [c] || shift.dims() != [c] {
            let mut bshape = vec![1; self.rank().max(2)];
            bshape[1] = c;
            return self.mul(&scale.reshape(&bshape)?)?.add(&shift.reshape(&bshape)?);
        }
        let (x, a, b) = (self.contiguous()?, scale.contiguous()?, shift.contiguous()?);
        let y = x.storage().channel_affine(x.layout(), &a.storage(), &b.storage())?;
        Ok(from_op(y, x.dims(), "channel_affine", &[&x, &a, &b], {
            let (x, a) = (x.clone(), a.clone());
            move |dy, needs| {
                let dy = dy.contiguous()?;
                let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
                let dx = match needs[0] {
                    true => Some(dy.channel_affine(&a, &Tensor::zeros(&[a.elem_count()], a.device())?)?),
                    false => None,
                };
                let da = if needs[1] { Some(dy.mul(&x)?.sum(&dims, false)?) } else { None };
                let db = if needs[2] { Some(dy.sum(&dims, false)?) } else { None };
                Ok(vec![dx, da, db])
            }
        }))
    }
}
