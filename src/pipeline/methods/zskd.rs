//! ZSKD, zero-shot knowledge distillation (Nayak et al., ICML 2019; docs/METHOD.md,
//! "Baselines"): no generator and no BN statistics. "Data impressions" are optimised
//! from noise so that the teacher's tempered prediction matches a soft target drawn
//! from a Dirichlet over the teacher's class similarity (read from its last layer), at
//! two concentration scales; the student distils on a pool of the impressions.

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::models::{Classifier, Features};
use crate::nn::Ctx;
use crate::optim::{Optimizer, ParamGroup};
use crate::pipeline::config::Config;
use crate::pipeline::loop_state::{check_finite, Accumulator, Losses, Loop};
use crate::rng::Rng;
use crate::{bail, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// `[distill.zskd]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZskdConfig {
    /// The teacher's softmax temperature in the impression loss (the paper: 20).
    pub temperature: f32,
    /// The Dirichlet's concentration scales, used in turn batch by batch (the paper:
    /// 1.0 and 0.1; the smaller gives peakier targets).
    pub betas: Vec<f32>,
    /// Adam's learning rate on the pixels; `2 * distill.g_steps` steps a batch.
    pub lr: f32,
}

impl Default for ZskdConfig {
    fn default() -> Self { ZskdConfig { temperature: 20.0, betas: vec![1.0, 0.1], lr: 0.05 } }
}


pub struct Zskd {
    similarity: ClassSimilarity,
}

impl Recipe for Zskd {
    const SYNTHESIS: Synthesis = Synthesis::Pixels;
    fn new(setup: &mut Setup) -> Result<Self> { Ok(Zskd { similarity: ClassSimilarity::of_teacher(setup.teacher)? }) }
}

impl DistillMethod for Zskd {
    fn pool_capacity(&self, cfg: &Config) -> usize { super::kept_pool_batches(cfg) }

    /// One batch of impressions (on a rank, its share): classes drawn uniformly, a soft
    /// target per image, `2 * distill.g_steps` Adam steps on the pixels; then pooled.
    fn synthesize(&mut self, lp: &mut Loop) -> Result<Losses> {
        let cfg = lp.cfg;
        let z = &cfg.distill.zskd;
        let (n, s, k) = (lp.local_batch, cfg.data.image_size, lp.teacher.num_classes());
        // one batch an iteration: the iteration picks the scale, so a resumed run goes on alike
        let beta = z.betas[lp.iteration % z.betas.len()];
        let classes: Vec<u32> = (0..n).map(|_| lp.rng.below(k) as u32).collect();
        let targets = self.similarity.sample_targets(&classes, beta, &mut lp.rng, lp.device)?;
        let x = Tensor::randn(&[n, 3, s, s], 0.0, 1.0, &mut lp.rng, lp.device)?.to_var()?;
        let mut opt = Optimizer::adam(vec![ParamGroup::new(vec![x.clone()], 0.0)], z.lr, 0.9, 0.999);
        let how = self.augment(cfg);
        let mut acc = Accumulator::default();
        for _ in 0..2 * cfg.distill.g_steps {
            let t = lp.teacher.forward_ctx(&lp.augment(&x, how)?, &mut Ctx::new(false))?;
            let mut loss = impression_loss(&t.logits, &targets, z.temperature)?;
            let parts = vec![("g_impression", loss.to_scalar()?)];
            check_finite(&parts, "zskd", lp.iteration)?;
            if lp.world() > 1 {
                // the global batch's mean loss is 1/N of this rank's share's
                loss = loss.scale(1.0 / lp.world() as f32)?;
            }
            opt.step(&loss.backward()?)?;
            acc.add(&parts);
        }
        lp.remember(x.detach(), self.pool_capacity(cfg));
        Ok(acc.mean())
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }

    /// The batch synthesised last.
    fn samples(&mut self, lp: &mut Loop) -> Result<Option<Tensor>> { Ok(lp.last_pooled().cloned()) }
}

/// The floor of a Dirichlet concentration: min-max scaling gives each class's least
/// similar class 0, which a Dirichlet does not take; that class then gets ~0 mass.
const MIN_CONCENTRATION: f32 = 1e-6;

/// The teacher's class similarity: the cosine between the last layer's weight vectors of
/// every two classes, each row min-max scaled to [0, 1] (its own class is 1).
pub struct ClassSimilarity {
    k: usize,
    rows: Vec<f32>,
}

impl ClassSimilarity {
    /// From a classifier weight `[k, d]` (k >= 2).
    pub fn from_weight(w: &Tensor) -> Result<ClassSimilarity> {
        let [k, d] = w.dims2("class similarity")?;
        if k < 2 {
            bail!("class similarity: the classifier has {k} class; at least 2 are needed");
        }
        let w = w.to_vec_f32()?;
        let unit: Vec<Vec<f32>> = w
            .chunks(d)
            .map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                r.iter().map(|x| x / norm).collect()
            })
            .collect();
        let mut rows = vec![0f32; k * k];
        for i in 0..k {
            let row: Vec<f32> = (0..k).map(|j| unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum()).collect();
            let (lo, hi) = row.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
            let span = (hi - lo).max(1e-12);
            for j in 0..k {
                rows[i * k + j] = (row[j] - lo) / span;
            }
        }
        Ok(ClassSimilarity { k, rows })
    }

    /// From the teacher's classifier: its last parameter shaped `[num_classes, feature_dim]`.
    pub fn of_teacher(teacher: &dyn Classifier) -> Result<ClassSimilarity> {
        let want = [teacher.num_classes(), teacher.feature_dim()];
        match teacher.named_parameters().into_iter().rev().find(|(_, t)| t.dims() == want) {
            Some((_, w)) => ClassSimilarity::from_weight(&w),
            None => bail!("zskd: {} has no classifier weight of shape {want:?}", teacher.arch()),
        }
    }

    /// Class `c`'s similarity to every class.
    pub fn row(&self, c: usize) -> &[f32] { &self.rows[c * self.k..(c + 1) * self.k] }

    /// One soft target per class in `classes`, drawn from Dirichlet(beta * row(c)):
    /// `[n, k]` on `device`.
    pub fn sample_targets(&self, classes: &[u32], beta: f32, rng: &mut Rng, device: Device) -> Result<Tensor> {
        if !(beta > 0.0 && beta.is_finite()) {
            bail!("zskd: the Dirichlet scale beta must be positive, got {beta}");
        }
        let mut out = Vec::with_capacity(classes.len() * self.k);
        for &c in classes {
            if c as usize >= self.k {
                bail!("zskd: class {c} out of range for {} classes", self.k);
            }
            let alpha: Vec<f32> = self.row(c as usize).iter().map(|s| (beta * s).max(MIN_CONCENTRATION)).collect();
            out.extend(rng.dirichlet(&alpha));
        }
        Tensor::from_vec(out, &[classes.len(), self.k], device)
    }
}

/// The impression loss: cross-entropy of the teacher's softmax at `temperature` against
/// the sampled soft targets `[n, k]`, mean over the batch.
pub fn impression_loss(t_logits: &Tensor, targets: &Tensor, temperature: f32) -> Result<Tensor> {
    t_logits.scale(1.0 / temperature)?.soft_cross_entropy(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight() -> Tensor {
        // classes 0 and 1 point alike, class 2 opposite to 0
        Tensor::from_vec(vec![1.0f32, 0.0, 0.8, 0.6, -1.0, 0.1], &[3, 2], Device::Cpu).unwrap()
    }

    #[test]
    fn similarity_is_the_row_scaled_cosine() {
        let s = ClassSimilarity::from_weight(&weight()).unwrap();
        // row 0: cosines 1, 0.8, -0.99504; min-max to 1, (0.8 + 0.99504) / 1.99504, 0
        let c02 = -1.0 / (1.01f32).sqrt();
        let want = [1.0, (0.8 - c02) / (1.0 - c02), 0.0];
        for (g, w) in s.row(0).iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "row 0 {:?}, want {want:?}", s.row(0));
        }
        assert!((0..3).all(|c| (s.row(c)[c] - 1.0).abs() < 1e-6));
    }

    #[test]
    fn targets_follow_the_class_similarity_dirichlet() {
        let s = ClassSimilarity::from_weight(&weight()).unwrap();
        let mut rng = Rng::new(5);
        let n = 4000;
        let t = s.sample_targets(&vec![0u32; n], 1.0, &mut rng, Device::Cpu).unwrap().to_vec_f32().unwrap();
        let mut mean = [0f64; 3];
        for row in t.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            for (m, x) in mean.iter_mut().zip(row) {
                *m += *x as f64 / n as f64;
            }
        }
        // the Dirichlet's mean is the concentration over its sum
        let alpha: Vec<f32> = s.row(0).iter().map(|x| x.max(MIN_CONCENTRATION)).collect();
        let total: f32 = alpha.iter().sum();
        for (m, a) in mean.iter().zip(&alpha) {
            assert!((m - (a / total) as f64).abs() < 0.015, "mean {mean:?}, alpha {alpha:?}");
        }
        // a smaller beta concentrates each draw on fewer classes
        let peak = |beta: f32, rng: &mut Rng| {
            let t = s.sample_targets(&vec![1u32; 2000], beta, rng, Device::Cpu).unwrap().to_vec_f32().unwrap();
            t.chunks(3).map(|r| r.iter().cloned().fold(0f32, f32::max) as f64).sum::<f64>() / 2000.0
        };
        assert!(peak(0.1, &mut rng) > peak(1.0, &mut rng) + 0.1);
        assert!(s.sample_targets(&[3], 1.0, &mut rng, Device::Cpu).is_err());
    }

    #[test]
    fn the_similarity_is_read_from_the_teachers_classifier() {
        let teacher = crate::models::build("resnet8", 10, true, &mut Rng::new(1)).unwrap();
        let fc = teacher.named_parameters().into_iter().find(|(n, _)| n == "fc.weight").unwrap().1;
        let (a, b) = (ClassSimilarity::of_teacher(teacher.as_ref()).unwrap(), ClassSimilarity::from_weight(&fc).unwrap());
        assert_eq!(a.rows, b.rows);
    }

    #[test]
    fn the_impression_loss_is_the_tempered_soft_cross_entropy() {
        let logits = Tensor::from_vec(vec![2.0f32, 0.0, -2.0], &[1, 3], Device::Cpu).unwrap();
        let target = Tensor::from_vec(vec![0.5f32, 0.25, 0.25], &[1, 3], Device::Cpu).unwrap();
        let got = impression_loss(&logits, &target, 20.0).unwrap().to_scalar().unwrap();
        let z: Vec<f64> = [0.1f64, 0.0, -0.1].to_vec();
        let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = -(0.5 * (z[0] - lse) + 0.25 * (z[1] - lse) + 0.25 * (z[2] - lse));
        assert!((got as f64 - want).abs() < 1e-6, "got {got}, want {want}");
    }
}
