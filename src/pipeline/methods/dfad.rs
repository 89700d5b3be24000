//! DFAD (docs/METHOD.md, "Baselines"): the generator maximises, and the student minimises,
//! the L1 distance of the two networks' logits; no BN term.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::{Result, Tensor};

pub struct Dfad;

impl Recipe for Dfad {
    const SYNTHESIS: Synthesis = Synthesis::Generator;
    fn new(_setup: &mut Setup) -> Result<Self> { Ok(Dfad) }
}

impl DistillMethod for Dfad {
    fn generator_loss(&mut self, _lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let l1 = b.student.logits.l1(&b.teacher.logits)?;
        let parts = vec![("g_l1", l1.to_scalar()?)];
        Ok((l1.neg()?, parts))
    }

    fn student_loss(&self, _lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> {
        let l1 = s.logits.l1(&t.logits)?;
        // reported as `s_kd`, the student's distillation term in every method
        let parts = vec![("s_kd", l1.to_scalar()?)];
        Ok((l1, parts))
    }
}
