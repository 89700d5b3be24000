//! The launches of kernels/high_order_attention.cu: one thread per output position
//! (v1) or per 4 positions (v2, the forward default).

use super::HighOrder;
use crate::backend::cuda::{family, LaunchCfg};
use crate::fused::{check_dtype, pick, start, u, Gpu};
use crate::{bail, Layout, Result};

/// Element-wise launches: v1 one thread per position, v2 one per 4 positions.
fn per_position(v: u32, total: usize) -> LaunchCfg {
    LaunchCfg::elementwise(if v == 2 { total.div_ceil(4) } else { total } as u32)
}

pub fn products<G: Gpu>(g: &G, z: &G::Buf, l: &Layout, order: usize) -> Result<G::Buf> {
    let op = "hoa_products";
    let h = HighOrder::products(op, l, order)?;
    let dt = check_dtype(op, &[g.dtype(z)])?;
    let zo = start(g, z, l, op)?;
    let mut out = g.alloc(h.n * order * h.chw, dt)?;
    if h.out_len() > 0 {
        let v = pick("hoa_products_fwd", 2);
        let args = (u(order), u(h.n), u(h.chw), g.ptr(z, zo), g.ptr_mut(&mut out, 0));
        family::hoa_products_fwd.get(Some(v), dt).launch(g, per_position(v, h.out_len()), args)?;
    }
    Ok(out)
}

pub fn products_backward<G: Gpu>(g: &G, z: &G::Buf, l: &Layout, dh: &G::Buf, dh_l: &Layout, order: usize) -> Result<G::Buf> {
    let op = "hoa_products_backward";
    let h = HighOrder::products(op, l, order)?;
    if dh_l.shape() != h.products_out_shape(l.shape()) {
        bail!("{op}: gradient {:?} does not match the products of {:?}", dh_l.shape(), l.shape());
    }
    let dt = check_dtype(op, &[g.dtype(z), g.dtype(dh)])?;
    let (zo, go) = (start(g, z, l, op)?, start(g, dh, dh_l, op)?);
    let mut dz = g.alloc(l.elem_count(), dt)?;
    if h.out_len() > 0 {
        let v = pick("hoa_products_bwd", 1);
        let args = (u(order), u(h.n), u(h.chw), g.ptr(z, zo), g.ptr(dh, go), g.ptr_mut(&mut dz, 0));
        family::hoa_products_bwd.get(Some(v), dt).launch(g, per_position(v, h.out_len()), args)?;
    }
    Ok(dz)
}

pub fn combine<G: Gpu>(g: &G, uu: &G::Buf, l: &Layout, f: &G::Buf, f_l: &Layout, order: usize) -> Result<G::Buf> {
    let op = "hoa_combine";
    let h = HighOrder::combine(op, l, f_l, order)?;
    let dt = check_dtype(op, &[g.dtype(uu), g.dtype(f)])?;
    let (uo, fo) = (start(g, uu, l, op)?, start(g, f, f_l, op)?);
    let mut y = g.alloc(h.out_len(), dt)?;
    if h.out_len() > 0 {
        let v = pick("hoa_combine_fwd", 2);
        let args = (u(order), u(h.n), u(h.chw), g.ptr(uu, uo), g.ptr(f, fo), g.ptr_mut(&mut y, 0));
        family::hoa_combine_fwd.get(Some(v), dt).launch(g, per_position(v, h.out_len()), args)?;
    }
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
pub fn combine_backward<G: Gpu>(
    g: &G,
    uu: &G::Buf,
    l: &Layout,
    f: &G::Buf,
    f_l: &Layout,
    dy: &G::Buf,
    dy_l: &Layout,
    order: usize,
) -> Result<(G::Buf, G::Buf)> {
    let op = "hoa_combine_backward";
    let h = HighOrder::combine(op, l, f_l, order)?;
    if dy_l.shape() != f_l.shape() {
        bail!("{op}: gradient {:?} and features {:?} differ", dy_l.shape(), f_l.shape());
    }
    let dt = check_dtype(op, &[g.dtype(uu), g.dtype(f), g.dtype(dy)])?;
    let (uo, fo, go) = (start(g, uu, l, op)?, start(g, f, f_l, op)?, start(g, dy, dy_l, op)?);
    let (mut du, mut df) = (g.alloc(l.elem_count(), dt)?, g.alloc(h.out_len(), dt)?);
    if h.out_len() > 0 {
        let v = pick("hoa_combine_bwd", 1);
        let args = (u(order), u(h.n), u(h.chw), g.ptr(uu, uo), g.ptr(f, fo), g.ptr(dy, go), g.ptr_mut(&mut du, 0), g.ptr_mut(&mut df, 0));
        family::hoa_combine_bwd.get(Some(v), dt).launch(g, per_position(v, h.out_len()), args)?;
    }
    Ok((du, df))
}
