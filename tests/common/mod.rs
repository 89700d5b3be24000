//! Shared test helpers: random inputs, the one `assert_close`, a finite-difference
//! gradient checker and the devices a test runs on (`for_each_device`).
#![allow(dead_code)]

pub mod dp;

pub use dfkd::testing::assert_close;

use dfkd::rng::Rng;
use dfkd::{Device, Result, Tensor};

/// The demo shrunk to seconds, as `--set` values for the `distill` binary (one
/// iteration of one generator and one student step).
pub const TINY_SETS: [&str; 15] = [
    "data.image_size=16",
    "data.train_per_class=8",
    "data.test_per_class=4",
    "teacher.arch=resnet8",
    "teacher.epochs=1",
    "teacher.batch_size=16",
    "generator.channels=[16,16,8,8,8]",
    "distill.batch_size=8",
    "distill.g_steps=1",
    "distill.s_steps=1",
    "distill.iterations_per_epoch=1",
    "distill.epochs=1",
    "distill.checkpoint_every=1",
    "distill.proj_hidden=16",
    "distill.proj_dim=8",
];

/// Random normal tensor (never zeros: a kernel that ignores its input must fail).
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, &mut Rng::new(seed), Device::Cpu).unwrap()
}

/// Uniform tensor in [lo, hi).
pub fn rand(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::rand(shape, lo, hi, &mut Rng::new(seed), Device::Cpu).unwrap()
}

/// `assert_close` on two tensors of one shape (on any devices).
pub fn assert_tensors_close(got: &Tensor, want: &Tensor, abs: f32, rel: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    assert_close(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), abs, rel, what);
}

/// Checks the gradient of `f` with respect to each input against central finite
/// differences of the scalar `sum(f(inputs) * r)`, for a fixed random `r`, on every
/// device of `for_each_device` (the inputs are moved there; tensors that `f` captures
/// must follow its inputs' device). At most 40 entries of each input are probed
/// (spread over the tensor). Tolerance per entry: `abs + rel * |numeric|`.
pub fn check_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>, eps: f32, abs: f32, rel: f32) {
    for_each_device(|device| check_grads_on(device, inputs, &f, eps, abs, rel));
}

fn check_grads_on(device: Device, inputs: &[Tensor], f: &impl Fn(&[Tensor]) -> Result<Tensor>, eps: f32, abs: f32, rel: f32) {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.to_device(device).unwrap().to_var().unwrap()).collect();
    let out = f(&vars).unwrap();
    let r = randn(out.dims(), 999).to_device(device).unwrap();
    let loss = |xs: &[Tensor]| -> f64 {
        let y = dfkd::no_grad(|| f(xs)).unwrap();
        let (y, r) = (y.to_vec_f32().unwrap(), r.to_vec_f32().unwrap());
        y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    let grads = out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let max_probes = 40;
    for (k, v) in vars.iter().enumerate() {
        let analytic = grads.get(v).unwrap_or_else(|| panic!("{device}: input {k} got no gradient")).to_vec_f32().unwrap();
        let base = v.to_vec_f32().unwrap();
        let n = base.len();
        let step = (n / max_probes).max(1);
        for i in (0..n).step_by(step).take(max_probes) {
            let probe = |delta: f32| {
                let mut d = base.clone();
                d[i] += delta;
                let mut xs: Vec<Tensor> = vars.iter().map(|t| t.detach()).collect();
                xs[k] = Tensor::from_vec(d, v.dims(), Device::Cpu).unwrap().to_device(device).unwrap();
                loss(&xs)
            };
            let numeric = ((probe(eps) - probe(-eps)) / (2.0 * eps as f64)) as f32;
            let a = analytic[i];
            assert!(
                (a - numeric).abs() <= abs + rel * numeric.abs(),
                "{device}: input {k} {:?}, entry {i}: analytic {a}, numeric {numeric} (tolerance {abs} + {rel} * |numeric|)",
                v.dims()
            );
        }
    }
}

/// Runs `f` on the CPU (the reference) and then on each of `cuda_devices()`: the
/// emulator always, a GPU when one opens.
pub fn for_each_device(mut f: impl FnMut(Device)) {
    f(Device::Cpu);
    cuda_devices().into_iter().for_each(f);
}

/// The CUDA devices a test compares with the CPU: `CudaEmu` always (the kernels on the
/// emulator), and `Cuda(0)` when a driver is present and the GPU opens; otherwise a
/// note on stderr says why the GPU case was skipped. `DFKD_TEST_DEVICE` picks one
/// device instead (`cuda-emu`, `cuda`, `cuda:N`), and then a GPU that does not open
/// fails the test rather than skipping it (scripts/gpu-check sets it).
pub fn cuda_devices() -> Vec<Device> {
    use dfkd::backend::cuda;
    if let Ok(name) = std::env::var("DFKD_TEST_DEVICE") {
        let dev: Device = name.parse().unwrap_or_else(|e| panic!("DFKD_TEST_DEVICE={name}: {e}"));
        if let Device::Cuda(n) = dev {
            let what = cuda::cuda_device(n).unwrap_or_else(|e| panic!("DFKD_TEST_DEVICE={name}: {e}"));
            eprintln!("note: testing on {dev} ({what})");
        }
        return vec![dev];
    }
    let mut out = vec![Device::CudaEmu];
    match cuda::probe(0) {
        Ok(Some(what)) => {
            eprintln!("note: also testing on cuda:0 ({what})");
            out.push(Device::Cuda(0));
        }
        Ok(None) => eprintln!("note: no CUDA driver (libcuda.so): the Cuda case is skipped, CudaEmu only"),
        Err(e) => eprintln!("note: the Cuda case is skipped: {e}"),
    }
    out
}

/// The pipeline tests' configuration: 16 px, 10 classes, a tiny generator, 4 iterations
/// of 1 generator + 2 student steps; seconds on the CPU.
pub fn tiny(workdir: &std::path::Path) -> dfkd::pipeline::config::Config {
    let mut c = dfkd::pipeline::config::Config::cpu_demo();
    c.workdir = workdir.to_path_buf();
    c.device = "cpu".into();
    c.data.image_size = 16;
    c.data.train_per_class = 8;
    c.data.test_per_class = 4;
    c.teacher.arch = "resnet8".into();
    c.teacher.epochs = 1;
    c.teacher.batch_size = 16;
    c.generator.channels = vec![16, 16, 8, 8, 8];
    c.distill.batch_size = 8;
    c.distill.g_steps = 1;
    c.distill.s_steps = 2;
    c.distill.iterations_per_epoch = 2;
    c.distill.epochs = 2;
    c.distill.checkpoint_every = 2;
    c.distill.eval_every = 1;
    c.distill.proj_hidden = 16;
    c.distill.proj_dim = 8;
    c
}
