//! Contrastive model inversion's parts (Fang et al., IJCAI 2021; docs/METHOD.md,
//! "Baselines"): an embedding head on the teacher's pooled multi-stage features, a
//! memory bank of earlier synthesised samples' embeddings, and the instance
//! discrimination loss that makes each new sample unlike the others and the bank.

use crate::models::Features;
use crate::nn::{join, Linear, Module, Slot};
use crate::rng::Rng;
use crate::{bail, Device, Result, Tensor};

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
/// `k_i` among every `k_j` of the batch and every row of `bank` (earlier samples). All
/// rows unit vectors; `-(1/n) sum_i log softmax_j(q_i . key_j / tau)[i]`.
pub fn instance_contrast(q: &Tensor, k: &Tensor, bank: Option<&Tensor>, tau: f32) -> Result<Tensor> {
    let [n, d] = q.dims2("instance_contrast")?;
    if k.dims() != [n, d] {
        bail!("instance_contrast: views {:?} and {:?} differ", q.dims(), k.dims());
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
    logits.cross_entropy(&(0..n as u32).collect::<Vec<_>>(), 0.0)
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
        if self.rows.is_empty() {
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
        let got = instance_contrast(&q, &k, Some(&bank), tau).unwrap().to_scalar().unwrap() as f64;
        // sample 0: dots with k0, k1, bank = 0.6, 0, -1; sample 1: 0.8, 1, 0
        let nll = |pos: f64, all: &[f64]| -(pos / 0.5) + all.iter().map(|x| (x / 0.5).exp()).sum::<f64>().ln();
        let want = 0.5 * (nll(0.6, &[0.6, 0.0, -1.0]) + nll(1.0, &[0.8, 1.0, 0.0]));
        assert!((got - want).abs() < 1e-5, "got {got}, want {want}");
        // without a bank only the batch's other views are negatives
        let no_bank = instance_contrast(&q, &k, None, tau).unwrap().to_scalar().unwrap() as f64;
        let want = 0.5 * (nll(0.6, &[0.6, 0.0]) + nll(1.0, &[0.8, 1.0]));
        assert!((no_bank - want).abs() < 1e-5);
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
