//! Diagnostic: seconds per distillation iteration of the CPU demo (5 generator + 15
//! student steps, batch 64, 32 px, resnet20 -> resnet8 with random weights) with the
//! fused attention ops, with their compositions (`distill.fused_attention = false`),
//! and without MHAD and SFCL ("baseline"): what the fused ops save, and what MHAD +
//! SFCL still cost.
//!
//!     cargo run --release --example distill_iteration_time -- [ITERATIONS [fused|unfused|baseline]...]
//!
//! With `DFKD_PROFILE=1`, each run also prints where its timed iterations spent their
//! time, op by op (`dfkd::profile`).

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use dfkd::models::build;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::Device;
use std::time::Instant;

/// CPU seconds this process has used (user + system), from /proc: under contention
/// from other jobs it varies less than wall time.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the parenthesised command name; utime and stime are the 12th and 13th
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().skip(11).take(2).map(|v| v.parse().unwrap_or(0.0)).collect();
    f.iter().sum::<f64>() / 100.0
}

fn main() -> dfkd::Result<()> {
    dfkd::allocator::keep_freed_pages(); // as the distill binary does
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iters: usize = args.first().map_or(2, |s| s.parse().expect("ITERATIONS is a number"));
    let runs = [("fused", true, true), ("unfused", false, true), ("baseline", true, false)];
    for (name, fused, aux) in runs.into_iter().filter(|(n, ..)| args.len() < 2 || args[1..].iter().any(|a| a == n)) {
        let mut cfg = Config::cpu_demo();
        cfg.distill.fused_attention = fused;
        cfg.distill.mhad = aux;
        cfg.distill.sfcl = aux;
        let teacher = build(&cfg.teacher.arch, cfg.data.num_classes, true, &mut Rng::new(1))?;
        let student = build(&cfg.student.arch, cfg.data.num_classes, true, &mut Rng::new(2))?;
        let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu)?;
        d.iterate()?; // warm-up: buffer pool, page faults
        dfkd::profile::reset();
        let (mut wall, mut cpu) = (vec![], vec![]);
        let start = Instant::now();
        for _ in 0..iters {
            let (t0, c0) = (Instant::now(), cpu_seconds());
            d.iterate()?;
            wall.push(format!("{:.2}", t0.elapsed().as_secs_f64()));
            cpu.push(format!("{:.2}", cpu_seconds() - c0));
        }
        println!("{name:>13}: wall {} s, CPU {} s per iteration", wall.join(", "), cpu.join(", "));
        if dfkd::profile::enabled() {
            println!("\n{}", dfkd::profile::report().table(Some(start.elapsed()), 30));
        }
    }
    Ok(())
}
