//! Fused contrastive similarity (NT-Xent) on the CPU, the parts around the similarity
//! GEMM (the math: kernels/contrastive.cu). The sizes are small (2n = 128 rows of
//! d = 128 in the paper): plain loops on one thread, where what costs is the 2n^2
//! exponentials: the vectorisable `simd::exp`, each computed once.

use super::contrastive_rows;
use crate::backend::cpu::simd::{exp, fold_lanes, tree};
use crate::backend::{BackendStorage, CpuStorage};
use crate::fused::{check_dtype, contiguous_start};
use crate::{bail, DType, Layout, Result};

/// `([t; s] / max(||row||, eps), ||row||)`.
pub fn normalize(t: &[f32], s: &[f32], n: usize, d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (mut zhat, mut norms) = (vec![0f32; 2 * n * d], vec![0f32; 2 * n]);
    for (r, (z, nr)) in zhat.chunks_exact_mut(d).zip(&mut norms).enumerate() {
        let x = if r < n { &t[r * d..(r + 1) * d] } else { &s[(r - n) * d..(r - n + 1) * d] };
        *nr = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        let den = nr.max(eps);
        z.iter_mut().zip(x).for_each(|(z, &x)| *z = x / den);
    }
    (zhat, norms)
}

/// `dx = (dzhat - zhat (zhat . dzhat)) / ||x||`, or `dzhat / eps` where the norm was
/// clamped; rows of t then of s.
pub fn normalize_backward(zhat: &[f32], norms: &[f32], dzhat: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut dx = vec![0f32; zhat.len()];
    for (((dx, z), g), &nr) in dx.chunks_exact_mut(d).zip(zhat.chunks_exact(d)).zip(dzhat.chunks_exact(d)).zip(norms) {
        if nr > eps {
            let dot: f32 = z.iter().zip(g).map(|(z, g)| z * g).sum();
            dx.iter_mut().zip(z).zip(g).for_each(|((dx, &z), &g)| *dx = (g - z * dot) / nr);
        } else {
            dx.iter_mut().zip(g).for_each(|(dx, &g)| *dx = g / eps);
        }
    }
    dx
}

/// Per anchor row i of `sim` [n, 2n]: `(loss_i, lse_i)` over the logits `sim * inv_tau`
/// with j = i masked out.
pub fn rows(sim: &[f32], n: usize, inv_tau: f32) -> (Vec<f32>, Vec<f32>) {
    let (mut loss, mut lse) = (vec![0f32; n], vec![0f32; n]);
    let mut e = vec![0f32; 2 * n];
    for (i, row) in sim.chunks_exact(2 * n).enumerate() {
        // the logits with the anchor's own masked to -inf (exp gives 0 for it), then
        // max and sum in vectorised passes
        e.iter_mut().zip(row).for_each(|(e, &v)| *e = v * inv_tau);
        e[i] = f32::NEG_INFINITY;
        let m = tree(fold_lanes(&e, f32::NEG_INFINITY, f32::max), f32::max);
        e.iter_mut().for_each(|e| *e = exp(*e - m));
        let l = tree(fold_lanes(&e, 0.0, |a, v| a + v), |a, b| a + b).ln() + m;
        lse[i] = l;
        loss[i] = l - row[n + i] * inv_tau;
    }
    (loss, lse)
}

/// `S = G + Gᵀ` [2n, 2n]: the gradient of the row losses with respect to the full
/// similarity matrix of the 2n normalised rows (kernels/contrastive.cu).
pub fn sym(sim: &[f32], lse: &[f32], dloss: &[f32], n: usize, inv_tau: f32) -> Vec<f32> {
    let m = 2 * n;
    // G's non-zero rows, each exponential once
    let mut g = vec![0f32; n * m];
    for (i, (gr, sr)) in g.chunks_exact_mut(m).zip(sim.chunks_exact(m)).enumerate() {
        gr.iter_mut().zip(sr).for_each(|(g, &v)| *g = exp(v * inv_tau - lse[i]));
        gr[i] = 0.0;
        gr[n + i] -= 1.0;
        gr.iter_mut().for_each(|g| *g = dloss[i] * *g * inv_tau);
    }
    // S = G + Gᵀ: G's rows into S's first n rows, then Gᵀ added column by column
    let mut s = vec![0f32; m * m];
    s[..n * m].copy_from_slice(&g);
    for (i, gr) in g.chunks_exact(m).enumerate() {
        for (j, &v) in gr.iter().enumerate() {
            s[j * m + i] += v;
        }
    }
    s
}

fn f32_rows<'a>(x: &'a CpuStorage, l: &Layout, len: usize, op: &'static str) -> Result<&'a [f32]> {
    let v = x.contiguous_f32(l, op)?;
    if v.len() != len {
        bail!("{op}: expected {len} values, got shape {:?}", l.shape());
    }
    Ok(v)
}

pub fn normalize_storage(t: &CpuStorage, l: &Layout, s: &CpuStorage, s_l: &Layout, eps: f32) -> Result<(CpuStorage, CpuStorage)> {
    let op = "contrastive_normalize";
    let (n, d) = contrastive_rows(op, l, s_l)?;
    check_dtype(op, &[t.dtype(), s.dtype()])?;
    let (z, norms) = normalize(&t.f32_view(l, op)?, &s.f32_view(s_l, op)?, n, d, eps);
    Ok((CpuStorage::F32(z), CpuStorage::F32(norms)))
}

pub fn normalize_backward_storage(
    zhat: &CpuStorage,
    l: &Layout,
    norms: &CpuStorage,
    dzhat: &CpuStorage,
    dzhat_l: &Layout,
    eps: f32,
    dtype: DType,
) -> Result<(CpuStorage, CpuStorage)> {
    let op = "contrastive_normalize_backward";
    let &[m, d] = l.shape() else { bail!("{op}: expected [2n, d], got {:?}", l.shape()) };
    check_dtype(op, &[dtype])?;
    let z = f32_rows(zhat, l, m * d, op)?;
    if dzhat_l.shape() != l.shape() {
        bail!("{op}: gradient {:?} and zhat {:?} differ", dzhat_l.shape(), l.shape());
    }
    let g = f32_rows(dzhat, dzhat_l, m * d, op)?;
    let nr = f32_rows(norms, &Layout::contiguous(&[m]), m, op)?;
    let dx = normalize_backward(z, nr, g, d, eps);
    let half = m / 2 * d;
    Ok((CpuStorage::from_f32_as(dx[..half].to_vec(), dtype), CpuStorage::from_f32_as(dx[half..].to_vec(), dtype)))
}

pub fn rows_storage(sim: &CpuStorage, l: &Layout, tau: f32) -> Result<(CpuStorage, CpuStorage)> {
    let op = "contrastive_rows";
    let &[n, m] = l.shape() else { bail!("{op}: expected [n, 2n], got {:?}", l.shape()) };
    if m != 2 * n {
        bail!("{op}: expected [n, 2n], got {:?}", l.shape());
    }
    let (loss, lse) = rows(f32_rows(sim, l, n * m, op)?, n, 1.0 / tau);
    Ok((CpuStorage::F32(loss), CpuStorage::F32(lse)))
}

pub fn sym_storage(sim: &CpuStorage, l: &Layout, lse: &CpuStorage, dloss: &CpuStorage, dloss_l: &Layout, tau: f32) -> Result<CpuStorage> {
    let op = "contrastive_sym";
    let &[n, m] = l.shape() else { bail!("{op}: expected [n, 2n], got {:?}", l.shape()) };
    if m != 2 * n {
        bail!("{op}: expected [n, 2n], got {:?}", l.shape());
    }
    contiguous_start(dloss_l, op)?;
    let (sim, lse) = (f32_rows(sim, l, n * m, op)?, f32_rows(lse, &Layout::contiguous(&[n]), n, op)?);
    let dloss = f32_rows(dloss, dloss_l, n, op)?;
    Ok(CpuStorage::F32(sym(sim, lse, dloss, n, 1.0 / tau)))
}
