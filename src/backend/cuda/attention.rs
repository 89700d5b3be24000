//! Host side of the fused attention kernels (kernels/spatial_attention.cu,
//! high_order_attention.cu, contrastive.cu, normalized_distance.cu), written once
//! against `Gpu` so that the emulator and a real GPU storage run the same code: argument
//! checks (shared with the CPU through `backend::attention`), the kernel version for the
//! shape, the launch.
//!
//! Each kernel family has numbered versions side by side (llm.c style, the .cu headers
//! say what each changes). `VERSIONS` lists them; the host picks a default per shape,
//! and `force_version` lets the parity tests and the bench run every one.

use super::launch::{check_u32, Gpu, LaunchCfg};
use super::launchers::k::family;
use crate::backend::attention::{check_dtype, contiguous_start, contrastive_rows, distance_rows, HighOrder, Planes};
use crate::{bail, DType, Layout, Result};
use std::cell::RefCell;

/// Every versioned kernel family and its versions.
pub const VERSIONS: &[(&str, &[u32])] = &[
    ("spatial_attention_fwd", &[1, 2, 3]),
    ("spatial_attention_bwd", &[1, 2]),
    ("hoa_products_fwd", &[1, 2]),
    ("hoa_products_bwd", &[1]),
    ("hoa_combine_fwd", &[1, 2]),
    ("hoa_combine_bwd", &[1]),
    ("contrastive_rows", &[1, 2]),
    ("contrastive_sym", &[1]),
];

/// Planes (spatial attention) or rows (NT-Xent) up to this long get one warp each
/// instead of a block: a 256-thread block on a 7x7 plane leaves 207 threads idle.
const WARP_MAX: usize = 1024;

thread_local! {
    static FORCED: RefCell<Vec<(&'static str, u32)>> = const { RefCell::new(Vec::new()) };
}

/// Makes this thread's launches of `family` use version `v` (`None`: the default for
/// the shape again). Errors on an unknown family or version.
pub fn force_version(family: &str, v: Option<u32>) -> Result<()> {
    let Some(&(name, versions)) = VERSIONS.iter().find(|(n, _)| *n == family) else {
        bail!("unknown kernel family `{family}`");
    };
    if let Some(v) = v.filter(|v| !versions.contains(v)) {
        bail!("kernel family `{family}` has no version {v} (versions: {versions:?})");
    }
    FORCED.with(|f| {
        let mut f = f.borrow_mut();
        f.retain(|(n, _)| *n != name);
        f.extend(v.map(|v| (name, v)));
    });
    Ok(())
}

fn pick(family: &str, default: u32) -> u32 {
    FORCED.with(|f| f.borrow().iter().find(|(n, _)| *n == family).map_or(default, |&(_, v)| v))
}

/// The start of a contiguous view that lies inside its buffer.
fn start<G: Gpu>(g: &G, b: &G::Buf, l: &Layout, op: &str) -> Result<usize> {
    let s = contiguous_start(l, op)?;
    if s + l.elem_count() > g.len(b) {
        bail!("{op}: view {:?} at offset {s} overruns a buffer of {}", l.shape(), g.len(b));
    }
    check_u32(s + l.elem_count())?;
    Ok(s)
}

/// An f32 buffer of exactly `len` values (saved statistics, row vectors).
fn whole_f32<G: Gpu>(g: &G, b: &G::Buf, len: usize, what: &str) -> Result<u64> {
    if g.dtype(b) != DType::F32 || g.len(b) != len {
        bail!("{what}: expected {len} f32 values, got {} of {:?}", g.len(b), g.dtype(b));
    }
    Ok(g.ptr(b, 0))
}

fn u(v: usize) -> u32 {
    v as u32
}

pub fn spatial_attention<G: Gpu>(g: &G, a: &G::Buf, l: &Layout, f: &G::Buf, f_l: &Layout, k: f32) -> Result<(G::Buf, G::Buf)> {
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
pub fn spatial_attention_backward<G: Gpu>(
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

/// Element-wise launches: v1 one thread per position, v2 one per 4 positions.
fn per_position(v: u32, total: usize) -> LaunchCfg {
    LaunchCfg::elementwise(if v == 2 { total.div_ceil(4) } else { total } as u32)
}

pub fn hoa_products<G: Gpu>(g: &G, z: &G::Buf, l: &Layout, order: usize) -> Result<G::Buf> {
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

pub fn hoa_products_backward<G: Gpu>(g: &G, z: &G::Buf, l: &Layout, dh: &G::Buf, dh_l: &Layout, order: usize) -> Result<G::Buf> {
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

pub fn hoa_combine<G: Gpu>(g: &G, uu: &G::Buf, l: &Layout, f: &G::Buf, f_l: &Layout, order: usize) -> Result<G::Buf> {
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
pub fn hoa_combine_backward<G: Gpu>(
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

pub fn contrastive_normalize<G: Gpu>(g: &G, t: &G::Buf, l: &Layout, s: &G::Buf, s_l: &Layout, eps: f32) -> Result<(G::Buf, G::Buf)> {
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

pub fn contrastive_normalize_backward<G: Gpu>(g: &G, z: &G::Buf, l: &Layout, norms: &G::Buf, dz: &G::Buf, eps: f32, dtype: DType) -> Result<(G::Buf, G::Buf)> {
    let op = "contrastive_normalize_backward";
    let &[m, d] = l.shape() else { bail!("{op}: expected [2n, d], got {:?}", l.shape()) };
    if m % 2 != 0 {
        bail!("{op}: expected [2n, d], got {:?}", l.shape());
    }
    let dt = check_dtype(op, &[dtype])?;
    if g.dtype(z) != DType::F32 || g.dtype(dz) != DType::F32 {
        bail!("{op}: zhat and its gradient must be f32, got {:?} and {:?}", g.dtype(z), g.dtype(dz));
    }
    let (zo, go) = (start(g, z, l, op)?, start(g, dz, l, op)?);
    let np = whole_f32(g, norms, m, "contrastive_normalize_backward norms")?;
    let n = m / 2;
    let (mut dtb, mut dsb) = (g.alloc(n * d, dt)?, g.alloc(n * d, dt)?);
    let args = (u(n), u(d), eps, g.ptr(z, zo), np, g.ptr(dz, go), g.ptr_mut(&mut dtb, 0), g.ptr_mut(&mut dsb, 0));
    family::contrastive_normalize_bwd.get(None, dt).launch(g, LaunchCfg::warp_rows(m as u32), args)?;
    Ok((dtb, dsb))
}

pub fn normalized_distance<G: Gpu>(g: &G, a: &G::Buf, l: &Layout, b: &G::Buf, b_l: &Layout, eps: f32) -> Result<(G::Buf, G::Buf)> {
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
pub fn normalized_distance_backward<G: Gpu>(
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

/// `[n, 2n]` of an f32 similarity matrix, and its start.
fn sim_dims<G: Gpu>(g: &G, sim: &G::Buf, l: &Layout, op: &str) -> Result<(usize, usize)> {
    match *l.shape() {
        [n, m] if m == 2 * n && n > 0 && g.dtype(sim) == DType::F32 => Ok((n, start(g, sim, l, op)?)),
        _ => bail!("{op}: expected an f32 [n, 2n] similarity matrix, got {:?} of {:?}", l.shape(), g.dtype(sim)),
    }
}

pub fn contrastive_rows_fwd<G: Gpu>(g: &G, sim: &G::Buf, l: &Layout, tau: f32) -> Result<(G::Buf, G::Buf)> {
    let op = "contrastive_rows";
    let (n, so) = sim_dims(g, sim, l, op)?;
    let (mut loss, mut lse) = (g.alloc(n, DType::F32)?, g.alloc(n, DType::F32)?);
    let v = pick("contrastive_rows", if 2 * n <= 4 * WARP_MAX { 2 } else { 1 });
    let cfg = if v == 2 { LaunchCfg::warp_rows(n as u32) } else { LaunchCfg::rows(n as u32, 2 * n as u32) };
    let args = (u(n), 1.0 / tau, g.ptr(sim, so), g.ptr_mut(&mut loss, 0), g.ptr_mut(&mut lse, 0));
    family::contrastive_rows.get(Some(v), DType::F32).launch(g, cfg, args)?;
    Ok((loss, lse))
}

pub fn contrastive_sym<G: Gpu>(g: &G, sim: &G::Buf, l: &Layout, lse: &G::Buf, dloss: &G::Buf, dloss_l: &Layout, tau: f32) -> Result<G::Buf> {
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
