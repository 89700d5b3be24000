//! Diagnostic: how fast the generator alone learns to match the teacher's BN statistics
//! (alpha * L_BN, no adversarial term), and what its images look like: pixel spread,
//! the teacher's confidence and class coverage. Config overrides select the variant.
//!
//!     cargo run --release --example generator_probe -- WORKDIR TEACHER.safetensors STEPS [--set k=v ...]

use dfkd::models::build;
use dfkd::nn::{Ctx, Module};
use dfkd::optim::{Optimizer, ParamGroup};
use dfkd::pipeline::config::Config;
use dfkd::pipeline::generator::Generator;
use dfkd::pipeline::losses::bn_loss;
use dfkd::pipeline::report::save_image_grid;
use dfkd::rng::Rng;
use dfkd::{no_grad, Device};

fn main() -> dfkd::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = Config::cpu_demo();
    cfg.workdir = args[1].clone().into();
    let steps: usize = args[3].parse().unwrap();
    let sets: Vec<String> = args[4..].iter().filter(|a| *a != "--set").cloned().collect();
    cfg.apply_overrides(&sets)?;
    let teacher = build(&cfg.teacher.arch, cfg.data.num_classes, true, &mut Rng::new(0))?;
    dfkd::checkpoint::load_model(teacher.as_ref(), &args[2])?;
    teacher.freeze(true)?;
    let mut rng = Rng::new(cfg.seed);
    let g = Generator::new(&cfg.generator, cfg.data.image_size, cfg.data.num_classes, cfg.distill.fused_attention, &mut rng)?;
    let gc = &cfg.generator;
    let mut opt = Optimizer::adam(vec![ParamGroup::new(g.parameters(), 0.0)], gc.lr, gc.beta1, gc.beta2);
    let t0 = std::time::Instant::now();
    for step in 0..=steps {
        let noise = g.sample_z(cfg.distill.batch_size, &mut rng, Device::Cpu)?;
        let x = g.forward(&noise.z, &mut Ctx::new(true))?;
        let t = teacher.forward(&x, false)?;
        let bn = bn_loss(&t)?;
        // a conditional generator with gen_target_ce also learns to show its targets
        let ce = match &noise.targets {
            Some(y) if cfg.distill.gen_target_ce > 0.0 => Some((t.logits.cross_entropy(y, 0.0)?, y.clone())),
            _ => None,
        };
        if step % 10 == 0 {
            let p = no_grad(|| t.logits.softmax(1))?;
            let maxp: f32 = p.max(&[1], false)?.mean_all()?.to_scalar()?;
            let pm = p.mean(&[0], false)?.to_vec_f32()?;
            let ent: f32 = -pm.iter().map(|q| q * q.max(1e-12).ln()).sum::<f32>();
            let std = x.sqr()?.mean_all()?.to_scalar()?.sqrt();
            println!(
                "step {step:4}  L_BN {:8.2}  rms(x) {std:.3}  teacher max-p {maxp:.3}  class entropy {ent:.2}  {:.2}s/step",
                bn.to_scalar()?,
                t0.elapsed().as_secs_f32() / (step.max(1)) as f32
            );
            if let Some((ce, y)) = &ce {
                let hits = t.logits.argmax_last()?.iter().zip(y).filter(|(a, b)| **a == **b as usize).count();
                println!("           target CE {:.3}  teacher sees the target in {hits} of {}", ce.to_scalar()?, y.len());
            }
        }
        if step == steps {
            save_image_grid(&x.narrow(0, 0, 32)?, 8, std::path::Path::new("/tmp/probe.png"))?;
            for (i, (x, (rm, rv))) in t.bn_inputs.iter().zip(&t.bn_running).enumerate() {
                let (m, v) = x.channel_stats()?;
                let dm = m.sub(rm)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
                let dv = v.sub(rv)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
                println!("bn {i:2} {:?}: |mean - rm| {dm:.3}, |var - rv| {dv:.3}", x.dims());
            }
            break;
        }
        let mut loss = bn.scale(cfg.distill.alpha)?;
        if let Some((ce, _)) = &ce {
            loss = loss.add(&ce.scale(cfg.distill.gen_target_ce)?)?;
        }
        opt.step(&loss.backward()?)?;
    }
    Ok(())
}
