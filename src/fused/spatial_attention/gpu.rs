//! The launches of kernels/spatial_attention.cu: v3 (forward) and v2 (backward) give
//! each plane a warp, for planes of up to `WARP_MAX` values; longer ones get a block.

use super::Planes;
use crate::backend::cuda::{family, LaunchCfg};
use crate::fused::{check_dtype, pick, start, u, whole_f32, Gpu, WARP_MAX};
use crate::{DType, Layout, Result};

pub fn forward<G: Gpu>(g: &G, a: &G::Buf, l: &Layout, f: &G::Buf, f_l: &Layout, k: f32) -> Result<(G::Buf, G::Buf)> {
    let op = "spatial_attention";
    let p = Planes::new(op, &[l, f_l])?;
    let dt = check_dtype(op, &[g.dtype(a), g.dtype(f)])?;
    let (ao, fo) = (start(g, a, l, op)?, start(g, f, f_l, op)?);
    let (mut y, mut stats) = (g.alloc(p.len(), dt)?, g.alloc(2 * p.planes, DType::F32)?);
    if p.is_empty() {
        return Ok((y, stats));
    }
    let v = pick("spatial_attention_fwd", if p.hw <= WARP_MAX { 3 } else { 2 });
    let cfg = if v == 3 { LaunchCfg::warp_rows(p.planes as u32) } else { LaunchCfg::rows(p.planes as u32, p.hw as u32) };
    let args = (u(p.planes), u(p.hw), k, g.ptr(a, ao), g.ptr(f, fo), g.ptr_mut(&mut y, 0), g.ptr_mut(&mut stats, 0));
    family::spatial_attention_fwd.get(Some(v), dt).launch(g, cfg, args)?;
    Ok((y, stats))
}

#[allow(clippy::too_many_arguments)]
pub fn backward<G: Gpu>(
    g: &G,
    a: &G::Buf,
    l: &Layout,
    f: &G::Buf,
    f_l: &Layout,
    dy: &G::Buf,
    dy_l: &Layout,
    stats: &G::Buf,
    k: f32,
) -> Result<(G::Buf, G::Buf)> {
    let op = "spatial_attention_backward";
    let p = Planes::new(op, &[l, f_l, dy_l])?;
    let dt = check_dtype(op, &[g.dtype(a), g.dtype(f), g.dtype(dy)])?;
    let (ao, fo, go) = (start(g, a, l, op)?, start(g, f, f_l, op)?, start(g, dy, dy_l, op)?);
    let sp = whole_f32(g, stats, 2 * p.planes, "spatial_attention_backward stats")?;
    let (mut da, mut df) = (g.alloc(p.len(), dt)?, g.alloc(p.len(), dt)?);
    if p.is_empty() {
        return Ok((da, df));
    }
    let v = pick("spatial_attention_bwd", if p.hw <= WARP_MAX { 2 } else { 1 });
    let cfg = if v == 2 { LaunchCfg::warp_rows(p.planes as u32) } else { LaunchCfg::rows(p.planes as u32, p.hw as u32) };
    let args = (u(p.planes), u(p.hw), k, g.ptr(a, ao), g.ptr(f, fo), g.ptr(dy, go), sp, g.ptr_mut(&mut da, 0), g.ptr_mut(&mut df, 0));
    family::spatial_attention_bwd.get(Some(v), dt).launch(g, cfg, args)?;
    Ok((da, df))
}
