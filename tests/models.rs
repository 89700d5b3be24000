//! Model shapes, parameter counts, train/eval behaviour, freezing, and spectral norm.

use dfkd::models::{build, Classifier, ARCHS};
use dfkd::nn::{ConvTranspose2d, Ctx, Linear, Slot, SpectralNorm};
use dfkd::rng::Rng;
use dfkd::{ConvOpts, Device, Tensor};

fn input(n: usize, size: usize, seed: u64) -> Tensor {
    Tensor::randn(&[n, 3, size, size], 0.0, 1.0, &mut Rng::new(seed), Device::Cpu).unwrap()
}

fn model(arch: &str, classes: usize, small_stem: bool) -> Box<dyn Classifier> {
    build(arch, classes, small_stem, &mut Rng::new(0)).unwrap()
}

/// Number of BatchNorm layers, counted from the state_dict names.
fn bn_layers(m: &dyn Classifier) -> usize {
    let mut n = 0;
    m.visit("", &mut |name, _| n += name.ends_with(".running_mean") as usize);
    n
}

/// (arch, stage channels, feature dim, BatchNorm layers)
const EXPECTED: [(&str, &[usize], usize, usize); 7] = [
    ("resnet18", &[64, 128, 256, 512], 512, 20),
    ("resnet34", &[64, 128, 256, 512], 512, 36),
    ("mobilenet_v2", &[24, 32, 96, 1280], 1280, 52),
    ("wrn40_2", &[32, 64, 128], 128, 37),
    ("wrn16_2", &[32, 64, 128], 128, 13),
    ("resnet8", &[16, 32, 64], 64, 9),
    ("resnet20", &[16, 32, 64], 64, 21),
];

/// Runs `arch` on a batch of 2 at `size` px and checks every output's shape; `sides`
/// are the expected spatial sizes of the stages.
fn check_shapes(arch: &str, small_stem: bool, size: usize, sides: &[usize]) {
    let (_, channels, dim, bns) = EXPECTED.iter().find(|e| e.0 == arch).unwrap();
    let m = model(arch, 7, small_stem);
    assert_eq!((m.arch(), m.num_classes(), m.feature_dim()), (arch, 7, *dim));
    assert_eq!(m.stage_channels(), channels.to_vec(), "{arch}");
    let f = m.forward(&input(2, size, 1), false).unwrap();
    assert_eq!(f.logits.dims(), [2, 7], "{arch}");
    assert_eq!(f.penultimate.dims(), [2, *dim], "{arch}");
    let stage_dims: Vec<Vec<usize>> = f.stages.iter().map(|s| s.dims().to_vec()).collect();
    let expected: Vec<Vec<usize>> = channels.iter().zip(sides).map(|(&c, &s)| vec![2, c, s, s]).collect();
    assert_eq!(stage_dims, expected, "{arch} stages at {size} px");
    assert_eq!((f.bn_inputs.len(), f.bn_running.len(), bn_layers(&*m)), (*bns, *bns, *bns), "{arch}");
    for (x, (mean, var)) in f.bn_inputs.iter().zip(&f.bn_running) {
        assert_eq!((x.dims()[1], mean.dims(), var.dims()), (mean.dims()[0], var.dims(), mean.dims()), "{arch}");
    }
    assert!(f.logits.to_vec_f32().unwrap().iter().all(|v| v.is_finite()), "{arch}");
}

#[test]
fn small_stem_shapes_at_32px() {
    for arch in ["resnet18", "resnet34", "mobilenet_v2"] {
        check_shapes(arch, true, 32, &[32, 16, 8, 4]);
    }
    for arch in ["wrn40_2", "wrn16_2", "resnet8", "resnet20"] {
        check_shapes(arch, true, 32, &[32, 16, 8]);
    }
}

#[test]
fn imagenet_stem_shapes_at_64px() {
    for arch in ["resnet18", "resnet34", "mobilenet_v2"] {
        check_shapes(arch, false, 64, &[16, 8, 4, 2]);
    }
    for arch in ["wrn16_2", "resnet8", "resnet20"] {
        check_shapes(arch, false, 64, &[16, 8, 4]);
    }
}

#[test]
fn imagenet_stem_at_224px() {
    for arch in ["resnet18", "mobilenet_v2"] {
        let m = model(arch, 200, false);
        let f = m.forward(&input(1, 224, 2), false).unwrap();
        assert_eq!(f.logits.dims(), [1, 200]);
        let sides: Vec<usize> = f.stages.iter().map(|s| s.dims()[2]).collect();
        assert_eq!(sides, [56, 28, 14, 7], "{arch}");
    }
}

#[test]
fn parameter_counts_match_torchvision() {
    // torchvision with 1000 classes and its ImageNet stem; the CIFAR models as PyTorch
    // counts them with 10 classes and the 3x3 stem (scripts/make_model_fixtures.py).
    for (arch, classes, small_stem, count) in [
        ("resnet18", 1000, false, 11_689_512),
        ("resnet34", 1000, false, 21_797_672),
        ("mobilenet_v2", 1000, false, 3_504_872),
        ("resnet8", 10, true, 78_042),
        ("resnet20", 10, true, 272_474),
        ("wrn16_2", 10, true, 691_674),
        ("wrn40_2", 10, true, 2_243_546),
    ] {
        assert_eq!(model(arch, classes, small_stem).num_parameters(), count, "{arch}");
    }
}

#[test]
fn unknown_arch_lists_the_valid_names() {
    let err = build("resnet50", 10, false, &mut Rng::new(0)).err().unwrap().to_string();
    assert!(err.contains("resnet50"), "{err}");
    for arch in ARCHS {
        assert!(err.contains(arch), "{err}");
    }
}

#[test]
fn train_mode_updates_bn_statistics_and_eval_does_not() {
    let m = model("resnet8", 10, true);
    let buffers = |m: &dyn Classifier| -> Vec<Vec<f32>> {
        let mut v = vec![];
        m.visit("", &mut |_, s| {
            if let Slot::Buffer(t) = s {
                v.push(t.to_vec_f32().unwrap())
            }
        });
        v
    };
    let counters = |m: &dyn Classifier| -> Vec<u64> {
        let mut v = vec![];
        m.visit("", &mut |_, s| {
            if let Slot::Counter(c) = s {
                v.push(c.get())
            }
        });
        v
    };
    let x = input(4, 32, 3);
    let before = buffers(&*m);
    let eval1 = m.logits(&x, false).unwrap().to_vec_f32().unwrap();
    assert_eq!(buffers(&*m), before, "eval must not touch running statistics");
    assert!(counters(&*m).iter().all(|&c| c == 0));

    let f = m.forward(&x, true).unwrap();
    let after = buffers(&*m);
    assert!(before.iter().zip(&after).all(|(b, a)| b != a), "every running stat must move in train mode");
    assert!(counters(&*m).iter().all(|&c| c == 1));
    // first BN: running_mean = 0.9 * 0 + 0.1 * batch mean of its input
    let (mean, _) = f.bn_inputs[0].channel_stats().unwrap();
    let expected: Vec<f32> = mean.to_vec_f32().unwrap().iter().map(|m| 0.1 * m).collect();
    for (a, e) in f.bn_running[0].0.to_vec_f32().unwrap().iter().zip(&expected) {
        assert!((a - e).abs() < 1e-6, "{a} vs {e}");
    }
    // eval logits now differ (new running stats) and are deterministic
    let eval2 = m.logits(&x, false).unwrap().to_vec_f32().unwrap();
    assert_ne!(eval1, eval2);
    assert_eq!(eval2, m.logits(&x, false).unwrap().to_vec_f32().unwrap());
}

#[test]
fn frozen_model_passes_gradients_to_its_input_only() {
    let m = model("resnet8", 10, true);
    m.freeze(true).unwrap();
    let x = input(2, 32, 4).to_var().unwrap();
    let grads = m.forward(&x, true).unwrap().logits.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_some());
    assert!(m.parameters().iter().all(|p| grads.get(p).is_none()));

    m.freeze(false).unwrap();
    let grads = m.forward(&x, true).unwrap().logits.sum_all().unwrap().backward().unwrap();
    assert!(m.parameters().iter().all(|p| grads.get(p).is_some()));
}

/// Largest singular value of the row-major `rows x cols` matrix `a`, by power iteration
/// on A^T A in f64, run to convergence.
fn top_singular_value(a: &[f32], rows: usize, cols: usize) -> f64 {
    let mut v = vec![1.0f64; cols];
    let mut sigma = 0.0;
    for _ in 0..2000 {
        let av: Vec<f64> = (0..rows).map(|i| (0..cols).map(|j| a[i * cols + j] as f64 * v[j]).sum()).collect();
        let atav: Vec<f64> = (0..cols).map(|j| (0..rows).map(|i| a[i * cols + j] as f64 * av[i]).sum()).collect();
        let norm = atav.iter().map(|x| x * x).sum::<f64>().sqrt();
        sigma = norm.sqrt(); // ||A^T A v|| -> sigma^2 for unit v
        v = atav.iter().map(|x| x / norm).collect();
    }
    sigma
}

/// sigma as the layer applies it: the ratio of the raw weight to the normalised one.
fn applied_sigma(raw: &Tensor, normalised: &Tensor) -> f64 {
    let (r, n) = (raw.to_vec_f32().unwrap(), normalised.to_vec_f32().unwrap());
    let i = (0..r.len()).max_by(|&a, &b| r[a].abs().total_cmp(&r[b].abs())).unwrap();
    (r[i] / n[i]) as f64
}

#[test]
fn spectral_norm_sigma_converges_to_the_top_singular_value() {
    let mut rng = Rng::new(5);
    let sn = SpectralNorm::new(Linear::new(7, 5, true, &mut rng).unwrap(), &mut rng).unwrap();
    for _ in 0..200 {
        sn.weight(true).unwrap();
    }
    let w = &sn.inner.weight;
    let expected = top_singular_value(&w.to_vec_f32().unwrap(), 5, 7);
    let got = applied_sigma(w, &sn.weight(false).unwrap());
    assert!((got - expected).abs() < 1e-4 * expected, "sigma {got} vs {expected}");

    // a transposed conv is normalised along weight dim 1 (its output channels)
    let ct = ConvTranspose2d::new(3, 4, 2, ConvOpts::default(), 0, false, &mut rng).unwrap();
    let sn = SpectralNorm::new(ct, &mut rng).unwrap();
    for _ in 0..200 {
        sn.weight(true).unwrap();
    }
    let w = sn.inner.weight.to_vec_f32().unwrap(); // [c_in 3, c_out 4, 2, 2]
    let mat: Vec<f32> = (0..4).flat_map(|o| (0..3).flat_map(move |i| (0..4).map(move |k| (i, o, k)))).map(|(i, o, k)| w[(i * 4 + o) * 4 + k]).collect();
    let expected = top_singular_value(&mat, 4, 12);
    let got = applied_sigma(&sn.inner.weight, &sn.weight(false).unwrap());
    assert!((got - expected).abs() < 1e-4 * expected, "sigma {got} vs {expected}");
}

#[test]
fn spectral_norm_gradient_matches_finite_differences() {
    let mut rng = Rng::new(6);
    let sn = SpectralNorm::new(Linear::new(4, 3, false, &mut rng).unwrap(), &mut rng).unwrap();
    sn.weight(true).unwrap();
    let r = Tensor::randn(&[3, 4], 0.0, 1.0, &mut rng, Device::Cpu).unwrap();
    // eval mode: u and v stay fixed, so the loss is a smooth function of W alone
    let loss = |sn: &SpectralNorm<Linear>| sn.weight(false).unwrap().mul(&r).unwrap().sum_all().unwrap();
    let grads = loss(&sn).backward().unwrap();
    let g = grads.get(&sn.inner.weight).unwrap().to_vec_f32().unwrap();
    let w0 = sn.inner.weight.to_vec_f32().unwrap();
    let h = 1e-3;
    for i in 0..w0.len() {
        let at = |d: f32| {
            let mut w = w0.clone();
            w[i] += d;
            sn.inner.weight.assign(&Tensor::from_vec(w, &[3, 4], Device::Cpu).unwrap()).unwrap();
            loss(&sn).to_scalar().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!((fd - g[i]).abs() < 2e-2 * (1.0 + g[i].abs()), "dW[{i}]: autograd {} vs finite difference {fd}", g[i]);
    }
}

#[test]
fn ctx_records_only_when_asked() {
    let m = model("resnet8", 10, true);
    let x = input(2, 32, 7);
    let mut ctx = Ctx::eval();
    let f = m.forward_ctx(&x, &mut ctx).unwrap();
    assert!(f.bn_inputs.is_empty() && f.bn_running.is_empty());
    assert_eq!(m.forward(&x, false).unwrap().bn_inputs.len(), 9);
}

#[test]
fn mobilenet_dropout_is_random_in_train_mode_only() {
    let m = model("mobilenet_v2", 10, true);
    let x = input(2, 32, 8);
    let logits = |train: bool| m.logits(&x, train).unwrap().to_vec_f32().unwrap();
    let (a, b) = (logits(true), logits(true));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_ne!(a, b, "two training passes must draw different dropout masks");
    assert_eq!(logits(false), logits(false));
}
