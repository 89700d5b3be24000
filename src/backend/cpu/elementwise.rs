//! Element-wise maps, strided copies. Strided views are walked in runs along the last
//! dimension after merging dimensions that are contiguous in every operand.

use super::{buffers, CpuStorage, PAR_THRESHOLD};
use crate::backend::{BinaryOp, UnaryOp};
use crate::{bail, Layout, Result};
use rayon::prelude::*;

/// Merges adjacent dims that are contiguous with each other in all `layouts` (which share
/// one shape), so that a broadcast `[N, C, H, W] * [1, C, 1, 1]` walks runs of `H * W`.
pub(crate) fn coalesce(layouts: &[&Layout]) -> Vec<Layout> {
    let shape = layouts[0].shape();
    let mut dims: Vec<usize> = vec![];
    let mut strides: Vec<Vec<usize>> = vec![vec![]; layouts.len()];
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let merge = !dims.is_empty() && layouts.iter().enumerate().all(|(i, l)| *strides[i].last().unwrap() == l.strides()[d] * shape[d]);
        if merge {
            *dims.last_mut().unwrap() *= shape[d];
            for (i, l) in layouts.iter().enumerate() {
                *strides[i].last_mut().unwrap() = l.strides()[d];
            }
        } else {
            dims.push(shape[d]);
            for (i, l) in layouts.iter().enumerate() {
                strides[i].push(l.strides()[d]);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        strides.iter_mut().for_each(|s| s.push(1));
    }
    layouts.iter().zip(strides).map(|(l, s)| Layout::new(dims.clone(), s, l.offset())).collect()
}

/// Calls `f(row, out_row)` for every row (all dims but the last) of a contiguous output
/// of `shape`, in parallel when the output is large.
fn for_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(row_len).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(row_len).enumerate().for_each(|(r, o)| f(r, o));
    }
}

fn map1(x: &[f32], l: &Layout, f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let n = l.elem_count();
    buffers::filled(n, |out| map1_into(x, l, f, out))
}

fn map1_into(x: &[f32], l: &Layout, f: impl Fn(f32) -> f32 + Sync, out: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    if let Some(r) = l.contiguous_range() {
        let x = &x[r];
        if n >= PAR_THRESHOLD {
            out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)));
        } else {
            out.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
        }
        return;
    }
    let l = &coalesce(&[l])[0];
    let (row_len, s) = (*l.shape().last().unwrap(), *l.strides().last().unwrap());
    for_rows(out, row_len, |r, o| {
        let base = l.row_offset(r);
        o.iter_mut().enumerate().for_each(|(i, o)| *o = f(x[base + i * s]));
    });
}

fn map2(a: &[f32], la: &Layout, b: &[f32], lb: &Layout, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    buffers::filled(la.elem_count(), |out| map2_into(a, la, b, lb, f, out))
}

fn map2_into(a: &[f32], la: &Layout, b: &[f32], lb: &Layout, f: impl Fn(f32, f32) -> f32 + Sync, out: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    if let (Some(ra), Some(rb)) = (la.contiguous_range(), lb.contiguous_range()) {
        let (a, b) = (&a[ra], &b[rb]);
        if n >= PAR_THRESHOLD {
            out.par_chunks_mut(4096)
                .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
                .for_each(|(o, (a, b))| o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = f(a, b)));
        } else {
            out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = f(a, b));
        }
        return;
    }
    let ls = coalesce(&[la, lb]);
    let (la, lb) = (&ls[0], &ls[1]);
    let row_len = *la.shape().last().unwrap();
    let (sa, sb) = (*la.strides().last().unwrap(), *lb.strides().last().unwrap());
    for_rows(out, row_len, |r, o| {
        let (oa, ob) = (la.row_offset(r), lb.row_offset(r));
        match (sa, sb) {
            // the common broadcast shapes get loops the compiler can vectorise
            (1, 0) => {
                let bv = b[ob];
                o.iter_mut().zip(&a[oa..oa + row_len]).for_each(|(o, &a)| *o = f(a, bv))
            }
            (0, 1) => {
                let av = a[oa];
                o.iter_mut().zip(&b[ob..ob + row_len]).for_each(|(o, &b)| *o = f(av, b))
            }
            (1, 1) => o.iter_mut().zip(a[oa..oa + row_len].iter().zip(&b[ob..ob + row_len])).for_each(|(o, (&a, &b))| *o = f(a, b)),
            _ => o.iter_mut().enumerate().for_each(|(i, o)| *o = f(a[oa + i * sa], b[ob + i * sb])),
        }
    });
}

pub fn unary(x: &[f32], l: &Layout, op: UnaryOp) -> Result<Vec<f32>> {
    // One arm per variant, each calling `UnaryOp::apply` on a constant variant: the
    // closure is monomorphic, `apply` inlines to that variant's expression and the loop
    // vectorises, with the math written once (in src/backend/ops.rs).
    macro_rules! go {
        ($($v:ident $(($($p:ident),+))?),* $(,)?) => {
            match op { $(UnaryOp::$v $(($($p),+))? => map1(x, l, move |x| UnaryOp::$v $(($($p),+))?.apply(x))),* }
        };
    }
    Ok(go!(Neg, Recip, Exp, Log, Sqrt, Sqr, Abs, Sign, Relu, Sigmoid, Tanh, LeakyRelu(s), LeakyStep(s), Powf(e), Clamp(lo, hi), InRange(lo, hi), Affine(m, a),))
}

pub fn binary(a: &[f32], la: &Layout, b: &[f32], lb: &Layout, op: BinaryOp) -> Result<Vec<f32>> {
    if la.shape() != lb.shape() {
        bail!("binary {op:?}: operands must be broadcast to one shape, got {:?} and {:?}", la.shape(), lb.shape());
    }
    macro_rules! go { ($($v:path),*) => { match op { $($v => map2(a, la, b, lb, |x, y| $v.apply(x, y))),* } } }
    Ok(go!(BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Eq, BinaryOp::Gt, BinaryOp::WherePositive))
}

pub fn copy_strided(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    fn go<T: Copy + Default + Send + Sync>(v: &[T], l: &Layout) -> Vec<T> {
        let mut out = vec![T::default(); l.elem_count()];
        go_into(v, l, &mut out);
        out
    }
    /// Writes the view into `out` (all of it).
    fn go_into<T: Copy + Send + Sync>(v: &[T], l: &Layout, out: &mut [T]) {
        if let Some(r) = l.contiguous_range() {
            out.copy_from_slice(&v[r]);
            return;
        }
        let l = &coalesce(&[l])[0];
        let (row_len, s) = (*l.shape().last().unwrap(), *l.strides().last().unwrap());
        let body = |(r, o): (usize, &mut [T])| {
            let base = l.row_offset(r);
            o.iter_mut().enumerate().for_each(|(i, o)| *o = v[base + i * s]);
        };
        if out.len() >= PAR_THRESHOLD {
            out.par_chunks_mut(row_len).enumerate().for_each(body);
        } else {
            out.chunks_mut(row_len).enumerate().for_each(body);
        }
    }
    Ok(match s {
        // f32 copies come from the buffer pool: broadcasts materialised by backward
        // passes (a sum's gradient) are full activation-sized buffers every step, and
        // fresh ones fault their pages in (a fifth of an MHAD student step)
        CpuStorage::F32(v) => CpuStorage::F32(buffers::filled(l.elem_count(), |out| go_into(v, l, out))),
        CpuStorage::F16(v) => CpuStorage::F16(go(v, l)),
        CpuStorage::BF16(v) => CpuStorage::BF16(go(v, l)),
        CpuStorage::U32(v) => CpuStorage::U32(go(v, l)),
    })
}

pub fn copy_into(src: &CpuStorage, l: &Layout, dst: &mut CpuStorage, dst_l: &Layout) -> Result<()> {
    fn go<T: Copy>(v: &[T], l: &Layout, d: &mut [T], dl: &Layout) {
        let ls = coalesce(&[l, dl]);
        let (l, dl) = (&ls[0], &ls[1]);
        let row_len = *l.shape().last().unwrap();
        let (s, ds) = (*l.strides().last().unwrap(), *dl.strides().last().unwrap());
        for r in 0..l.elem_count() / row_len.max(1) {
            let (o, od) = (l.row_offset(r), dl.row_offset(r));
            if s == 1 && ds == 1 {
                d[od..od + row_len].copy_from_slice(&v[o..o + row_len]);
            } else {
                (0..row_len).for_each(|i| d[od + i * ds] = v[o + i * s]);
            }
        }
    }
    if l.shape() != dst_l.shape() {
        bail!("copy_into: shapes {:?} and {:?} differ", l.shape(), dst_l.shape());
    }
    match (src, dst) {
        (CpuStorage::F32(v), CpuStorage::F32(d)) => go(v, l, d, dst_l),
        (CpuStorage::F16(v), CpuStorage::F16(d)) => go(v, l, d, dst_l),
        (CpuStorage::BF16(v), CpuStorage::BF16(d)) => go(v, l, d, dst_l),
        (CpuStorage::U32(v), CpuStorage::U32(d)) => go(v, l, d, dst_l),
        (s, d) => bail!("copy_into: dtypes {:?} and {:?} differ", crate::backend::BackendStorage::dtype(s), crate::backend::BackendStorage::dtype(d)),
    }
    Ok(())
}
