//! Batched matrix multiply through the `gemm` crate, which takes arbitrary strides, so
//! transposed views cost nothing.

use crate::{bail, Layout, Result};
use rayon::prelude::*;

/// `[b, m, k] x [b, k, n] -> [b, m, n]`.
pub fn matmul(a: &[f32], la: &Layout, b: &[f32], lb: &Layout) -> Result<Vec<f32>> {
    let (sa, sb) = (la.shape(), lb.shape());
    if la.rank() != 3 || lb.rank() != 3 || sa[0] != sb[0] || sa[2] != sb[1] {
        bail!("matmul: expected [b, m, k] x [b, k, n], got {sa:?} x {sb:?}");
    }
    let (batch, m, k, n) = (sa[0], sa[1], sa[2], sb[2]);
    let mut out = vec![0f32; batch * m * n];
    if out.is_empty() {
        return Ok(out);
    }
    let (ta, tb) = (la.strides(), lb.strides());
    let one = |bi: usize, dst: &mut [f32], par: gemm::Parallelism| {
        // SAFETY: the views lie inside `a` and `b` (their layouts were built from these
        // buffers' shapes), `dst` holds exactly m*n elements, and row/column strides
        // are the views' own, so every address gemm forms is in bounds.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr().add(la.offset() + bi * ta[0]),
                ta[2] as isize,
                ta[1] as isize,
                b.as_ptr().add(lb.offset() + bi * tb[0]),
                tb[2] as isize,
                tb[1] as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    let flops = 2 * m * n * k;
    if batch == 1 || flops >= 1 << 22 {
        // big products: let gemm split each one across the threads
        let par = if flops >= 1 << 20 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
        out.chunks_mut(m * n).enumerate().for_each(|(bi, d)| one(bi, d, par));
    } else {
        out.par_chunks_mut(m * n).enumerate().for_each(|(bi, d)| one(bi, d, gemm::Parallelism::None));
    }
    Ok(out)
}
