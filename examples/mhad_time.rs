//! Diagnostic: MHAD's loss forward + backward alone at the demo shapes (batch 64,
//! resnet20 and resnet8 stages at 32 px: 16x32x32, 32x16x16, 64x8x8), order 3.
//!
//!     cargo run --release --example mhad_time -- [REPEATS]

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

use dfkd::models::Features;
use dfkd::pipeline::losses::Mhad;
use dfkd::rng::Rng;
use dfkd::{Device, Tensor};
use std::time::Instant;

fn features(rng: &mut Rng, grad: bool) -> dfkd::Result<Features> {
    let stages: Vec<Tensor> = [(16, 32), (32, 16), (64, 8)]
        .iter()
        .map(|&(c, s)| {
            let t = Tensor::randn(&[64, c, s, s], 0.0, 1.0, rng, Device::Cpu)?.relu()?;
            if grad {
                t.to_var()
            } else {
                Ok(t)
            }
        })
        .collect::<dfkd::Result<_>>()?;
    let penultimate = Tensor::randn(&[64, 64], 0.0, 1.0, rng, Device::Cpu)?;
    let logits = Tensor::randn(&[64, 10], 0.0, 1.0, rng, Device::Cpu)?;
    Ok(Features { logits, stages, penultimate, bn_inputs: vec![], bn_running: vec![] })
}

fn main() -> dfkd::Result<()> {
    dfkd::allocator::keep_freed_pages();
    let repeats: usize = std::env::args().nth(1).map_or(20, |s| s.parse().expect("REPEATS is a number"));
    let mut rng = Rng::new(1);
    let (t, s) = (features(&mut rng, false)?, features(&mut rng, true)?);
    let mhad = Mhad::new(&t, &s, 3, true, true, true, &mut rng)?;
    let mut v = vec![];
    for i in 0..=repeats {
        let t0 = Instant::now();
        let g = mhad.loss(&t, &s)?.backward()?;
        assert!(!g.is_empty());
        if i > 0 {
            v.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    v.sort_by(f64::total_cmp);
    println!("MHAD loss forward + backward: median {:.1} ms over {repeats}", v[v.len() / 2]);
    Ok(())
}
