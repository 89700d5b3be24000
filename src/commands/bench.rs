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

pub fn run(a: &BenchArgs) -> Result<BenchResult> {
    if a.steps == 0 {
        bail!("bench: --steps must be at least 1");
    }
    let mut rng = Rng::new(0);
    let model = build(&a.arch, a.num_classes, a.small_stem, &mut rng)?;
    model.to_device(a.device)?;
    let mut opt = Optimizer::sgd(vec![ParamGroup::new(model.parameters(), 5e-4)], 0.01, 0.9, false);
    let x = Tensor::randn(&[a.batch, 3, a.image_size, a.image_size], 0.0, 1.0, &mut rng, a.device)?;
    let labels: Vec<u32> = (0..a.batch).map(|_| rng.below(a.num_classes) as u32).collect();
    let mut times = vec![];
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let loss = model.logits(&x, true)?.cross_entropy(&labels, 0.0)?;
        opt.step(&loss.backward()?)?;
        // reading the loss synchronises with the device
        let _ = loss.to_scalar()?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(BenchResult { images_per_sec: a.batch as f64 / (median / 1e3), step_ms: times })
}
