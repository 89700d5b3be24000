//! Evaluation on the real test split: top-1, top-5, per-class accuracy, and how often
//! the student agrees with the teacher.

use crate::data::loader::{Loader, LoaderConfig};
use crate::data::Dataset;
use crate::models::Classifier;
use crate::{no_grad, Device, Result, Tensor};
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Accuracy {
    pub top1: f32,
    pub top5: f32,
    pub per_class: Vec<f32>,
    pub samples: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub models: Vec<Accuracy>,
    /// Fraction of test images where the first two models predict the same class.
    pub agreement: Option<f32>,
}

/// Evaluates one or more models on `ds`'s test split in one pass over the images.
pub fn evaluate(models: &[&dyn Classifier], ds: &Dataset, image_size: usize, batch: usize, device: Device) -> Result<Evaluation> {
    let k = ds.num_classes();
    if ds.test.is_empty() {
        // an accuracy over no images would print as 0.00% and pass for a result
        crate::bail!("evaluate: the test split of {} is empty", ds.root.display());
    }
    let loader = Loader::new(&ds.test, LoaderConfig::eval(ds, batch, image_size as u32));
    let mut correct1 = vec![0usize; models.len()];
    let mut correct5 = vec![0usize; models.len()];
    let mut class_hits = vec![vec![0usize; k]; models.len()];
    let mut class_total = vec![0usize; k];
    let (mut agree, mut n) = (0usize, 0usize);
    for b in loader.epoch(0) {
        let b = b?;
        let x = Tensor::from_vec(b.images, &[b.n, 3, b.size, b.size], device)?;
        let mut preds = vec![];
        for (m, model) in models.iter().enumerate() {
            let logits = no_grad(|| model.logits(&x, false))?.to_vec_f32()?;
            let c = logits.len() / b.n;
            let mut top1 = vec![];
            for (i, row) in logits.chunks(c).enumerate() {
                let label = b.labels[i] as usize;
                let mut order: Vec<usize> = (0..c).collect();
                order.sort_by(|&a, &z| row[z].total_cmp(&row[a]));
                if order[0] == label {
                    correct1[m] += 1;
                    class_hits[m][label] += 1;
                }
                if order.iter().take(5).any(|&o| o == label) {
                    correct5[m] += 1;
                }
                top1.push(order[0]);
            }
            preds.push(top1);
        }
        for &l in &b.labels {
            class_total[l as usize] += 1;
        }
        if preds.len() >= 2 {
            agree += preds[0].iter().zip(&preds[1]).filter(|(a, b)| a == b).count();
        }
        n += b.n;
    }
    let pct = |c: usize, t: usize| if t == 0 { 0.0 } else { 100.0 * c as f32 / t as f32 };
    let models = (0..models.len())
        .map(|m| Accuracy {
            top1: pct(correct1[m], n),
            top5: pct(correct5[m], n),
            per_class: (0..k).map(|c| pct(class_hits[m][c], class_total[c])).collect(),
            samples: n,
        })
        .collect();
    let agreement = (correct1.len() >= 2).then(|| pct(agree, n));
    Ok(Evaluation { models, agreement })
}
