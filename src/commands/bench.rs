//! `distill bench`: times full training steps (forward, backward, SGD) on random data
//! so a user can size a run, and scripts can compare with PyTorch on the same step.

use crate::models::build;
use crate::optim::{Optimizer, ParamGroup};
use crate::rng::Rng;
use crate::{bail, Device, Result, Tensor};
use std::time::Instant;

pub struct BenchArgs {
    pub arch: String,
    pub batch: usize,
    pub image_size: usize,
    pub num_classes: usize,
    pub small_stem: bool,
    pub steps: usize,
    pub warmup: usize,
    pub device: Device,
}

pub struct BenchResult {
    pub step_ms: Vec<f64>,
    pub images_per_sec: f64,
}

/// One training step on a fixed random batch: forward, cross-entropy, backward, SGD.
/// The step `distill bench`, `benches/train_step.rs` and `benches/cuda.rs` all time,
/// and `scripts/bench_pytorch.py` mirrors.
pub struct TrainStep {
    model: Box<dyn crate::models::Classifier>,
    opt: Optimizer,
    x: Tensor,
    labels: Vec<u32>,
}

impl TrainStep {
    pub fn new(arch: &str, batch: usize, image_size: usize, num_classes: usize, small_stem: bool, device: Device) -> Result<TrainStep> {
        let mut rng = Rng::new(0);
        let model = build(arch, num_classes, small_stem, &mut rng)?;
        model.to_device(device)?;
        let opt = Optimizer::sgd(vec![ParamGroup::new(model.parameters(), 5e-4)], 0.01, 0.9, false);
        let x = Tensor::randn(&[batch, 3, image_size, image_size], 0.0, 1.0, &mut rng, device)?;
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(num_classes) as u32).collect();
        Ok(TrainStep { model, opt, x, labels })
    }

    /// Runs one step and returns its loss; reading the loss waits for the device.
    pub fn run(&mut self) -> Result<f32> {
        let loss = self.model.logits(&self.x, true)?.cross_entropy(&self.labels, 0.0)?;
        self.opt.step(&loss.backward()?)?;
        loss.to_scalar()
    }
}

pub fn run(a: &BenchArgs) -> Result<BenchResult> {
    if a.steps == 0 {
        bail!("bench: --steps must be at least 1");
    }
    let mut step = TrainStep::new(&a.arch, a.batch, a.image_size, a.num_classes, a.small_stem, a.device)?;
    let mut times = vec![];
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        step.run()?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(BenchResult { images_per_sec: a.batch as f64 / (median / 1e3), step_ms: times })
}
