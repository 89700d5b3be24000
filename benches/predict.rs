//! Inference as `distill predict` runs it: one image (batch 1), evaluation mode, no
//! graph, `Classifier::logits`; ResNet-18 at 224 px with 200 classes (the paper's
//! students and teachers at their image size) and the demo's resnet8 at 32 px, each on
//! one thread and on two. Random weights and input (timing only).
//!
//! PyTorch's numbers for the same work: `scripts/bench_pytorch.py --workload predict`
//! (torch.inference_mode, `--threads 1` / `2`); both are logged in docs/PERF.md.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::models::build;
use dfkd::rng::Rng;
use dfkd::{no_grad, Device, Tensor};

fn predict(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let mut group = c.benchmark_group("predict");
    group.sample_size(30).throughput(Throughput::Elements(1));
    // (arch, classes, the CIFAR-style 3x3 stem, image size)
    for (arch, classes, small_stem, size) in [("resnet18", 200, false, 224), ("resnet8", 10, true, 32)] {
        let model = build(arch, classes, small_stem, &mut Rng::new(1)).unwrap();
        let x = Tensor::randn(&[1, 3, size, size], 0.0, 1.0, &mut Rng::new(2), Device::Cpu).unwrap();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            group.bench_function(format!("{arch}_b1_{size}px_{threads}thread"), |b| {
                b.iter(|| pool.install(|| no_grad(|| model.logits(&x, false)).unwrap().to_vec_f32().unwrap()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, predict);
criterion_main!(benches);
