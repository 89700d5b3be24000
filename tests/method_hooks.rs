//! A method outside `Method`, through `Distiller::with_method`, with the hooks the six
//! listed methods leave at their defaults, as MAD and CMI need them: an EMA copy of the
//! generator (`own_modules`, followed in `after_generator_step`, sampled in
//! `student_batch`), a module trained with the generator (`generator_side`), and state
//! of its own (`save` / `restore`). Each is trained, checkpointed and restored exactly.

mod common;

use dfkd::models::{build, Features};
use dfkd::nn::{Ctx, Linear, Module};
use dfkd::pipeline::checkpoint_dir::CheckpointDir;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::pipeline::generator::Generator;
use dfkd::pipeline::loop_state::{Loop, Losses, SynthBatch};
use dfkd::pipeline::losses;
use dfkd::pipeline::methods::{DistillMethod, Setup, Synthesis};
use dfkd::rng::Rng;
use dfkd::{no_grad, Device, Gradients, Result, Tensor};
use std::path::Path;

/// The EMA copy's momentum per generator step (MAD's).
const MOMENTUM: f32 = 0.9;

struct Momentum {
    ema: Generator,
    head: Linear,
    /// Generator steps taken: state of the method's own, reported as a loss part.
    steps: u64,
}

impl Momentum {
    /// `seed` draws the head (and the EMA copy before it takes the live generator's weights).
    fn build(setup: &mut Setup, seed: u64) -> Result<Box<dyn DistillMethod>> {
        let cfg = setup.cfg;
        let mut rng = Rng::new(seed);
        let ema = Generator::new(&cfg.generator, cfg.data.image_size, setup.teacher.num_classes(), cfg.distill.fused_attention, &mut rng)?;
        for ((_, e, _), (_, g, _)) in ema.named_tensors().into_iter().zip(setup.generator.expect("a generator").named_tensors()) {
            e.assign(&g)?;
        }
        Ok(Box::new(Momentum { ema, head: Linear::new(4, 2, true, &mut rng)?, steps: 0 }))
    }
}

impl DistillMethod for Momentum {
    fn generator_side(&self) -> &dyn Module {
        &self.head
    }

    fn own_modules(&self) -> Vec<(&'static str, &dyn Module)> {
        vec![("generator_ema", &self.ema)]
    }

    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("momentum.txt"), self.steps.to_string()).map_err(|e| dfkd::Error::io(dir, e))
    }

    fn restore(&mut self, dir: &Path, _lp: &Loop) -> Result<()> {
        let text = std::fs::read_to_string(dir.join("momentum.txt")).map_err(|e| dfkd::Error::io(dir, e))?;
        self.steps = text.parse().expect("a step count");
        Ok(())
    }

    fn generator_loss(&mut self, lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let d = &lp.cfg.distill;
        let (loss, mut parts) = losses::bn_minus_kd(&b.teacher, &b.student, d.alpha, d.tau_gen)?;
        let head = self.head.weight.sqr()?.sum_all()?;
        parts.extend([("g_head", head.to_scalar()?), ("g_steps", self.steps as f32)]);
        Ok((loss.add(&head.scale(0.01)?)?, parts))
    }

    fn after_generator_step(&mut self, lp: &Loop, _grads: &Gradients) -> Result<()> {
        self.steps += 1;
        let live = lp.generator.as_ref().expect("a generator").named_parameters();
        no_grad(|| {
            for ((_, e), (_, g)) in self.ema.named_parameters().iter().zip(&live) {
                e.assign(&e.scale(MOMENTUM)?.add(&g.scale(1.0 - MOMENTUM)?)?)?;
            }
            Ok(())
        })
    }

    /// Half the batch from the live generator, half from the EMA copy.
    fn student_batch(&mut self, lp: &mut Loop) -> Result<Tensor> {
        let live = lp.fresh_student_batch()?;
        let half = live.dims()[0] / 2;
        let noise = self.ema.sample_z(half, &mut lp.rng, lp.device)?;
        let past = no_grad(|| self.ema.forward(&noise.z, &mut Ctx::new(true)))?.detach();
        Tensor::cat(&[&live.narrow(0, half, live.dims()[0] - half)?, &past], 0)
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> {
        lp.student_kd(t, s)
    }
}

type Named = Vec<(String, Vec<f32>)>;

fn named(d: &Distiller) -> Named {
    d.named_state().into_iter().map(|(n, t)| (n, t.to_vec_f32().unwrap())).collect()
}

/// The tensors under `prefix`, named without it.
fn under(state: &Named, prefix: &str) -> Named {
    state.iter().filter_map(|(n, v)| Some((n.strip_prefix(prefix)?.to_string(), v.clone()))).collect()
}

fn momentum<'a>(cfg: &'a Config, teacher: &'a dyn dfkd::models::Classifier, student: &'a dyn dfkd::models::Classifier, seed: u64) -> Distiller<'a> {
    Distiller::with_method(cfg, teacher, student, Device::Cpu, Synthesis::Generator, |setup| Momentum::build(setup, seed)).unwrap()
}

#[test]
fn a_method_of_its_own_trains_checkpoints_and_restores_its_modules_and_state() {
    let w = std::env::temp_dir().join(format!("dfkd-method-hooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&w);
    let cfg = common::tiny(&w);
    let teacher = build("resnet8", 10, true, &mut Rng::new(5)).unwrap();
    let student = || build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
    let s1 = student();
    let mut d = momentum(&cfg, teacher.as_ref(), s1.as_ref(), 7);
    let before = named(&d);
    assert_eq!(under(&before, "generator_ema."), under(&before, "generator."), "the EMA copy starts as the live generator");
    assert_eq!(under(&before, "generator_side.").len(), 2, "the head's weight and bias");
    d.iterate().unwrap();
    let after = named(&d);
    assert_ne!(under(&after, "generator_side."), under(&before, "generator_side."), "the generator's optimiser trains the head");
    let ema = under(&after, "generator_ema.");
    assert!(ema != under(&before, "generator_ema.") && ema != under(&after, "generator."), "the EMA copy follows the generator, behind it");

    // a fresh distiller with another head and EMA draw: all comes from the checkpoint
    let ckpt = CheckpointDir::new(&w.join("run"));
    d.save_checkpoint(&ckpt).unwrap();
    let s2 = student();
    let mut r = momentum(&cfg, teacher.as_ref(), s2.as_ref(), 8);
    r.resume(&ckpt).unwrap();
    assert_eq!(named(&r), after);
    // the step count came back too: the next iteration reports the same losses
    let (continued, resumed) = (d.iterate().unwrap(), r.iterate().unwrap());
    assert!(continued.0.iter().any(|&(n, v)| n == "g_steps" && v > 0.0), "{continued:?}");
    assert_eq!(format!("{continued:?}"), format!("{resumed:?}"));
    assert_eq!(named(&r), named(&d));
    std::fs::remove_dir_all(&w).unwrap();
}
