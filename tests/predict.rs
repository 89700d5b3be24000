//! `predict` against PyTorch: a CIFAR ResNet-8 with random weights and randomised BN
//! statistics, two PNGs of odd sizes through torchvision's eval transform (resize,
//! centre crop, normalise), logits from PyTorch's eval-mode forward
//! (`scripts/check_predict_parity.py --fixture`). Tolerance: max |diff| 1e-3, as for the
//! full-size torchvision check the same script runs.

use dfkd::commands::predict::{load_classifier, predict_one};
use dfkd::Device;
use std::path::Path;

#[test]
fn predict_matches_pytorch_on_png_images() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/predict");
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let size = expected["image_size"].as_u64().unwrap() as usize;
    let model = load_classifier("resnet8", 10, true, &dir.join("resnet8.safetensors")).unwrap();
    for (i, name) in expected["images"].as_array().unwrap().iter().enumerate() {
        let p = predict_one(model.as_ref(), &dir.join(name.as_str().unwrap()), size, Device::Cpu).unwrap();
        let want: Vec<f32> = expected["logits"][i].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let worst = p.logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-3, "{name}: max |logit diff| {worst} (logits {:?} vs {want:?})", p.logits);
        assert!(want.iter().any(|v| v.abs() > 0.1), "the fixture's logits must not be trivially small");
        let best = want.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(p.top5[0].0, best);
    }
}

#[test]
fn unreadable_images_are_reported_by_name_and_the_rest_processed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/predict");
    let bad = std::env::temp_dir().join(format!("dfkd-bad-{}.png", std::process::id()));
    std::fs::write(&bad, b"not a png").unwrap();
    let model = load_classifier("resnet8", 10, true, &dir.join("resnet8.safetensors")).unwrap();
    let err = predict_one(model.as_ref(), &bad, 32, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(predict_one(model.as_ref(), &dir.join("image0.png"), 32, Device::Cpu).is_ok());
    let args = dfkd::commands::predict::PredictArgs {
        arch: "resnet8".into(),
        num_classes: 10,
        weights: dir.join("resnet8.safetensors"),
        image_size: 32,
        small_stem: true,
        json: true,
        images: vec![bad.clone(), dir.join("image1.png")],
        device: Device::Cpu,
    };
    assert_eq!(dfkd::commands::predict::run(&args).unwrap(), 1);
    std::fs::remove_file(bad).unwrap();
}
