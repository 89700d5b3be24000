//! Sanity baseline for the data-free loop: the same student step (KD from the teacher)
//! on *real* training images. If this does not learn, the student side is at fault; if
//! it does and data-free does not, the synthetic images are.
//!
//!     cargo run --release --example kd_real_images -- WORKDIR TEACHER.safetensors STEPS

use dfkd::commands::job::prepare_data;
use dfkd::data::loader::{Loader, LoaderConfig};
use dfkd::models::build;
use dfkd::optim::{Optimizer, ParamGroup};
use dfkd::pipeline::config::Config;
use dfkd::pipeline::eval::evaluate;
use dfkd::rng::Rng;
use dfkd::{no_grad, Device, Tensor};

fn main() -> dfkd::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = Config::cpu_demo();
    cfg.workdir = args[1].clone().into();
    let steps: usize = args[3].parse().unwrap();
    let ds = prepare_data(&cfg)?;
    let teacher = build(&cfg.teacher.arch, 10, true, &mut Rng::new(0))?;
    dfkd::checkpoint::load_model(teacher.as_ref(), &args[2])?;
    let student = build(&cfg.student.arch, 10, true, &mut Rng::new(1))?;
    let mut opt = Optimizer::sgd(vec![ParamGroup::new(student.parameters(), 5e-4)], 0.05, 0.9, false);
    let loader = Loader::new(&ds.train, LoaderConfig::train(&ds, 64, 32, 0));
    let mut step = 0;
    'outer: for epoch in 0.. {
        for b in loader.epoch(epoch) {
            let b = b?;
            let x = Tensor::from_vec(b.images, &[b.n, 3, 32, 32], Device::Cpu)?;
            let t = no_grad(|| teacher.logits(&x, false))?;
            let s = student.logits(&x, true)?;
            let loss = s.kd_loss(&t, 4.0)?;
            opt.step(&loss.backward()?)?;
            step += 1;
            if step % 50 == 0 {
                let acc = evaluate(&[student.as_ref()], &ds, 32, 128, Device::Cpu)?.models[0].top1;
                println!("step {step}: kd {:.3}, student test top-1 {acc:.1}%", loss.to_scalar()?);
            }
            if step == steps {
                break 'outer;
            }
        }
    }
    Ok(())
}
