//! Safetensors checkpoints: round trips, every error case, and PyTorch-made fixtures
//! (scripts/make_model_fixtures.py).

use dfkd::checkpoint::{load_model, load_tensors, save_model, save_tensors};
use dfkd::models::{build, Classifier};
use dfkd::nn::{BatchNorm2d, ConvTranspose2d, Ctx, Linear, Module, Slot, SpectralNorm};
use dfkd::rng::Rng;
use dfkd::{ConvOpts, DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models");

/// A fresh scratch directory per test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dfkd-checkpoint-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn model(arch: &str, classes: usize, small_stem: bool, seed: u64) -> Box<dyn Classifier> {
    build(arch, classes, small_stem, &mut Rng::new(seed)).unwrap()
}

fn input(n: usize, size: usize, seed: u64) -> Tensor {
    Tensor::randn(&[n, 3, size, size], 0.0, 1.0, &mut Rng::new(seed), Device::Cpu).unwrap()
}

fn linear(seed: u64) -> Linear {
    Linear::new(5, 4, true, &mut Rng::new(seed)).unwrap()
}

fn t(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, &mut Rng::new(seed), Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    a.to_vec_f32().unwrap().iter().zip(b.to_vec_f32().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The error of a load that must fail, as text.
fn load_error<M: Module + ?Sized>(m: &M, path: &Path) -> String {
    load_model(m, path).expect_err("the load should have failed").to_string()
}

#[test]
fn round_trip_gives_identical_logits_and_counters() {
    let dir = scratch("round_trip");
    let path = dir.join("resnet8.safetensors");
    let a = model("resnet8", 10, true, 1);
    a.forward(&input(4, 32, 2), true).unwrap(); // move the running stats and counters
    save_model(&*a, &path).unwrap();
    assert!(!dir.join("resnet8.safetensors.tmp").exists(), "the temporary file must be renamed away");

    let b = model("resnet8", 10, true, 99);
    let x = input(2, 32, 3);
    assert_ne!(a.logits(&x, false).unwrap().to_vec_f32().unwrap(), b.logits(&x, false).unwrap().to_vec_f32().unwrap());
    load_model(&*b, &path).unwrap();
    assert_eq!(a.logits(&x, false).unwrap().to_vec_f32().unwrap(), b.logits(&x, false).unwrap().to_vec_f32().unwrap());
    let counters = |m: &dyn Classifier| {
        let mut v = vec![];
        m.visit("", &mut |_, s| {
            if let Slot::Counter(c) = s {
                v.push(c.get())
            }
        });
        v
    };
    assert_eq!(counters(&*b), vec![1; 9]);
    // loaded parameters stay trainable leaves
    assert!(b.parameters().iter().all(|p| p.requires_grad()));

    // saving over an existing file replaces it
    save_model(&*b, &path).unwrap();
    load_model(&*a, &path).unwrap();
}

#[test]
fn missing_key_is_named() {
    let dir = scratch("missing");
    let path = dir.join("partial.safetensors");
    let l = linear(0);
    save_tensors(&path, &[("weight", &l.weight)]).unwrap();
    let err = load_error(&l, &path);
    assert!(err.contains("partial.safetensors") && err.contains("`bias`") && err.contains("missing"), "{err}");
}

#[test]
fn unexpected_key_is_named() {
    let dir = scratch("unexpected");
    let path = dir.join("extra.safetensors");
    let l = linear(0);
    save_tensors(&path, &[("weight", &l.weight), ("bias", l.bias.as_ref().unwrap()), ("head.weight", &l.weight)]).unwrap();
    let err = load_error(&l, &path);
    assert!(err.contains("extra.safetensors") && err.contains("`head.weight`") && err.contains("unexpected"), "{err}");
}

#[test]
fn shape_mismatch_names_both_shapes_and_leaves_the_model_untouched() {
    let dir = scratch("shape");
    let path = dir.join("shape.safetensors");
    let l = linear(0);
    let before = l.weight.to_vec_f32().unwrap();
    // `bias` sorts before `weight` and is fine; `weight` has the wrong shape
    save_tensors(&path, &[("weight", &t(&[3, 5], 1)), ("bias", &t(&[4], 2))]).unwrap();
    let err = load_error(&l, &path);
    assert!(err.contains("shape.safetensors") && err.contains("`weight`") && err.contains("[3, 5]") && err.contains("[4, 5]"), "{err}");
    assert_eq!(l.weight.to_vec_f32().unwrap(), before);
    let bias_in_file = load_tensors(&path).unwrap().into_iter().find(|(n, _)| n == "bias").unwrap().1;
    assert_ne!(l.bias.as_ref().unwrap().to_vec_f32().unwrap(), bias_in_file.to_vec_f32().unwrap(), "a failed load must write nothing");
}

#[test]
fn wrong_dtype_is_named() {
    let dir = scratch("dtype");
    let path = dir.join("dtype.safetensors");
    let l = linear(0);
    let ints = Tensor::from_vec(vec![1u32; 20], &[4, 5], Device::Cpu).unwrap();
    save_tensors(&path, &[("weight", &ints), ("bias", l.bias.as_ref().unwrap())]).unwrap();
    let err = load_error(&l, &path);
    assert!(err.contains("dtype.safetensors") && err.contains("`weight`") && err.contains("U32"), "{err}");

    // a counter must be an int64 scalar
    let bn = BatchNorm2d::new(3).unwrap();
    let path = dir.join("counter.safetensors");
    let tensors: Vec<(String, Tensor)> = bn.named_tensors().into_iter().map(|(n, t, _)| (n, t)).collect();
    let mut refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let float_counter = Tensor::scalar(3.0, Device::Cpu).unwrap();
    refs.push(("num_batches_tracked", &float_counter));
    save_tensors(&path, &refs).unwrap();
    let err = load_error(&bn, &path);
    assert!(err.contains("counter.safetensors") && err.contains("`num_batches_tracked`") && err.contains("I64"), "{err}");
}

#[test]
fn truncated_corrupt_and_absent_files_are_named() {
    let dir = scratch("corrupt");
    let good = dir.join("good.safetensors");
    let m = model("resnet8", 10, true, 0);
    save_model(&*m, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&*m, &truncated);
    assert!(err.contains("truncated.safetensors") && err.contains("not a valid safetensors file"), "{err}");

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    let err = load_error(&*m, &garbage);
    assert!(err.contains("garbage.safetensors"), "{err}");
    assert!(load_tensors(&garbage).err().unwrap().to_string().contains("garbage.safetensors"));

    let absent = dir.join("absent.safetensors");
    assert!(load_error(&*m, &absent).contains("absent.safetensors"));
}

#[test]
fn half_precision_files_load_as_f32() {
    let dir = scratch("half");
    let l = linear(0);
    for dtype in [DType::F16, DType::BF16] {
        let (w, b) = (t(&[4, 5], 1).to_dtype(dtype).unwrap(), t(&[4], 2).to_dtype(dtype).unwrap());
        let path = dir.join(format!("{}.safetensors", dtype.as_str()));
        save_tensors(&path, &[("weight", &w), ("bias", &b)]).unwrap();
        load_model(&l, &path).unwrap();
        assert_eq!(l.weight.dtype(), DType::F32);
        assert_eq!(l.weight.to_vec_f32().unwrap(), w.to_vec_f32().unwrap());
        assert_eq!(l.bias.as_ref().unwrap().to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    }
}

#[test]
fn generic_tensor_files_round_trip() {
    let dir = scratch("generic");
    let path = dir.join("state.safetensors");
    let (a, b) = (t(&[3, 2], 1), t(&[], 2).to_dtype(DType::F16).unwrap());
    let idx = Tensor::from_vec(vec![4u32, 0, 7], &[3], Device::Cpu).unwrap();
    save_tensors(&path, &[("m.a", &a), ("m.b", &b), ("step", &idx)]).unwrap();
    let loaded = load_tensors(&path).unwrap();
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["m.a", "m.b", "step"]);
    assert_eq!(loaded[0].1.to_vec_f32().unwrap(), a.to_vec_f32().unwrap());
    assert_eq!((loaded[1].1.dtype(), loaded[1].1.dims()), (DType::F32, &[][..]));
    assert_eq!(loaded[1].1.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    assert_eq!(loaded[2].1.to_vec_u32().unwrap(), [4, 0, 7]);

    let err = save_tensors(&path, &[("x", &a), ("x", &a)]).err().unwrap().to_string();
    assert!(err.contains("`x`") && err.contains("state.safetensors"), "{err}");
}

/// Keys and shapes (counters as `[]`) in state_dict order.
fn keys_and_shapes(m: &dyn Classifier) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![];
    m.visit("", &mut |name, slot| {
        let shape = match slot {
            Slot::Parameter(t) | Slot::Buffer(t) => t.dims().to_vec(),
            Slot::Counter(_) => vec![],
        };
        out.push((name.to_string(), shape));
    });
    out
}

#[test]
fn state_dict_names_and_shapes_match_pytorch() {
    let text = std::fs::read_to_string(format!("{FIXTURES}/torch_shapes.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (arch, classes, small_stem) in [
        ("resnet18", 1000, false),
        ("resnet34", 1000, false),
        ("mobilenet_v2", 1000, false),
        ("resnet8", 10, true),
        ("resnet20", 10, true),
        ("wrn16_2", 10, true),
        ("wrn40_2", 10, true),
    ] {
        let expected: Vec<(String, Vec<usize>)> = serde_json::from_value(json[arch]["keys"].clone()).unwrap();
        assert_eq!(keys_and_shapes(&*model(arch, classes, small_stem, 0)), expected, "{arch}");
    }
}

fn fixture_logits() -> HashMap<String, Tensor> {
    load_tensors(format!("{FIXTURES}/logits.safetensors")).unwrap().into_iter().collect()
}

#[test]
fn pytorch_resnet8_and_f16_wrn16_2_give_the_same_logits() {
    let io = fixture_logits();
    for (arch, file) in [("resnet8", "resnet8.safetensors"), ("wrn16_2", "wrn16_2_f16.safetensors")] {
        let m = model(arch, 10, true, 0);
        load_model(&*m, format!("{FIXTURES}/{file}")).unwrap();
        let logits = m.logits(&io["input"], false).unwrap();
        let diff = max_abs_diff(&logits, &io[arch]);
        assert!(diff < 1e-4, "{arch}: logits differ from PyTorch's by {diff}");
    }
}

#[test]
fn pytorch_resnet8_matches_in_training_mode() {
    let io = fixture_logits();
    let m = model("resnet8", 10, true, 0);
    load_model(&*m, format!("{FIXTURES}/resnet8.safetensors")).unwrap();
    let f = m.forward(&io["input"], true).unwrap();
    let diff = max_abs_diff(&f.logits, &io["resnet8.train"]);
    assert!(diff < 1e-4, "training-mode logits differ from PyTorch's by {diff}");
    let tensors: HashMap<String, Tensor> = m.named_tensors().into_iter().map(|(n, t, _)| (n, t)).collect();
    for key in ["bn1.running_mean", "bn1.running_var", "layer3.0.bn2.running_mean", "layer3.0.bn2.running_var"] {
        let diff = max_abs_diff(&tensors[key], &io[&format!("resnet8.train.{key}")]);
        assert!(diff < 1e-5, "{key} differs from PyTorch's by {diff}");
    }
}

#[test]
fn spectral_norm_conv_transpose_matches_pytorch() {
    let f: HashMap<String, Tensor> = load_tensors(format!("{FIXTURES}/sn_convt.safetensors")).unwrap().into_iter().collect();
    let mut rng = Rng::new(0);
    let ct = ConvTranspose2d::new(6, 4, 3, ConvOpts::default().padding(1), 0, true, &mut rng).unwrap();
    let sn = SpectralNorm::new(ct, &mut rng).unwrap();
    for (name, t, _) in sn.named_tensors() {
        t.assign(&f[&format!("before.{name}")]).unwrap();
    }
    let y = sn.forward(&f["input"], &Ctx::train()).unwrap();
    assert!(max_abs_diff(&y, &f["y_train"]) < 1e-5, "train output differs by {}", max_abs_diff(&y, &f["y_train"]));
    assert!(max_abs_diff(&sn.u, &f["after.weight_u"]) < 1e-6);
    assert!(max_abs_diff(&sn.v, &f["after.weight_v"]) < 1e-6);
    let y = sn.forward(&f["input"], &Ctx::eval()).unwrap();
    assert!(max_abs_diff(&y, &f["y_eval"]) < 1e-5, "eval output differs by {}", max_abs_diff(&y, &f["y_eval"]));
}

/// Full torchvision models (random weights, 200 classes, 64 px): too large to commit.
/// `python scripts/make_model_fixtures.py --full DIR` then
/// `DFKD_TORCHVISION_FIXTURES=DIR cargo test --release --test checkpoint -- --ignored`.
#[test]
#[ignore]
fn torchvision_models_match() {
    let dir = std::env::var("DFKD_TORCHVISION_FIXTURES").expect("set DFKD_TORCHVISION_FIXTURES");
    let io: HashMap<String, Tensor> = load_tensors(format!("{dir}/logits.safetensors")).unwrap().into_iter().collect();
    for arch in ["resnet18", "resnet34", "mobilenet_v2"] {
        let m = model(arch, 200, false, 0);
        load_model(&*m, format!("{dir}/{arch}.safetensors")).unwrap();
        let logits = m.logits(&io["input"], false).unwrap();
        let scale = io[arch].to_vec_f32().unwrap().iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let diff = max_abs_diff(&logits, &io[arch]);
        assert!(diff < 1e-5 * scale.max(1.0), "{arch}: logits differ from torchvision's by {diff} (scale {scale})");
    }
}
