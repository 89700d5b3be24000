//! MAD, momentum adversarial distillation (Do et al., NeurIPS 2022; docs/METHOD.md,
//! "Baselines"): the adversarial game of DFQ (the generator minimises alpha * L_BN -
//! L_KD) plus an exponential moving average of the generator. The live generator chases
//! whatever the student gets wrong now; the average moves slowly, so its images carry
//! what the student learned before, and part of every student batch comes from it to
//! keep the student from forgetting as the live generator drifts.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::nn::ema::{copy_state, ema_update};
use crate::nn::{Ctx, Module};
use crate::pipeline::generator::Generator;
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::pipeline::losses;
use crate::{bail, no_grad, Gradients, Result, Tensor};
use serde::{Deserialize, Serialize};

/// `[distill.mad]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MadConfig {
    /// The average's momentum per generator step: `ema <- m * ema + (1 - m) * live`
    /// (the paper: about 0.9).
    pub momentum: f32,
    /// The share of each student batch drawn from the average (the rest from the live
    /// generator).
    pub ema_share: f32,
}

impl Default for MadConfig {
    fn default() -> Self { MadConfig { momentum: 0.9, ema_share: 0.5 } }
}

pub struct Mad {
    /// The moving average of the loop's generator (same architecture).
    ema: Generator,
}

impl Recipe for Mad {
    const SYNTHESIS: Synthesis = Synthesis::Generator;

    fn new(setup: &mut Setup) -> Result<Self> {
        let cfg = setup.cfg;
        let Some(live) = setup.generator else { bail!("mad: the loop built no generator") };
        let ema = Generator::new(&cfg.generator, cfg.data.image_size, setup.teacher.num_classes(), cfg.distill.fused_attention, setup.rng)?;
        // the average starts as the live generator
        copy_state(&ema, live)?;
        Ok(Mad { ema })
    }
}

impl DistillMethod for Mad {
    fn own_modules(&self) -> Vec<(&'static str, &dyn Module)> { vec![("generator_ema", &self.ema)] }

    fn generator_loss(&mut self, lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let d = &lp.cfg.distill;
        losses::bn_minus_kd(&b.teacher, &b.student, d.alpha, d.tau_gen)
    }

    fn after_generator_step(&mut self, lp: &Loop, _grads: &Gradients) -> Result<()> {
        ema_update(&self.ema, lp.generator.as_ref().expect("mad has a generator"), lp.cfg.distill.mad.momentum)
    }

    /// The live generator's images, then the average's (`ema_share` of the batch), each
    /// from fresh noise, detached.
    fn student_batch(&mut self, lp: &mut Loop) -> Result<Tensor> {
        let n = lp.local_batch;
        let from_ema = ((n as f32 * lp.cfg.distill.mad.ema_share).round() as usize).min(n);
        // `k` images of `g` from fresh noise, none when `k` is 0
        let device = lp.device;
        let draw = |g: &Generator, k: usize, rng: &mut crate::rng::Rng| -> Result<Option<Tensor>> {
            if k == 0 {
                return Ok(None);
            }
            let z = g.sample_z(k, rng, device)?;
            Ok(Some(no_grad(|| g.forward(&z.z, &mut Ctx::new(true)))?))
        };
        let live = draw(lp.generator.as_ref().expect("mad has a generator"), n - from_ema, &mut lp.rng)?;
        let past = draw(&self.ema, from_ema, &mut lp.rng)?;
        let parts: Vec<&Tensor> = live.iter().chain(past.iter()).collect();
        Ok(Tensor::cat(&parts, 0)?.detach())
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }
}
