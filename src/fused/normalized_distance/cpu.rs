//! MHAD's distance between L2-normalised maps on the CPU, one pass over the rows each
//! way (the math: kernels/normalized_distance.cu). Rows are samples, thousands of
//! values long: threads take whole rows, and the three sums are f64 in 8 lanes, so the
//! distance, a difference of terms near 1, keeps the digits the composition has.

use super::distance_rows;
use crate::backend::cpu::simd::multiversion;
use crate::backend::cpu::{buffers, PAR_THRESHOLD};
use crate::backend::{BackendStorage, CpuStorage};
use crate::fused::check_dtype;
use crate::{bail, DType, Layout, Result};
use rayon::prelude::*;

multiversion! {
    /// `[|a|^2, |b|^2, a.b]` of one row, in 8 interleaved f64 lanes (a fixed order).
    fn row_sums(a: &[f32], b: &[f32]) -> [f64; 3] {
        let (mut aa, mut bb, mut ab) = ([0f64; 8], [0f64; 8], [0f64; 8]);
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().unwrap(), y.try_into().unwrap());
            for l in 0..8 {
                let (x, y) = (x[l] as f64, y[l] as f64);
                aa[l] += x * x;
                bb[l] += y * y;
                ab[l] += x * y;
            }
        }
        for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
            let (x, y) = (x as f64, y as f64);
            aa[l] += x * x;
            bb[l] += y * y;
            ab[l] += x * y;
        }
        [aa.iter().sum(), bb.iter().sum(), ab.iter().sum()]
    }
}

multiversion! {
    /// `da = ka a + kb b`, `db = la a + lb b` over one row.
    fn row_gradients(a: &[f32], b: &[f32], k: [f32; 4], da: &mut [f32], db: &mut [f32]) {
        let [ka, kb, la, lb] = k;
        for (((&x, &y), da), db) in a.iter().zip(b).zip(da.iter_mut()).zip(db.iter_mut()) {
            *da = ka * x + kb * y;
            *db = la * x + lb * y;
        }
    }
}

/// `alpha = 1 / max(|a|, eps)` and `beta` likewise.
fn scales(na: f64, nb: f64, eps: f64) -> (f64, f64) {
    (1.0 / na.max(eps), 1.0 / nb.max(eps))
}

/// A row's distance from its sums.
fn distance(s: [f64; 3], eps: f64) -> f64 {
    let (na, nb) = (s[0].sqrt(), s[1].sqrt());
    let (alpha, beta) = scales(na, nb, eps);
    let (ua, ub) = (alpha * na, beta * nb);
    ua * ua + ub * ub - 2.0 * alpha * beta * s[2]
}

/// `[ka, kb, la, lb]` of a row with stats `[|a|, |b|, a.b]` and gradient `g`.
fn coefficients(st: &[f32], g: f32, eps: f64) -> [f32; 4] {
    let (na, nb, ab, g2) = (st[0] as f64, st[1] as f64, st[2] as f64, 2.0 * g as f64);
    let (alpha, beta) = scales(na, nb, eps);
    let pa = if na > eps { 1.0 - alpha * beta * ab } else { 0.0 };
    let pb = if nb > eps { alpha * beta * ab - 1.0 } else { 0.0 };
    let k = -g2 * alpha * beta;
    [(g2 * alpha * alpha * (1.0 - pa)) as f32, k as f32, k as f32, (g2 * beta * beta * (1.0 + pb)) as f32]
}

/// `(dist [n], stats [n, 3])`.
pub fn forward(a: &[f32], b: &[f32], n: usize, d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let row = |r: usize| row_sums(&a[r * d..(r + 1) * d], &b[r * d..(r + 1) * d]);
    let sums: Vec<[f64; 3]> = if n * d >= PAR_THRESHOLD { (0..n).into_par_iter().map(row).collect() } else { (0..n).map(row).collect() };
    let dist = sums.iter().map(|&s| distance(s, eps as f64) as f32).collect();
    let stats = sums.iter().flat_map(|s| [s[0].sqrt() as f32, s[1].sqrt() as f32, s[2] as f32]).collect();
    (dist, stats)
}

/// `(da, db)`.
pub fn backward(a: &[f32], b: &[f32], stats: &[f32], g: &[f32], n: usize, d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (mut da, mut db) = (buffers::filled(n * d, |_| ()), buffers::filled(n * d, |_| ()));
    if d > 0 {
        let run = |(r, (da, db)): (usize, (&mut [f32], &mut [f32]))| {
            let k = coefficients(&stats[3 * r..3 * r + 3], g[r], eps as f64);
            row_gradients(&a[r * d..(r + 1) * d], &b[r * d..(r + 1) * d], k, da, db)
        };
        if n * d >= PAR_THRESHOLD {
            da.par_chunks_mut(d).zip(db.par_chunks_mut(d)).enumerate().for_each(run);
        } else {
            da.chunks_mut(d).zip(db.chunks_mut(d)).enumerate().for_each(run);
        }
    }
    (da, db)
}

/// The forward pass on CPU storages.
pub fn forward_storage(a: &CpuStorage, l: &Layout, b: &CpuStorage, b_l: &Layout, eps: f32) -> Result<(CpuStorage, CpuStorage)> {
    let op = "normalized_distance";
    let (n, d) = distance_rows(op, l, b_l)?;
    let dtype = check_dtype(op, &[a.dtype(), b.dtype()])?;
    let (dist, stats) = forward(&a.f32_view(l, op)?, &b.f32_view(b_l, op)?, n, d, eps);
    Ok((CpuStorage::from_f32_as(dist, dtype), CpuStorage::from_f32_as(stats, DType::F32)))
}

/// The backward pass on CPU storages.
#[allow(clippy::too_many_arguments)]
pub fn backward_storage(
    a: &CpuStorage,
    l: &Layout,
    b: &CpuStorage,
    b_l: &Layout,
    stats: &CpuStorage,
    g: &CpuStorage,
    g_l: &Layout,
    eps: f32,
) -> Result<(CpuStorage, CpuStorage)> {
    let op = "normalized_distance_backward";
    let (n, d) = distance_rows(op, l, b_l)?;
    if g_l.shape() != [n] {
        bail!("{op}: expected a gradient of [{n}], got {:?}", g_l.shape());
    }
    let dtype = check_dtype(op, &[a.dtype(), b.dtype(), g.dtype()])?;
    if stats.dtype() != DType::F32 || stats.len() != 3 * n {
        bail!("{op}: expected {} f32 statistics, got {} of {:?}", 3 * n, stats.len(), stats.dtype());
    }
    let st = stats.f32_view(&Layout::contiguous(&[3 * n]), op)?;
    let (da, db) = backward(&a.f32_view(l, op)?, &b.f32_view(b_l, op)?, &st, &g.f32_view(g_l, op)?, n, d, eps);
    Ok((CpuStorage::from_f32_as(da, dtype), CpuStorage::from_f32_as(db, dtype)))
}
