//! Diagnostic: a distilled student's test accuracy with its running BN statistics (as
//! evaluated) and with batch statistics of the real test batch. A large gap means the
//! synthetic images' feature statistics differ from the real ones.
//!
//!     cargo run --release --example bn_mismatch -- WORKDIR MODEL.safetensors [ARCH]

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
    let arch = args.get(3).cloned().unwrap_or(cfg.student.arch.clone());
    let student = build(&arch, 10, true, &mut Rng::new(1))?;
    dfkd::checkpoint::load_model(student.as_ref(), &args[2])?;
    for train_bn in [false, true] {
        let (mut hit, mut n) = (0, 0);
        // shuffled: the test list is sorted by class, and one-class batches have other statistics
        let lc = LoaderConfig { shuffle: true, ..LoaderConfig::eval(&ds, 250, 32) };
        for b in Loader::new(&ds.test, lc).epoch(0) {
            let b = b?;
            let x = Tensor::from_vec(b.images, &[b.n, 3, 32, 32], Device::Cpu)?;
            let pred = no_grad(|| student.logits(&x, train_bn))?.argmax_last()?;
            hit += pred.iter().zip(&b.labels).filter(|(p, l)| **p == **l as usize).count();
            n += b.n;
        }
        println!("batch-norm {}: top-1 {:.1}%", if train_bn { "batch statistics" } else { "running statistics" }, 100.0 * hit as f32 / n as f32);
    }
    Ok(())
}
