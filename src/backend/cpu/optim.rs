//! Fused optimiser updates, in place, with PyTorch's exact update rules.

use crate::backend::UpdateRule;
use crate::{bail, Result};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn update(p: &mut [f32], g: &[f32], state: &mut [&mut [f32]], rule: UpdateRule) -> Result<()> {
    if g.len() != p.len() || state.iter().any(|s| s.len() != p.len()) {
        bail!("optimizer update: parameter, gradient and state lengths differ");
    }
    match (rule, state) {
        (UpdateRule::Sgd { lr, momentum, weight_decay, nesterov }, [buf]) => {
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(buf.par_chunks_mut(CHUNK)).for_each(|((p, g), b)| {
                for i in 0..p.len() {
                    let d = g[i] + weight_decay * p[i];
                    b[i] = momentum * b[i] + d;
                    let step = if nesterov { d + momentum * b[i] } else { b[i] };
                    p[i] -= lr * step;
                }
            });
        }
        (UpdateRule::Adam { lr, beta1, beta2, eps, weight_decay, step }, [m, v]) => {
            let bc1 = 1.0 - beta1.powi(step as i32);
            let bc2 = 1.0 - beta2.powi(step as i32);
            let step_size = lr / bc1;
            let bc2_sqrt = bc2.sqrt();
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let d = g[i] + weight_decay * p[i];
                    m[i] = beta1 * m[i] + (1.0 - beta1) * d;
                    v[i] = beta2 * v[i] + (1.0 - beta2) * d * d;
                    p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
                }
            });
        }
        (rule, s) => bail!("optimizer update {rule:?}: wrong number of state buffers ({})", s.len()),
    }
    Ok(())
}
