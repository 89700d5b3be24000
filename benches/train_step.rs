//! A full ResNet-18 training step (batch 32, 3x64x64, 200 classes, SGD): forward,
//! backward and the optimiser update, in images/s. PyTorch's number for the same step
//! comes from `scripts/bench_pytorch.py`; both are logged in docs/PERF.md.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::models::build;
use dfkd::optim::{Optimizer, ParamGroup};
use dfkd::rng::Rng;
use dfkd::{Device, Tensor};

fn bench(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let (batch, size, classes) = (32, 64, 200);
    let mut rng = Rng::new(0);
    let model = build("resnet18", classes, false, &mut rng).unwrap();
    let mut opt = Optimizer::sgd(vec![ParamGroup::new(model.parameters(), 5e-4)], 0.01, 0.9, false);
    let x = Tensor::randn(&[batch, 3, size, size], 0.0, 1.0, &mut rng, Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function("resnet18_b32_64px_200c_sgd", |b| {
        b.iter(|| {
            let loss = model.logits(&x, true).unwrap().cross_entropy(&labels, 0.0).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            loss.to_scalar().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
