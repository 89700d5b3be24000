//! Losses and normalisations used by classification and distillation.

use crate::{bail, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Sum,
}

impl Tensor {
    /// Cross-entropy of logits `[n, k]` against class indices, with PyTorch's label
    /// smoothing: the target is `(1 - s) * onehot + s / k`. Mean over the batch.
    pub fn cross_entropy(&self, labels: &[u32], label_smoothing: f32) -> Result<Tensor> {
        let [n, k] = self.dims2("cross_entropy")?;
        if labels.len() != n {
            bail!("cross_entropy: {} labels for a batch of {n}", labels.len());
        }
        let mut target = vec![label_smoothing / k as f32; n * k];
        for (i, &c) in labels.iter().enumerate() {
            if c as usize >= k {
                bail!("cross_entropy: label {c} out of range for {k} classes");
            }
            target[i * k + c as usize] += 1.0 - label_smoothing;
        }
        let target = Tensor::from_vec(target, &[n, k], self.device())?;
        self.soft_cross_entropy(&target)
    }

    /// Cross-entropy against a target distribution `[n, k]`, mean over the batch.
    pub fn soft_cross_entropy(&self, target: &Tensor) -> Result<Tensor> {
        let n = self.dims()[0] as f32;
        self.log_softmax(1)?.mul(target)?.sum_all()?.scale(-1.0 / n)
    }

    /// Knowledge-distillation loss `tau^2 * KL(softmax(teacher/tau) || softmax(self/tau))`,
    /// averaged over the batch (PyTorch's `kl_div(..., reduction="batchmean")`).
    pub fn kd_loss(&self, teacher_logits: &Tensor, tau: f32) -> Result<Tensor> {
        let n = self.dims()[0] as f32;
        let log_ps = self.scale(1.0 / tau)?.log_softmax(1)?;
        let log_pt = teacher_logits.scale(1.0 / tau)?.log_softmax(1)?;
        let kl = log_pt.exp()?.mul(&log_pt.sub(&log_ps)?)?.sum_all()?;
        kl.scale(tau * tau / n)
    }

    pub fn mse(&self, target: &Tensor) -> Result<Tensor> {
        self.sub(target)?.sqr()?.mean_all()
    }
    pub fn l1(&self, target: &Tensor) -> Result<Tensor> {
        self.sub(target)?.abs()?.mean_all()
    }

    /// `x / max(||x||_2, eps)` along `dim` (PyTorch's `F.normalize`).
    pub fn l2_normalize(&self, dim: usize, eps: f32) -> Result<Tensor> {
        let norm = self.sqr()?.sum(&[dim], true)?.sqrt()?.clamp(eps, f32::INFINITY)?;
        self.div(&norm)
    }
}
