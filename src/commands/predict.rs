//! `distill predict`: top-5 classes of images under a classifier, with torchvision's
//! evaluation transform, as text or JSON lines.

use crate::checkpoint::load_model;
use crate::data::load_rgb;
use crate::data::transforms::eval_transform;
use crate::models::{build, Classifier};
use crate::rng::Rng;
use crate::{no_grad, Device, Result, Tensor};
use std::path::{Path, PathBuf};

pub struct PredictArgs {
    pub arch: String,
    pub num_classes: usize,
    pub weights: PathBuf,
    pub image_size: usize,
    pub small_stem: bool,
    pub json: bool,
    pub images: Vec<PathBuf>,
    pub device: Device,
}

/// One image's prediction: raw logits and the top-5 (class, probability).
pub struct Prediction {
    pub logits: Vec<f32>,
    pub top5: Vec<(usize, f32)>,
}

pub fn load_classifier(arch: &str, num_classes: usize, small_stem: bool, weights: &Path) -> Result<Box<dyn Classifier>> {
    let model = build(arch, num_classes, small_stem, &mut Rng::new(0))?;
    load_model(model.as_ref(), weights)?;
    Ok(model)
}

pub fn predict_one(model: &dyn Classifier, path: &Path, image_size: usize, device: Device) -> Result<Prediction> {
    let img = load_rgb(path)?;
    let x = Tensor::from_vec(eval_transform(&img, image_size as u32), &[1, 3, image_size, image_size], device)?;
    let logits = no_grad(|| model.logits(&x, false))?;
    let probs = logits.softmax(1)?.to_vec_f32()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let top5 = order.into_iter().take(5).map(|c| (c, probs[c])).collect();
    Ok(Prediction { logits: logits.to_vec_f32()?, top5 })
}

/// Predicts every image; unreadable ones are reported by name and the rest still
/// processed. Returns how many failed.
pub fn run(args: &PredictArgs) -> Result<usize> {
    if args.image_size == 0 {
        crate::bail!("predict: --image-size 0 is not allowed: expected a size in pixels, at least 1");
    }
    let model = load_classifier(&args.arch, args.num_classes, args.small_stem, &args.weights)?;
    model.to_device(args.device)?;
    let mut failed = 0;
    for path in &args.images {
        match predict_one(model.as_ref(), path, args.image_size, args.device) {
            Ok(p) if args.json => {
                let v =
                    serde_json::json!({"image": path, "logits": p.logits, "top5": p.top5.iter().map(|(c, q)| serde_json::json!([c, q])).collect::<Vec<_>>()});
                println!("{v}");
            }
            Ok(p) => {
                let classes: Vec<String> = p.top5.iter().map(|(c, q)| format!("{c} ({:.1}%)", 100.0 * q)).collect();
                println!("{}: {}", path.display(), classes.join(", "));
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    Ok(failed)
}
