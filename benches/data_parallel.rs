//! Data-parallel scaling on the in-process collective: one demo distillation iteration
//! (the `distill` bench's work: 5 generator + 15 student steps, global batch 64) on 1,
//! 2 and 4 ranks, in synthetic images/s, and the collective volume per iteration.
//!
//! Here the ranks are threads sharing the CPU's cores, so more ranks cannot be faster:
//! what this measures is the cost of the data-parallel machinery (the collectives,
//! synchronised BatchNorm, gathered negatives, smaller per-rank batches) at a fixed
//! amount of work. One rank takes no collective at all (the single-device path). The
//! scaling across GPUs is modelled in docs/PERF.md from these volumes.

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dfkd::models::build;
use dfkd::parallel::{run_group, Collective, ThreadGroup};
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::Device;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `iters` iterations on `world` ranks; the slowest rank's time, and the
/// elements rank 0 sent.
fn iterations(cfg: &Config, world: usize, iters: u64) -> (Duration, u64) {
    let mut cfg = cfg.clone();
    cfg.parallel.ranks = world;
    let groups: Vec<Arc<ThreadGroup>> = ThreadGroup::new(world).into_iter().map(Arc::new).collect();
    let handles: Vec<Arc<dyn Collective>> = groups.iter().map(|g| g.clone() as Arc<dyn Collective>).collect();
    let times = run_group(handles, |_| {
        let teacher = build(&cfg.teacher.arch, cfg.data.num_classes, true, &mut Rng::new(1))?;
        let student = build(&cfg.student.arch, cfg.data.num_classes, true, &mut Rng::new(2))?;
        let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu)?;
        d.iterate()?; // warm-up: allocator, first-use costs
        let t0 = Instant::now();
        for _ in 0..iters {
            d.iterate()?;
        }
        Ok(t0.elapsed())
    })
    .unwrap();
    let (_, sent) = groups[0].traffic();
    (times.into_iter().max().unwrap(), sent / (iters + 1))
}

fn scaling(c: &mut Criterion) {
    dfkd::allocator::keep_freed_pages();
    let cfg = Config::cpu_demo();
    let d = &cfg.distill;
    let mut group = c.benchmark_group("data_parallel");
    group.sample_size(10);
    group.throughput(Throughput::Elements(((d.g_steps + d.s_steps) * d.batch_size) as u64));
    for world in [1, 2, 4] {
        let (_, per_iteration) = iterations(&cfg, world, 1);
        eprintln!("{world} rank(s): each rank sends {:.2} MB per iteration to collectives", per_iteration as f64 * 4.0 / 1e6);
        group.bench_function(format!("demo_iteration_{world}_ranks"), |b| b.iter_custom(|iters| iterations(&cfg, world, iters).0));
    }
    group.finish();
}

criterion_group!(benches, scaling);
criterion_main!(benches);
