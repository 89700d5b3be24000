//! The CUDA backend on a GPU (cuda:0): the throughput of representative kernels in
//! GB/s against the card's peak memory bandwidth (they are memory-bound: each moves
//! every byte once or twice and does a few flops per element), and the ResNet-18
//! training step of benches/train_step.rs (batch 32, 3x64x64, 200 classes, SGD) in
//! images/s. Without a usable GPU it prints "skipped: no CUDA device" and exits 0, so
//! `cargo bench` stays green on CPU-only machines.
//!
//! Kernels are timed queued back to back between two device synchronisations
//! (`cuda::time_queued`): launches are asynchronous, so the clock must wait for the
//! work, and one synchronisation per batch keeps its cost out of the kernel's time.
//! Bytes are the minimum traffic of the op (inputs read once, outputs written once).

use criterion::{Criterion, Throughput};
use dfkd::backend::{cuda, BinaryOp, Conv2dParams, CpuStorage, Storage};
use dfkd::commands::bench::TrainStep;
use dfkd::rng::Rng;
use dfkd::{Device, Layout};

fn on_gpu(n: usize, seed: u64) -> Storage {
    let mut r = Rng::new(seed);
    Storage::from_cpu(CpuStorage::F32((0..n).map(|_| r.normal()).collect()), Device::Cuda(0)).expect("upload to cuda:0")
}

/// One kernel case: a name, its minimum bytes moved, and the op to run.
struct Case {
    name: &'static str,
    bytes: u64,
    run: Box<dyn Fn()>,
}

fn cases() -> Vec<Case> {
    let mut out = vec![];
    // element-wise binary: 16M f32 (read 2, write 1)
    let n = 1 << 24;
    let (a, b) = (on_gpu(n, 1), on_gpu(n, 2));
    let l = Layout::contiguous(&[n]);
    out.push(Case { name: "binary_add_16M", bytes: 12 * n as u64, run: Box::new(move || drop(a.binary(&l, &b, &l, BinaryOp::Add).unwrap())) });
    // softmax over rows of 1000 (classifier logits): 32768 rows
    let (rows, d) = (32768, 1000);
    let x = on_gpu(rows * d, 3);
    let l = Layout::contiguous(&[rows, d]);
    out.push(Case { name: "softmax_32768x1000", bytes: 8 * (rows * d) as u64, run: Box::new(move || drop(x.softmax_last(&l, false).unwrap())) });
    // batch-norm forward (statistics + normalise) of a ResNet layer-1 activation
    let shape = [32, 64, 56, 56];
    let n: usize = shape.iter().product();
    let (x, g, bt) = (on_gpu(n, 4), on_gpu(64, 5), on_gpu(64, 6));
    let l = Layout::contiguous(&shape);
    out.push(Case { name: "batch_norm_fwd_32x64x56x56", bytes: 12 * n as u64, run: Box::new(move || drop(x.batch_norm_train(&l, &g, &bt, 1e-5).unwrap())) });
    // im2col of a 3x3 stride-1 conv on that activation (reads the input, writes 9x it)
    let p = Conv2dParams { batch: 32, c_in: 64, h_in: 56, w_in: 56, c_out: 64, kh: 3, kw: 3, stride: (1, 1), padding: (1, 1), dilation: (1, 1), groups: 1 };
    let x = on_gpu(n, 7);
    let l = Layout::contiguous(&p.input_shape());
    let col = (p.batch * p.c_in * 9 * p.h_out() * p.w_out()) as u64;
    out.push(Case { name: "im2col_3x3_32x64x56x56", bytes: 4 * (n as u64 + col), run: Box::new(move || drop(cuda::im2col(&x, &l, &p).unwrap())) });
    out
}

fn kernels(c: &mut Criterion, peak: Option<f64>) {
    let cases = cases();
    let mut group = c.benchmark_group("cuda_kernels");
    for case in &cases {
        group.throughput(Throughput::Bytes(case.bytes));
        group.bench_function(case.name, |b| b.iter_custom(|iters| cuda::time_queued(0, iters, &*case.run)));
    }
    group.finish();
    // criterion prints GiB/s; this states them in GB/s and as a share of the peak
    println!("\n{:<28} {:>10} {:>10} {:>8}", "kernel", "median us", "GB/s", "of peak");
    for case in &cases {
        let med = cuda::median_queued(0, &*case.run);
        let gbs = case.bytes as f64 / med / 1e9;
        let share = peak.map(|p| format!("{:.0}%", 100.0 * gbs / p)).unwrap_or_else(|| "n/a".into());
        println!("{:<28} {:>10.1} {:>10.1} {:>8}", case.name, med * 1e6, gbs, share);
    }
}

fn train_step(c: &mut Criterion) {
    let batch = 32;
    let mut step = TrainStep::new("resnet18", batch, 64, 200, false, Device::Cuda(0)).unwrap();
    let mut group = c.benchmark_group("cuda_train_step");
    group.sample_size(20);
    group.throughput(Throughput::Elements(batch as u64));
    // the step reads its loss, which waits for the step's kernels
    group.bench_function("resnet18_b32_64px_200c_sgd", |b| b.iter(|| step.run().unwrap()));
    group.finish();
    if let Some(s) = cuda::cuda_alloc_stats(0) {
        println!(
            "cuda:0 caching allocator: {} requests from the cache, {} from the driver, {} MiB in use, {} MiB cached, peak {} MiB",
            s.hits,
            s.misses,
            s.in_use >> 20,
            s.cached >> 20,
            s.peak >> 20
        );
    }
}

fn main() {
    let Some(what) = cuda::probe(0).unwrap_or_else(|e| {
        eprintln!("{e}");
        None
    }) else {
        println!("skipped: no CUDA device");
        return;
    };
    let peak = cuda::cuda_peak_bandwidth_gbs(0).ok().flatten();
    match peak {
        Some(p) => println!("cuda:0: {what}, peak memory bandwidth {p:.0} GB/s"),
        None => println!("cuda:0: {what} (peak memory bandwidth not reported)"),
    }
    let mut c = Criterion::default().configure_from_args();
    kernels(&mut c, peak);
    train_step(&mut c);
    c.final_summary();
}
