//! The launches of kernels/normalized_distance.cu: a block per row forward (three
//! sums), a thread per element backward.

use super::distance_rows;
use crate::backend::cuda::{check_u32, family, LaunchCfg};
use crate::fused::{check_dtype, start, u, whole_f32, Gpu};
use crate::{bail, DType, Layout, Result};

pub fn forward<G: Gpu>(g: &G, a: &G::Buf, l: &Layout, b: &G::Buf, b_l: &Layout, eps: f32) -> Result<(G::Buf, G::Buf)> {
    let op = "normalized_distance";
    let (n, d) = distance_rows(op, l, b_l)?;
    let dt = check_dtype(op, &[g.dtype(a), g.dtype(b)])?;
    let (ao, bo) = (start(g, a, l, op)?, start(g, b, b_l, op)?);
    let (mut dist, mut stats) = (g.alloc(n, dt)?, g.alloc(3 * n, DType::F32)?);
    if n > 0 {
        let args = (u(n), u(d), eps, g.ptr(a, ao), g.ptr(b, bo), g.ptr_mut(&mut dist, 0), g.ptr_mut(&mut stats, 0));
        family::normalized_distance_fwd.get(None, dt).launch(g, LaunchCfg::rows(check_u32(n)?, check_u32(d)?), args)?;
    }
    Ok((dist, stats))
}

#[allow(clippy::too_many_arguments)]
pub fn backward<G: Gpu>(
    g: &G,
    a: &G::Buf,
    l: &Layout,
    b: &G::Buf,
    b_l: &Layout,
    stats: &G::Buf,
    dd: &G::Buf,
    dd_l: &Layout,
    eps: f32,
) -> Result<(G::Buf, G::Buf)> {
    let op = "normalized_distance_backward";
    let (n, d) = distance_rows(op, l, b_l)?;
    if dd_l.shape() != [n] {
        bail!("{op}: expected a gradient of [{n}], got {:?}", dd_l.shape());
    }
    let dt = check_dtype(op, &[g.dtype(a), g.dtype(b), g.dtype(dd)])?;
    let (ao, bo, go) = (start(g, a, l, op)?, start(g, b, b_l, op)?, start(g, dd, dd_l, op)?);
    let st = whole_f32(g, stats, 3 * n, "normalized_distance_backward stats")?;
    let (mut da, mut db) = (g.alloc(n * d, dt)?, g.alloc(n * d, dt)?);
    if n * d > 0 {
        let args = (u(n), u(d), eps, g.ptr(a, ao), g.ptr(b, bo), st, g.ptr(dd, go), g.ptr_mut(&mut da, 0), g.ptr_mut(&mut db, 0));
        family::normalized_distance_bwd.get(None, dt).launch(g, LaunchCfg::elementwise(check_u32(n * d)?), args)?;
    }
    Ok((da, db))
}
