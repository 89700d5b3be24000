//! DFQ (docs/METHOD.md, "Baselines"): the generator minimises alpha * L_BN - L_KD (as
//! DFKD-FGVC's) plus the teacher's cross-entropy on sampled targets; the student
//! distils with KD on fresh images.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::pipeline::losses;
use crate::{Result, Tensor};

pub struct Dfq;

impl Recipe for Dfq {
    const SYNTHESIS: Synthesis = Synthesis::Generator;
    fn new(_setup: &mut Setup) -> Result<Self> { Ok(Dfq) }
}

impl DistillMethod for Dfq {
    fn generator_loss(&mut self, lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let cfg = lp.cfg;
        let (loss, mut parts) = losses::bn_minus_kd(&b.teacher, &b.student, cfg.distill.alpha, cfg.distill.tau_gen)?;
        // the conditional generator's own targets; an unconditional one cannot aim at a
        // class, so its CE (on random targets) cannot fall
        let k = b.teacher.logits.dims()[1];
        let targets = match &b.targets {
            Some(y) => y.clone(),
            None => (0..b.images.dims()[0]).map(|_| lp.rng.below(k) as u32).collect(),
        };
        let ce = b.teacher.logits.cross_entropy(&targets, 0.0)?;
        parts.push(("g_ce", ce.to_scalar()?));
        Ok((loss.add(&ce)?, parts))
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }
}
