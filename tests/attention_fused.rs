//! The fused attention ops against the compositions of engine ops they replace
//! (src/pipeline/attention.rs), forward values and input gradients, on the CPU and on
//! the emulated CUDA device. Inputs are random, non-zero, at odd sizes (plus a plane
//! long enough for the kernels' block-per-plane versions). Tolerance `abs + rel * |ref|`:
//! the fused ops use a vectorised exp (CPU, < 2e-7 relative) or CUDA's expf and f32
//! sums where the composition uses libm and f64 sums, so values agree to a few float
//! roundings; 1e-5 + 1e-5 forward and 1e-5 + 1e-4 for gradients, which sum more terms.

mod common;
use common::assert_close;
use dfkd::nn::{Conv2d, Module};
use dfkd::pipeline::attention::{contrastive_loss, high_order_attention, HighOrderAttention};
use dfkd::pipeline::losses::normalized_distance;
use dfkd::rng::Rng;
use dfkd::{ConvOpts, Device, Result, Tensor};

/// The CPU, the emulator, and `cuda:0` when one opens (or `DFKD_TEST_DEVICE`).
fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(common::cuda_devices());
    d
}
const FWD: (f32, f32) = (1e-5, 1e-5);
const GRAD: (f32, f32) = (1e-5, 1e-4);

fn randn(shape: &[usize], seed: u64, dev: Device) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, &mut Rng::new(seed), dev).unwrap()
}

/// Output values, then the gradient of `sum(out * r)` for each input, flattened.
fn run(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Vec<Vec<f32>> {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.to_var().unwrap()).collect();
    let out = f(&vars).unwrap();
    let r = randn(out.dims(), 77, out.device());
    let grads = out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut all = vec![out.to_vec_f32().unwrap()];
    all.extend(vars.iter().map(|v| grads.get(v).expect("a gradient for every input").to_vec_f32().unwrap()));
    all
}

fn compare(what: &str, fused: Vec<Vec<f32>>, reference: Vec<Vec<f32>>) {
    for (k, (got, want)) in fused.iter().zip(&reference).enumerate() {
        let (abs, rel) = if k == 0 { FWD } else { GRAD };
        let part = if k == 0 { "forward".to_string() } else { format!("gradient of input {}", k - 1) };
        assert_close(got, want, abs, rel, &format!("{what}: {part}"));
    }
}

#[test]
fn spatial_attention_matches_the_composition() {
    // 63 (odd, scalar paths), 64 (4-wide paths), 1517 (block-per-plane versions)
    for dev in devices() {
        for (shape, scaled) in [([3, 5, 7, 9], true), ([2, 3, 8, 8], true), ([1, 2, 37, 41], true), ([2, 3, 5, 3], false)] {
            let (a, f) = (randn(&shape, 1, dev).affine(2.0, 0.0).unwrap(), randn(&shape, 2, dev));
            let fused = run(&[a.clone(), f.clone()], |v| v[0].spatial_attention_fused(&v[1], 0.05, scaled));
            let reference = run(&[a, f], |v| dfkd::pipeline::attention::spatial_attention(&v[0], &v[1], 0.05, scaled));
            compare(&format!("{dev} spatial attention {shape:?} scaled={scaled}"), fused, reference);
        }
    }
}

/// The slices of the stacked 1x1-conv output that order r multiplies, as the
/// composition takes them.
fn split_orders(z: &Tensor, order: usize) -> Vec<Vec<Tensor>> {
    let c = z.dims()[1] / (order * (order + 1) / 2);
    let mut parts = z.split(1, &vec![c; order * (order + 1) / 2]).unwrap().into_iter();
    (1..=order).map(|r| (0..r).map(|_| parts.next().unwrap()).collect()).collect()
}

#[test]
fn high_order_products_and_combine_match_their_compositions() {
    for dev in devices() {
        for (order, n, c, h, w) in [(3, 2, 5, 3, 7), (2, 3, 4, 4, 4), (4, 1, 3, 5, 5), (1, 2, 3, 1, 1)] {
            let what = format!("{dev} order {order} [{n}, {c}, {h}, {w}]");
            let z = randn(&[n, order * (order + 1) / 2 * c, h, w], 3, dev);
            let fused = run(std::slice::from_ref(&z), |v| v[0].hoa_products(order));
            let reference = run(&[z], |v| {
                let prods: Vec<Tensor> =
                    split_orders(&v[0], order).into_iter().map(|zr| zr[1..].iter().try_fold(zr[0].clone(), |p, z| p.mul(z))?.relu()).collect::<Result<_>>()?;
                Tensor::cat(&prods.iter().collect::<Vec<_>>(), 1)
            });
            compare(&format!("{what} products"), fused, reference);

            let (u, f) = (randn(&[n, order * c, h, w], 4, dev).affine(2.0, 0.0).unwrap(), randn(&[n, c, h, w], 5, dev));
            let fused = run(&[u.clone(), f.clone()], |v| v[0].hoa_combine(&v[1], order));
            let reference = run(&[u, f], |v| {
                let parts = v[0].split(1, &vec![c; order])?;
                let sum = parts[1..].iter().try_fold(parts[0].sigmoid()?, |s, p| s.add(&p.sigmoid()?))?;
                sum.scale(1.0 / order as f32)?.mul(&v[1])
            });
            compare(&format!("{what} combine"), fused, reference);
        }
    }
}

/// The whole MHA after its 1x1 convs as the module runs it fused (products, one
/// grouped V conv, combine) against `high_order_attention`, gradients of F, z and the
/// V weights and biases included.
#[test]
fn high_order_attention_matches_the_composition() {
    let (order, n, c, h, w) = (3, 2, 12, 5, 7);
    let cq = c / 4;
    for dev in devices() {
        let z = randn(&[n, 6 * cq, h, w], 6, dev);
        let f = randn(&[n, c, h, w], 7, dev);
        let vw: Vec<Tensor> = (0..order).map(|r| randn(&[c, cq, 1, 1], 10 + r as u64, dev).scale(0.5).unwrap()).collect();
        let vb: Vec<Tensor> = (0..order).map(|r| randn(&[c], 20 + r as u64, dev)).collect();
        let mut inputs = vec![f, z];
        inputs.extend(vw.iter().cloned());
        inputs.extend(vb.iter().cloned());
        let fused = run(&inputs, |v| {
            let (ws, bs) = (&v[2..2 + order], &v[2 + order..]);
            let w = Tensor::cat(&ws.iter().collect::<Vec<_>>(), 0)?;
            let b = Tensor::cat(&bs.iter().collect::<Vec<_>>(), 0)?;
            v[1].hoa_products(order)?.conv2d(&w, Some(&b), ConvOpts::default().groups(order))?.hoa_combine(&v[0], order)
        });
        let reference = run(&inputs, |v| {
            let convs: Vec<Conv2d> =
                (0..order).map(|r| Conv2d { weight: v[2 + r].clone(), bias: Some(v[2 + order + r].clone()), opts: ConvOpts::default() }).collect();
            high_order_attention(&v[0], &split_orders(&v[1], order), &convs)
        });
        compare(&format!("{dev} high-order attention"), fused, reference);
    }
}

/// The module switch: the same weights give the same output and parameter gradients.
#[test]
fn high_order_attention_module_fused_and_unfused_agree() {
    let f = randn(&[3, 8, 5, 5], 8, Device::Cpu);
    let grads = |fused: bool| {
        let m = HighOrderAttention::new(8, 3, fused, &mut Rng::new(9)).unwrap();
        let fv = f.to_var().unwrap();
        let y = m.forward(&fv).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y.to_vec_f32().unwrap(), g.get(&fv).unwrap().to_vec_f32().unwrap()];
        out.extend(m.parameters().iter().map(|p| g.get(p).unwrap().to_vec_f32().unwrap()));
        out
    };
    compare("module", grads(true), grads(false));
}

#[test]
fn contrastive_loss_matches_the_composition() {
    for dev in devices() {
        for (n, d, tau) in [(7, 11, 0.1), (64, 33, 0.5), (1, 5, 0.1)] {
            let (t, s) = (randn(&[n, d], 30, dev), randn(&[n, d], 31, dev).affine(3.0, 0.0).unwrap());
            let fused = run(&[t.clone(), s.clone()], |v| v[0].nt_xent_fused(&v[1], tau));
            let reference = run(&[t, s], |v| contrastive_loss(&v[0], &v[1], tau));
            compare(&format!("{dev} NT-Xent n={n} d={d} tau={tau}"), fused, reference);
        }
    }
}

/// MHAD's normalised distance against two `l2_normalize`, a difference, its square and a
/// sum: rows of odd lengths, maps of a demo stage's size (two samples), and a row whose
/// norm is under the floor (the clamp's branch of the backward pass).
#[test]
fn normalized_distance_matches_the_composition() {
    for dev in devices() {
        for shape in [vec![3, 7], vec![2, 5, 3, 3], vec![2, 16, 32, 32], vec![1, 1]] {
            let (a, b) = (randn(&shape, 90, dev), randn(&shape, 91, dev).affine(0.5, 0.2).unwrap());
            let fused = run(&[a.clone(), b.clone()], |v| v[0].normalized_distance(&v[1], 1e-12));
            let reference = run(&[a, b], |v| normalized_distance(&v[0], &v[1]));
            compare(&format!("{dev} normalized distance {shape:?}"), fused, reference);
        }
        // row 1 of a has norm ~3e-13 < 1e-12: a / eps, no projection term
        let tiny = Tensor::from_vec(vec![1.0, 1.0, 1.0, 1.0, 1e-13, -2e-13, 1e-13, 1e-13], &[2, 4], Device::Cpu).unwrap().to_device(dev).unwrap();
        let a = randn(&[2, 4], 92, dev).mul(&tiny).unwrap();
        let b = randn(&[2, 4], 93, dev);
        let fused = run(&[a.clone(), b.clone()], |v| v[0].normalized_distance(&v[1], 1e-12));
        let reference = run(&[a, b], |v| normalized_distance(&v[0], &v[1]));
        compare(&format!("{dev} normalized distance, a clamped row"), fused, reference);
    }
}
