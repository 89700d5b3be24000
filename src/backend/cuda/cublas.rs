//! Batched GEMM through cuBLAS's strided-batched sgemm.
//!
//! cuBLAS is column-major, our tensors row-major. A row-major matrix in memory is the
//! column-major storage of its transpose, so the row-major product C = A B is computed
//! as the column-major C^T = B^T A^T: cuBLAS gets B first, with its m = our n and its
//! n = our m, and writes C^T column-major, which is C row-major.
//!
//! A strided view needs no copy when one of its two matrix dims has unit stride: rows
//! contiguous (the common case, cuBLAS op N on the transpose it sees) or columns
//! contiguous (a transposed view, op T). Every GEMM of the convolutions is one of these.
//! Other views are first made contiguous with the copy kernel; a broadcast batch
//! (stride 0) stays broadcast, cuBLAS accepts a zero batch stride.
//!
//! Plain FP32 math: cuBLAS's default mode does not use TF32 tensor cores, so results
//! match the CPU reference to FP32 rounding (TF32 would round inputs to 10 bits). The
//! mode is pinned on every handle (`pin_math_mode`) rather than trusted to be the
//! default.

use super::device::{CudaBuf, CudaDev};
use super::launch::Gpu;
use super::ops;
use crate::{bail, DType, Error, Layout, Result};
use cudarc::cublas::{result as blas, sys::cublasOperation_t};

/// Sets the handle's math mode to CUBLAS_DEFAULT_MATH (FP32 FMA, no TF32 tensor ops)
/// and reads it back.
pub fn pin_math_mode(blas: &cudarc::cublas::CudaBlas) -> Result<()> {
    use cudarc::cublas::sys;
    let h = *blas.handle();
    // SAFETY: a live handle; the mode is one of cuBLAS's own values.
    let set = unsafe { sys::cublasSetMathMode(h, sys::cublasMath_t::CUBLAS_DEFAULT_MATH) };
    if set != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("cublasSetMathMode(CUBLAS_DEFAULT_MATH) failed: {set:?}");
    }
    let mut mode = u32::MAX;
    // SAFETY: a live handle; the mode is read as its integer, whatever value it has.
    let got = unsafe { sys::cublasGetMathMode(h, &mut mode as *mut u32 as *mut sys::cublasMath_t) };
    if got != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || mode != sys::cublasMath_t::CUBLAS_DEFAULT_MATH as u32 {
        bail!("cuBLAS math mode is {mode} after setting CUBLAS_DEFAULT_MATH (0) ({got:?}): GEMMs would not be plain FP32");
    }
    Ok(())
}

/// How one row-major operand `[batch, rows, cols]` appears to cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    /// false: rows are contiguous, so memory holds the operand's transpose column-major
    /// (cuBLAS op N); true: columns are contiguous, memory holds the operand itself
    /// column-major (op T).
    pub trans: bool,
    /// cuBLAS's leading dimension: the stride between the stored columns.
    pub ld: usize,
    pub batch_stride: usize,
    /// Elements from the buffer start to the first matrix.
    pub offset: usize,
}

impl Operand {
    /// `None` when neither matrix dim has unit stride (or rows overlap): copy first.
    /// The stride of a dim of size 1 never matters.
    pub fn of(l: &Layout) -> Option<Operand> {
        let (&[_, rows, cols], &[batch_stride, sr, sc]) = (l.shape(), l.strides()) else { return None };
        let offset = l.offset();
        if cols <= 1 || sc == 1 {
            let ld = if rows <= 1 { cols.max(1) } else { sr };
            if ld >= cols.max(1) {
                return Some(Operand { trans: false, ld, batch_stride, offset });
            }
        }
        if rows <= 1 || sr == 1 {
            let ld = if cols <= 1 { rows.max(1) } else { sc };
            if ld >= rows.max(1) {
                return Some(Operand { trans: true, ld, batch_stride, offset });
            }
        }
        None
    }
}

/// The arguments of cublasSgemmStridedBatched, in its own (column-major) terms: its A is
/// our right operand, its B our left one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub offset_a: usize,
    pub offset_b: usize,
}

impl Plan {
    /// Row-major `[batch, m, k] x [batch, k, n]` with operands `lhs` and `rhs`.
    pub fn new(lhs: Operand, rhs: Operand, [batch, m, k, n]: [usize; 4]) -> Plan {
        Plan {
            transa: rhs.trans,
            transb: lhs.trans,
            m: n,
            n: m,
            k,
            lda: rhs.ld,
            ldb: lhs.ld,
            ldc: n,
            stride_a: rhs.batch_stride,
            stride_b: lhs.batch_stride,
            stride_c: m * n,
            batch,
            offset_a: rhs.offset,
            offset_b: lhs.offset,
        }
    }
}

/// cuBLAS handles at most 65535 matrices per call on some versions (the grid's y/z
/// limit): larger batches are split.
const MAX_BATCH: usize = 65535;

/// `[b, m, k] x [b, k, n] -> [b, m, n]` on the device, any strides; with `sum_batch`
/// the `[m, n]` sum of the b products instead, accumulated in place by one GEMM call per
/// sample (beta = 1 after the first), in batch order.
pub fn matmul(dev: &'static CudaDev, a: &CudaBuf, la: &Layout, b: &CudaBuf, lb: &Layout, sum_batch: bool) -> Result<CudaBuf> {
    let (sa, sb) = (la.shape(), lb.shape());
    if la.rank() != 3 || lb.rank() != 3 || sa[0] != sb[0] || sa[2] != sb[1] {
        bail!("matmul: expected [b, m, k] x [b, k, n], got {sa:?} x {sb:?}");
    }
    for (x, l) in [(a, la), (b, lb)] {
        if dev.dtype(x) != DType::F32 {
            return Err(Error::DType { op: "matmul", expected: DType::F32, got: dev.dtype(x) });
        }
        // cuBLAS reads whatever the strides address: keep it inside the buffer
        let last = l.offset() + l.shape().iter().zip(l.strides()).map(|(&d, &s)| d.saturating_sub(1) * s).sum::<usize>();
        if l.elem_count() > 0 && last >= dev.len(x) {
            bail!("matmul: a view of shape {:?}, strides {:?}, offset {} reaches past its buffer of {}", l.shape(), l.strides(), l.offset(), dev.len(x));
        }
    }
    let dims @ [batch, m, k, n] = [sa[0], sa[1], sa[2], sb[2]];
    let len = if sum_batch { m * n } else { batch * m * n };
    if batch * m * n == 0 || k == 0 {
        return dev.zeros(len, DType::F32); // an empty sum
    }
    // every call writes its whole output (beta = 0 first)
    let mut c = dev.alloc(len, DType::F32)?;
    let (a_copy, lhs) = usable(dev, a, la)?;
    let (b_copy, rhs) = usable(dev, b, lb)?;
    let (a, b) = (a_copy.as_ref().unwrap_or(a), b_copy.as_ref().unwrap_or(b));
    let p = Plan::new(lhs, rhs, dims);
    let int = |v: usize, what: &str| i32::try_from(v).map_err(|_| Error::Msg(format!("matmul: {what} = {v} exceeds cuBLAS's 32-bit sizes")));
    let (mm, nn, kk, lda, ldb, ldc) = (int(p.m, "n")?, int(p.n, "m")?, int(p.k, "k")?, int(p.lda, "lda")?, int(p.ldb, "ldb")?, int(p.ldc, "ldc")?);
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let alpha = 1f32;
    // (first sample, samples in this call, beta): chunks of a batch, or one sample at a
    // time accumulating into the same output
    let calls: Vec<(usize, usize, f32)> = if sum_batch {
        (0..batch).map(|i| (i, 1, if i == 0 { 0.0 } else { 1.0 })).collect()
    } else {
        (0..batch).step_by(MAX_BATCH).map(|i| (i, (batch - i).min(MAX_BATCH), 0.0)).collect()
    };
    let blas = dev.blas();
    // the handle belongs to the device's context: make it current on this thread
    dev.bind()?;
    for (start, count, beta) in calls {
        let pa = dev.ptr(b, p.offset_a + start * p.stride_a);
        let pb = dev.ptr(a, p.offset_b + start * p.stride_b);
        let pc = dev.ptr_mut(&mut c, if sum_batch { 0 } else { start * p.stride_c });
        // SAFETY: the pointers address live f32 buffers of this device; the plan's
        // sizes, leading dimensions and batch strides describe views that lie inside
        // them (they come from the tensors' layouts, checked against the buffers when
        // the layouts were made, or from the contiguous copies made above); the output
        // holds batch * m * n elements (m * n when summing, every call writing the same
        // matrix, ordered by the stream). alpha and beta are host scalars (cuBLAS's
        // default pointer mode) read before the call returns. The handle is bound to
        // the device's stream, so the GEMM is ordered with the kernels around it.
        unsafe {
            blas::sgemm_strided_batched(
                *blas.handle(),
                op(p.transa),
                op(p.transb),
                mm,
                nn,
                kk,
                &alpha,
                pa as *const f32,
                lda,
                p.stride_a as i64,
                pb as *const f32,
                ldb,
                p.stride_b as i64,
                &beta,
                pc as *mut f32,
                ldc,
                p.stride_c as i64,
                count as i32,
            )
        }
        .map_err(|e| dev.error(&format!("cuBLAS sgemm_strided_batched ({p:?})"), format!("{e:?}")))?;
    }
    // the copies (if any) are dropped here, after the GEMM was queued on the same stream
    drop((a_copy, b_copy));
    Ok(c)
}

/// The operand as cuBLAS can read it: the view itself, or a contiguous copy made by the
/// copy kernel (one matrix when the batch is broadcast).
fn usable(dev: &'static CudaDev, buf: &CudaBuf, l: &Layout) -> Result<(Option<CudaBuf>, Operand)> {
    if let Some(op) = Operand::of(l) {
        return Ok((None, op));
    }
    let (copy, batch_stride) = contiguous_copy_layout(l);
    let copy_buf = ops::copy_strided(&dev, buf, &copy)?;
    let op = Operand { trans: false, ld: l.shape()[2].max(1), batch_stride, offset: 0 };
    Ok((Some(copy_buf), op))
}

/// The view to copy for an operand cuBLAS cannot read as is, and the batch stride of
/// the copy: a broadcast batch is copied once and stays broadcast.
pub fn contiguous_copy_layout(l: &Layout) -> (Layout, usize) {
    let (s, st) = (l.shape(), l.strides());
    if st[0] == 0 || s[0] == 1 {
        (Layout::new(vec![1, s[1], s[2]], vec![0, st[1], st[2]], l.offset()), 0)
    } else {
        (l.clone(), s[1] * s[2])
    }
}

#[cfg(test)]
mod tests {
    //! The GEMM plan executed by a CPU model of cublasSgemmStridedBatched (column-major,
    //! op N/T, leading dimensions, batch strides), against the CPU matmul: the
    //! column-major trick is checked without a GPU.
    use super::*;
    use crate::backend::{BackendStorage, CpuStorage};

    /// cublasSgemmStridedBatched's definition with alpha = 1, beta = 0.
    fn sgemm_model(p: &Plan, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![f32::NAN; p.batch * p.stride_c];
        for bi in 0..p.batch {
            let (a0, b0, c0) = (p.offset_a + bi * p.stride_a, p.offset_b + bi * p.stride_b, bi * p.stride_c);
            for i in 0..p.m {
                for j in 0..p.n {
                    let mut s = 0f32;
                    for q in 0..p.k {
                        // op(A)(i, q) and op(B)(q, j) of column-major storage
                        let av = if p.transa { a[a0 + q + i * p.lda] } else { a[a0 + i + q * p.lda] };
                        let bv = if p.transb { b[b0 + j + q * p.ldb] } else { b[b0 + q + j * p.ldb] };
                        s += av * bv;
                    }
                    c[c0 + i + j * p.ldc] = s;
                }
            }
        }
        c
    }

    /// What `matmul` does, with the device replaced by host buffers.
    fn via_plan(a: &[f32], la: &Layout, b: &[f32], lb: &Layout) -> Vec<f32> {
        let prep = |x: &[f32], l: &Layout| -> (Vec<f32>, Operand) {
            match Operand::of(l) {
                Some(op) => (x.to_vec(), op),
                None => {
                    let (copy, batch_stride) = contiguous_copy_layout(l);
                    let data = CpuStorage::F32(x.to_vec()).copy_strided(&copy).unwrap().to_f32_vec(&Layout::contiguous(&[copy.elem_count()]));
                    (data, Operand { trans: false, ld: l.shape()[2].max(1), batch_stride, offset: 0 })
                }
            }
        };
        let ((ad, lhs), (bd, rhs)) = (prep(a, la), prep(b, lb));
        let (s, t) = (la.shape(), lb.shape());
        let p = Plan::new(lhs, rhs, [s[0], s[1], s[2], t[2]]);
        assert!(p.lda >= if p.transa { p.k } else { p.m }.max(1), "lda {p:?}");
        assert!(p.ldb >= if p.transb { p.n } else { p.k }.max(1), "ldb {p:?}");
        sgemm_model(&p, &bd, &ad)
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.range(-1.0, 1.0)).collect()
    }

    /// A `[b, r, c]` view of a buffer with the given strides, its buffer long enough.
    fn view(shape: [usize; 3], strides: [usize; 3], offset: usize) -> (Layout, usize) {
        let len = offset + shape.iter().zip(strides).map(|(&n, s)| n.saturating_sub(1) * s).sum::<usize>() + 1;
        (Layout::new(shape.to_vec(), strides.to_vec(), offset), len)
    }

    #[test]
    fn the_column_major_plan_matches_the_cpu_matmul_on_every_kind_of_view() {
        let (b, m, k, n) = (3, 5, 7, 4);
        // left operands [b, m, k]
        let lhs = [
            ("contiguous", view([b, m, k], [m * k, k, 1], 0)),
            ("transposed", view([b, m, k], [m * k, 1, m], 0)),
            ("broadcast batch, offset", view([b, m, k], [0, k, 1], 3)),
            ("broadcast transposed (conv input gradient)", view([b, m, k], [0, 1, m], 2)),
            ("padded rows", view([b, m, k], [m * 10, 10, 1], 1)),
            ("no unit stride: copied", view([b, m, k], [2 * m * k, 2 * k, 2], 0)),
            ("broadcast rows: copied", view([b, m, k], [k, 0, 1], 0)),
            ("broadcast, no unit stride: copied once", view([b, m, k], [0, 2, 2 * m], 1)),
        ];
        // right operands [b, k, n]
        let rhs = [
            ("contiguous", view([b, k, n], [k * n, n, 1], 0)),
            ("transposed (conv weight gradient)", view([b, k, n], [k * n, 1, k], 0)),
            ("batch stride beyond the matrix", view([b, k, n], [k * n + 5, n, 1], 4)),
            ("no unit stride: copied", view([b, k, n], [k * n * 3, 3, 3 * k], 0)),
        ];
        for (ln, (la, alen)) in &lhs {
            for (rn, (lb, blen)) in &rhs {
                let (a, bb) = (data(*alen, 1), data(*blen, 2));
                let want = CpuStorage::F32(a.clone()).matmul(la, &CpuStorage::F32(bb.clone()), lb).unwrap();
                let want = want.to_f32_vec(&Layout::contiguous(&[b * m * n]));
                let got = via_plan(&a, la, &bb, lb);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-5, "{ln} x {rn}: element {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn size_one_dims_and_vectors_need_no_copy() {
        // a row vector with any column stride, a column vector with any row stride
        let (l, _) = view([2, 1, 6], [6, 99, 1], 0);
        assert_eq!(Operand::of(&l).map(|o| (o.trans, o.ld)), Some((false, 6)));
        let (l, _) = view([2, 1, 6], [12, 0, 2], 0);
        assert_eq!(Operand::of(&l).map(|o| (o.trans, o.ld)), Some((true, 2)));
        let (l, _) = view([2, 6, 1], [6, 1, 77], 0);
        assert_eq!(Operand::of(&l).map(|o| (o.trans, o.ld)), Some((false, 1)));
        let (l, _) = view([2, 6, 1], [12, 2, 0], 0);
        assert_eq!(Operand::of(&l).map(|o| (o.trans, o.ld)), Some((false, 2)));
        // a broadcast scalar row repeated down: rows stride 0, nothing unit: copy
        let (l, _) = view([1, 4, 3], [0, 0, 2], 0);
        assert_eq!(Operand::of(&l), None);
        for (shape, strides) in [([2, 1, 6], [6, 99, 1]), ([2, 6, 1], [12, 2, 0]), ([1, 1, 1], [0, 0, 0])] {
            let (la, alen) = view(shape, strides, 0);
            let (lb, blen) = view([shape[0], shape[2], 3], [shape[2] * 3, 3, 1], 0);
            let (a, b) = (data(alen, 3), data(blen, 4));
            let want = CpuStorage::F32(a.clone()).matmul(&la, &CpuStorage::F32(b.clone()), &lb).unwrap();
            let want = want.to_f32_vec(&Layout::contiguous(&[shape[0] * shape[1] * 3]));
            let got = via_plan(&a, &la, &b, &lb);
            assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-5), "{shape:?} {strides:?}: {got:?} vs {want:?}");
        }
    }
}
