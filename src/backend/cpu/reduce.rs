//! Reductions over any set of axes. The reduced axes are walked as one strided
//! sub-layout per output element; outputs are parallel.

use super::elementwise::coalesce;
use super::{simd, PAR_THRESHOLD};
use crate::backend::ReduceOp;
use crate::{bail, Layout, Result};
use rayon::prelude::*;

pub fn reduce(x: &[f32], l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<Vec<f32>> {
    let rank = l.rank();
    if let Some(&d) = dims.iter().find(|&&d| d >= rank) {
        bail!("reduce: axis {d} out of range for shape {:?}", l.shape());
    }
    let (mut kept, mut red) = (vec![], vec![]);
    for d in 0..rank {
        if dims.contains(&d) {
            red.push(d)
        } else {
            kept.push(d)
        }
    }
    let pick = |ds: &[usize], offset| {
        let shape: Vec<usize> = ds.iter().map(|&d| l.shape()[d]).collect();
        let strides: Vec<usize> = ds.iter().map(|&d| l.strides()[d]).collect();
        Layout::new(if shape.is_empty() { vec![1] } else { shape }, if strides.is_empty() { vec![0] } else { strides }, offset)
    };
    let kept_l = pick(&kept, l.offset());
    let red_l = coalesce(&[&pick(&red, 0)]).remove(0);
    let n_out = kept_l.elem_count();
    let n_red = red_l.elem_count();

    // Sum accumulates each run in f32 and the runs in f64: cheap, and enough precision
    // for the finite-difference checks on sums of a few hundred thousand terms.
    let reduce_one = |o: usize| -> f32 {
        let base = kept_l.offset_of_flat(o);
        let mut acc64 = 0f64;
        let mut acc = op.identity();
        red_l.for_each_run(|start, stride, n| {
            let s = base + start;
            let run = if stride == 1 { &x[s..s + n] } else { &[] };
            match op {
                ReduceOp::Sum => acc64 += if stride == 1 { simd::sum(run) } else { (0..n).map(|i| x[s + i * stride]).sum::<f32>() } as f64,
                _ => {
                    if stride == 1 {
                        acc = run.iter().fold(acc, |a, &v| max_nan(op, a, v))
                    } else {
                        acc = (0..n).fold(acc, |a, i| max_nan(op, a, x[s + i * stride]))
                    }
                }
            }
        });
        if op == ReduceOp::Sum {
            acc64 as f32
        } else {
            acc
        }
    };
    let mut out = vec![0f32; n_out];
    if n_out * n_red >= PAR_THRESHOLD && n_out > 1 {
        out.par_iter_mut().enumerate().for_each(|(o, v)| *v = reduce_one(o));
    } else if n_out == 1 && n_red >= PAR_THRESHOLD && op == ReduceOp::Sum {
        // A full reduction: split the contiguous input across threads.
        if let Some(r) = l.contiguous_range() {
            // chunk sums are collected in order and added sequentially: rayon's own
            // `sum` groups by work stealing, which would make results vary run to run
            let partial: Vec<f64> = x[r].par_chunks(1 << 14).map(|c| simd::sum(c) as f64).collect();
            out[0] = partial.iter().sum::<f64>() as f32;
        } else {
            out[0] = reduce_one(0);
        }
    } else {
        out.iter_mut().enumerate().for_each(|(o, v)| *v = reduce_one(o));
    }
    Ok(out)
}

/// max/min that propagate NaN, as PyTorch does.
#[inline(always)]
fn max_nan(op: ReduceOp, a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        op.combine(a, b)
    }
}
