//! A full ResNet-18 training step (batch 32, 3x64x64, 200 classes, SGD): forward,
//! backward and the optimiser update, in images/s. PyTorch's number for the same step
//! comes from `scripts/bench_pytorch.py`; both are logged in docs/PERF.md.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::commands::bench::TrainStep;
use dfkd::Device;

fn bench(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let batch = 32;
    let mut step = TrainStep::new("resnet18", batch, 64, 200, false, Device::Cpu).unwrap();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("resnet18_b32_64px_200c_sgd", |b| b.iter(|| step.run().unwrap()));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
