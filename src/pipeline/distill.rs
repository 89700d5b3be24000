//! The data-free distillation loop (docs/METHOD.md, "Losses and the adversarial loop"):
//! each iteration runs a synthesis phase (generator steps against the frozen teacher
//! and student, or pixels optimised directly), then `s_steps` student steps on
//! synthetic batches. What each phase computes is the method's (`methods`); the loop
//! holds the state they share (`loop_state::Loop`), the ranks of a data-parallel run,
//! and the checkpoints.

use super::checkpoint_dir::CheckpointDir;
use super::config::Config;
use super::generator::Generator;
use super::loop_state::{Loop, Losses};
use super::methods::{DistillMethod, Setup, Synthesis};
use super::progress::Progress;
use super::report::{save_image_grid, MetricsLog};
use crate::checkpoint::{load_model, load_tensors, save_model, save_tensors};
use crate::models::{Classifier, Features};
use crate::nn::Module;
use crate::optim::{CosineSchedule, Optimizer, ParamGroup};
use crate::parallel;
use crate::{bail, no_grad, Device, Result, Tensor, TensorId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

#[derive(Serialize, Deserialize)]
struct State {
    iteration: usize,
    rng: [u64; 4],
}

pub struct Distiller<'a> {
    lp: Loop<'a>,
    method: Box<dyn DistillMethod>,
}

impl<'a> Distiller<'a> {
    /// Built on a rank's thread of a data-parallel group (`parallel::run_ranks`), the
    /// distiller is that rank's: it synthesises its share of each batch, averages
    /// gradients with the other ranks, and starts from rank 0's weights.
    pub fn new(cfg: &'a Config, teacher: &'a dyn Classifier, student: &'a dyn Classifier, device: Device) -> Result<Self> {
        let method = cfg.distill.method;
        Self::with_method(cfg, teacher, student, device, method.synthesis(), |setup| method.build(setup))
    }

    /// A distiller for a method built by `make` (which synthesises as `synthesis` says)
    /// instead of the configured one: a method of one's own, outside `Method`.
    pub fn with_method(
        cfg: &'a Config,
        teacher: &'a dyn Classifier,
        student: &'a dyn Classifier,
        device: Device,
        synthesis: Synthesis,
        make: impl FnOnce(&mut Setup) -> Result<Box<dyn DistillMethod>>,
    ) -> Result<Self> {
        let d = &cfg.distill;
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
        let generator = match synthesis {
            Synthesis::Generator => Some(Generator::new(&cfg.generator, cfg.data.image_size, teacher.num_classes(), d.fused_attention, &mut rng)?),
            Synthesis::Pixels => None,
        };
        if let Some(g) = &generator {
            g.to_device(device)?;
        }
        // a small probe batch decides how MHAD pairs the two networks' features; drawn
        // for every method, so that what follows in the stream does not depend on it
        let probe = Tensor::randn(&[2, 3, cfg.data.image_size, cfg.data.image_size], 0.0, 1.0, &mut rng, device)?;
        let (tp, sp) = no_grad(|| -> Result<(Features, Features)> { Ok((teacher.forward(&probe, false)?, student.forward(&probe, false)?)) })?;
        let mut setup = Setup { cfg, teacher, student, generator: generator.as_ref(), probe_teacher: tp, probe_student: sp, rng: &mut rng, device };
        let method = make(&mut setup)?;
        for m in own_modules(method.as_ref()) {
            m.1.to_device(device)?;
        }
        let mut params = student.parameters();
        params.extend(method.student_side().parameters());
        let s = &cfg.student;
        let opt_s = Optimizer::sgd(vec![ParamGroup::new(params, s.weight_decay)], s.lr, s.momentum, false);
        let g = &cfg.generator;
        let opt_g = generator.as_ref().map(|gen| {
            let mut params = gen.parameters();
            params.extend(method.generator_side().parameters());
            Optimizer::adam(vec![ParamGroup::new(params, 0.0)], g.lr, g.beta1, g.beta2)
        });
        let total_iters = d.epochs * d.iterations_per_epoch;
        let schedule = CosineSchedule { base: s.lr, min: 0.0, total: total_iters * d.s_steps, warmup: 0 };
        if let Some(g) = &group {
            // built from the same seeds, the ranks already agree; this makes sure of it
            parallel::broadcast_module(student, g)?;
            for (_, m) in own_modules(method.as_ref()) {
                parallel::broadcast_module(m, g)?;
            }
            if let Some(gen) = &generator {
                parallel::broadcast_module(gen, g)?;
            }
        }
        let local_batch = d.batch_size / world;
        let lp =
            Loop { cfg, teacher, student, generator, opt_s, opt_g, schedule, rng, shared_rng: None, iteration: 0, pool: vec![], device, group, local_batch };
        Ok(Distiller { lp, method })
    }

    /// This rank in a data-parallel run (0 alone): rank 0 writes logs and checkpoints.
    pub fn rank(&self) -> usize {
        self.lp.group.as_ref().map_or(0, |g| g.rank())
    }

    pub fn total_iterations(&self) -> usize {
        self.lp.cfg.distill.epochs * self.lp.cfg.distill.iterations_per_epoch
    }
    pub fn iteration(&self) -> usize {
        self.lp.iteration
    }

    /// One iteration: the synthesis phase, then the student phase. Returns the mean of
    /// each loss over the iteration's steps.
    pub fn iterate(&mut self) -> Result<(Losses, Losses)> {
        let lp = &mut self.lp;
        if let Some(g) = &lp.group {
            // each rank draws its own noise; tied to the iteration, so a resumed run
            // (with any number of ranks) needs no saved per-rank state
            let streams = lp.cfg.distill_rng(0xd15711);
            lp.rng = streams.fork(1 + g.rank() as u64).fork(lp.iteration as u64);
            // and the draws that keep the ranks' pool shards aligned come from one stream
            lp.shared_rng = Some(streams.fork(0).fork(lp.iteration as u64));
        }
        let g_losses = self.method.synthesize(lp)?;
        let s_losses = lp.student_steps(self.method.as_mut())?;
        if let (Some(g), false) = (&lp.group, lp.cfg.parallel.sync_batch_norm) {
            // each rank's BatchNorm statistics came from its own share: rank 0's are kept
            parallel::broadcast_buffers(lp.student, g)?;
            for (_, m) in own_modules(self.method.as_ref()) {
                parallel::broadcast_buffers(m, g)?;
            }
            if let Some(gen) = &lp.generator {
                parallel::broadcast_buffers(gen, g)?;
            }
        }
        lp.iteration += 1;
        Ok((lp.synced_losses(g_losses)?, lp.synced_losses(s_losses)?))
    }

    /// The gradients one generator step applies for noise `z` (this rank's share),
    /// averaged over the ranks, by parameter name: how the data-parallel steps are
    /// checked against one process.
    pub fn generator_step_gradients(&mut self, z: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let lp = &mut self.lp;
        let (Some(g), Some(_)) = (&lp.generator, &lp.opt_g) else { bail!("{} optimises pixels: it has no generator step", lp.cfg.distill.method) };
        let names = generator_side_names(g, self.method.as_ref());
        lp.student.freeze(true)?;
        let grads =
            lp.generator_loss(self.method.as_mut(), z, None).and_then(|(loss, _, _)| lp.backward_synced(&loss, lp.opt_g.as_ref().expect("checked above")));
        lp.student.freeze(false)?;
        let grads = grads?;
        let opt_g = lp.opt_g.as_ref().expect("checked above");
        Ok(opt_g.params().filter_map(|p| Some((names.get(&p.id())?.clone(), grads.get(p)?.clone()))).collect())
    }

    /// The gradients one student step applies for images `x` (this rank's share),
    /// averaged over the ranks, by name (`student.*`, `aux.*`).
    pub fn student_step_gradients(&mut self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let lp = &mut self.lp;
        let (loss, _) = lp.student_loss(self.method.as_ref(), x)?;
        let grads = lp.backward_synced(&loss, &lp.opt_s)?;
        let names = student_side_names(lp.student, self.method.as_ref());
        Ok(lp.opt_s.params().filter_map(|p| Some((names.get(&p.id())?.clone(), grads.get(p)?.clone()))).collect())
    }

    /// Every trained weight and buffer by name: the student, the method's modules and
    /// the generator (for checking that data-parallel ranks agree).
    pub fn named_state(&self) -> Vec<(String, Tensor)> {
        let prefixed =
            |prefix: &str, m: &dyn Module| -> Vec<(String, Tensor)> { m.named_tensors().into_iter().map(|(n, t, _)| (format!("{prefix}.{n}"), t)).collect() };
        let mut out = prefixed("student", self.lp.student);
        for (name, m) in own_modules(self.method.as_ref()) {
            out.extend(prefixed(name, m));
        }
        if let Some(g) = &self.lp.generator {
            out.extend(prefixed("generator", g));
        }
        out
    }

    /// This rank's rows of each pooled batch (alone, the batches), in pool order.
    pub fn pool_shard(&self) -> &[Tensor] {
        &self.lp.pool
    }

    /// A grid of freshly synthesised images (or the method's latest batch): on a rank,
    /// its own share (rank 0 writes the grids).
    pub fn save_samples(&mut self, path: &Path) -> Result<()> {
        let Some(x) = no_grad(|| self.method.samples(&mut self.lp))? else { return Ok(()) };
        let n = x.dims()[0].min(64);
        save_image_grid(&x.narrow(0, 0, n)?, 8, path)
    }

    /// Writes the checkpoint. On a rank of a data-parallel group every rank must call
    /// it: the pool is saved as global batches, gathered from every rank's rows; rank 0
    /// alone writes.
    pub fn save_checkpoint(&self, ckpt: &CheckpointDir) -> Result<()> {
        let lp = &self.lp;
        let pool = match &lp.group {
            Some(g) => lp.pool.iter().map(|shard| g.all_gather(shard)).collect::<Result<Vec<_>>>()?,
            None => lp.pool.clone(),
        };
        if self.rank() != 0 {
            return Ok(());
        }
        let method = self.method.as_ref();
        let state = State { iteration: lp.iteration, rng: lp.rng.state() };
        ckpt.save(&state, |dir| {
            save_model(lp.student, dir.join("student.safetensors"))?;
            for (name, m) in own_modules(method) {
                save_model(m, dir.join(format!("{name}.safetensors")))?;
            }
            let s_state = lp.opt_s.state_tensors(&student_side_names(lp.student, method))?;
            save_tensors(dir.join("optim_student.safetensors"), &s_state.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>())?;
            if let (Some(g), Some(opt)) = (&lp.generator, &lp.opt_g) {
                save_model(g, dir.join("generator.safetensors"))?;
                let g_state = opt.state_tensors(&generator_side_names(g, method))?;
                save_tensors(dir.join("optim_generator.safetensors"), &g_state.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>())?;
            }
            let pool: Vec<(String, &Tensor)> = pool.iter().enumerate().map(|(i, t)| (format!("{i}"), t)).collect();
            save_tensors(dir.join("pool.safetensors"), &pool)?;
            method.save(dir)
        })
    }

    /// Restores the state `save_checkpoint` wrote: models, optimisers, RNG, iteration,
    /// and the pool (on a rank, its rows of each global batch: the number of ranks may
    /// differ from the run that wrote it).
    pub fn resume(&mut self, ckpt: &CheckpointDir) -> Result<()> {
        let (state, dir): (State, _) = ckpt.load()?;
        let lp = &mut self.lp;
        let method = self.method.as_ref();
        load_model(lp.student, dir.join("student.safetensors"))?;
        for (name, m) in own_modules(method) {
            load_model(m, dir.join(format!("{name}.safetensors")))?;
        }
        let as_map = |p: std::path::PathBuf| -> Result<HashMap<String, Tensor>> { Ok(load_tensors(p)?.into_iter().collect()) };
        lp.opt_s.load_state_tensors(&student_side_names(lp.student, method), &as_map(dir.join("optim_student.safetensors"))?)?;
        if let (Some(g), Some(opt)) = (&lp.generator, &mut lp.opt_g) {
            load_model(g, dir.join("generator.safetensors"))?;
            opt.load_state_tensors(&generator_side_names(g, method), &as_map(dir.join("optim_generator.safetensors"))?)?;
        }
        let mut pool: Vec<(usize, Tensor)> =
            load_tensors(dir.join("pool.safetensors"))?.into_iter().filter_map(|(n, t)| n.parse().ok().map(|i| (i, t))).collect();
        pool.sort_by_key(|(i, _)| *i);
        let (rank, world) = lp.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
        let shard = |t: Tensor| -> Result<Tensor> {
            let n = t.dims().first().copied().unwrap_or(0);
            match world {
                1 => Ok(t),
                _ if !n.is_multiple_of(world) => bail!("the checkpoint's pooled batches have {n} images, which {world} ranks cannot share evenly"),
                _ => t.narrow(0, rank * n / world, n / world)?.contiguous(),
            }
        };
        // checkpoints load on the host; the student trains on the pool where it runs
        lp.pool = pool.into_iter().map(|(_, t)| shard(t)?.to_device(lp.device)).collect::<Result<_>>()?;
        lp.iteration = state.iteration;
        lp.rng = crate::rng::Rng::from_state(state.rng);
        self.method.restore(&dir, &self.lp)
    }
}

/// The method's modules besides the student and the generator, by the name they go
/// by in checkpoints and `named_state`: those its optimisers train (`aux` with the
/// student, `generator_side` with the generator), then its own.
fn own_modules(method: &dyn DistillMethod) -> Vec<(&'static str, &dyn Module)> {
    let mut out: Vec<(&'static str, &dyn Module)> = vec![("aux", method.student_side())];
    if method.generator_side().num_parameters() > 0 {
        out.push(("generator_side", method.generator_side()));
    }
    out.extend(method.own_modules());
    out
}

fn parameter_names(module: &dyn Module, prefix: &str) -> HashMap<TensorId, String> {
    module.named_parameters().into_iter().map(|(n, t)| (t.id(), format!("{prefix}{n}"))).collect()
}

/// Names of everything the student optimiser updates: `student.*` and `aux.*`.
fn student_side_names(student: &dyn Classifier, method: &dyn DistillMethod) -> HashMap<TensorId, String> {
    let mut names = parameter_names(student, "student.");
    names.extend(parameter_names(method.student_side(), "aux."));
    names
}

/// Names of everything the generator optimiser updates: the generator's own (as
/// checkpoints have always named them) and `generator_side.*`.
fn generator_side_names(generator: &Generator, method: &dyn DistillMethod) -> HashMap<TensorId, String> {
    let mut names = parameter_names(generator, "");
    names.extend(parameter_names(method.generator_side(), "generator_side."));
    names
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
    let d = distiller.lp.cfg.distill.clone();
    let total = distiller.total_iterations();
    let bar = log.is_some().then(|| Progress::new("distill", total as u64));
    if let Some(bar) = &bar {
        bar.set_position(distiller.iteration() as u64);
        std::fs::create_dir_all(run_dir.join("images")).map_err(|e| crate::Error::io(run_dir, e))?;
    }
    while distiller.iteration() < total {
        let (g, s) = distiller.iterate()?;
        let it = distiller.iteration();
        if crate::failpoint::hit(&format!("rank{}-iteration", distiller.rank())) {
            // the multi-process tests' failing rank (tests/mpi.rs): an error, as a lost GPU gives
            bail!("failpoint: rank {} fails after iteration {it}", distiller.rank());
        }
        let checkpoint = it.is_multiple_of(d.checkpoint_every) || it == total;
        if let (Some(log), Some(bar)) = (log.as_deref_mut(), &bar) {
            let mut record = json!({"phase": "distill", "iteration": it, "epoch": it as f32 / d.iterations_per_epoch as f32,
                                    "lr": distiller.lp.opt_s.lr()});
            for (n, v) in g.iter().chain(&s) {
                record[*n] = json!(v);
            }
            let epoch_done = it.is_multiple_of(d.iterations_per_epoch);
            let epoch = it / d.iterations_per_epoch;
            if epoch_done && d.eval_every > 0 && (epoch.is_multiple_of(d.eval_every) || it == total) {
                let acc = evaluate(distiller.lp.student)?;
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
