//! Whole training steps, in images/s:
//! - a ResNet-18 step (batch 32, 3x64x64, 200 classes, SGD): forward, backward and the
//!   optimiser update;
//! - one demo distillation iteration (`Config::cpu_demo()`: 5 generator + 15 student
//!   steps, batch 64, 32 px, resnet20 -> resnet8 with random weights, MHAD and SFCL),
//!   counting the 20 batches of synthetic images it trains on.
//!
//! PyTorch's numbers for the same work come from `scripts/bench_pytorch.py`
//! (`--workload train-step` / `demo-iteration`); both are logged in docs/PERF.md.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::commands::bench::TrainStep;
use dfkd::models::build;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
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

fn demo_iteration(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let cfg = Config::cpu_demo();
    let d = &cfg.distill;
    let teacher = build(&cfg.teacher.arch, cfg.data.num_classes, true, &mut Rng::new(1)).unwrap();
    let student = build(&cfg.student.arch, cfg.data.num_classes, true, &mut Rng::new(2)).unwrap();
    let mut distiller = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu).unwrap();
    let mut group = c.benchmark_group("distill");
    group.sample_size(10);
    group.throughput(Throughput::Elements(((d.g_steps + d.s_steps) * d.batch_size) as u64));
    group.bench_function("demo_iteration_resnet20_resnet8_b64_32px", |b| b.iter(|| distiller.iterate().unwrap()));
    group.finish();
}

criterion_group!(benches, bench, demo_iteration);
criterion_main!(benches);
