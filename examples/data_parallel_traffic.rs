//! What one data-parallel rank sends to collectives per generator step and per
//! student step, for the demo and the paper's setting: the inputs of the multi-GPU
//! scaling model in docs/PERF.md. Measured on 2 ranks of the in-process collective
//! with a tiny global batch (4): the gradient and statistics volumes do not depend on
//! the batch, only SFCL's gathered projections do (2 x batch x proj_dim floats).
//!
//! cargo run --release --example data_parallel_traffic

use dfkd::models::build;
use dfkd::parallel::{run_group, Collective, ThreadGroup};
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::{Device, Result, Tensor};
use std::sync::Arc;

fn main() -> Result<()> {
    println!("| setting | sync_batch_norm | step | collective calls | f32 elements | of which gradients |");
    println!("|---|---|---|---|---|---|");
    for (preset, sync) in [("cpu-demo", true), ("cpu-demo", false), ("paper-cub", true), ("paper-cub", false)] {
        let mut cfg = Config::preset(preset)?;
        cfg.parallel.sync_batch_norm = sync;
        cfg.device = "cpu".into();
        cfg.distill.batch_size = 4;
        cfg.parallel.ranks = 2;
        let groups: Vec<Arc<ThreadGroup>> = ThreadGroup::new(2).into_iter().map(Arc::new).collect();
        let handles: Vec<Arc<dyn Collective>> = groups.iter().map(|g| g.clone() as Arc<dyn Collective>).collect();
        let size = cfg.data.image_size;
        let rows = run_group(handles, |rank| {
            let k = cfg.data.num_classes;
            let teacher = build(&cfg.teacher.arch, k, cfg.teacher.small_stem, &mut Rng::new(1))?;
            let student = build(&cfg.student.arch, k, cfg.student.small_stem, &mut Rng::new(2))?;
            let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu)?;
            let mut rng = Rng::new(3 + rank as u64);
            let g = &groups[rank];
            let before = g.traffic();
            let z = Tensor::randn(&[2, cfg.generator.z_dim], 0.0, 1.0, &mut rng, Device::Cpu)?;
            let gen_grads: usize = d.generator_step_gradients(&z)?.iter().map(|(_, t)| t.elem_count()).sum();
            let mid = g.traffic();
            let x = Tensor::randn(&[2, 3, size, size], 0.0, 1.0, &mut rng, Device::Cpu)?;
            let stu_grads: usize = d.student_step_gradients(&x)?.iter().map(|(_, t)| t.elem_count()).sum();
            let after = g.traffic();
            Ok([("generator", mid.0 - before.0, mid.1 - before.1, gen_grads), ("student", after.0 - mid.0, after.1 - mid.1, stu_grads)])
        })?;
        for (step, calls, elems, grads) in rows[0] {
            println!("| {preset} | {sync} | {step} | {calls} | {elems} | {grads} |");
        }
    }
    Ok(())
}
