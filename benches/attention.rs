//! The fused attention ops (spatial attention, high-order attention, contrastive
//! similarity, MHAD's normalised distance) against the compositions of engine ops they
//! replace, forward and forward+backward, on every device:
//! - `cpu`: criterion times the fused CPU loops and the composition (which on the CPU
//!   is also the CPU reference), at the CPU demo's shapes (batch 64, 32 px: resnet8/20
//!   stages, generator blocks) and at the paper's shapes (224 px ResNet-18 stages,
//!   generator blocks, 2n = 128 x d = 128) with 4 samples instead of 64, so the bench
//!   takes a few minutes on 2 cores (the paper's contrastive shape is full size);
//! - `cuda-emu`: every numbered version of every kernel is validated against the CPU
//!   loops on each shape (2 samples); emulator timings say nothing about a GPU and
//!   are not taken;
//! - `cuda` (cuda:0, when it opens): every version of every kernel is validated
//!   against the CPU loops there instead of on the emulator; then, at batch 64 for
//!   every shape (the paper's batch; the CPU's `_b4` cases become `_b64`), criterion
//!   times the fused op and the composition on the GPU, forward and forward+backward,
//!   and a table gives each kernel version's time, GB/s and fraction of the card's
//!   measured copy bandwidth, and its speed-up over the composition. Filter with
//!   `cargo bench --bench attention -- /cuda/` to skip the CPU groups.
//!   `DFKD_BENCH_DEVICE=cuda-emu` runs this GPU path on the emulator at batch 2, to
//!   check its plumbing without a GPU (its timings mean nothing).
//!
//! `DFKD_BENCH_CASES=a,b` keeps only the cases whose names contain `a` or `b` (criterion's
//! filter selects timed functions, but validation and the version tables run per case).
//!
//! Throughput is the *minimal* byte count of each pass, the op's inputs read once and
//! outputs written once (f32): spatial attention forward reads a and f and writes y
//! (3 tensors), backward reads a, f, dy and writes da, df (5); high-order attention
//! forward reads z (R(R+1)/2 * C/4 channels) and f and writes y, backward reads z, f
//! and dy and writes dz and df (the V GEMM's intermediates and weights are not
//! counted: a fully fused implementation would not store them); the contrastive loss
//! reads t and s (and writes dt, ds backward), MHAD's distance reads a and b (and
//! writes da, db backward). Criterion prints it as GiB/s.
//! `scripts/bench_attention_pytorch.py` runs the same ops in PyTorch.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::autograd::backward_with;
use dfkd::backend::cuda;
use dfkd::nn::Conv2d;
use dfkd::pipeline::attention::{contrastive_loss, high_order_attention, spatial_attention};
use dfkd::pipeline::losses::normalized_distance;
use dfkd::rng::Rng;
use dfkd::{ConvOpts, Device, Layout, Result, Tensor};
use std::time::Duration;

const ORDER: usize = 3;
const LAMBDA: f32 = 0.05;
const TAU: f32 = 0.1;

#[derive(Clone, Copy, Debug)]
enum Op {
    Spatial,
    HighOrder,
    Contrastive,
    Distance,
}

/// One op at one shape: `[n, c, h, w]`, or `[n, d, 1, 1]` for the contrastive loss.
#[derive(Clone, Copy)]
struct Case {
    op: Op,
    name: &'static str,
    shape: [usize; 4],
}

const CASES: &[Case] = &[
    // the CPU demo: generator blocks at s = 32 (channels 64/32/16/16 at 4/8/16/32 px)
    Case { op: Op::Spatial, name: "demo_gen_64x4x4", shape: [64, 64, 4, 4] },
    Case { op: Op::Spatial, name: "demo_gen_32x8x8", shape: [64, 32, 8, 8] },
    Case { op: Op::Spatial, name: "demo_gen_16x32x32", shape: [64, 16, 32, 32] },
    // the paper: generator blocks at s = 224, 4 samples
    Case { op: Op::Spatial, name: "paper_gen_256x28x28_b4", shape: [4, 256, 28, 28] },
    Case { op: Op::Spatial, name: "paper_gen_64x224x224_b4", shape: [4, 64, 224, 224] },
    // the CPU demo: resnet8/resnet20 stages at 32 px
    Case { op: Op::HighOrder, name: "demo_stage_16x32x32", shape: [64, 16, 32, 32] },
    Case { op: Op::HighOrder, name: "demo_stage_32x16x16", shape: [64, 32, 16, 16] },
    Case { op: Op::HighOrder, name: "demo_stage_64x8x8", shape: [64, 64, 8, 8] },
    // the paper: ResNet-18 stages at 224 px, 4 samples
    Case { op: Op::HighOrder, name: "paper_stage_64x56x56_b4", shape: [4, 64, 56, 56] },
    Case { op: Op::HighOrder, name: "paper_stage_128x28x28_b4", shape: [4, 128, 28, 28] },
    Case { op: Op::HighOrder, name: "paper_stage_256x14x14_b4", shape: [4, 256, 14, 14] },
    Case { op: Op::HighOrder, name: "paper_stage_512x7x7_b4", shape: [4, 512, 7, 7] },
    // SFCL: n anchors of d (the demo's projection is 64 wide, the paper's 128)
    Case { op: Op::Contrastive, name: "demo_n64_d64", shape: [64, 64, 1, 1] },
    Case { op: Op::Contrastive, name: "paper_n64_d128", shape: [64, 128, 1, 1] },
    // MHAD's distance of normalised maps: the demo's stages, a ResNet-18 stage at 224 px
    Case { op: Op::Distance, name: "demo_stage_16x32x32", shape: [64, 16, 32, 32] },
    Case { op: Op::Distance, name: "demo_stage_32x16x16", shape: [64, 32, 16, 16] },
    Case { op: Op::Distance, name: "demo_stage_64x8x8", shape: [64, 64, 8, 8] },
    Case { op: Op::Distance, name: "paper_stage_64x56x56_b4", shape: [4, 64, 56, 56] },
];

/// The op's inputs as leaf variables: spatial (a, f); high-order (f, z, V weights,
/// V biases); contrastive (t, s); distance (a, b).
fn inputs(case: &Case, n: usize, dev: Device) -> Vec<Tensor> {
    let [_, c, h, w] = case.shape;
    let mut rng = Rng::new(7);
    let mut t = |shape: &[usize], std: f32| Tensor::randn(shape, 0.0, std, &mut rng, dev).unwrap().to_var().unwrap();
    match case.op {
        Op::Spatial => vec![t(&[n, c, h, w], 2.0), t(&[n, c, h, w], 1.0)],
        Op::HighOrder => {
            let cq = c / 4;
            let mut v = vec![t(&[n, c, h, w], 1.0), t(&[n, ORDER * (ORDER + 1) / 2 * cq, h, w], 1.0)];
            v.extend((0..ORDER).map(|_| t(&[c, cq, 1, 1], 0.3)).collect::<Vec<_>>());
            v.extend((0..ORDER).map(|_| t(&[c], 0.1)).collect::<Vec<_>>());
            v
        }
        Op::Contrastive => vec![t(&[n, c], 1.0), t(&[n, c], 1.0)],
        Op::Distance => vec![t(&[n, c, h, w], 1.0), t(&[n, c, h, w], 1.0)],
    }
}

fn fused(case: &Case, x: &[Tensor]) -> Result<Tensor> {
    match case.op {
        Op::Spatial => x[0].spatial_attention_fused(&x[1], LAMBDA, true),
        Op::HighOrder => {
            let w = Tensor::cat(&x[2..2 + ORDER].iter().collect::<Vec<_>>(), 0)?;
            let b = Tensor::cat(&x[2 + ORDER..].iter().collect::<Vec<_>>(), 0)?;
            x[1].hoa_products(ORDER)?.conv2d(&w, Some(&b), ConvOpts::default().groups(ORDER))?.hoa_combine(&x[0], ORDER)
        }
        Op::Contrastive => x[0].nt_xent_fused(&x[1], TAU),
        Op::Distance => x[0].normalized_distance(&x[1], 1e-12),
    }
}

fn unfused(case: &Case, x: &[Tensor]) -> Result<Tensor> {
    match case.op {
        Op::Spatial => spatial_attention(&x[0], &x[1], LAMBDA, true),
        Op::HighOrder => {
            let cq = case.shape[1] / 4;
            let mut parts = x[1].split(1, &[cq; ORDER * (ORDER + 1) / 2])?.into_iter();
            let z: Vec<Vec<Tensor>> = (1..=ORDER).map(|r| (0..r).map(|_| parts.next().unwrap()).collect()).collect();
            let v: Vec<Conv2d> =
                (0..ORDER).map(|r| Conv2d { weight: x[2 + r].clone(), bias: Some(x[2 + ORDER + r].clone()), opts: ConvOpts::default() }).collect();
            high_order_attention(&x[0], &z, &v)
        }
        Op::Contrastive => contrastive_loss(&x[0], &x[1], TAU),
        Op::Distance => normalized_distance(&x[0], &x[1]),
    }
}

/// Backward from `dy` after a forward; returns the output and the inputs' gradients.
fn fwd_bwd(y: &Tensor, dy: &Tensor, inputs: &[Tensor]) -> Vec<Tensor> {
    let g = backward_with(y, dy.clone()).unwrap();
    let mut out = vec![y.clone()];
    out.extend(inputs.iter().map(|x| g.get(x).unwrap().clone()));
    out
}

/// The output gradient backward starts from: made once per case, outside the timed
/// region (a fresh activation-sized buffer per iteration costs page faults).
fn output_grad(y: &Tensor) -> Tensor {
    Tensor::full(0.5, y.dims(), y.device()).unwrap()
}

/// Minimal bytes of (forward, backward) in f32, as the header defines them.
fn min_bytes(case: &Case, n: usize) -> (u64, u64) {
    let [_, c, h, w] = case.shape;
    let map = (n * c * h * w * 4) as u64;
    match case.op {
        Op::Spatial => (3 * map, 5 * map),
        Op::HighOrder => {
            let z = map / 4 * (ORDER * (ORDER + 1) / 2) as u64;
            (z + 2 * map, 2 * z + 3 * map)
        }
        Op::Contrastive | Op::Distance => (2 * map, 4 * map),
    }
}

/// The kernel families an op's fused path launches.
fn families(op: Op) -> &'static [&'static str] {
    match op {
        Op::Spatial => &["spatial_attention_fwd", "spatial_attention_bwd"],
        Op::HighOrder => &["hoa_products_fwd", "hoa_products_bwd", "hoa_combine_fwd", "hoa_combine_bwd"],
        Op::Contrastive => &["contrastive_rows"],
        Op::Distance => &[],
    }
}

/// Every version of every kernel the case uses, forward and backward on `dev` (the
/// emulator or a GPU) against the CPU loops (1e-5 + 1e-4 * |cpu|).
fn validate(case: &Case, dev: Device) {
    let n = case.shape[0].min(2);
    let vals = |dev: Device| -> Vec<Vec<f32>> {
        let x = inputs(case, n, dev);
        let y = fused(case, &x).unwrap();
        fwd_bwd(&y, &output_grad(&y), &x).iter().map(|t| t.to_vec_f32().unwrap()).collect()
    };
    let want = vals(Device::Cpu);
    for family in families(case.op) {
        let versions = dfkd::fused::versions(family).unwrap();
        for &v in versions {
            dfkd::fused::force_version(family, Some(v)).unwrap();
            let got = vals(dev);
            dfkd::fused::force_version(family, None).unwrap();
            let worst = got.iter().flatten().zip(want.iter().flatten()).map(|(g, w)| (g - w).abs() / (1e-5 + 1e-4 * w.abs())).fold(0f32, f32::max);
            let verdict = if worst <= 1.0 { "valid" } else { "MISMATCH" };
            let note = if dev == Device::CudaEmu { "; timing needs a GPU" } else { "" };
            println!("{dev} {}/{}: {family} v{v}: {verdict} (worst error {worst:.2} of the tolerance{note})", op_name(case.op), case.name);
            assert!(worst <= 1.0, "{family} v{v} disagrees with the CPU on {}", case.name);
        }
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Spatial => "spatial_attention",
        Op::HighOrder => "high_order_attention",
        Op::Contrastive => "contrastive",
        Op::Distance => "normalized_distance",
    }
}

fn bench_cpu(c: &mut Criterion, case: &Case) {
    let n = case.shape[0];
    let (fwd_bytes, bwd_bytes) = min_bytes(case, n);
    let mut group = c.benchmark_group(format!("{}/{}/cpu", op_name(case.op), case.name));
    group.sample_size(10).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(2));
    let x = inputs(case, n, Device::Cpu);
    let dy = output_grad(&dfkd::no_grad(|| fused(case, &x)).unwrap());
    for (label, f) in [("fused", fused as fn(&Case, &[Tensor]) -> Result<Tensor>), ("unfused", unfused)] {
        group.throughput(Throughput::Bytes(fwd_bytes));
        group.bench_function(format!("{label}_fwd"), |b| b.iter(|| dfkd::no_grad(|| f(case, &x).unwrap())));
        group.throughput(Throughput::Bytes(fwd_bytes + bwd_bytes));
        group.bench_function(format!("{label}_fwd_bwd"), |b| b.iter(|| fwd_bwd(&f(case, &x).unwrap(), &dy, &x)));
    }
    group.finish();
}

/// The bandwidth cuda:0 reaches copying 256 MiB (bytes read + written per second):
/// the ceiling the fractions are of. `DFKD_PEAK_GBS` overrides it.
fn measured_ceiling(dev: Device) -> f64 {
    if let Some(v) = std::env::var("DFKD_PEAK_GBS").ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    let n = if dev == Device::CudaEmu { 1 << 20 } else { 1 << 26 };
    let x = Tensor::full(1.0, &[n], dev).unwrap();
    let s = x.storage();
    let l = Layout::contiguous(&[n]);
    let t = cuda::median_queued(0, &|| drop(s.copy_strided(&l).unwrap()));
    8.0 * n as f64 / t / 1e9
}

/// One case on the GPU `dev` at batch 64 (2 on the emulator): criterion for the fused op
/// and the composition, then every kernel version against the composition.
fn bench_cuda(c: &mut Criterion, case: &Case, dev: Device, ceiling: f64) {
    validate(case, dev);
    let n = if dev == Device::CudaEmu { 2 } else { 64 };
    let name = case.name.replace("_b4", &format!("_b{n}"));
    let (fwd_bytes, bwd_bytes) = min_bytes(case, n);
    let x = inputs(case, n, dev);
    let dy = output_grad(&dfkd::no_grad(|| fused(case, &x)).unwrap());
    let (x, dy) = (&x, &dy);
    let run_fwd = |f: fn(&Case, &[Tensor]) -> Result<Tensor>| move || drop(dfkd::no_grad(|| f(case, x).unwrap()));
    let run_fwd_bwd = |f: fn(&Case, &[Tensor]) -> Result<Tensor>| move || drop(fwd_bwd(&f(case, x).unwrap(), dy, x));
    let mut group = c.benchmark_group(format!("{}/{name}/cuda", op_name(case.op)));
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for (label, f) in [("fused", fused as fn(&Case, &[Tensor]) -> Result<Tensor>), ("unfused", unfused)] {
        group.throughput(Throughput::Bytes(fwd_bytes));
        let fwd = run_fwd(f);
        group.bench_function(format!("{label}_fwd"), |b| b.iter_custom(|iters| cuda::time_queued(0, iters, &fwd)));
        group.throughput(Throughput::Bytes(fwd_bytes + bwd_bytes));
        let both = run_fwd_bwd(f);
        group.bench_function(format!("{label}_fwd_bwd"), |b| b.iter_custom(|iters| cuda::time_queued(0, iters, &both)));
    }
    group.finish();

    let row = |what: &str, tf: f64, tb: f64, base: Option<f64>| {
        let gbs = |bytes: u64, t: f64| bytes as f64 / t / 1e9;
        let (gf, gb) = (gbs(fwd_bytes, tf), gbs(fwd_bytes + bwd_bytes, tb));
        let speedup = base.map(|u| format!("{:.2}x", u / tb)).unwrap_or_default();
        println!(
            "{:<26} {:>9.1} {:>8.0} {:>5.0}% {:>11.1} {:>8.0} {:>5.0}% {:>9}",
            what,
            tf * 1e6,
            gf,
            100.0 * gf / ceiling,
            tb * 1e6,
            gb,
            100.0 * gb / ceiling,
            speedup
        );
    };
    let (uf, ub) = (cuda::median_queued(0, &run_fwd(unfused)), cuda::median_queued(0, &run_fwd_bwd(unfused)));
    println!("\n{dev} {}/{name}: minimal bytes fwd {fwd_bytes}, fwd+bwd {}; fractions of {ceiling:.0} GB/s", op_name(case.op), fwd_bytes + bwd_bytes);
    println!("{:<26} {:>9} {:>8} {:>6} {:>11} {:>8} {:>6} {:>9}", "kernel version", "fwd us", "GB/s", "ceil", "fwd+bwd us", "GB/s", "ceil", "vs unfused");
    row("unfused composition", uf, ub, None);
    row("fused (defaults)", cuda::median_queued(0, &run_fwd(fused)), cuda::median_queued(0, &run_fwd_bwd(fused)), Some(ub));
    for family in families(case.op) {
        for &v in dfkd::fused::versions(family).unwrap() {
            dfkd::fused::force_version(family, Some(v)).unwrap();
            let (tf, tb) = (cuda::median_queued(0, &run_fwd(fused)), cuda::median_queued(0, &run_fwd_bwd(fused)));
            dfkd::fused::force_version(family, None).unwrap();
            row(&format!("{family} v{v}"), tf, tb, Some(ub));
        }
    }
}

fn bench(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let gpu = match std::env::var("DFKD_BENCH_DEVICE") {
        Ok(d) => Some(d.parse::<Device>().unwrap_or_else(|e| panic!("DFKD_BENCH_DEVICE={d}: {e}"))),
        Err(_) => cuda::probe(0)
            .unwrap_or_else(|e| {
                eprintln!("{e}");
                None
            })
            .map(|_| Device::Cuda(0)),
    };
    let target = gpu.map(|dev| {
        let g = measured_ceiling(dev);
        let what = if let Device::Cuda(k) = dev { cuda::cuda_device(k).unwrap() } else { "the emulator: plumbing only".into() };
        println!("{dev}: {what}; copy bandwidth {g:.0} GB/s (the ceiling of the fractions below)");
        (dev, g)
    });
    let only = std::env::var("DFKD_BENCH_CASES").ok();
    let wanted = |c: &Case| only.as_deref().is_none_or(|o| o.split(',').any(|w| c.name.contains(w)));
    for case in CASES.iter().filter(|c| wanted(c)) {
        match target {
            Some((dev, g)) => bench_cuda(c, case, dev, g),
            None => {
                validate(case, Device::CudaEmu);
                println!("cuda {}/{}: skipped: no CUDA device", op_name(case.op), case.name);
            }
        }
        bench_cpu(c, case);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
