//! Diagnostic: the BN-statistics loss (L_BN) of the teacher on real test images, per
//! BatchNorm layer: the floor a generator can hope to reach.
//!
//!     cargo run --release --example bn_loss_of_real_images -- WORKDIR TEACHER.safetensors

use dfkd::commands::job::prepare_data;
use dfkd::data::loader::{Loader, LoaderConfig};
use dfkd::models::build;
use dfkd::pipeline::config::Config;
use dfkd::rng::Rng;
use dfkd::{no_grad, Device, Tensor};

fn main() -> dfkd::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut cfg = Config::cpu_demo();
    cfg.workdir = args[1].clone().into();
    let ds = prepare_data(&cfg)?;
    let teacher = build(&cfg.teacher.arch, 10, true, &mut Rng::new(0))?;
    dfkd::checkpoint::load_model(teacher.as_ref(), &args[2])?;
    // shuffled: the test list is sorted by class, and one-class batches have other statistics
    let lc = LoaderConfig { shuffle: true, ..LoaderConfig::eval(&ds, 64, 32) };
    let b = Loader::new(&ds.test, lc).epoch(0).next().unwrap()?;
    let x = Tensor::from_vec(b.images, &[b.n, 3, 32, 32], Device::Cpu)?;
    let t = no_grad(|| teacher.forward(&x, false))?;
    println!("total L_BN on 64 real test images: {:.2}", dfkd::pipeline::losses::bn_loss(&t)?.to_scalar()?);
    for (i, (x, (rm, rv))) in t.bn_inputs.iter().zip(&t.bn_running).enumerate() {
        let (m, v) = x.channel_stats()?;
        let dm = m.sub(rm)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
        let dv = v.sub(rv)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
        let rvn = rv.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
        println!("bn {i:2} {:?}: |mean - rm| {dm:.3}, |var - rv| {dv:.3}, |rv| {rvn:.3}", x.dims());
    }
    Ok(())
}
