//! Every differentiable op's backward against central finite differences, on random
//! inputs, on the CPU and the CUDA kernels (`common::for_each_device`). Tolerances are
//! for f32 forward passes with step 1e-2: abs + rel * |numeric|.

mod common;
use common::{check_grads, rand, randn};
use dfkd::{ConvOpts, Device, Tensor};

const EPS: f32 = 1e-2;
const ABS: f32 = 2e-3;
const REL: f32 = 1e-2;

fn check1(x: Tensor, f: impl Fn(&Tensor) -> dfkd::Result<Tensor>) {
    check_grads(&[x], |v| f(&v[0]), EPS, ABS, REL);
}
fn check2(a: Tensor, b: Tensor, f: impl Fn(&Tensor, &Tensor) -> dfkd::Result<Tensor>) {
    check_grads(&[a, b], |v| f(&v[0], &v[1]), EPS, ABS, REL);
}

#[test]
fn unary_ops() {
    let x = randn(&[3, 5], 1);
    let pos = rand(&[3, 5], 0.5, 2.0, 2);
    check1(x.clone(), |x| x.exp());
    check1(pos.clone(), |x| x.log());
    check1(pos.clone(), |x| x.sqrt());
    check1(pos.clone(), |x| x.powf(1.7));
    check1(x.clone(), |x| x.sqr());
    check1(pos.clone(), |x| x.recip());
    check1(x.clone(), |x| x.sigmoid());
    check1(x.clone(), |x| x.tanh());
    check1(x.clone(), |x| x.affine(-1.5, 0.3));
    check1(x.clone(), |x| x.neg());
    // kinked ops: inputs kept away from the kink by more than EPS
    let away = rand(&[4, 6], 0.1, 1.0, 3).mul(&randn(&[4, 6], 4).map(dfkd::backend::UnaryOp::Sign).unwrap()).unwrap();
    check1(away.clone(), |x| x.relu());
    check1(away.clone(), |x| x.leaky_relu(0.2));
    check1(away.clone(), |x| x.abs());
    check1(away.clone(), |x| x.clamp(-0.05, 0.05));
}

#[test]
fn binary_ops_with_broadcasting() {
    let a = randn(&[2, 3, 4], 5);
    let b = randn(&[3, 1], 6);
    let pos = rand(&[1, 4], 0.5, 2.0, 7);
    check2(a.clone(), b.clone(), |a, b| a.add(b));
    check2(a.clone(), b.clone(), |a, b| a.sub(b));
    check2(a.clone(), b.clone(), |a, b| a.mul(b));
    check2(a.clone(), pos.clone(), |a, b| a.div(b));
    // operands differ by more than EPS everywhere: max and min are smooth there
    let gap = rand(&[2, 3, 4], 0.1, 0.5, 8).mul(&randn(&[2, 3, 4], 80).map(dfkd::backend::UnaryOp::Sign).unwrap()).unwrap();
    let c = a.add(&gap).unwrap();
    check2(a.clone(), c.clone(), |a, b| a.maximum(b));
    check2(a.clone(), c.clone(), |a, b| a.minimum(b));
    // a value used twice accumulates both gradients
    check1(a.clone(), |a| a.mul(a)?.add(a));
}

#[test]
fn reductions() {
    let x = randn(&[3, 4, 5], 9);
    check1(x.clone(), |x| x.sum(&[1], false));
    check1(x.clone(), |x| x.sum(&[0, 2], true));
    check1(x.clone(), |x| x.mean(&[2], false));
    check1(x.clone(), |x| x.var(&[0, 2], true, true));
    check1(x.clone(), |x| x.var(&[1], false, false));
    check1(x.clone(), |x| x.max(&[1], false));
    check1(x.clone(), |x| x.min(&[0, 2], true));
    check1(x.clone(), |x| x.sum_all());
    check1(x.permute(&[2, 0, 1]).unwrap(), |x| x.sum(&[1], false));
}

#[test]
fn matmul_and_linear() {
    check2(randn(&[3, 4], 10), randn(&[4, 5], 11), |a, b| a.matmul(b));
    check2(randn(&[2, 3, 4], 12), randn(&[4, 2], 13), |a, b| a.matmul(b));
    check2(randn(&[2, 3, 4], 14), randn(&[2, 5, 4], 15), |a, b| a.matmul(&b.t()?));
    check_grads(&[randn(&[3, 4], 16), randn(&[5, 4], 17), randn(&[5], 18)], |v| v[0].linear(&v[1], Some(&v[2])), EPS, ABS, REL);
}

#[test]
fn softmax_and_losses() {
    let x = randn(&[4, 6], 19);
    check1(x.clone(), |x| x.softmax(1));
    check1(x.clone(), |x| x.log_softmax(1));
    check1(randn(&[3, 4, 5], 20), |x| x.softmax(1));
    check1(x.clone(), |x| x.cross_entropy(&[0, 5, 2, 3], 0.0));
    check1(x.clone(), |x| x.cross_entropy(&[1, 1, 4, 0], 0.1));
    check2(x.clone(), randn(&[4, 6], 21), |s, t| s.kd_loss(t, 4.0));
    check2(x.clone(), randn(&[4, 6], 22), |a, b| a.mse(b));
    check2(x.clone(), randn(&[4, 6], 23).affine(1.0, 3.0).unwrap(), |a, b| a.l1(b));
    check1(x.clone(), |x| x.l2_normalize(1, 1e-12));
}

#[test]
fn views_and_copies() {
    let x = randn(&[2, 3, 4], 24);
    check1(x.clone(), |x| x.reshape(&[6, 4])?.exp());
    check1(x.clone(), |x| x.permute(&[2, 0, 1])?.contiguous()?.sqr());
    check1(x.clone(), |x| x.narrow(2, 1, 2)?.exp());
    check1(randn(&[3, 1], 25), |x| x.broadcast_as(&[2, 3, 4])?.sqr());
    check2(x.clone(), randn(&[2, 2, 4], 26), |a, b| Tensor::cat(&[a, b], 1)?.sqr());
    check1(x.clone(), |x| x.t()?.contiguous()?.sqr());
}

#[test]
fn convolutions() {
    let opts =
        [ConvOpts::default(), ConvOpts::default().stride(2).padding(1), ConvOpts::default().padding(2).dilation(2), ConvOpts::default().padding(1).groups(2)];
    for o in opts {
        check_grads(&[randn(&[2, 4, 7, 6], 27), randn(&[6, 4 / o.groups, 3, 3], 28), randn(&[6], 29)], |v| v[0].conv2d(&v[1], Some(&v[2]), o), EPS, ABS, REL);
    }
    // depthwise
    check2(randn(&[2, 3, 5, 5], 30), randn(&[3, 1, 3, 3], 31), |x, w| x.conv2d(w, None, ConvOpts::default().padding(1).groups(3)));
    // transposed, as the generator uses it (3x3, stride 1, padding 1) and strided
    check2(randn(&[2, 4, 5, 5], 32), randn(&[4, 3, 3, 3], 33), |x, w| x.conv_transpose2d(w, None, ConvOpts::default().padding(1), (0, 0)));
    check2(randn(&[2, 4, 4, 3], 34), randn(&[4, 2, 3, 3], 35), |x, w| x.conv_transpose2d(w, None, ConvOpts::default().stride(2).padding(1), (1, 1)));
}

#[test]
fn pooling_and_upsampling() {
    // a permutation of distinct values: no ties, so max pooling is differentiable
    let distinct = |shape: &[usize], seed| {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05).collect();
        dfkd::rng::Rng::new(seed).shuffle(&mut v);
        Tensor::from_vec(v, shape, dfkd::Device::Cpu).unwrap()
    };
    check1(distinct(&[2, 3, 6, 7], 36), |x| x.max_pool2d(2, 2, 0));
    check1(distinct(&[2, 3, 7, 7], 37), |x| x.max_pool2d(3, 2, 1));
    let (_, idx) = distinct(&[2, 3, 6, 6], 38).max_pool2d_with_indices(2, 2, 0).unwrap();
    check1(randn(&[2, 3, 3, 3], 39), move |x| x.max_unpool2d(&idx.to_device(x.device())?, (6, 6)));
    // a remapping that repeats some pixels and drops others (gradients must add up)
    let remap: Vec<u32> = (0..2 * 3 * 4 * 5).map(|i| ((i * 7 + i / 3) % 30) as u32).collect();
    let remap = Tensor::from_vec(remap, &[2, 3, 4, 5], Device::Cpu).unwrap();
    check1(randn(&[2, 3, 5, 6], 46), move |x| x.gather_planes(&remap.to_device(x.device())?));
    // a random resized crop, shifted and mirrored: four gathers weighted per pixel (the
    // same draws at every call)
    check1(randn(&[2, 3, 6, 6], 47), |x| dfkd::pipeline::augment::random_crop_shift_flip(x, 0.3, 1, &mut dfkd::rng::Rng::new(8)));
    check1(randn(&[2, 3, 6, 7], 40), |x| x.avg_pool2d(2, 2, 0));
    check1(randn(&[2, 3, 7, 7], 41), |x| x.avg_pool2d(3, 2, 1));
    check1(randn(&[2, 3, 4, 4], 42), |x| x.adaptive_avg_pool2d(1));
    check1(randn(&[2, 3, 4, 5], 43), |x| x.upsample_nearest2d(2));
}

#[test]
fn batch_norm_train_and_eval() {
    let (rm, rv) = (randn(&[3], 44), rand(&[3], 0.5, 1.5, 45));
    let bn = |train: bool| {
        let (rm, rv) = (rm.deep_copy().unwrap(), rv.deep_copy().unwrap());
        // the running statistics follow the input's device (training-mode calls update
        // them but do not read them, so a copy per call changes nothing)
        move |v: &[Tensor]| v[0].batch_norm(&v[1], &v[2], &rm.to_device(v[0].device())?, &rv.to_device(v[0].device())?, train, 0.1, 1e-5)
    };
    let x = randn(&[4, 3, 3, 2], 46).affine(2.0, 1.0).unwrap();
    check_grads(&[x.clone(), randn(&[3], 47), randn(&[3], 48)], bn(true), EPS, ABS, REL);
    check_grads(&[x.clone(), randn(&[3], 47), randn(&[3], 48)], bn(false), EPS, ABS, REL);
    check_grads(&[randn(&[5, 3], 49), randn(&[3], 50), randn(&[3], 51)], bn(true), EPS, ABS, REL);
    check1(x, |x| {
        let (m, v) = x.channel_stats()?;
        m.add(&v)
    });
    // evaluation-mode batch norm's per-channel affine map, gradients of all three
    check_grads(&[randn(&[3, 4, 2, 5], 52), randn(&[4], 53), randn(&[4], 54)], |v| v[0].channel_affine(&v[1], &v[2]), EPS, ABS, REL);
}

#[test]
fn fused_attention_ops() {
    // spatial attention, scaled (k = lambda * h * w) and not
    check2(randn(&[2, 3, 4, 5], 60), randn(&[2, 3, 4, 5], 61), |a, f| a.spatial_attention_fused(f, 0.05, true));
    check2(randn(&[2, 3, 3, 3], 62).affine(2.0, 0.0).unwrap(), randn(&[2, 3, 3, 3], 63), |a, f| a.spatial_attention_fused(f, 0.5, false));
    // high-order products: factors at least 0.3 from 0, so a probe never flips a
    // product's sign (the ReLU kink)
    let away = rand(&[2, 12, 3, 3], 0.3, 1.5, 64).mul(&randn(&[2, 12, 3, 3], 65).map(dfkd::backend::UnaryOp::Sign).unwrap()).unwrap();
    check1(away, |z| z.hoa_products(3));
    check2(randn(&[2, 6, 3, 3], 66), randn(&[2, 2, 3, 3], 67), |u, f| u.hoa_combine(f, 3));
    // NT-Xent on unnormalised features
    check2(randn(&[5, 7], 68), randn(&[5, 7], 69).affine(2.0, 0.0).unwrap(), |t, s| t.nt_xent_fused(s, 0.5));
    check2(randn(&[4, 6], 70), randn(&[4, 6], 71), |t, s| t.nt_xent_fused(s, 0.1));
    // MHAD's distance of normalised maps
    check2(randn(&[3, 2, 2, 3], 72), randn(&[3, 2, 2, 3], 73).affine(2.0, 0.5).unwrap(), |a, b| a.normalized_distance(b, 1e-12));
}
