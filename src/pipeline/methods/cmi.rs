//! CMI, contrastive model inversion (Fang et al., IJCAI 2021; docs/METHOD.md,
//! "Baselines"): a generator optimised with DFQ's terms (alpha * L_BN - L_KD, and the
//! teacher's cross-entropy on sampled targets) plus a contrastive instance-
//! discrimination loss: each synthesised image, seen through two augmentations, must
//! recognise its other view among the batch's and a memory bank of earlier samples'
//! embeddings, so new images differ from each other and from what came before. The
//! synthesised batches go into an image pool, and the student distils on batches drawn
//! from all of it.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::Features;
use crate::nn::{join, Ctx, Linear, Module, Slot};
use crate::pipeline::augment::random_shift_flip;
use crate::pipeline::config::Config;
use crate::pipeline::loop_state::{Losses, Loop, SynthBatch};
use crate::pipeline::losses;
use crate::rng::Rng;
use crate::{bail, Device, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `[distill.cmi]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CmiConfig {
    /// The contrastive term's weight in the generator's loss (CMI's `cr`: 0.8).
    pub contrast_weight: f32,
    /// Its temperature (CMI's `cr_T`: 0.1).
    pub tau: f32,
    /// Embeddings the memory bank keeps (first in, first out).
    pub bank_size: usize,
    /// The embedding head: hidden width and output dimensions.
    pub head_hidden: usize,
    pub head_dim: usize,
    /// Largest shift of the second view (and a mirror with probability 1/2).
    pub view_shift: usize,
}

impl Default for CmiConfig {
    fn default() -> Self { CmiConfig { contrast_weight: 0.8, tau: 0.1, bank_size: 2048, head_hidden: 256, head_dim: 128, view_shift: 4 } }
}


/// The bank's file in a checkpoint folder.
const BANK_FILE: &str = "cmi_bank.safetensors";

pub struct Cmi {
    head: EmbeddingHead,
    bank: MemoryBank,
}

impl Recipe for Cmi {
    const SYNTHESIS: Synthesis = Synthesis::Generator;

    fn new(setup: &mut Setup) -> Result<Self> {
        let c = &setup.cfg.distill.cmi;
        let head = EmbeddingHead::new(&setup.teacher.stage_channels(), c.head_hidden, c.head_dim, setup.rng)?;
        Ok(Cmi { head, bank: MemoryBank::new(c.head_dim, c.bank_size) })
    }
}

impl DistillMethod for Cmi {
    fn generator_side(&self) -> &dyn Module { &self.head }

    fn pool_capacity(&self, cfg: &Config) -> usize { super::kept_pool_batches(cfg) }

    fn generator_loss(&mut self, lp: &mut Loop, b: &SynthBatch) -> Result<(Tensor, Losses)> {
        let cfg = lp.cfg;
        let c = &cfg.distill.cmi;
        let (mut loss, mut parts) = losses::bn_minus_kd(&b.teacher, &b.student, cfg.distill.alpha, cfg.distill.tau_gen)?;
        let (ce, part) = lp.target_ce(b)?;
        parts.push(part);
        loss = loss.add(&ce)?;
        // the second view of every image, through the frozen teacher and the head
        let view = random_shift_flip(&b.raw, c.view_shift, &mut lp.rng)?;
        let (q, key) = (self.head.embed(&b.teacher)?, self.head.embed(&lp.teacher.forward_ctx(&view, &mut Ctx::new(false))?)?);
        // on a rank, every rank's keys are candidates (the global batch), as one
        // process would have them; this rank's own are at rows rank * n ..
        let (keys, first) = match crate::parallel::current() {
            Some(g) => (crate::parallel::all_gather(&key, &g)?, g.rank() * key.dims()[0]),
            None => (key, 0),
        };
        let bank = self.bank.tensor(lp.device)?;
        let cr = instance_contrast(&q, &keys, first, bank.as_ref(), c.tau)?;
        parts.push(("g_contrast", cr.to_scalar()?));
        parts.push(("g_bank_size", self.bank.len() as f32));
        self.bank.push(&keys.detach())?;
        Ok((loss.add(&cr.scale(c.contrast_weight)?)?, parts))
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }

    fn save(&self, dir: &Path) -> Result<()> {
        match self.bank.tensor(Device::Cpu)? {
            Some(t) => crate::checkpoint::save_tensors(dir.join(BANK_FILE), &[("bank", &t)]),
            None => Ok(()),
        }
    }

    fn restore(&mut self, dir: &Path, _lp: &Loop) -> Result<()> {
        let path = dir.join(BANK_FILE);
        if !path.exists() {
            // saved before the first generator step: the bank was empty
            return Ok(());
        }
        match crate::checkpoint::load_tensors(&path)?.into_iter().find(|(n, _)| n == "bank") {
            Some((_, t)) => self.bank.restore(&t),
            None => bail!("{}: no tensor `bank` (a CMI memory bank)", path.display()),
        }
    }
}

/// Embeds a synthesised batch from the teacher's view of it: every stage's output
/// averaged over its positions, concatenated, then `Linear -> ReLU -> Linear` and
/// L2-normalised. Trained with the generator, which it pushes toward diverse samples.
pub struct EmbeddingHead {
    fc1: Linear,
    fc2: Linear,
}

impl EmbeddingHead {
    /// `stage_channels`: the teacher's `Classifier::stage_channels`.
    pub fn new(stage_channels: &[usize], hidden: usize, out: usize, rng: &mut Rng) -> Result<EmbeddingHead> {
        let d: usize = stage_channels.iter().sum();
        Ok(EmbeddingHead { fc1: Linear::new(d, hidden, true, rng)?, fc2: Linear::new(hidden, out, true, rng)? })
    }

    /// Unit embeddings `[n, out]` of the batch whose teacher features are `t`.
    pub fn embed(&self, t: &Features) -> Result<Tensor> {
        let pooled: Vec<Tensor> = t.stages.iter().map(|f| f.mean(&[2, 3], false)).collect::<Result<_>>()?;
        let x = Tensor::cat(&pooled.iter().collect::<Vec<_>>(), 1)?;
        self.fc2.forward(&self.fc1.forward(&x)?.relu()?)?.l2_normalize(1, 1e-12)
    }
}

impl Module for EmbeddingHead {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.fc1.visit(&join(prefix, "fc1"), f);
        self.fc2.visit(&join(prefix, "fc2"), f);
    }
}

/// Instance discrimination (InfoNCE): sample i's view `q_i` must pick its other view
/// `k_{first + i}` among every row of `k` (the batch's other views) and of `bank`
/// (earlier samples). All rows unit vectors;
/// `-(1/n) sum_i log softmax_j(q_i . key_j / tau)[first + i]`.
pub fn instance_contrast(q: &Tensor, k: &Tensor, first: usize, bank: Option<&Tensor>, tau: f32) -> Result<Tensor> {
    let [n, d] = q.dims2("instance_contrast")?;
    let [m, dk] = k.dims2("instance_contrast")?;
    if dk != d || first + n > m {
        bail!("instance_contrast: views {:?} and keys {:?} (this batch's from row {first}) do not match", q.dims(), k.dims());
    }
    let keys = match bank {
        Some(b) if b.dims()[0] > 0 => {
            if b.dims()[1] != d {
                bail!("instance_contrast: the bank's rows have {} values, the embeddings {d}", b.dims()[1]);
            }
            Tensor::cat(&[k, &b.detach()], 0)?
        }
        _ => k.clone(),
    };
    let logits = q.matmul(&keys.t()?)?.scale(1.0 / tau)?;
    logits.cross_entropy(&(first as u32..(first + n) as u32).collect::<Vec<_>>(), 0.0)
}

/// The embeddings of the latest synthesised samples, first in first out.
pub struct MemoryBank {
    dim: usize,
    capacity: usize,
    /// Oldest first.
    rows: std::collections::VecDeque<Vec<f32>>,
}

impl MemoryBank {
    pub fn new(dim: usize, capacity: usize) -> MemoryBank { MemoryBank { dim, capacity, rows: Default::default() } }

    pub fn len(&self) -> usize { self.rows.len() }
    pub fn is_empty(&self) -> bool { self.rows.is_empty() }

    /// Adds a batch of embeddings `[n, dim]` (detached), dropping the oldest past capacity.
    pub fn push(&mut self, z: &Tensor) -> Result<()> {
        let [_, d] = z.dims2("memory bank")?;
        if d != self.dim {
            bail!("memory bank: embeddings of {d} values, the bank holds {}", self.dim);
        }
        for row in z.to_vec_f32()?.chunks(d) {
            if self.rows.len() == self.capacity {
                self.rows.pop_front();
            }
            self.rows.push_back(row.to_vec());
        }
        Ok(())
    }

    /// The bank as `[len, dim]`, oldest first (`None` while empty): what the loss takes
    /// and what a checkpoint saves.
    pub fn tensor(&self, device: Device) -> Result<Option<Tensor>> {
        if self.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(self.rows.iter().flatten().copied().collect(), &[self.rows.len(), self.dim], device)?))
    }

    /// Restores a bank `tensor` wrote.
    pub fn restore(&mut self, saved: &Tensor) -> Result<()> {
        self.rows.clear();
        self.push(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor { Tensor::from_vec(v.to_vec(), shape, Device::Cpu).unwrap() }

    #[test]
    fn instance_contrast_matches_a_hand_computation() {
        let q = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
        let k = t(&[0.6, 0.8, 0.0, 1.0], &[2, 2]);
        let bank = t(&[-1.0, 0.0], &[1, 2]);
        let tau = 0.5;
        let got = instance_contrast(&q, &k, 0, Some(&bank), tau).unwrap().to_scalar().unwrap() as f64;
        // sample 0: dots with k0, k1, bank = 0.6, 0, -1; sample 1: 0.8, 1, 0
        let nll = |pos: f64, all: &[f64]| -(pos / 0.5) + all.iter().map(|x| (x / 0.5).exp()).sum::<f64>().ln();
        let want = 0.5 * (nll(0.6, &[0.6, 0.0, -1.0]) + nll(1.0, &[0.8, 1.0, 0.0]));
        assert!((got - want).abs() < 1e-5, "got {got}, want {want}");
        // without a bank only the batch's other views are negatives
        let no_bank = instance_contrast(&q, &k, 0, None, tau).unwrap().to_scalar().unwrap() as f64;
        let want = 0.5 * (nll(0.6, &[0.6, 0.0]) + nll(1.0, &[0.8, 1.0]));
        assert!((no_bank - want).abs() < 1e-5);
        // one sample of a rank whose keys start at row 1 of the gathered three
        let keys = t(&[0.6, 0.8, 0.0, 1.0, 1.0, 0.0], &[3, 2]);
        let one = instance_contrast(&q.narrow(0, 1, 1).unwrap(), &keys, 1, None, tau).unwrap().to_scalar().unwrap() as f64;
        assert!((one - nll(1.0, &[0.8, 1.0, 0.0])).abs() < 1e-5);
        assert!(instance_contrast(&q, &keys, 2, None, tau).is_err());
    }

    #[test]
    fn the_bank_keeps_the_latest_rows_and_restores() {
        let mut b = MemoryBank::new(2, 3);
        assert!(b.tensor(Device::Cpu).unwrap().is_none());
        b.push(&t(&[1., 1., 2., 2.], &[2, 2])).unwrap();
        b.push(&t(&[3., 3., 4., 4.], &[2, 2])).unwrap();
        let saved = b.tensor(Device::Cpu).unwrap().unwrap();
        assert_eq!(saved.to_vec_f32().unwrap(), vec![2., 2., 3., 3., 4., 4.]);
        let mut c = MemoryBank::new(2, 3);
        c.restore(&saved).unwrap();
        assert_eq!(c.tensor(Device::Cpu).unwrap().unwrap().to_vec_f32().unwrap(), saved.to_vec_f32().unwrap());
        assert!(b.push(&t(&[1., 2., 3.], &[1, 3])).is_err());
    }

    #[test]
    fn the_head_embeds_pooled_stages_as_unit_vectors() {
        let mut rng = Rng::new(1);
        let head = EmbeddingHead::new(&[2, 3], 8, 4, &mut rng).unwrap();
        let stages = vec![Tensor::randn(&[5, 2, 4, 4], 0.0, 1.0, &mut rng, Device::Cpu).unwrap(), Tensor::randn(&[5, 3, 2, 2], 0.0, 1.0, &mut rng, Device::Cpu).unwrap()];
        let logits = Tensor::zeros(&[5, 10], Device::Cpu).unwrap();
        let f = Features { logits: logits.clone(), stages, penultimate: logits, bn_inputs: vec![], bn_running: vec![] };
        let z = head.embed(&f).unwrap();
        assert_eq!(z.dims(), &[5, 4]);
        for row in z.to_vec_f32().unwrap().chunks(4) {
            assert!((row.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert_eq!(head.named_parameters().len(), 4);
    }
}
