//! DAFL (docs/METHOD.md, "Baselines"): the generator minimises one-hot CE on the teacher's
//! own predictions, an activation term and a class-balance term
//! (`losses::dafl_generator_loss`); the student distils with KD on fresh images.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::pipeline::losses;
use crate::{Result, Tensor};

pub struct Dafl;

impl Recipe for Dafl {
    const SYNTHESIS: Synthesis = Synthesis::Generator;
    fn new(_setup: &mut Setup) -> Result<Self> { Ok(Dafl) }
}

impl DistillMethod for Dafl {
    fn generator_loss(&mut self, _lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let l = losses::dafl_generator_loss(&b.teacher)?;
        let parts = vec![("g_dafl", l.to_scalar()?)];
        Ok((l, parts))
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }
}
