//! Supervised training of a classifier on real images: how the teacher is made when
//! none is imported (SGD, cosine schedule, the paper's augmentations).

use super::config::TeacherConfig;
use super::progress::Progress;
use super::report::MetricsLog;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::Dataset;
use crate::models::Classifier;
use crate::optim::{CosineSchedule, Optimizer, ParamGroup, WeightAverage};
use crate::{bail, Device, Result, Tensor};
use serde_json::json;

/// What `train_classifier` leaves besides the trained model.
pub struct Trained {
    /// The last epoch's training accuracy (%), of the weights as they trained.
    pub train_top1: f32,
    /// With `ema_decay` > 0 the model holds the average, and this the last weights
    /// (`WeightAverage::swap` brings them back); `None` without an average.
    pub last: Option<WeightAverage>,
}

/// Trains `model` in place on `device` (moving it there first). With a positive
/// `cfg.ema_decay` the model ends holding the moving average of its weights (and
/// BatchNorm statistics), which is then the trained model.
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
    let total = cfg.epochs * loader.len();
    let schedule = CosineSchedule { base: cfg.lr, min: 0.0, total, warmup: cfg.warmup_epochs * loader.len() };
    let mut opt = Optimizer::sgd(vec![ParamGroup::new(model.parameters(), cfg.weight_decay)], cfg.lr, cfg.momentum, false);
    let mut average = if cfg.ema_decay > 0.0 { Some(WeightAverage::new(model, cfg.ema_decay)?) } else { None };
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
            if let Some(a) = &mut average {
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
    }
    bar.finish(&format!("train top-1 {train_acc:.1}%"));
    Ok(Trained { train_top1: train_acc, last: average })
}
