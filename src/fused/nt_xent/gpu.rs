//! The launches of kernels/contrastive.cu: a warp per row to normalise, a warp per
//! anchor row for the losses (v2, rows up to `4 * WARP_MAX`) or a block (v1), a thread
//! per element of `S`.

use super::contrastive_rows;
use crate::backend::cuda::{check_u32, family, LaunchCfg};
use crate::fused::{check_dtype, pick, start, u, whole_f32, Gpu, WARP_MAX};
use crate::{bail, DType, Layout, Result};

pub fn normalize<G: Gpu>(g: &G, t: &G::Buf, l: &Layout, s: &G::Buf, s_l: &Layout, eps: f32) -> Result<(G::Buf, G::Buf)> {
    let op = "contrastive_normalize";
    let (n, d) = contrastive_rows(op, l, s_l)?;
    let dt = check_dtype(op, &[g.dtype(t), g.dtype(s)])?;
    let (to, so) = (start(g, t, l, op)?, start(g, s, s_l, op)?);
    let (mut z, mut norms) = (g.alloc(2 * n * d, DType::F32)?, g.alloc(2 * n, DType::F32)?);
    check_u32(2 * n * d)?;
    let args = (u(n), u(d), eps, g.ptr(t, to), g.ptr(s, so), g.ptr_mut(&mut z, 0), g.ptr_mut(&mut norms, 0));
    family::contrastive_normalize_fwd.get(None, dt).launch(g, LaunchCfg::warp_rows(2 * n as u32), args)?;
    Ok((z, norms))
}

#[allow(clippy::too_many_arguments)]
pub fn normalize_backward<G: Gpu>(
    g: &G,
    z: &G::Buf,
    l: &Layout,
    norms: &G::Buf,
    dz: &G::Buf,
    dz_l: &Layout,
    eps: f32,
    dtype: DType,
) -> Result<(G::Buf, G::Buf)> {
    let op = "contrastive_normalize_backward";
    let &[m, d] = l.shape() else { bail!("{op}: expected [2n, d], got {:?}", l.shape()) };
    if m % 2 != 0 {
        bail!("{op}: expected [2n, d], got {:?}", l.shape());
    }
    if dz_l.shape() != l.shape() {
        bail!("{op}: gradient {:?} and zhat {:?} differ", dz_l.shape(), l.shape());
    }
    let dt = check_dtype(op, &[dtype])?;
    if g.dtype(z) != DType::F32 || g.dtype(dz) != DType::F32 {
        bail!("{op}: zhat and its gradient must be f32, got {:?} and {:?}", g.dtype(z), g.dtype(dz));
    }
    let (zo, go) = (start(g, z, l, op)?, start(g, dz, dz_l, op)?);
    let np = whole_f32(g, norms, m, "contrastive_normalize_backward norms")?;
    let n = m / 2;
    let (mut dtb, mut dsb) = (g.alloc(n * d, dt)?, g.alloc(n * d, dt)?);
    let args = (u(n), u(d), eps, g.ptr(z, zo), np, g.ptr(dz, go), g.ptr_mut(&mut dtb, 0), g.ptr_mut(&mut dsb, 0));
    family::contrastive_normalize_bwd.get(None, dt).launch(g, LaunchCfg::warp_rows(m as u32), args)?;
    Ok((dtb, dsb))
}

/// `[n, 2n]` of an f32 similarity matrix, and its start.
fn sim_dims<G: Gpu>(g: &G, sim: &G::Buf, l: &Layout, op: &str) -> Result<(usize, usize)> {
    match *l.shape() {
        [n, m] if m == 2 * n && n > 0 && g.dtype(sim) == DType::F32 => Ok((n, start(g, sim, l, op)?)),
        _ => bail!("{op}: expected an f32 [n, 2n] similarity matrix, got {:?} of {:?}", l.shape(), g.dtype(sim)),
    }
}

pub fn rows<G: Gpu>(g: &G, sim: &G::Buf, l: &Layout, tau: f32) -> Result<(G::Buf, G::Buf)> {
    let op = "contrastive_rows";
    let (n, so) = sim_dims(g, sim, l, op)?;
    let (mut loss, mut lse) = (g.alloc(n, DType::F32)?, g.alloc(n, DType::F32)?);
    let v = pick("contrastive_rows", if 2 * n <= 4 * WARP_MAX { 2 } else { 1 });
    let cfg = if v == 2 { LaunchCfg::warp_rows(n as u32) } else { LaunchCfg::rows(n as u32, 2 * n as u32) };
    let args = (u(n), 1.0 / tau, g.ptr(sim, so), g.ptr_mut(&mut loss, 0), g.ptr_mut(&mut lse, 0));
    family::contrastive_rows.get(Some(v), DType::F32).launch(g, cfg, args)?;
    Ok((loss, lse))
}

pub fn sym<G: Gpu>(g: &G, sim: &G::Buf, l: &Layout, lse: &G::Buf, dloss: &G::Buf, dloss_l: &Layout, tau: f32) -> Result<G::Buf> {
    let op = "contrastive_sym";
    let (n, so) = sim_dims(g, sim, l, op)?;
    let lp = whole_f32(g, lse, n, "contrastive_sym lse")?;
    if dloss_l.elem_count() != n || g.dtype(dloss) != DType::F32 {
        bail!("{op}: expected {n} f32 row-loss gradients, got {:?} of {:?}", dloss_l.shape(), g.dtype(dloss));
    }
    let go = start(g, dloss, dloss_l, op)?;
    let m = 2 * n;
    let mut sym = g.alloc(check_u32(m * m)? as usize, DType::F32)?;
    let args = (u(n), 1.0 / tau, g.ptr(sim, so), lp, g.ptr(dloss, go), g.ptr_mut(&mut sym, 0));
    family::contrastive_sym.get(Some(pick("contrastive_sym", 1)), DType::F32).launch(g, LaunchCfg::elementwise((m * m) as u32), args)?;
    Ok(sym)
}
