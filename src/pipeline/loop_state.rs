//! What the distillation loop holds and every method works with (`Loop`), and the
//! steps methods share: the generator and student steps around a method's losses, the
//! image pool, augmentation, and the gradients averaged over data-parallel ranks.

use super::augment::Augment;
use super::config::Config;
use super::generator::Generator;
use super::methods::DistillMethod;
use crate::models::{Classifier, Features};
use crate::nn::Ctx;
use crate::optim::{CosineSchedule, Optimizer};
use crate::parallel::{self, Collective};
use crate::rng::Rng;
use crate::{bail, no_grad, Device, Gradients, Result, Tensor};
use std::sync::Arc;

pub use super::losses::Losses;

/// One synthesised batch in a generator step, as the generator's loss sees it.
pub struct SynthBatch {
    /// The generator's output.
    pub raw: Tensor,
    /// `raw` as the networks saw it (augmented as the method's `augment` says).
    pub images: Tensor,
    /// The frozen teacher's and student's features on `images`.
    pub teacher: Features,
    pub student: Features,
    /// The class each image was asked to show, when the generator is conditional.
    pub targets: Option<Vec<u32>>,
}

pub struct Loop<'a> {
    pub cfg: &'a Config,
    pub teacher: &'a dyn Classifier,
    pub student: &'a dyn Classifier,
    /// `None` for methods that optimise pixels.
    pub generator: Option<Generator>,
    /// The student's SGD, over the student and the method's `student_side`.
    pub(crate) opt_s: Optimizer,
    /// The generator's Adam, over the generator and the method's `generator_side`.
    pub(crate) opt_g: Option<Optimizer>,
    pub(crate) schedule: CosineSchedule,
    pub rng: Rng,
    /// On a rank of a data-parallel group, the draws every rank makes alike (which
    /// pooled batch a new one replaces), tied to the iteration; `None` alone, where
    /// `rng` makes them.
    pub(crate) shared_rng: Option<Rng>,
    pub iteration: usize,
    /// The image pool: this rank's rows of each pooled global batch (the share it
    /// synthesised), in the same slots on every rank; alone, the whole batches.
    pub(crate) pool: Vec<Tensor>,
    pub device: Device,
    /// This rank's group in a data-parallel run (`parallel::current` when built).
    pub(crate) group: Option<Arc<dyn Collective>>,
    /// This rank's share of `distill.batch_size`.
    pub local_batch: usize,
}

impl Loop<'_> {
    /// Ranks in the data-parallel group (1 alone).
    pub fn world(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world())
    }

    /// The gradients of `loss` the optimiser applies: this rank's, averaged over the
    /// ranks in buckets overlapped with the backward pass.
    pub(crate) fn backward_synced(&self, loss: &Tensor, opt: &Optimizer) -> Result<Gradients> {
        match &self.group {
            Some(g) => parallel::backward_averaged(loss, opt.params(), g, self.cfg.parallel.bucket_elems()),
            None => loss.backward(),
        }
    }

    /// Each loss's mean over the ranks (each rank's is over its own share).
    pub(crate) fn synced_losses(&self, losses: Losses) -> Result<Losses> {
        let Some(g) = &self.group else { return Ok(losses) };
        let v: Vec<f32> = losses.iter().map(|l| l.1).collect();
        let sum = g.all_reduce_sum(&Tensor::from_vec(v, &[losses.len()], self.device)?)?.to_vec_f32()?;
        Ok(losses.iter().zip(sum).map(|(&(n, _), s)| (n, s / g.world() as f32)).collect())
    }

    /// The batch as the networks see it: augmented as a method's
    /// `DistillMethod::augment` says, with draws from the loop's stream.
    pub fn augment(&mut self, x: &Tensor, how: Augment) -> Result<Tensor> {
        how.apply(x, &mut self.rng)
    }

    /// A synthesised batch, with the class each image was asked to show when the
    /// generator is conditional.
    pub fn fresh_images(&mut self, train: bool) -> Result<(Tensor, Option<Vec<u32>>)> {
        let g = self.generator.as_ref().expect("a generator: methods without one synthesise pixels and pool them");
        let noise = g.sample_z(self.local_batch, &mut self.rng, self.device)?;
        Ok((g.forward(&noise.z, &mut Ctx::new(train))?, noise.targets))
    }

    /// A student batch of fresh generator output (its BatchNorm in training mode),
    /// detached.
    pub fn fresh_student_batch(&mut self) -> Result<Tensor> {
        Ok(no_grad(|| self.fresh_images(true))?.0.detach())
    }

    /// Adds a synthesised batch (this rank's share) to the pool, replacing a random one
    /// when it is full: the same one on every rank.
    pub fn remember(&mut self, batch: Tensor, capacity: usize) {
        if self.pool.len() >= capacity {
            let i = self.shared_rng.as_mut().unwrap_or(&mut self.rng).below(self.pool.len());
            self.pool[i] = batch;
        } else {
            self.pool.push(batch);
        }
    }

    /// The batch pooled last, if any.
    pub fn last_pooled(&self) -> Option<&Tensor> {
        self.pool.last()
    }

    /// A student batch of images drawn at random from the whole pool, so that one batch
    /// mixes several generator states. On a rank, its share of the batch, drawn with its
    /// own noise from its own rows of the pool (docs/DATA_PARALLEL.md, "Image pools").
    pub fn pooled_images(&mut self) -> Result<Tensor> {
        let n = self.local_batch;
        let picks: Vec<Tensor> = (0..n)
            .map(|_| {
                let b = &self.pool[self.rng.below(self.pool.len())];
                b.narrow(0, self.rng.below(b.dims()[0]), 1)
            })
            .collect::<Result<_>>()?;
        Tensor::cat(&picks.iter().collect::<Vec<_>>(), 0)
    }

    /// `distill.g_steps` generator steps on `m`'s loss, each on fresh noise, pooling
    /// each batch when `m` keeps a pool. Returns the mean of each loss.
    pub fn generator_steps<M: DistillMethod + ?Sized>(&mut self, m: &mut M) -> Result<Losses> {
        let cfg = self.cfg;
        let capacity = m.pool_capacity(cfg);
        self.student.freeze(true)?;
        let mut acc = Accumulator::default();
        for _ in 0..cfg.distill.g_steps {
            let noise = self.generator.as_ref().expect("a generator").sample_z(self.local_batch, &mut self.rng, self.device)?;
            let (loss, parts, raw) = self.generator_loss(m, &noise.z, noise.targets)?;
            let grads = self.backward_synced(&loss, self.opt_g.as_ref().expect("a generator's optimiser"))?;
            self.opt_g.as_mut().expect("a generator's optimiser").step(&grads)?;
            m.after_generator_step(self, &grads)?;
            acc.add(&parts);
            if capacity > 0 {
                self.remember(raw.detach(), capacity);
            }
        }
        self.student.freeze(false)?;
        Ok(acc.mean())
    }

    /// The generator's loss on the images it makes from noise `z` (asked for `targets`
    /// when conditional), its parts, and the images.
    pub(crate) fn generator_loss<M: DistillMethod + ?Sized>(&mut self, m: &mut M, z: &Tensor, targets: Option<Vec<u32>>) -> Result<(Tensor, Losses, Tensor)> {
        let raw = match &self.generator {
            Some(g) => g.forward(z, &mut Ctx::new(true))?,
            None => bail!("{} optimises pixels: it has no generator to take a step on", self.cfg.distill.method),
        };
        let images = self.augment(&raw, m.augment(self.cfg))?;
        let teacher = self.teacher.forward(&images, false)?;
        let student = self.student.forward_ctx(&images, &mut Ctx::new(!self.cfg.distill.gen_student_eval))?;
        let b = SynthBatch { raw, images, teacher, student, targets };
        let (loss, mut parts) = m.generator_loss(self, &b)?;
        parts.push(("g_class_entropy", class_entropy(&b.teacher.logits)?));
        check_finite(&parts, "generator", self.iteration)?;
        Ok((loss, parts, b.raw))
    }

    /// `distill.s_steps` student steps on batches `m` draws, with the cosine schedule.
    /// Returns the mean of each loss.
    pub(crate) fn student_steps<M: DistillMethod + ?Sized>(&mut self, m: &mut M) -> Result<Losses> {
        let mut acc = Accumulator::default();
        for _ in 0..self.cfg.distill.s_steps {
            self.opt_s.set_lr(self.schedule.lr_at(self.opt_s.steps() as usize));
            let x = m.student_batch(self)?;
            let (loss, parts) = self.student_loss(m, &x)?;
            let grads = self.backward_synced(&loss, &self.opt_s)?;
            self.opt_s.step(&grads)?;
            acc.add(&parts);
        }
        Ok(acc.mean())
    }

    /// The student's loss on synthetic images `x` (and its side modules'), with its
    /// parts.
    pub(crate) fn student_loss<M: DistillMethod + ?Sized>(&mut self, m: &M, x: &Tensor) -> Result<(Tensor, Losses)> {
        let x = self.augment(x, m.augment(self.cfg))?;
        let t = no_grad(|| self.teacher.forward(&x, false))?;
        let s = self.student.forward_ctx(&x, &mut Ctx::new(true))?;
        let (loss, parts) = m.student_loss(self, &t, &s)?;
        check_finite(&parts, "student", self.iteration)?;
        Ok((loss, parts))
    }

    /// The teacher's cross-entropy on the batch's target classes, as `g_ce` (DFQ's and
    /// CMI's term): the conditional generator's own targets; an unconditional one cannot
    /// aim at a class, so its CE (on random targets, drawn here) cannot fall.
    pub fn target_ce(&mut self, b: &SynthBatch) -> Result<(Tensor, (&'static str, f32))> {
        let k = b.teacher.logits.dims()[1];
        let targets = match &b.targets {
            Some(y) => y.clone(),
            None => (0..b.images.dims()[0]).map(|_| self.rng.below(k) as u32).collect(),
        };
        let ce = b.teacher.logits.cross_entropy(&targets, 0.0)?;
        let part = ("g_ce", ce.to_scalar()?);
        Ok((ce, part))
    }

    /// The student's KD term, KL(p_T || p_S) at `distill.tau_kd`, as `s_kd`.
    pub fn student_kd(&self, t: &Features, s: &Features) -> Result<(Tensor, Losses)> {
        let kd = s.logits.kd_loss(&t.logits, self.cfg.distill.tau_kd)?;
        let parts = vec![("s_kd", kd.to_scalar()?)];
        Ok((kd, parts))
    }
}

/// Entropy (nats) of the teacher's batch-mean prediction on synthetic images: log(K)
/// when the generator covers every class evenly, near 0 when it has collapsed to one.
fn class_entropy(t_logits: &Tensor) -> Result<f32> {
    let p = no_grad(|| t_logits.softmax(1)?.mean(&[0], false))?.to_vec_f32()?;
    Ok(-p.iter().filter(|&&q| q > 0.0).map(|&q| q * q.ln()).sum::<f32>())
}

/// Stops the run at a loss that is NaN or infinite, naming it.
pub fn check_finite(parts: &Losses, phase: &str, iteration: usize) -> Result<()> {
    for (name, v) in parts {
        if !v.is_finite() {
            bail!("{phase} step of iteration {iteration}: loss `{name}` is {v}; stopping (the last checkpoint is kept)");
        }
    }
    Ok(())
}

/// The mean of each named loss over a phase's steps.
#[derive(Default)]
pub struct Accumulator {
    sums: Vec<(&'static str, f64)>,
    count: usize,
}

impl Accumulator {
    pub fn add(&mut self, parts: &Losses) {
        for &(name, v) in parts {
            match self.sums.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 += v as f64,
                None => self.sums.push((name, v as f64)),
            }
        }
        self.count += 1;
    }
    pub fn mean(&self) -> Losses {
        self.sums.iter().map(|&(n, s)| (n, (s / self.count.max(1) as f64) as f32)).collect()
    }
}
