//! The data-parallel tests' helpers (tests/data_parallel.rs on threads, tests/mpi.rs
//! on processes): the gradients of one step, a batch's share, and the tolerance.

use dfkd::models::{build, Classifier};
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::{Device, Tensor};

pub type Named = Vec<(String, Vec<f32>)>;

/// A teacher and a student, the same on every rank.
pub fn models() -> (Box<dyn Classifier>, Box<dyn Classifier>) {
    (build("resnet8", 10, true, &mut Rng::new(5)).unwrap(), build("resnet8", 10, true, &mut Rng::new(6)).unwrap())
}

pub fn to_host(named: Vec<(String, Tensor)>) -> Named {
    named.into_iter().map(|(n, t)| (n, t.to_vec_f32().unwrap())).collect()
}

/// This rank's rows of a batch split evenly over `world` ranks.
pub fn share(x: &Tensor, rank: usize, world: usize) -> Tensor {
    let n = x.dims()[0] / world;
    x.narrow(0, rank * n, n).unwrap().contiguous().unwrap()
}

pub fn student_grads(cfg: &Config, x: &Tensor) -> Named {
    let (t, s) = models();
    let mut d = Distiller::new(cfg, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    to_host(d.student_step_gradients(x).unwrap())
}

pub fn generator_grads(cfg: &Config, z: &Tensor) -> Named {
    let (t, s) = models();
    let mut d = Distiller::new(cfg, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    to_host(d.generator_step_gradients(z).unwrap())
}

pub fn largest(named: &Named) -> f32 {
    named.iter().flat_map(|(_, g)| g.iter()).fold(0f32, |m, v| m.max(v.abs()))
}

/// The largest violation of the tolerance over every gradient, as a multiple of it
/// (<= 1 passes), and where.
pub fn worst(got: &Named, want: &Named) -> (f32, String) {
    let abs = 1e-5 * largest(want);
    assert_eq!(got.iter().map(|g| &g.0).collect::<Vec<_>>(), want.iter().map(|g| &g.0).collect::<Vec<_>>(), "the same parameters get gradients");
    let mut worst = (0.0f32, String::new());
    for ((name, g), (_, w)) in got.iter().zip(want) {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let r = (a - b).abs() / (abs + 2e-3 * b.abs());
            // a NaN ratio counts as the worst
            if r.is_nan() || r > worst.0 {
                worst = (r, format!("{name}[{i}]: {a} vs {b}"));
            }
        }
    }
    worst
}
