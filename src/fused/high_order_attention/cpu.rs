//! Fused high-order attention on the CPU: the element-wise parts around the V_r GEMM
//! (the math and the split: kernels/high_order_attention.cu). Threads take whole
//! samples; within a sample the positions go in blocks of `BLOCK` so that each order's
//! passes over a block stay in L1.

use super::HighOrder;
use crate::backend::cpu::simd::{multiversion, sigmoid};
use crate::backend::cpu::{buffers, PAR_THRESHOLD};
use crate::backend::{BackendStorage, CpuStorage};
use crate::fused::check_dtype;
use crate::{bail, Layout, Result};
use rayon::prelude::*;

/// Positions per block: 2 KiB of f32 per operand.
const BLOCK: usize = 512;

/// `[start, end)` of block `b0` in a slice of `chw`.
fn blocks(chw: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..chw).step_by(BLOCK).map(move |b| b..(b + BLOCK).min(chw))
}

multiversion! {
    /// One sample: `z` its R(R+1)/2 slices, `h` its R.
    fn products_sample(order: usize, chw: usize, z: &[f32], h: &mut [f32]) {
        for r in 1..=order {
            let first = r * (r - 1) / 2 * chw;
            let out = &mut h[(r - 1) * chw..r * chw];
            for b in blocks(chw) {
                let o = &mut out[b.clone()];
                o.copy_from_slice(&z[first + b.start..first + b.end]);
                for k in 1..r {
                    o.iter_mut().zip(&z[first + k * chw + b.start..first + k * chw + b.end]).for_each(|(o, &z)| *o *= z);
                }
                o.iter_mut().for_each(|o| *o = o.max(0.0));
            }
        }
    }
}

multiversion! {
    /// One sample: `dz[r][k] = dh[r] * [prod > 0] * prod_{j != k} z[r][j]`.
    fn products_backward_sample(order: usize, chw: usize, z: &[f32], dh: &[f32], dz: &mut [f32]) {
        let mut g = [0f32; BLOCK];
        for r in 1..=order {
            let first = r * (r - 1) / 2 * chw;
            for b in blocks(chw) {
                let g = &mut g[..b.len()];
                let zk = |k: usize| &z[first + k * chw + b.start..first + k * chw + b.end];
                g.copy_from_slice(zk(0));
                for k in 1..r {
                    g.iter_mut().zip(zk(k)).for_each(|(g, &z)| *g *= z);
                }
                let dhr = &dh[(r - 1) * chw + b.start..(r - 1) * chw + b.end];
                g.iter_mut().zip(dhr).for_each(|(g, &d)| *g = if *g > 0.0 { d } else { 0.0 });
                for k in 0..r {
                    let o = &mut dz[first + k * chw + b.start..first + k * chw + b.end];
                    o.copy_from_slice(g);
                    for j in (0..r).filter(|&j| j != k) {
                        o.iter_mut().zip(zk(j)).for_each(|(o, &z)| *o *= z);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// One sample: `y = f * (1/R) sum_r sigmoid(u[r])`.
    fn combine_sample(order: usize, chw: usize, u: &[f32], f: &[f32], y: &mut [f32]) {
        let inv_r = 1.0 / order as f32;
        let mut acc = [0f32; BLOCK];
        for b in blocks(chw) {
            let acc = &mut acc[..b.len()];
            acc.fill(0.0);
            for r in 0..order {
                acc.iter_mut().zip(&u[r * chw + b.start..r * chw + b.end]).for_each(|(a, &u)| *a += sigmoid(u));
            }
            y[b.clone()].iter_mut().zip(acc.iter()).zip(&f[b]).for_each(|((y, &a), &f)| *y = a * inv_r * f);
        }
    }
}

multiversion! {
    /// One sample: `du[r] = dy * f / R * s_r (1 - s_r)`, `df = dy * (1/R) sum_r s_r`.
    fn combine_backward_sample(order: usize, chw: usize, u: &[f32], f: &[f32], dy: &[f32], du: &mut [f32], df: &mut [f32]) {
        let inv_r = 1.0 / order as f32;
        let (mut acc, mut gf) = ([0f32; BLOCK], [0f32; BLOCK]);
        for b in blocks(chw) {
            let (acc, gf) = (&mut acc[..b.len()], &mut gf[..b.len()]);
            acc.fill(0.0);
            gf.iter_mut().zip(&dy[b.clone()]).zip(&f[b.clone()]).for_each(|((gf, &g), &f)| *gf = g * f * inv_r);
            for r in 0..order {
                let rb = r * chw + b.start..r * chw + b.end;
                let it = du[rb.clone()].iter_mut().zip(&u[rb]).zip(acc.iter_mut()).zip(gf.iter());
                it.for_each(|(((du, &u), a), &gf)| {
                    let s = sigmoid(u);
                    *a += s;
                    *du = gf * (s * (1.0 - s));
                });
            }
            df[b.clone()].iter_mut().zip(acc.iter()).zip(&dy[b]).for_each(|((df, &a), &g)| *df = g * (a * inv_r));
        }
    }
}

/// Runs `f(sample, out_chunk)` over the samples, in parallel for large tensors.
fn per_sample(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let chunk = out.len() / n.max(1);
    if chunk == 0 {
        return;
    }
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(chunk).enumerate().for_each(|(s, o)| f(s, o));
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(s, o)| f(s, o));
    }
}

pub fn products(z: &[f32], g: HighOrder) -> Vec<f32> {
    let (p, r) = (HighOrder::slices(g.order) * g.chw, g.order * g.chw);
    buffers::filled(g.n * r, |h| per_sample(h, g.n, |s, h| products_sample(g.order, g.chw, &z[s * p..(s + 1) * p], h)))
}

pub fn products_backward(z: &[f32], dh: &[f32], g: HighOrder) -> Vec<f32> {
    let (p, r) = (HighOrder::slices(g.order) * g.chw, g.order * g.chw);
    buffers::filled(g.n * p, |dz| per_sample(dz, g.n, |s, dz| products_backward_sample(g.order, g.chw, &z[s * p..(s + 1) * p], &dh[s * r..(s + 1) * r], dz)))
}

pub fn combine(u: &[f32], f: &[f32], g: HighOrder) -> Vec<f32> {
    let (c, ru) = (g.chw, g.order * g.chw);
    buffers::filled(g.n * c, |y| per_sample(y, g.n, |s, y| combine_sample(g.order, c, &u[s * ru..(s + 1) * ru], &f[s * c..(s + 1) * c], y)))
}

pub fn combine_backward(u: &[f32], f: &[f32], dy: &[f32], g: HighOrder) -> (Vec<f32>, Vec<f32>) {
    let (c, ru) = (g.chw, g.order * g.chw);
    // each sample's du and df chunks are written by the same task, so they are zipped
    let (mut du, mut df) = (buffers::filled(g.n * ru, |_| ()), buffers::filled(g.n * c, |_| ()));
    if c > 0 && g.n > 0 {
        let run = |(s, (du, df)): (usize, (&mut [f32], &mut [f32]))| {
            combine_backward_sample(g.order, c, &u[s * ru..(s + 1) * ru], &f[s * c..(s + 1) * c], &dy[s * c..(s + 1) * c], du, df)
        };
        if du.len() >= PAR_THRESHOLD {
            du.par_chunks_mut(ru).zip(df.par_chunks_mut(c)).enumerate().for_each(run);
        } else {
            du.chunks_mut(ru).zip(df.chunks_mut(c)).enumerate().for_each(run);
        }
    }
    (du, df)
}

/// The products' forward pass on CPU storages.
pub fn products_storage(z: &CpuStorage, l: &Layout, order: usize) -> Result<CpuStorage> {
    let op = "hoa_products";
    let g = HighOrder::products(op, l, order)?;
    let dtype = check_dtype(op, &[z.dtype()])?;
    Ok(CpuStorage::from_f32_as(products(&z.f32_view(l, op)?, g), dtype))
}

pub fn products_backward_storage(z: &CpuStorage, l: &Layout, dh: &CpuStorage, dh_l: &Layout, order: usize) -> Result<CpuStorage> {
    let op = "hoa_products_backward";
    let g = HighOrder::products(op, l, order)?;
    if dh_l.shape() != g.products_out_shape(l.shape()) {
        bail!("{op}: gradient {:?} does not match the products of {:?}", dh_l.shape(), l.shape());
    }
    let dtype = check_dtype(op, &[z.dtype(), dh.dtype()])?;
    Ok(CpuStorage::from_f32_as(products_backward(&z.f32_view(l, op)?, &dh.f32_view(dh_l, op)?, g), dtype))
}

pub fn combine_storage(u: &CpuStorage, l: &Layout, f: &CpuStorage, f_l: &Layout, order: usize) -> Result<CpuStorage> {
    let op = "hoa_combine";
    let g = HighOrder::combine(op, l, f_l, order)?;
    let dtype = check_dtype(op, &[u.dtype(), f.dtype()])?;
    Ok(CpuStorage::from_f32_as(combine(&u.f32_view(l, op)?, &f.f32_view(f_l, op)?, g), dtype))
}

pub fn combine_backward_storage(
    u: &CpuStorage,
    l: &Layout,
    f: &CpuStorage,
    f_l: &Layout,
    dy: &CpuStorage,
    dy_l: &Layout,
    order: usize,
) -> Result<(CpuStorage, CpuStorage)> {
    let op = "hoa_combine_backward";
    let g = HighOrder::combine(op, l, f_l, order)?;
    if dy_l.shape() != f_l.shape() {
        bail!("{op}: gradient {:?} and features {:?} differ", dy_l.shape(), f_l.shape());
    }
    let dtype = check_dtype(op, &[u.dtype(), f.dtype(), dy.dtype()])?;
    let (du, df) = combine_backward(&u.f32_view(l, op)?, &f.f32_view(f_l, op)?, &dy.f32_view(dy_l, op)?, g);
    Ok((CpuStorage::from_f32_as(du, dtype), CpuStorage::from_f32_as(df, dtype)))
}
