//! Geometry and argument checks of the fused attention ops (spatial attention,
//! high-order attention, contrastive similarity), shared by every backend so that the
//! CPU loops and the kernels accept and refuse the same inputs. The math is documented
//! once, in the kernel files (kernels/spatial_attention.cu, high_order_attention.cu,
//! contrastive.cu).

use crate::{bail, DType, Layout, Result};

/// The element types the fused ops read and write; math is always f32.
pub fn check_dtype(op: &str, dtypes: &[DType]) -> Result<DType> {
    let d = dtypes[0];
    if !matches!(d, DType::F32 | DType::BF16) || dtypes.iter().any(|&x| x != d) {
        bail!("{op}: expected f32 or bf16 inputs of one dtype, got {dtypes:?}");
    }
    Ok(d)
}

/// The start of a contiguous view, or an error naming the op.
pub fn contiguous_start(l: &Layout, op: &str) -> Result<usize> {
    match l.contiguous_range() {
        Some(r) => Ok(r.start),
        None => bail!("{op}: expected a contiguous input, got strides {:?} for shape {:?}", l.strides(), l.shape()),
    }
}

/// Spatial attention works on `planes` planes of `hw` values: `[n, c, h, w]` (or any
/// `[n, c, ...]`) has n*c planes of h*w.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planes {
    pub planes: usize,
    pub hw: usize,
}

impl Planes {
    /// Checks that every layout has the same `[n, c, ...]` shape and is contiguous.
    pub fn new(op: &str, ls: &[&Layout]) -> Result<Planes> {
        let shape = ls[0].shape();
        if shape.len() < 3 {
            bail!("{op}: expected [n, c, h, w], got shape {shape:?}");
        }
        for l in ls {
            if l.shape() != shape {
                bail!("{op}: shapes {:?} and {shape:?} differ", l.shape());
            }
            contiguous_start(l, op)?;
        }
        Ok(Planes { planes: shape[0] * shape[1], hw: shape[2..].iter().product() })
    }
    pub fn len(&self) -> usize {
        self.planes * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// High-order attention of order R over `n` samples; `chw` is the size of one slice of
/// one sample: `C/4 * h * w` for the products, `C * h * w` for the combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HighOrder {
    pub order: usize,
    pub n: usize,
    pub chw: usize,
}

impl HighOrder {
    /// Slices of the products' input: one per `W_{r,k}`, R(R+1)/2.
    pub fn slices(order: usize) -> usize {
        order * (order + 1) / 2
    }

    /// `z` is `[n, R(R+1)/2 * cq, ...]` (the stacked 1x1-conv output).
    pub fn products(op: &str, z: &Layout, order: usize) -> Result<HighOrder> {
        let s = z.shape();
        if order == 0 || s.len() < 2 || !s[1].is_multiple_of(HighOrder::slices(order)) {
            bail!("{op}: order {order} needs [n, R(R+1)/2 * c, ...] with R >= 1, got {s:?}");
        }
        contiguous_start(z, op)?;
        Ok(HighOrder { order, n: s[0], chw: z.elem_count() / s[0].max(1) / HighOrder::slices(order) })
    }
    /// The products' output (and gradient) shape.
    pub fn products_out_shape(&self, z_shape: &[usize]) -> Vec<usize> {
        let mut s = z_shape.to_vec();
        s[1] = s[1] / HighOrder::slices(self.order) * self.order;
        s
    }

    /// `u` is `[n, R * c, ...]` (the V projections' outputs), `f` is `[n, c, ...]`.
    pub fn combine(op: &str, u: &Layout, f: &Layout, order: usize) -> Result<HighOrder> {
        let (su, sf) = (u.shape(), f.shape());
        let ok = order > 0 && su.len() >= 2 && su.len() == sf.len() && su[0] == sf[0] && su[1] == order * sf[1] && su[2..] == sf[2..];
        if !ok {
            bail!("{op}: order {order} needs u [n, R * c, ...] and f [n, c, ...], got {su:?} and {sf:?}");
        }
        contiguous_start(u, op)?;
        contiguous_start(f, op)?;
        Ok(HighOrder { order, n: sf[0], chw: f.elem_count() / sf[0].max(1) })
    }
    /// Elements of the output: one slice per sample.
    pub fn out_len(&self) -> usize {
        self.n * self.chw
    }
}

/// `t` and `s` are `[n, d]` feature rows, contiguous.
pub fn contrastive_rows(op: &str, t: &Layout, s: &Layout) -> Result<(usize, usize)> {
    match (t.shape(), s.shape()) {
        (&[n, d], &[n2, d2]) if n == n2 && d == d2 && n > 0 && d > 0 => {
            contiguous_start(t, op)?;
            contiguous_start(s, op)?;
            Ok((n, d))
        }
        (a, b) => bail!("{op}: expected two [n, d] feature batches of one shape (n, d > 0), got {a:?} and {b:?}"),
    }
}

/// `a` and `b` are `[n, ...]` of one shape, contiguous: `n` rows of `d` values.
pub fn distance_rows(op: &str, a: &Layout, b: &Layout) -> Result<(usize, usize)> {
    if a.shape() != b.shape() || a.rank() < 1 {
        bail!("{op}: expected two [n, ...] tensors of one shape, got {:?} and {:?}", a.shape(), b.shape());
    }
    contiguous_start(a, op)?;
    contiguous_start(b, op)?;
    let n = a.shape()[0];
    Ok((n, a.elem_count().checked_div(n).unwrap_or(0)))
}
