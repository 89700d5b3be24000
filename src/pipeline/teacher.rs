//! Supervised training of a classifier on real images: how the teacher is made when
//! none is imported (SGD, cosine schedule, the paper's augmentations).

use super::config::TeacherConfig;
use super::progress::Progress;
use super::report::MetricsLog;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::Dataset;
use crate::models::Classifier;
use crate::optim::{CosineSchedule, Optimizer, ParamGroup, WeightAverage};
use crate::{bail, no_grad, Device, Result, Tensor};
use serde_json::json;

/// What `train_classifier` leaves besides the trained model.
pub struct Trained {
    /// The last epoch's training accuracy (%), of the weights as they trained.
    pub train_top1: f32,
    /// With `ema_decay` or `swa_epochs` > 0 the model holds the average, and this the
    /// last weights (`WeightAverage::swap` brings them back); `None` without an average.
    pub last: Option<WeightAverage>,
}

/// Trains `model` in place on `device` (moving it there first). With a positive
/// `cfg.ema_decay` the model ends holding the moving average of its weights (and
/// BatchNorm statistics), with `cfg.swa_epochs` the equal average of its last epochs'
/// weights (with BatchNorm statistics recomputed); that is then the trained model.
pub fn train_classifier(
    model: &dyn Classifier,
    ds: &Dataset,
    cfg: &TeacherConfig,
    image_size: usize,
    seed: u64,
    device: Device,
    log: &mut MetricsLog,
    phase: &str,
) -> Result<Trained> {
    model.to_device(device)?;
    let loader = Loader::new(&ds.train, LoaderConfig::train(ds, cfg.batch_size, image_size as u32, seed));
    if loader.is_empty() {
        bail!("{phase}: {} training images are fewer than one batch of {}", ds.train.len(), cfg.batch_size);
    }
    if cfg.zero_init_residual {
        zero_init_residual(model)?;
    }
    let total = cfg.epochs * loader.len();
    // with SWA the cosine anneals to `swa_lr` before the averaged epochs and stays there
    let (min, annealed) = if cfg.swa_epochs > 0 { (cfg.swa_lr, cfg.epochs - cfg.swa_epochs) } else { (0.0, cfg.epochs) };
    let schedule = CosineSchedule { base: cfg.lr, min, total: annealed * loader.len(), warmup: cfg.warmup_epochs * loader.len() };
    let mut opt = Optimizer::sgd(vec![ParamGroup::new(model.parameters(), cfg.weight_decay)], cfg.lr, cfg.momentum, false);
    let mut average = match (cfg.ema_decay > 0.0, cfg.swa_epochs > 0) {
        (true, _) => Some(WeightAverage::new(model, cfg.ema_decay)?),
        (_, true) => Some(WeightAverage::equal(model)?),
        _ => None,
    };
    let bar = Progress::new(phase, total as u64);
    let mut train_acc = 0.0;
    for epoch in 0..cfg.epochs {
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        for batch in loader.epoch(epoch as u64) {
            let b = batch?;
            opt.set_lr(schedule.lr_at(opt.steps() as usize));
            let x = Tensor::from_vec(b.images, &[b.n, 3, b.size, b.size], device)?;
            let logits = model.logits(&x, true)?;
            let loss = logits.cross_entropy(&b.labels, cfg.label_smoothing)?;
            let l = loss.to_scalar()?;
            if !l.is_finite() {
                bail!("{phase}: the cross-entropy loss became {l} at epoch {epoch}, step {}", opt.steps());
            }
            opt.step(&loss.backward()?)?;
            if let (Some(a), true) = (&mut average, cfg.ema_decay > 0.0) {
                a.update()?;
            }
            let preds = logits.argmax_last()?;
            correct += preds.iter().zip(&b.labels).filter(|(p, l)| **p == **l as usize).count();
            seen += b.n;
            loss_sum += l as f64 * b.n as f64;
            bar.step(&format!("epoch {}/{} loss {:.3} acc {:.1}%", epoch + 1, cfg.epochs, l, 100.0 * correct as f32 / seen as f32));
        }
        if seen == 0 {
            // every batch was skipped: a model that never trained must not pass for a teacher
            let w = loader.warnings();
            bail!("{phase}: none of the {} training images could be read (first: {})", ds.train.len(), w.first.join("; "));
        }
        train_acc = 100.0 * correct as f32 / seen as f32;
        if let (Some(a), true) = (&mut average, cfg.swa_epochs > 0 && epoch >= annealed) {
            a.update()?;
        }
        log.write(&json!({"phase": phase, "epoch": epoch + 1, "loss": loss_sum / seen.max(1) as f64,
                          "train_top1": train_acc, "lr": opt.lr()}))?;
    }
    let w = loader.warnings();
    if w.count > 0 {
        eprintln!("{phase}: skipped {} unreadable training images (first: {})", w.count, w.first.join("; "));
    }
    if opt.steps() == 0 {
        bail!("{phase}: no training step ran (teacher.epochs = {}), so there is no trained model to keep", cfg.epochs);
    }
    if let Some(a) = &mut average {
        a.swap()?;
        if cfg.swa_epochs > 0 {
            recompute_batch_norm_statistics(model, &loader, cfg.epochs as u64, device)?;
        }
    }
    bar.finish(&format!("train top-1 {train_acc:.1}%"));
    Ok(Trained { train_top1: train_acc, last: average })
}

/// torchvision's `zero_init_residual`: every residual block's last BatchNorm scale
/// (`layerN.i.bn2.weight` of a basic block) starts at 0.
pub fn zero_init_residual(model: &dyn Classifier) -> Result<()> {
    let scales: Vec<Tensor> =
        model.named_parameters().into_iter().filter(|(n, _)| n.starts_with("layer") && n.ends_with(".bn2.weight")).map(|(_, t)| t).collect();
    if scales.is_empty() {
        bail!("teacher.zero_init_residual: {} has no residual blocks with `layerN.i.bn2` (ResNets only)", model.arch());
    }
    no_grad(|| scales.iter().try_for_each(|t| t.assign(&t.zeros_like()?)))
}

/// PyTorch's `swa_utils.update_bn`: every BatchNorm layer's running statistics become
/// the equal average of its batch statistics over one pass of the training data (in
/// training mode, nothing learned), as the averaged weights would produce them.
fn recompute_batch_norm_statistics(model: &dyn Classifier, loader: &Loader, epoch: u64, device: Device) -> Result<()> {
    let mut sums: Vec<(Tensor, Tensor)> = vec![];
    let mut running = vec![];
    let mut batches = 0usize;
    no_grad(|| -> Result<()> {
        for batch in loader.epoch(epoch) {
            let b = batch?;
            let x = Tensor::from_vec(b.images, &[b.n, 3, b.size, b.size], device)?;
            let f = model.forward(&x, true)?;
            for (i, input) in f.bn_inputs.iter().enumerate() {
                let (mean, var) = (input.mean(&[0, 2, 3], false)?, input.var(&[0, 2, 3], false, true)?);
                if i < sums.len() {
                    sums[i] = (sums[i].0.add(&mean)?, sums[i].1.add(&var)?);
                } else {
                    sums.push((mean, var));
                }
            }
            running = f.bn_running;
            batches += 1;
        }
        let n = batches as f32;
        for ((m, v), (rm, rv)) in sums.iter().zip(&running) {
            rm.assign(&m.affine(1.0 / n, 0.0)?)?;
            rv.assign(&v.affine(1.0 / n, 0.0)?)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::build;
    use crate::rng::Rng;

    /// Exactly the blocks' last BatchNorm scales become 0; a model without residual
    /// blocks is refused by name.
    #[test]
    fn zero_init_residual_zeroes_each_blocks_last_batch_norm_scale() {
        let m = build("resnet8", 10, true, &mut Rng::new(0)).unwrap();
        zero_init_residual(m.as_ref()).unwrap();
        let mut zeroed = 0;
        for (name, t) in m.named_parameters() {
            let v = t.to_vec_f32().unwrap();
            if name.ends_with(".bn2.weight") {
                assert!(v.iter().all(|&x| x == 0.0), "{name}");
                zeroed += 1;
            } else if name.ends_with("bn1.weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{name}");
            }
        }
        assert_eq!(zeroed, 3, "resnet8 has three basic blocks");
        let e = zero_init_residual(build("mobilenet_v2", 10, true, &mut Rng::new(0)).unwrap().as_ref()).unwrap_err().to_string();
        assert!(e.contains("mobilenet_v2") && e.contains("ResNets only"), "{e}");
    }
}
