//! DeepInversion (ADI; docs/METHOD.md, "Baselines"): no generator. Each iteration optimises
//! a batch of pixels from noise against the teacher's BN statistics and sampled
//! targets, with image priors (total variation, l2) and the Jensen-Shannon competition
//! term against the student, then keeps it in an image pool the student distils on.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::nn::Ctx;
use crate::optim::{Optimizer, ParamGroup};
use crate::pipeline::config::Config;
use crate::pipeline::loop_state::{check_finite, Accumulator, Losses, Loop};
use crate::pipeline::losses;
use crate::{Result, Tensor};


pub struct DeepInversion;

impl Recipe for DeepInversion {
    const SYNTHESIS: Synthesis = Synthesis::Pixels;
    fn new(_setup: &mut Setup) -> Result<Self> { Ok(DeepInversion) }
}

impl DistillMethod for DeepInversion {
    fn pool_capacity(&self, cfg: &Config) -> usize { super::kept_pool_batches(cfg) }

    /// `2 * distill.g_steps` Adam steps on a fresh batch of pixels. On a rank, its share
    /// of the batch: the BN term is the global batch's, and each rank's pixels get their
    /// gradient of the global batch's loss.
    fn synthesize(&mut self, lp: &mut Loop) -> Result<Losses> {
        let cfg = lp.cfg;
        let d = &cfg.distill;
        let (n, s, k) = (lp.local_batch, cfg.data.image_size, lp.teacher.num_classes());
        let x = Tensor::randn(&[n, 3, s, s], 0.0, 1.0, &mut lp.rng, lp.device)?.to_var()?;
        let targets: Vec<u32> = (0..n).map(|_| lp.rng.below(k) as u32).collect();
        let mut opt = Optimizer::adam(vec![ParamGroup::new(vec![x.clone()], 0.0)], 0.05, 0.5, 0.99);
        let how = self.augment(cfg);
        lp.student.freeze(true)?;
        let mut acc = Accumulator::default();
        for _ in 0..2 * d.g_steps {
            let xa = lp.augment(&x, how)?;
            let t = lp.teacher.forward(&xa, false)?;
            let st = lp.student.forward_ctx(&xa, &mut Ctx::new(false))?;
            let (bn, ce) = (losses::bn_loss(&t)?, t.logits.cross_entropy(&targets, 0.0)?);
            let (tv, l2) = (losses::total_variation(&x)?, x.sqr()?.mean_all()?);
            let js = losses::js_divergence(&t.logits, &st.logits)?;
            let mut loss = bn.scale(d.alpha)?.add(&ce)?.add(&tv.scale(0.05)?)?.add(&l2.scale(1e-4)?)?.sub(&js)?;
            if lp.world() > 1 {
                // the global loss is the mean of the ranks' (each a mean over its share,
                // the BN term's backward summed over the ranks): 1/N of this rank's
                loss = loss.scale(1.0 / lp.world() as f32)?;
            }
            let parts = vec![("g_bn", bn.to_scalar()?), ("g_ce", ce.to_scalar()?), ("g_js", js.to_scalar()?)];
            check_finite(&parts, "deepinversion", lp.iteration)?;
            opt.step(&loss.backward()?)?;
            acc.add(&parts);
        }
        lp.student.freeze(false)?;
        lp.remember(x.detach(), self.pool_capacity(cfg));
        Ok(acc.mean())
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }

    /// The batch inverted last.
    fn samples(&mut self, lp: &mut Loop) -> Result<Option<Tensor>> { Ok(lp.last_pooled().cloned()) }
}
