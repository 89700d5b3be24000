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
        let (ce, part) = lp.target_ce(b)?;
        parts.push(part);
        Ok((loss.add(&ce)?, parts))
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }
}
