//! Softmax and log-softmax over the last dimension, max-subtracted for stability.

use super::PAR_THRESHOLD;
use crate::{Layout, Result};
use rayon::prelude::*;

pub fn softmax_last(x: &[f32], l: &Layout, log: bool) -> Result<Vec<f32>> {
    let d = *l.shape().last().unwrap_or(&1);
    let mut out = x.to_vec();
    if d == 0 {
        return Ok(out);
    }
    let row = |r: &mut [f32]| {
        let max = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if log {
            let lse = r.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
            r.iter_mut().for_each(|v| *v -= lse);
        } else {
            let mut sum = 0f64;
            r.iter_mut().for_each(|v| {
                *v = (*v - max).exp();
                sum += *v as f64;
            });
            let inv = (1.0 / sum) as f32;
            r.iter_mut().for_each(|v| *v *= inv);
        }
    };
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(d).for_each(row);
    } else {
        out.chunks_mut(d).for_each(row);
    }
    Ok(out)
}
