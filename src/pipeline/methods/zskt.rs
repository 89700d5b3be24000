//! ZSKT (docs/METHOD.md, "Baselines"): the generator maximises the KL between the two
//! networks; the student minimises it plus 250 x the attention transfer between
//! matching stages (Zagoruyko and Komodakis' weight).

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::pipeline::losses;
use crate::{Result, Tensor};

/// The weight of the attention-transfer term in the student's loss.
const AT_WEIGHT: f32 = 250.0;

pub struct Zskt;

impl Recipe for Zskt {
    const SYNTHESIS: Synthesis = Synthesis::Generator;
    fn new(_setup: &mut Setup) -> Result<Self> { Ok(Zskt) }
}

impl DistillMethod for Zskt {
    fn generator_loss(&mut self, lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let kd = b.student.logits.kd_loss(&b.teacher.logits, lp.cfg.distill.tau_gen)?;
        let parts = vec![("g_kd", kd.to_scalar()?)];
        Ok((kd.neg()?, parts))
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> {
        let (loss, mut parts) = lp.student_kd(t, s)?;
        let at = losses::attention_transfer(t, s)?;
        parts.push(("s_at", at.to_scalar()?));
        Ok((loss.add(&at.scale(AT_WEIGHT)?)?, parts))
    }
}
