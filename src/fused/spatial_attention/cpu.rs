//! Fused spatial attention on the CPU (the math: kernels/spatial_attention.cu). Threads
//! take runs of whole (sample, channel) planes; each plane is walked in vectorised
//! passes while it sits in L1/L2 (a 32x32 plane is 4 KiB, a 224x224 one 196 KiB), so
//! memory sees each input read once and each output written once.

use super::Planes;
use crate::backend::cpu::simd::{exp, fold_lanes, multiversion, tree, LANES};
use crate::backend::cpu::{buffers, PAR_THRESHOLD};
use crate::backend::{BackendStorage, CpuStorage};
use crate::fused::check_dtype;
use crate::{Layout, Result};
use rayon::prelude::*;

/// Elements a thread's run of planes covers at least: rayon's split costs microseconds.
const TASK_ELEMS: usize = 1 << 14;

multiversion! {
    /// Planes of `hw` values: writes `y` and per plane `(max, 1/sum)`.
    fn forward_planes(hw: usize, k: f32, a: &[f32], f: &[f32], y: &mut [f32], stats: &mut [f32]) {
        for (((a, f), y), st) in a.chunks_exact(hw).zip(f.chunks_exact(hw)).zip(y.chunks_exact_mut(hw)).zip(stats.chunks_exact_mut(2)) {
            let m = tree(fold_lanes(a, f32::NEG_INFINITY, f32::max), f32::max);
            // y holds exp(a - m) until the last pass
            let mut acc = [0f32; LANES];
            let (mut yc, mut ac) = (y.chunks_exact_mut(LANES), a.chunks_exact(LANES));
            for (y, a) in (&mut yc).zip(&mut ac) {
                for i in 0..LANES {
                    y[i] = exp(a[i] - m);
                    acc[i] += y[i];
                }
            }
            for (i, (y, &a)) in yc.into_remainder().iter_mut().zip(ac.remainder()).enumerate() {
                *y = exp(a - m);
                acc[i] += *y;
            }
            let inv = 1.0 / tree(acc, |x, y| x + y);
            for (y, &f) in y.iter_mut().zip(f) {
                *y = f + k * (*y * inv) * f;
            }
            st[0] = m;
            st[1] = inv;
        }
    }
}

multiversion! {
    /// Writes `da` and `df` for planes of `hw` values given the forward's stats.
    fn backward_planes(hw: usize, k: f32, a: &[f32], f: &[f32], dy: &[f32], stats: &[f32], da: &mut [f32], df: &mut [f32]) {
        let planes = a.chunks_exact(hw).zip(f.chunks_exact(hw)).zip(dy.chunks_exact(hw)).zip(stats.chunks_exact(2));
        for ((((a, f), dy), st), (da, df)) in planes.zip(da.chunks_exact_mut(hw).zip(df.chunks_exact_mut(hw))) {
            let (m, inv) = (st[0], st[1]);
            // da holds the softmax w until the last pass
            let mut acc = [0f32; LANES];
            let (mut dc, mut ac, mut fc, mut gc) = (da.chunks_exact_mut(LANES), a.chunks_exact(LANES), f.chunks_exact(LANES), dy.chunks_exact(LANES));
            for (((da, a), f), g) in (&mut dc).zip(&mut ac).zip(&mut fc).zip(&mut gc) {
                for i in 0..LANES {
                    da[i] = exp(a[i] - m) * inv;
                    acc[i] += da[i] * f[i] * g[i];
                }
            }
            let tail = dc.into_remainder().iter_mut().zip(ac.remainder()).zip(fc.remainder()).zip(gc.remainder());
            for (i, (((da, &a), &f), &g)) in tail.enumerate() {
                *da = exp(a - m) * inv;
                acc[i] += *da * f * g;
            }
            let dot = tree(acc, |x, y| x + y);
            for (((da, df), &f), &g) in da.iter_mut().zip(df.iter_mut()).zip(f).zip(dy) {
                let w = *da;
                *da = k * w * (f * g - dot);
                *df = g * (1.0 + k * w);
            }
        }
    }
}

/// Planes per rayon task, and whether to go parallel at all.
fn split(p: Planes) -> (usize, bool) {
    ((TASK_ELEMS / p.hw.max(1)).max(1), p.len() >= PAR_THRESHOLD)
}

pub fn forward(a: &[f32], f: &[f32], p: Planes, k: f32) -> (Vec<f32>, Vec<f32>) {
    let mut stats = vec![0f32; 2 * p.planes];
    if p.is_empty() {
        return (vec![], stats);
    }
    let (per, par) = split(p);
    let hw = p.hw;
    let y = buffers::filled(p.len(), |y| {
        let run = |(t, (y, st)): (usize, (&mut [f32], &mut [f32]))| {
            let r = t * per * hw..t * per * hw + y.len();
            forward_planes(hw, k, &a[r.clone()], &f[r], y, st)
        };
        if par {
            y.par_chunks_mut(per * hw).zip(stats.par_chunks_mut(2 * per)).enumerate().for_each(run);
        } else {
            run((0, (y, &mut stats)));
        }
    });
    (y, stats)
}

pub fn backward(a: &[f32], f: &[f32], dy: &[f32], stats: &[f32], p: Planes, k: f32) -> (Vec<f32>, Vec<f32>) {
    if p.is_empty() {
        return (vec![], vec![]);
    }
    let (per, par) = split(p);
    let hw = p.hw;
    // every element of df is written by the backward pass below
    let mut df = buffers::filled(p.len(), |_| ());
    let da = buffers::filled(p.len(), |da| {
        let run = |(t, (da, df)): (usize, (&mut [f32], &mut [f32]))| {
            let r = t * per * hw..t * per * hw + da.len();
            let st = &stats[2 * t * per..2 * (t * per + da.len() / hw)];
            backward_planes(hw, k, &a[r.clone()], &f[r.clone()], &dy[r], st, da, df)
        };
        if par {
            da.par_chunks_mut(per * hw).zip(df.par_chunks_mut(per * hw)).enumerate().for_each(run);
        } else {
            run((0, (da, &mut df)));
        }
    });
    (da, df)
}

/// The forward pass on CPU storages.
pub fn forward_storage(a: &CpuStorage, l: &Layout, f: &CpuStorage, f_l: &Layout, k: f32) -> Result<(CpuStorage, CpuStorage)> {
    let op = "spatial_attention";
    let p = Planes::new(op, &[l, f_l])?;
    let dtype = check_dtype(op, &[a.dtype(), f.dtype()])?;
    let (y, stats) = forward(&a.f32_view(l, op)?, &f.f32_view(f_l, op)?, p, k);
    Ok((CpuStorage::from_f32_as(y, dtype), CpuStorage::F32(stats)))
}

/// The backward pass on CPU storages.
#[allow(clippy::too_many_arguments)]
pub fn backward_storage(
    a: &CpuStorage,
    l: &Layout,
    f: &CpuStorage,
    f_l: &Layout,
    dy: &CpuStorage,
    dy_l: &Layout,
    stats: &CpuStorage,
    k: f32,
) -> Result<(CpuStorage, CpuStorage)> {
    let op = "spatial_attention_backward";
    let p = Planes::new(op, &[l, f_l, dy_l])?;
    let dtype = check_dtype(op, &[a.dtype(), f.dtype(), dy.dtype()])?;
    let stats = stats.f32(op)?;
    if stats.len() != 2 * p.planes {
        crate::bail!("{op}: {} stats for {} planes", stats.len(), p.planes);
    }
    let (da, df) = backward(&a.f32_view(l, op)?, &f.f32_view(f_l, op)?, &dy.f32_view(dy_l, op)?, stats, p, k);
    Ok((CpuStorage::from_f32_as(da, dtype), CpuStorage::from_f32_as(df, dtype)))
}
