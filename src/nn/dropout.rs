//! `nn.Dropout` (inverted: kept units are scaled by 1 / (1 - p), identity in eval).

use super::Ctx;
use crate::rng::Rng;
use crate::{Result, Tensor};
use std::sync::Mutex;

/// Owns its random stream (seeded when the model is built) so that a run is
/// reproducible from the model's seed and forward can take `&self`.
pub struct Dropout {
    pub p: f32,
    rng: Mutex<Rng>,
}

impl Dropout {
    pub fn new(p: f32, rng: &mut Rng) -> Dropout {
        Dropout { p, rng: Mutex::new(Rng::new(rng.next_u64())) }
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if !ctx.train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let mask: Vec<f32> = {
            let mut rng = self.rng.lock().unwrap();
            (0..x.elem_count()).map(|_| if rng.uniform() < keep { 1.0 / keep } else { 0.0 }).collect()
        };
        x.mul(&Tensor::from_vec(mask, x.dims(), x.device())?)
    }
}
