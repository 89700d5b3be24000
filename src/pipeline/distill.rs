//! The adversarial data-free distillation loop (METHOD.md, "Losses and the adversarial
//! loop"): each iteration runs `g_steps` generator steps against the frozen teacher and
//! student, then `s_steps` student steps on fresh synthetic batches. Baselines swap the
//! losses (`Method`); DeepInversion optimises pixels instead of a generator.

use super::augment::random_shift_flip;
use super::checkpoint_dir::CheckpointDir;
use super::config::Config;
use super::generator::Generator;
use super::losses::{self, Method, Mhad, ProjectionHead};
use super::progress::Progress;
use super::report::{save_image_grid, MetricsLog};
use crate::checkpoint::{load_model, load_tensors, save_model, save_tensors};
use crate::models::{Classifier, Features};
use crate::nn::{Ctx, Module};
use crate::optim::{CosineSchedule, Optimizer, ParamGroup};
use crate::parallel::{self, Collective};
use crate::rng::Rng;
use crate::{bail, no_grad, Device, Gradients, Result, Tensor, TensorId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// DeepInversion keeps the image batches it synthesised and trains the student on them;
/// its pool holds this many batches unless `distill.pool_batches` says otherwise.
const INVERSION_POOL_BATCHES: usize = 32;

/// Everything the student step trains besides the student itself.
struct Aux {
    mhad: Option<Mhad>,
    head: Option<ProjectionHead>,
}

impl Module for Aux {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, crate::nn::Slot<'_>)) {
        if let Some(m) = &self.mhad {
            m.visit(&crate::nn::join(prefix, "mhad"), f);
        }
        if let Some(h) = &self.head {
            h.visit(&crate::nn::join(prefix, "sfcl_head"), f);
        }
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    iteration: usize,
    rng: [u64; 4],
}

pub struct Distiller<'a> {
    cfg: &'a Config,
    method: Method,
    teacher: &'a dyn Classifier,
    student: &'a dyn Classifier,
    generator: Option<Generator>,
    aux: Aux,
    opt_s: Optimizer,
    opt_g: Option<Optimizer>,
    schedule: CosineSchedule,
    rng: Rng,
    /// On a rank of a data-parallel group, the draws every rank makes alike (which
    /// pooled batch a new one replaces), tied to the iteration; `None` alone, where
    /// `rng` makes them.
    shared_rng: Option<Rng>,
    iteration: usize,
    /// The image pool: this rank's rows of each pooled global batch (the share it
    /// synthesised), in the same slots on every rank; alone, the whole batches.
    pool: Vec<Tensor>,
    device: Device,
    /// This rank's group in a data-parallel run (`parallel::current` when built).
    group: Option<Arc<dyn Collective>>,
    /// This rank's share of `distill.batch_size`.
    local_batch: usize,
}

/// Losses of one step, by name, for the metrics log.
type Losses = Vec<(&'static str, f32)>;

impl<'a> Distiller<'a> {
    /// Built on a rank's thread of a data-parallel group (`parallel::run_ranks`), the
    /// distiller is that rank's: it synthesises its share of each batch, averages
    /// gradients with the other ranks, and starts from rank 0's weights.
    pub fn new(cfg: &'a Config, teacher: &'a dyn Classifier, student: &'a dyn Classifier, device: Device) -> Result<Self> {
        let d = &cfg.distill;
        let method = Method::parse(&d.method)?;
        let group = parallel::current();
        let world = group.as_ref().map_or(1, |g| g.world());
        // this rank thread's BatchNorm mode (no effect without a group)
        parallel::set_sync_batch_norm(cfg.parallel.sync_batch_norm);
        if !d.batch_size.is_multiple_of(world) {
            bail!("{world} data-parallel ranks need distill.batch_size ({}) divisible by them", d.batch_size);
        }
        if d.gen_target_ce > 0.0 && !cfg.generator.conditional {
            bail!("distill.gen_target_ce = {} needs generator.conditional = true: an unconditional generator cannot be asked for a class", d.gen_target_ce);
        }
        if d.pool_batches > 0 && d.g_steps == 0 {
            bail!("distill.pool_batches = {} needs generator steps to fill the pool, but distill.g_steps = 0", d.pool_batches);
        }
        let mut rng = cfg.distill_rng(0xd15711);
        // every module is built on the CPU; the loop runs where `device` says
        teacher.to_device(device)?;
        student.to_device(device)?;
        teacher.freeze(true)?;
        let generator = match method {
            Method::DeepInversion => None,
            _ => Some(Generator::new(&cfg.generator, cfg.data.image_size, teacher.num_classes(), d.fused_attention, &mut rng)?),
        };
        if let Some(g) = &generator {
            g.to_device(device)?;
        }
        // a small probe batch decides how MHAD pairs the two networks' features
        let probe = Tensor::randn(&[2, 3, cfg.data.image_size, cfg.data.image_size], 0.0, 1.0, &mut rng, device)?;
        let (tp, sp) = no_grad(|| -> Result<(Features, Features)> { Ok((teacher.forward(&probe, false)?, student.forward(&probe, false)?)) })?;
        let ours = method == Method::DfkdFgvc;
        let mhad = if ours && d.mhad { Some(Mhad::new(&tp, &sp, d.mha_order, d.adapter_identity_init, d.mhad_normalize, d.fused_attention, &mut rng)?) } else { None };
        let head = if ours && d.sfcl {
            let head = ProjectionHead::new(tp.penultimate.dims()[1], sp.penultimate.dims()[1], d.proj_hidden, d.proj_dim, d.proj_bn, d.tau_sfcl, d.fused_attention, &mut rng)?;
            Some(head.detach_projection(d.sfcl_detach_projection).global_negatives(cfg.parallel.global_negatives))
        } else {
            None
        };
        let aux = Aux { mhad, head };
        aux.to_device(device)?;
        let mut params = student.parameters();
        params.extend(aux.parameters());
        let s = &cfg.student;
        let opt_s = Optimizer::sgd(vec![ParamGroup::new(params, s.weight_decay)], s.lr, s.momentum, false);
        let g = &cfg.generator;
        let opt_g = generator.as_ref().map(|gen| Optimizer::adam(vec![ParamGroup::new(gen.parameters(), 0.0)], g.lr, g.beta1, g.beta2));
        let total_iters = d.epochs * d.iterations_per_epoch;
        let schedule = CosineSchedule { base: s.lr, min: 0.0, total: total_iters * d.s_steps, warmup: 0 };
        if let Some(g) = &group {
            // built from the same seeds, the ranks already agree; this makes sure of it
            parallel::broadcast_module(student, g)?;
            parallel::broadcast_module(&aux, g)?;
            if let Some(gen) = &generator {
                parallel::broadcast_module(gen, g)?;
            }
        }
        let local_batch = d.batch_size / world;
        Ok(Distiller { cfg, method, teacher, student, generator, aux, opt_s, opt_g, schedule, rng, shared_rng: None, iteration: 0, pool: vec![], device, group, local_batch })
    }

    /// This rank in a data-parallel run (0 alone): rank 0 writes logs and checkpoints.
    pub fn rank(&self) -> usize { self.group.as_ref().map_or(0, |g| g.rank()) }

    /// The gradients of `loss` the optimiser applies: this rank's, averaged over the
    /// ranks in buckets overlapped with the backward pass.
    fn backward_synced(&self, loss: &Tensor, opt: &Optimizer) -> Result<Gradients> {
        match &self.group {
            Some(g) => parallel::backward_averaged(loss, opt.params(), g, self.cfg.parallel.bucket_elems()),
            None => loss.backward(),
        }
    }

    /// Each loss's mean over the ranks (each rank's is over its own share).
    fn synced_losses(&self, losses: Losses) -> Result<Losses> {
        let Some(g) = &self.group else { return Ok(losses) };
        let v: Vec<f32> = losses.iter().map(|l| l.1).collect();
        let sum = g.all_reduce_sum(&Tensor::from_vec(v, &[losses.len()], self.device)?)?.to_vec_f32()?;
        Ok(losses.iter().zip(sum).map(|(&(n, _), s)| (n, s / g.world() as f32)).collect())
    }

    pub fn total_iterations(&self) -> usize { self.cfg.distill.epochs * self.cfg.distill.iterations_per_epoch }
    pub fn iteration(&self) -> usize { self.iteration }

    /// One iteration: the synthesis phase, then the student phase. Returns the mean of
    /// each loss over the iteration's steps.
    pub fn iterate(&mut self) -> Result<(Losses, Losses)> {
        if let Some(g) = &self.group {
            // each rank draws its own noise; tied to the iteration, so a resumed run
            // (with any number of ranks) needs no saved per-rank state
            let streams = self.cfg.distill_rng(0xd15711);
            self.rng = streams.fork(1 + g.rank() as u64).fork(self.iteration as u64);
            // and the draws that keep the ranks' pool shards aligned come from one stream
            self.shared_rng = Some(streams.fork(0).fork(self.iteration as u64));
        }
        let g_losses = match self.method {
            Method::DeepInversion => self.invert_pixels()?,
            _ => self.generator_steps()?,
        };
        let s_losses = self.student_steps()?;
        if let (Some(g), false) = (&self.group, self.cfg.parallel.sync_batch_norm) {
            // each rank's BN statistics came from its own share: rank 0's are kept
            parallel::broadcast_buffers(self.student, g)?;
            parallel::broadcast_buffers(&self.aux, g)?;
            if let Some(gen) = &self.generator {
                parallel::broadcast_buffers(gen, g)?;
            }
        }
        self.iteration += 1;
        Ok((self.synced_losses(g_losses)?, self.synced_losses(s_losses)?))
    }

    /// A synthesised batch, with the class each image was asked to show when the
    /// generator is conditional.
    fn fresh_images(&mut self, train: bool) -> Result<(Tensor, Option<Vec<u32>>)> {
        let n = self.local_batch;
        let g = self.generator.as_ref().expect("a generator");
        let noise = g.sample_z(n, &mut self.rng, self.device)?;
        Ok((g.forward(&noise.z, &mut Ctx::new(train))?, noise.targets))
    }

    fn generator_steps(&mut self) -> Result<Losses> {
        let d = &self.cfg.distill;
        self.student.freeze(true)?;
        let mut acc = Accumulator::default();
        for _ in 0..d.g_steps {
            let noise = self.generator.as_ref().expect("a generator").sample_z(self.local_batch, &mut self.rng, self.device)?;
            let (loss, parts, raw) = self.generator_loss(&noise.z, noise.targets)?;
            let grads = self.backward_synced(&loss, self.opt_g.as_ref().unwrap())?;
            self.opt_g.as_mut().unwrap().step(&grads)?;
            acc.add(&parts);
            if d.pool_batches > 0 {
                self.remember(raw.detach(), d.pool_batches);
            }
        }
        self.student.freeze(false)?;
        Ok(acc.mean())
    }

    /// The generator's loss on the images it makes from noise `z` (asked for `targets`
    /// when conditional), its parts, and the images.
    fn generator_loss(&mut self, z: &Tensor, targets: Option<Vec<u32>>) -> Result<(Tensor, Losses, Tensor)> {
        let d = &self.cfg.distill;
        let raw = self.generator.as_ref().expect("a generator").forward(z, &mut Ctx::new(true))?;
        let x = self.augment(&raw)?;
        let t = self.teacher.forward(&x, false)?;
        let s = self.student.forward_ctx(&x, &mut Ctx::new(!d.gen_student_eval))?;
        let kd = s.logits.kd_loss(&t.logits, d.tau_gen)?;
        let (loss, parts): (Tensor, Losses) = match self.method {
            Method::DfkdFgvc | Method::Dfq => {
                let bn = losses::bn_loss(&t)?;
                let mut loss = bn.scale(d.alpha)?.sub(&kd)?;
                let mut parts = vec![("g_bn", bn.to_scalar()?), ("g_kd", kd.to_scalar()?)];
                if self.method == Method::Dfq {
                    // the conditional generator's own targets; an unconditional one
                    // cannot aim at a class, so its CE (on random targets) cannot fall
                    let k = t.logits.dims()[1];
                    let targets = match &targets {
                        Some(y) => y.clone(),
                        None => (0..x.dims()[0]).map(|_| self.rng.below(k) as u32).collect(),
                    };
                    let ce = t.logits.cross_entropy(&targets, 0.0)?;
                    parts.push(("g_ce", ce.to_scalar()?));
                    loss = loss.add(&ce)?;
                }
                (loss, parts)
            }
            Method::Dafl => {
                let l = losses::dafl_generator_loss(&t)?;
                (l.clone(), vec![("g_dafl", l.to_scalar()?)])
            }
            Method::Dfad => {
                let l1 = s.logits.l1(&t.logits)?;
                (l1.neg()?, vec![("g_l1", l1.to_scalar()?)])
            }
            Method::Zskt => (kd.neg()?, vec![("g_kd", kd.to_scalar()?)]),
            Method::DeepInversion => unreachable!(),
        };
        let (loss, mut parts) = match self.method {
            Method::DfkdFgvc => self.class_terms(loss, parts, &t.logits, targets.as_deref())?,
            _ => (loss, parts),
        };
        parts.push(("g_class_entropy", class_entropy(&t.logits)?));
        check_finite(&parts, "generator", self.iteration)?;
        Ok((loss, parts, raw))
    }

    /// The gradients one generator step applies for noise `z` (this rank's share),
    /// averaged over the ranks, by parameter name: how the data-parallel steps are
    /// checked against one process.
    pub fn generator_step_gradients(&mut self, z: &Tensor) -> Result<Vec<(String, Tensor)>> {
        self.student.freeze(true)?;
        let grads = self.generator_loss(z, None).and_then(|(loss, _, _)| self.backward_synced(&loss, self.opt_g.as_ref().expect("a generator")));
        self.student.freeze(false)?;
        let grads = grads?;
        let g = self.generator.as_ref().expect("a generator");
        Ok(g.named_parameters().into_iter().filter_map(|(n, p)| grads.get(&p).map(|t| (n, t.clone()))).collect())
    }

    /// Adds the configured class terms to a DFKD-FGVC generator loss: the teacher's
    /// cross-entropy on the sampled targets, DAFL's one-hot term and its class-balance
    /// term. The baselines keep their published losses, so they never get these.
    fn class_terms(&self, mut loss: Tensor, mut parts: Losses, t_logits: &Tensor, targets: Option<&[u32]>) -> Result<(Tensor, Losses)> {
        let d = &self.cfg.distill;
        if d.gen_target_ce > 0.0 {
            let ce = t_logits.cross_entropy(targets.expect("conditional generator (checked in Distiller::new)"), 0.0)?;
            parts.push(("g_target_ce", ce.to_scalar()?));
            loss = loss.add(&ce.scale(d.gen_target_ce)?)?;
        }
        if d.gen_onehot > 0.0 {
            let own: Vec<u32> = t_logits.argmax_last()?.into_iter().map(|c| c as u32).collect();
            let ce = t_logits.cross_entropy(&own, 0.0)?;
            parts.push(("g_onehot", ce.to_scalar()?));
            loss = loss.add(&ce.scale(d.gen_onehot)?)?;
        }
        if d.gen_balance > 0.0 {
            let neg_entropy = losses::batch_neg_entropy(t_logits)?;
            parts.push(("g_balance", neg_entropy.to_scalar()?));
            loss = loss.add(&neg_entropy.scale(d.gen_balance)?)?;
        }
        Ok((loss, parts))
    }

    /// DeepInversion (ADI): optimise a batch of pixels against the teacher's BN
    /// statistics and sampled targets, with image priors and the competition term. On
    /// a rank, its share of the batch: the BN term is the global batch's, and each
    /// rank's pixels get their gradient of the global batch's loss.
    fn invert_pixels(&mut self) -> Result<Losses> {
        let d = &self.cfg.distill;
        let (n, s, k) = (self.local_batch, self.cfg.data.image_size, self.teacher.num_classes());
        let x = Tensor::randn(&[n, 3, s, s], 0.0, 1.0, &mut self.rng, self.device)?.to_var()?;
        let targets: Vec<u32> = (0..n).map(|_| self.rng.below(k) as u32).collect();
        let mut opt = Optimizer::adam(vec![ParamGroup::new(vec![x.clone()], 0.0)], 0.05, 0.5, 0.99);
        self.student.freeze(true)?;
        let mut acc = Accumulator::default();
        for _ in 0..2 * d.g_steps {
            let xa = self.augment(&x)?;
            let t = self.teacher.forward(&xa, false)?;
            let st = self.student.forward_ctx(&xa, &mut Ctx::new(false))?;
            let (bn, ce) = (losses::bn_loss(&t)?, t.logits.cross_entropy(&targets, 0.0)?);
            let (tv, l2) = (losses::total_variation(&x)?, x.sqr()?.mean_all()?);
            let js = losses::js_divergence(&t.logits, &st.logits)?;
            let mut loss = bn.scale(d.alpha)?.add(&ce)?.add(&tv.scale(0.05)?)?.add(&l2.scale(1e-4)?)?.sub(&js)?;
            if let Some(g) = &self.group {
                // the global loss is the mean of the ranks' (each a mean over its share,
                // the BN term's backward summed over the ranks): 1/N of this rank's
                loss = loss.scale(1.0 / g.world() as f32)?;
            }
            let parts = vec![("g_bn", bn.to_scalar()?), ("g_ce", ce.to_scalar()?), ("g_js", js.to_scalar()?)];
            check_finite(&parts, "deepinversion", self.iteration)?;
            opt.step(&loss.backward()?)?;
            acc.add(&parts);
        }
        self.student.freeze(false)?;
        let capacity = if d.pool_batches > 0 { d.pool_batches } else { INVERSION_POOL_BATCHES };
        self.remember(x.detach(), capacity);
        Ok(acc.mean())
    }

    /// The batch as the networks see it: randomly shifted and mirrored when
    /// `distill.augment_shift` > 0, unchanged otherwise.
    fn augment(&mut self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.distill.augment_shift {
            0 => Ok(x.clone()),
            s => random_shift_flip(x, s, &mut self.rng),
        }
    }

    /// Adds a synthesised batch (this rank's share) to the pool, replacing a random one
    /// when it is full: the same one on every rank.
    fn remember(&mut self, batch: Tensor, capacity: usize) {
        if self.pool.len() >= capacity {
            let i = self.shared_rng.as_mut().unwrap_or(&mut self.rng).below(self.pool.len());
            self.pool[i] = batch;
        } else {
            self.pool.push(batch);
        }
    }

    /// Whether student steps draw from the pool instead of fresh generator output.
    fn uses_pool(&self) -> bool { self.method == Method::DeepInversion || self.cfg.distill.pool_batches > 0 }

    /// A student batch of images drawn at random from the whole pool, so that one batch
    /// mixes several generator states. On a rank, its share of the batch, drawn with its
    /// own noise from its own rows of the pool (docs/DATA_PARALLEL.md, "Image pools").
    fn pooled_images(&mut self) -> Result<Tensor> {
        let n = self.local_batch;
        let picks: Vec<Tensor> = (0..n)
            .map(|_| {
                let b = &self.pool[self.rng.below(self.pool.len())];
                b.narrow(0, self.rng.below(b.dims()[0]), 1)
            })
            .collect::<Result<_>>()?;
        Tensor::cat(&picks.iter().collect::<Vec<_>>(), 0)
    }

    fn student_steps(&mut self) -> Result<Losses> {
        let mut acc = Accumulator::default();
        for _ in 0..self.cfg.distill.s_steps {
            self.opt_s.set_lr(self.schedule.lr_at(self.opt_s.steps() as usize));
            let x = if self.uses_pool() { self.pooled_images()? } else { no_grad(|| self.fresh_images(true))?.0.detach() };
            let (loss, parts) = self.student_loss(&x)?;
            let grads = self.backward_synced(&loss, &self.opt_s)?;
            self.opt_s.step(&grads)?;
            acc.add(&parts);
        }
        Ok(acc.mean())
    }

    /// The student's loss on synthetic images `x` (and the auxiliary modules'), with
    /// its parts.
    fn student_loss(&mut self, x: &Tensor) -> Result<(Tensor, Losses)> {
        let d = &self.cfg.distill;
        let x = self.augment(x)?;
        let t = no_grad(|| self.teacher.forward(&x, false))?;
        let s = self.student.forward_ctx(&x, &mut Ctx::new(true))?;
        let mut parts = vec![];
        let mut loss = match self.method {
            Method::Dfad => s.logits.l1(&t.logits)?,
            _ => s.logits.kd_loss(&t.logits, d.tau_kd)?,
        };
        parts.push(("s_kd", loss.to_scalar()?));
        if self.method == Method::Zskt {
            let at = losses::attention_transfer(&t, &s)?;
            parts.push(("s_at", at.to_scalar()?));
            loss = loss.add(&at.scale(250.0)?)?;
        }
        if let Some(m) = &self.aux.mhad {
            let l = m.loss(&t, &s)?;
            parts.push(("s_mhad", l.to_scalar()?));
            loss = loss.add(&l.scale(d.beta)?)?;
        }
        if let Some(h) = &self.aux.head {
            let l = h.loss(&t, &s)?;
            parts.push(("s_sfcl", l.to_scalar()?));
            loss = loss.add(&l.scale(d.gamma)?)?;
        }
        check_finite(&parts, "student", self.iteration)?;
        Ok((loss, parts))
    }

    /// The gradients one student step applies for images `x` (this rank's share),
    /// averaged over the ranks, by name (`student.*`, `aux.*`).
    pub fn student_step_gradients(&mut self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let (loss, _) = self.student_loss(x)?;
        let grads = self.backward_synced(&loss, &self.opt_s)?;
        let names = self.student_side_names();
        Ok(self.opt_s.params().filter_map(|p| Some((names.get(&p.id())?.clone(), grads.get(p)?.clone()))).collect())
    }

    /// Every trained weight and buffer by name: the student, the auxiliary modules and
    /// the generator (for checking that data-parallel ranks agree).
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.student.named_tensors().into_iter().map(|(n, t, _)| (format!("student.{n}"), t)).collect();
        out.extend(self.aux.named_tensors().into_iter().map(|(n, t, _)| (format!("aux.{n}"), t)));
        if let Some(g) = &self.generator {
            out.extend(g.named_tensors().into_iter().map(|(n, t, _)| (format!("generator.{n}"), t)));
        }
        out
    }

    /// This rank's rows of each pooled batch (alone, the batches), in pool order.
    pub fn pool_shard(&self) -> &[Tensor] { &self.pool }

    /// A grid of freshly synthesised images (or the latest inverted batch): on a rank,
    /// its own share (rank 0 writes the grids).
    pub fn save_samples(&mut self, path: &Path) -> Result<()> {
        let x = match self.method {
            Method::DeepInversion => match self.pool.last() {
                Some(x) => x.clone(),
                None => return Ok(()),
            },
            _ => no_grad(|| self.fresh_images(false))?.0,
        };
        let n = x.dims()[0].min(64);
        save_image_grid(&x.narrow(0, 0, n)?, 8, path)
    }

    fn optimizer_names(module: &dyn Module) -> HashMap<TensorId, String> {
        module.named_parameters().into_iter().map(|(n, t)| (t.id(), n)).collect()
    }

    /// Names of everything the student optimiser updates: `student.*` and `aux.*`.
    fn student_side_names(&self) -> HashMap<TensorId, String> {
        let mut names: HashMap<TensorId, String> =
            Self::optimizer_names(self.student).into_iter().map(|(i, n)| (i, format!("student.{n}"))).collect();
        names.extend(Self::optimizer_names(&self.aux).into_iter().map(|(i, n)| (i, format!("aux.{n}"))));
        names
    }

    /// Writes the checkpoint. On a rank of a data-parallel group every rank must call
    /// it: the pool is saved as global batches, gathered from every rank's rows; rank 0
    /// alone writes.
    pub fn save_checkpoint(&self, ckpt: &CheckpointDir) -> Result<()> {
        let pool = match &self.group {
            Some(g) => self.pool.iter().map(|shard| g.all_gather(shard)).collect::<Result<Vec<_>>>()?,
            None => self.pool.clone(),
        };
        if self.rank() != 0 {
            return Ok(());
        }
        let state = State { iteration: self.iteration, rng: self.rng.state() };
        ckpt.save(&state, |dir| {
            save_model(self.student, dir.join("student.safetensors"))?;
            save_model(&self.aux, dir.join("aux.safetensors"))?;
            let s_state = self.opt_s.state_tensors(&self.student_side_names())?;
            save_tensors(dir.join("optim_student.safetensors"), &s_state.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>())?;
            if let (Some(g), Some(opt)) = (&self.generator, &self.opt_g) {
                save_model(g, dir.join("generator.safetensors"))?;
                let g_state = opt.state_tensors(&Self::optimizer_names(g))?;
                save_tensors(dir.join("optim_generator.safetensors"), &g_state.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>())?;
            }
            let pool: Vec<(String, &Tensor)> = pool.iter().enumerate().map(|(i, t)| (format!("{i}"), t)).collect();
            save_tensors(dir.join("pool.safetensors"), &pool)
        })
    }

    /// Restores the state `save_checkpoint` wrote: models, optimisers, RNG, iteration,
    /// and the pool (on a rank, its rows of each global batch: the number of ranks may
    /// differ from the run that wrote it).
    pub fn resume(&mut self, ckpt: &CheckpointDir) -> Result<()> {
        let (state, dir): (State, _) = ckpt.load()?;
        load_model(self.student, dir.join("student.safetensors"))?;
        load_model(&self.aux, dir.join("aux.safetensors"))?;
        let as_map = |p: std::path::PathBuf| -> Result<HashMap<String, Tensor>> { Ok(load_tensors(p)?.into_iter().collect()) };
        let names = self.student_side_names();
        self.opt_s.load_state_tensors(&names, &as_map(dir.join("optim_student.safetensors"))?)?;
        if let (Some(g), Some(opt)) = (&self.generator, &mut self.opt_g) {
            load_model(g, dir.join("generator.safetensors"))?;
            opt.load_state_tensors(&Self::optimizer_names(g), &as_map(dir.join("optim_generator.safetensors"))?)?;
        }
        let mut pool: Vec<(usize, Tensor)> =
            load_tensors(dir.join("pool.safetensors"))?.into_iter().filter_map(|(n, t)| n.parse().ok().map(|i| (i, t))).collect();
        pool.sort_by_key(|(i, _)| *i);
        let (rank, world) = self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
        let shard = |t: Tensor| -> Result<Tensor> {
            let n = t.dims().first().copied().unwrap_or(0);
            match world {
                1 => Ok(t),
                _ if !n.is_multiple_of(world) => bail!("the checkpoint's pooled batches have {n} images, which {world} ranks cannot share evenly"),
                _ => t.narrow(0, rank * n / world, n / world)?.contiguous(),
            }
        };
        // checkpoints load on the host; the student trains on the pool where it runs
        self.pool = pool.into_iter().map(|(_, t)| shard(t)?.to_device(self.device)).collect::<Result<_>>()?;
        self.iteration = state.iteration;
        self.rng = Rng::from_state(state.rng);
        Ok(())
    }
}

/// Entropy (nats) of the teacher's batch-mean prediction on synthetic images: log(K)
/// when the generator covers every class evenly, near 0 when it has collapsed to one.
fn class_entropy(t_logits: &Tensor) -> Result<f32> {
    let p = no_grad(|| t_logits.softmax(1)?.mean(&[0], false))?.to_vec_f32()?;
    Ok(-p.iter().filter(|&&q| q > 0.0).map(|&q| q * q.ln()).sum::<f32>())
}

fn check_finite(parts: &Losses, phase: &str, iteration: usize) -> Result<()> {
    for (name, v) in parts {
        if !v.is_finite() {
            bail!("{phase} step of iteration {iteration}: loss `{name}` is {v}; stopping (the last checkpoint is kept)");
        }
    }
    Ok(())
}

#[derive(Default)]
struct Accumulator {
    sums: Vec<(&'static str, f64)>,
    count: usize,
}

impl Accumulator {
    fn add(&mut self, parts: &Losses) {
        for &(name, v) in parts {
            match self.sums.iter_mut().find(|(n, _)| *n == name) {
                Some(e) => e.1 += v as f64,
                None => self.sums.push((name, v as f64)),
            }
        }
        self.count += 1;
    }
    fn mean(&self) -> Losses { self.sums.iter().map(|&(n, s)| (n, (s / self.count.max(1) as f64) as f32)).collect() }
}

/// Runs the loop to the configured length, with checkpoints, image grids, evaluations
/// and metrics, resuming from `run_dir`'s checkpoint when `resume`. In a data-parallel
/// run every rank calls it and only rank 0 is given the `log`: the others train and
/// take part in the checkpoints (rank 0 writes them).
pub fn run(
    distiller: &mut Distiller,
    run_dir: &Path,
    resume: bool,
    mut log: Option<&mut MetricsLog>,
    mut evaluate: impl FnMut(&dyn Classifier) -> Result<f32>,
) -> Result<()> {
    let ckpt = CheckpointDir::new(run_dir);
    if resume {
        distiller.resume(&ckpt)?;
        eprintln!("resumed from iteration {}", distiller.iteration());
    }
    let d = distiller.cfg.distill.clone();
    let total = distiller.total_iterations();
    let bar = log.is_some().then(|| Progress::new("distill", total as u64));
    if let Some(bar) = &bar {
        bar.set_position(distiller.iteration() as u64);
        std::fs::create_dir_all(run_dir.join("images")).map_err(|e| crate::Error::io(run_dir, e))?;
    }
    while distiller.iteration() < total {
        let (g, s) = distiller.iterate()?;
        let it = distiller.iteration();
        let checkpoint = it.is_multiple_of(d.checkpoint_every) || it == total;
        if let (Some(log), Some(bar)) = (log.as_deref_mut(), &bar) {
            let mut record = json!({"phase": "distill", "iteration": it, "epoch": it as f32 / d.iterations_per_epoch as f32,
                                    "lr": distiller.opt_s.lr()});
            for (n, v) in g.iter().chain(&s) {
                record[*n] = json!(v);
            }
            let epoch_done = it.is_multiple_of(d.iterations_per_epoch);
            let epoch = it / d.iterations_per_epoch;
            if epoch_done && d.eval_every > 0 && (epoch.is_multiple_of(d.eval_every) || it == total) {
                let acc = evaluate(distiller.student)?;
                record["student_top1"] = json!(acc);
            }
            log.write(&record)?;
            let kd = s.iter().find(|(n, _)| *n == "s_kd").map(|p| p.1).unwrap_or(f32::NAN);
            bar.step(&format!("kd {kd:.3}"));
            if checkpoint {
                distiller.save_samples(&run_dir.join("images").join(format!("iter{it:06}.png")))?;
            }
        }
        if checkpoint {
            // after the grid, whose noise the saved RNG state has drawn; on every rank,
            // which gathers its rows of the pool for rank 0 to write
            distiller.save_checkpoint(&ckpt)?;
        }
    }
    if let Some(bar) = bar {
        bar.finish(&format!("{} iterations", total));
    }
    Ok(())
}
