//! DFKD-FGVC (docs/METHOD.md, "Losses and the adversarial loop"): the generator minimises
//! alpha * L_BN - L_KD, plus the optional class terms (`distill.gen_*`); the student
//! minimises L_KD + beta * L_MHAD + gamma * L_SFCL, with MHAD's and SFCL's modules
//! trained beside it (each a config switch: `distill.mhad`, `distill.sfcl`).

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::nn::{join, Module, Slot};
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::pipeline::losses::{self, Mhad, ProjectionHead};
use crate::{Result, Tensor};

/// Everything the student step trains besides the student.
struct Aux {
    mhad: Option<Mhad>,
    head: Option<ProjectionHead>,
}

impl Module for Aux {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        if let Some(m) = &self.mhad {
            m.visit(&join(prefix, "mhad"), f);
        }
        if let Some(h) = &self.head {
            h.visit(&join(prefix, "sfcl_head"), f);
        }
    }
}

pub struct DfkdFgvc {
    aux: Aux,
}

impl Recipe for DfkdFgvc {
    const SYNTHESIS: Synthesis = Synthesis::Generator;

    fn new(setup: &mut Setup) -> Result<Self> {
        let d = &setup.cfg.distill;
        let (tp, sp) = (&setup.probe_teacher, &setup.probe_student);
        let mhad = if d.mhad { Some(Mhad::new(tp, sp, d.mha_order, d.adapter_identity_init, d.mhad_normalize, d.fused_attention, setup.rng)?) } else { None };
        let head = if d.sfcl {
            let head = ProjectionHead::new(tp.penultimate.dims()[1], sp.penultimate.dims()[1], d.proj_hidden, d.proj_dim, d.proj_bn, d.tau_sfcl, d.fused_attention, setup.rng)?;
            Some(head.detach_projection(d.sfcl_detach_projection).global_negatives(setup.cfg.parallel.global_negatives))
        } else {
            None
        };
        Ok(DfkdFgvc { aux: Aux { mhad, head } })
    }
}

impl DistillMethod for DfkdFgvc {
    fn student_side(&self) -> &dyn Module { &self.aux }

    fn generator_loss(&mut self, lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let d = &lp.cfg.distill;
        let (loss, parts) = losses::bn_minus_kd(&b.teacher, &b.student, d.alpha, d.tau_gen)?;
        class_terms(lp, loss, parts, &b.teacher.logits, b.targets.as_deref())
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> {
        let d = &lp.cfg.distill;
        let (mut loss, mut parts) = lp.student_kd(t, s)?;
        if let Some(m) = &self.aux.mhad {
            let l = m.loss(t, s)?;
            parts.push(("s_mhad", l.to_scalar()?));
            loss = loss.add(&l.scale(d.beta)?)?;
        }
        if let Some(h) = &self.aux.head {
            let l = h.loss(t, s)?;
            parts.push(("s_sfcl", l.to_scalar()?));
            loss = loss.add(&l.scale(d.gamma)?)?;
        }
        Ok((loss, parts))
    }
}

/// Adds the configured class terms to the generator loss: the teacher's cross-entropy
/// on the sampled targets, DAFL's one-hot term and its class-balance term. The
/// baselines keep their published losses, so they never get these.
fn class_terms(lp: &Loop, mut loss: Tensor, mut parts: Losses, t_logits: &Tensor, targets: Option<&[u32]>) -> Result<(Tensor, Losses)> {
    let d = &lp.cfg.distill;
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
