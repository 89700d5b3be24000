//! Diagnostic: where a demo distillation iteration's time goes, phase by phase (batch
//! 64, 32 px, resnet20 -> resnet8 with random weights, the demo generator): the
//! generator's forward without a graph, the frozen teacher's forward without a graph,
//! the student's forward + backward on the KD loss alone, and whole generator and
//! student steps (`Distiller::iterate` with only one kind of step).
//!
//!     cargo run --release --example distill_phase_time -- [REPEATS]

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use dfkd::models::build;
use dfkd::nn::Ctx;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::pipeline::generator::Generator;
use dfkd::rng::Rng;
use dfkd::{no_grad, Device};
use std::time::Instant;

/// Median milliseconds of `repeats` calls of `f`, after one warm-up call.
fn time_ms(repeats: usize, mut f: impl FnMut() -> dfkd::Result<()>) -> dfkd::Result<f64> {
    f()?;
    let mut v = vec![];
    for _ in 0..repeats {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn main() -> dfkd::Result<()> {
    dfkd::allocator::keep_freed_pages();
    let repeats: usize = std::env::args().nth(1).map_or(5, |s| s.parse().expect("REPEATS is a number"));
    let cfg = Config::cpu_demo();
    let (n, s, k) = (cfg.distill.batch_size, cfg.data.image_size, cfg.data.num_classes);
    let teacher = build(&cfg.teacher.arch, k, true, &mut Rng::new(1))?;
    let student = build(&cfg.student.arch, k, true, &mut Rng::new(2))?;
    teacher.freeze(true)?;
    let mut rng = Rng::new(3);
    let gen = Generator::new(&cfg.generator, s, k, true, &mut rng)?;
    let x = dfkd::Tensor::randn(&[n, 3, s, s], 0.0, 1.0, &mut rng, Device::Cpu)?;
    let mut rows = vec![];
    rows.push((
        "generator forward, no graph",
        time_ms(repeats, || {
            let z = gen.sample_z(n, &mut Rng::new(4), Device::Cpu)?;
            no_grad(|| gen.forward(&z.z, &mut Ctx::train()))?;
            Ok(())
        })?,
    ));
    rows.push((
        "teacher forward, no graph (eval)",
        time_ms(repeats, || {
            no_grad(|| teacher.forward(&x, false))?;
            Ok(())
        })?,
    ));
    let t = no_grad(|| teacher.forward(&x, false))?;
    rows.push((
        "student forward + backward, KD only",
        time_ms(repeats, || {
            let f = student.forward_ctx(&x, &mut Ctx::train())?;
            f.logits.kd_loss(&t.logits, 4.0)?.backward()?;
            Ok(())
        })?,
    ));
    let steps = [
        ("5 generator steps", 5, 0, true, true),
        ("15 student steps, KD only", 0, 15, false, false),
        ("15 student steps, KD + MHAD", 0, 15, true, false),
        ("15 student steps, KD + SFCL", 0, 15, false, true),
        ("15 student steps, KD + MHAD + SFCL", 0, 15, true, true),
    ];
    for (name, g, st, mhad, sfcl) in steps {
        let mut c = cfg.clone();
        (c.distill.g_steps, c.distill.s_steps, c.distill.mhad, c.distill.sfcl) = (g, st, mhad, sfcl);
        let mut d = Distiller::new(&c, teacher.as_ref(), student.as_ref(), Device::Cpu)?;
        rows.push((name, time_ms(repeats, || d.iterate().map(|_| ()))?));
    }
    for (name, ms) in rows {
        println!("{name:>36}: {ms:8.1} ms");
    }
    Ok(())
}
