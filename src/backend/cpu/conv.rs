//! 2-D convolution on the CPU as im2col + GEMM (the `gemm` crate). Small 3x3 stride-1
//! convolutions take `conv3x3`'s direct AVX-512 or AVX2 path instead where it is faster
//! (its `applies` says where: forward, and the input gradient as a convolution itself),
//! and on AVX2 CPUs `conv3x3_weight`'s direct weight gradient. On AVX2 CPUs stride-2
//! 3x3 convolutions take `conv3x3_s2`'s direct forward and input gradient, stride-1
//! 1x1 convolutions `conv1x1`'s direct passes, and batches of stride-1 3x3
//! convolutions with 16 or more input channels `winograd`'s F(2x2, 3x3) forward and
//! input gradient, before any of the others.
//!
//! The output columns (one per output pixel of every sample) are processed in *tiles*:
//! several whole samples, or a band of output rows of one sample. For each tile and
//! group, im2col unrolls the receptive fields into a `[ckk, cols]` matrix
//! (`ckk = c_in/groups * kh * kw`) and each pass is one GEMM against it:
//!
//! ```text
//! forward          out[c_out/g, cols] =  w[c_out/g, ckk] · col[ckk, cols]
//! backward input   dcol[ckk, cols]    =  wᵀ · grad[c_out/g, cols], then col2im (scatter-add)
//! backward weight  dw[c_out/g, ckk]  +=  grad[c_out/g, cols] · colᵀ
//! ```
//!
//! Putting several samples in one tile keeps the GEMM wide where feature maps are small
//! (a 2x2 map gives 4 columns per sample); the column budget bounds memory on large maps.
//! Threads each take a contiguous run of samples and run single-threaded GEMMs, so
//! im2col and col2im parallelise too; with fewer samples than threads the GEMM itself
//! goes parallel instead. The weight gradient sums over the whole batch: each thread
//! accumulates a private, transposed partial (the gemm crate's faster orientation for
//! long sums), and the partials are added up at the end; when there are few columns per
//! thread, one shared accumulation with a parallel GEMM is cheaper.
//!
//! Tile width, budget and thresholds were tuned on ResNet-18 shapes (batch 32, 64x64
//! input) on two AVX-512 cores, where the three passes reach 200-250 GFLOP/s.

use super::{buffers, conv1x1, conv3x3, conv3x3_s2, conv3x3_weight, winograd};
use crate::backend::Conv2dParams;
use crate::Result;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::Cell;

/// Most floats in one column buffer (4 MiB); a sample needing more is cut into bands of
/// output rows.
const COL_BUDGET: usize = 1 << 20;
/// Columns per tile the GEMMs aim for: wide enough to amortise packing the weights,
/// narrow enough to stay in cache (wider tiles measured slower with 64 channels).
const TILE_COLS: usize = 256;
/// Fewest columns per thread (samples x output pixels) for which private per-thread
/// weight gradients beat splitting each GEMM across threads.
const SPLIT_K_MIN: usize = 1024;
/// Below this many multiply-adds a convolution runs on the calling thread.
const PAR_MACS: usize = 1 << 21;

pub fn conv2d(x: &[f32], w: &[f32], p: &Conv2dParams) -> Result<Vec<f32>> {
    if winograd::applies(p) {
        return Ok(winograd::conv2d(x, w, p));
    }
    if conv3x3::applies(p) {
        return Ok(conv3x3::conv2d(x, w, p));
    }
    if conv3x3_s2::applies(p) {
        return Ok(conv3x3_s2::conv2d(x, w, p));
    }
    if conv1x1::applies(p) {
        return Ok(conv1x1::conv2d(x, w, p));
    }
    let g = Geom::new(p);
    debug_assert_eq!(x.len(), g.in_len(), "Storage checks the operands");
    debug_assert_eq!(w.len(), g.w_len(), "Storage checks the operands");
    // Every element is written: a tile's GEMMs cover all its channels and pixels.
    let out = buffers::filled(g.out_len(), |out| g.for_each_task(out, g.out_sample(), |b0, out, par| g.forward(x, w, b0, out, par)));
    Ok(out)
}

/// The exact adjoint of `conv2d` in its input, so also conv_transpose2d's forward.
pub fn conv2d_backward_input(grad: &[f32], w: &[f32], p: &Conv2dParams) -> Result<Vec<f32>> {
    if winograd::applies_backward_input(p) {
        return Ok(winograd::conv2d_backward_input(grad, w, p));
    }
    if conv3x3::applies_backward_input(p) {
        return Ok(conv3x3::conv2d_backward_input(grad, w, p));
    }
    if conv3x3_s2::applies_backward_input(p) {
        return Ok(conv3x3_s2::conv2d_backward_input(grad, w, p));
    }
    if conv1x1::applies(p) {
        return Ok(conv1x1::conv2d_backward_input(grad, w, p));
    }
    let g = Geom::new(p);
    debug_assert_eq!(grad.len(), g.out_len(), "Storage checks the operands");
    debug_assert_eq!(w.len(), g.w_len(), "Storage checks the operands");
    let mut dx = buffers::zeroed(g.in_len());
    // Tasks own whole samples: row bands of one sample overlap in dx, so they stay on
    // one thread.
    g.for_each_task(&mut dx, g.in_sample(), |b0, dx, par| g.backward_input(grad, w, b0, dx, par));
    Ok(dx)
}

pub fn conv2d_backward_weight(x: &[f32], grad: &[f32], p: &Conv2dParams) -> Result<Vec<f32>> {
    if conv3x3_weight::applies(p) {
        return Ok(conv3x3_weight::conv2d_backward_weight(x, grad, p));
    }
    if conv1x1::applies(p) {
        return Ok(conv1x1::conv2d_backward_weight(x, grad, p));
    }
    let g = Geom::new(p);
    debug_assert_eq!(x.len(), g.in_len(), "Storage checks the operands");
    debug_assert_eq!(grad.len(), g.out_len(), "Storage checks the operands");
    let mut dw = buffers::zeroed(g.w_len());
    let (tasks, per_task, par) = g.split();
    if tasks <= 1 || per_task * g.hw < SPLIT_K_MIN {
        // One accumulation over the whole batch; threads split the GEMMs instead.
        let par = if tasks <= 1 { par } else { Parallelism::Rayon(rayon::current_num_threads()) };
        g.accumulate_dw(x, grad, 0, p.batch, &mut dw, false, par);
        return Ok(dw);
    }
    // Each thread accumulates a private dwᵀ over its samples; the partials are summed
    // (and transposed back) at the end, so no two threads write the same dw.
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|i| {
            let mut dwt = buffers::zeroed(g.w_len());
            g.accumulate_dw(x, grad, i * per_task, ((i + 1) * per_task).min(p.batch), &mut dwt, true, Parallelism::None);
            dwt
        })
        .collect();
    let block = g.cout_g * g.ckk;
    dw.par_chunks_mut(g.ckk).with_min_len(16).enumerate().for_each(|(row, dw)| {
        let (gi, co) = (row / g.cout_g, row % g.cout_g);
        for part in &partials {
            let part = &part[gi * block..][..block];
            dw.iter_mut().enumerate().for_each(|(r, d)| *d += part[r * g.cout_g + co]);
        }
    });
    partials.into_iter().for_each(buffers::recycle);
    Ok(dw)
}

/// Shapes derived once from the params.
struct Geom {
    p: Conv2dParams,
    ho: usize,
    wo: usize,
    /// Output pixels per plane.
    hw: usize,
    /// Input pixels per plane.
    plane: usize,
    cin_g: usize,
    cout_g: usize,
    /// Rows of the column matrix: one per (input channel of the group, ki, kj).
    ckk: usize,
    /// 1x1, stride 1, no padding: the input planes already are the column matrix.
    pointwise: bool,
}

/// A set of output columns: samples `b0..b0+nb`, output rows `r0..r0+nr` of each.
/// Either `nb == 1` or the rows are all of them.
#[derive(Clone, Copy, Debug)]
struct Tile {
    b0: usize,
    nb: usize,
    r0: usize,
    nr: usize,
}

impl Tile {
    fn cols(&self, g: &Geom) -> usize {
        self.nb * self.nr * g.wo
    }
}

impl Geom {
    /// `p` has passed `Conv2dParams::check` (in `Storage`).
    fn new(p: &Conv2dParams) -> Geom {
        let (kh, kw) = (p.kh, p.kw);
        let (ho, wo) = (p.h_out(), p.w_out());
        let (cin_g, cout_g) = (p.c_in / p.groups, p.c_out / p.groups);
        let pointwise = kh == 1 && kw == 1 && p.stride == (1, 1) && p.padding == (0, 0);
        Geom { p: *p, ho, wo, hw: ho * wo, plane: p.h_in * p.w_in, cin_g, cout_g, ckk: cin_g * kh * kw, pointwise }
    }

    fn in_sample(&self) -> usize {
        self.p.c_in * self.plane
    }
    fn out_sample(&self) -> usize {
        self.p.c_out * self.hw
    }
    fn in_len(&self) -> usize {
        self.p.batch * self.in_sample()
    }
    fn out_len(&self) -> usize {
        self.p.batch * self.out_sample()
    }
    fn w_len(&self) -> usize {
        self.p.c_out * self.ckk
    }

    /// How the batch is split: (tasks, samples per task, GEMM parallelism inside a task).
    fn split(&self) -> (usize, usize, Parallelism) {
        let threads = rayon::current_num_threads();
        if self.p.macs() < PAR_MACS || threads == 1 {
            return (1, self.p.batch, Parallelism::None);
        }
        let per_task = self.p.batch.div_ceil(threads);
        let tasks = self.p.batch.div_ceil(per_task);
        // Fewer samples than threads: spread each GEMM over the threads instead.
        let par = if tasks < threads { Parallelism::Rayon(threads) } else { Parallelism::None };
        (tasks, per_task, par)
    }

    /// Runs `f(first_sample, out_chunk, gemm_parallelism)` over contiguous runs of
    /// samples of `out` (`sample` floats each), in parallel when worth it.
    fn for_each_task(&self, out: &mut [f32], sample: usize, f: impl Fn(usize, &mut [f32], Parallelism) + Sync) {
        let (tasks, per_task, par) = self.split();
        if out.is_empty() {
            return;
        }
        if tasks <= 1 {
            f(0, out, par);
        } else {
            out.par_chunks_mut(per_task * sample).enumerate().for_each(|(i, o)| f(i * per_task, o, par));
        }
    }

    /// Tiles covering samples `b0..b1`: whole samples up to about `target` columns, or
    /// row bands of one sample when a sample's column matrix exceeds the budget.
    fn tiles(&self, b0: usize, b1: usize, target: usize) -> Vec<Tile> {
        let per_sample = self.ckk * self.hw;
        let mut tiles = vec![];
        if per_sample <= COL_BUDGET {
            let nb = (target / self.hw).clamp(1, COL_BUDGET / per_sample.max(1));
            for b in (b0..b1).step_by(nb) {
                tiles.push(Tile { b0: b, nb: nb.min(b1 - b), r0: 0, nr: self.ho });
            }
        } else {
            let nr = (COL_BUDGET / (self.ckk * self.wo)).max(1);
            for b in b0..b1 {
                for r in (0..self.ho).step_by(nr) {
                    tiles.push(Tile { b0: b, nb: 1, r0: r, nr: nr.min(self.ho - r) });
                }
            }
        }
        tiles
    }

    /// The forward pass for the samples of `out`, the first being `b0`.
    fn forward(&self, x: &[f32], w: &[f32], b0: usize, out: &mut [f32], par: Parallelism) {
        with_scratch(|col, tmp| {
            for t in self.tiles(b0, b0 + out.len() / self.out_sample(), TILE_COLS) {
                let n = t.cols(self);
                for gi in 0..self.p.groups {
                    let cols = self.im2col(x, t, gi, col, par);
                    let w_g = View { data: &w[gi * self.cout_g * self.ckk..], rs: self.ckk, cs: 1 };
                    // One sample: write straight into the output planes; several: into a
                    // [c_out/g, nb * hw] buffer, then reorder into NCHW.
                    let off = ((t.b0 - b0) * self.p.c_out + gi * self.cout_g) * self.hw + t.r0 * self.wo;
                    if t.nb == 1 {
                        matmul(self.cout_g, n, self.ckk, &mut out[off..], self.hw, 1, false, w_g, cols, par);
                    } else {
                        let tmp = sized(tmp, self.cout_g * n);
                        matmul(self.cout_g, n, self.ckk, tmp, n, 1, false, w_g, cols, par);
                        unpack(tmp, &mut out[off..], self.cout_g, self.out_sample(), self.hw, t.nb);
                    }
                }
            }
        })
    }

    /// Adds the input gradient of the samples of `dx`, the first being `b0`.
    fn backward_input(&self, grad: &[f32], w: &[f32], b0: usize, dx: &mut [f32], par: Parallelism) {
        with_scratch(|dcol, tmp| {
            for t in self.tiles(b0, b0 + dx.len() / self.in_sample(), TILE_COLS) {
                let n = t.cols(self);
                for gi in 0..self.p.groups {
                    let grad_t = self.grad_tile(grad, t, gi, tmp);
                    // wᵀ: element (r, co) of the [ckk, c_out/g] matrix is w_g[co, r].
                    let w_t = View { data: &w[gi * self.cout_g * self.ckk..], rs: 1, cs: self.ckk };
                    let off = ((t.b0 - b0) * self.p.c_in + gi * self.cin_g) * self.plane;
                    if self.pointwise && t.nb == 1 {
                        // The column matrix is the input plane itself: nothing to scatter.
                        let dst = &mut dx[off + t.r0 * self.wo..];
                        matmul(self.ckk, n, self.cout_g, dst, self.plane, 1, false, w_t, grad_t, par);
                    } else {
                        let dcol = sized(dcol, self.ckk * n);
                        matmul(self.ckk, n, self.cout_g, dcol, n, 1, false, w_t, grad_t, par);
                        self.col2im(dcol, t, &mut dx[off..]);
                    }
                }
            }
        })
    }

    /// `dw += grad · colᵀ` over samples `b0..b1`, per group. `transposed` stores each
    /// group's block as `[ckk, c_out/g]`, the GEMM's faster orientation for long sums.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_dw(&self, x: &[f32], grad: &[f32], b0: usize, b1: usize, dw: &mut [f32], transposed: bool, par: Parallelism) {
        let (rs, cs) = if transposed { (1, self.cout_g) } else { (self.ckk, 1) };
        with_scratch(|col, tmp| {
            for t in self.tiles(b0, b1, TILE_COLS) {
                for gi in 0..self.p.groups {
                    let cols = self.im2col(x, t, gi, col, par);
                    let grad_t = self.grad_tile(grad, t, gi, tmp);
                    // colᵀ: element (c, r) of the [cols, ckk] matrix is col[r, c].
                    let col_t = View { data: cols.data, rs: cols.cs, cs: cols.rs };
                    let dw_g = &mut dw[gi * self.cout_g * self.ckk..];
                    matmul(self.cout_g, self.ckk, t.cols(self), dw_g, rs, cs, true, grad_t, col_t, par);
                }
            }
        });
    }

    /// The `[ckk, cols]` column matrix of tile `t`, group `gi`: a view into `x` itself
    /// for a pointwise conv of one sample, else unrolled into `buf`. When the GEMM gets
    /// the threads (`par`: one task, e.g. batch-1 inference) so does the unrolling, a
    /// channel's rows per task: on one thread it left the other idle for ~6% of a
    /// ResNet-18 forward.
    fn im2col<'a>(&self, x: &'a [f32], t: Tile, gi: usize, buf: &'a mut Vec<f32>, par: Parallelism) -> View<'a> {
        let p = &self.p;
        let x = &x[(t.b0 * p.c_in + gi * self.cin_g) * self.plane..];
        if self.pointwise && t.nb == 1 {
            return View { data: &x[t.r0 * self.wo..], rs: self.plane, cs: 1 };
        }
        let n = t.cols(self);
        let col = sized(buf, self.ckk * n);
        let rows_per_channel = p.kh * p.kw;
        // channel `c`'s rows of the column matrix
        let fill = |c: usize, rows: &mut [f32]| {
            self.for_each_window_row(t, c..c + 1, |row, b, c, oh, ih, (lo, hi), iw0| {
                let dst = &mut rows[(row - c * rows_per_channel) * n + (b * t.nr + oh - t.r0) * self.wo..][..self.wo];
                let Some(ih) = ih else { return dst.fill(0.0) };
                let src = &x[(b * p.c_in + c) * self.plane + ih * p.w_in..][..p.w_in];
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                if p.stride.1 == 1 {
                    dst[lo..hi].copy_from_slice(&src[iw0..iw0 + hi - lo]);
                } else {
                    dst[lo..hi].iter_mut().zip(src[iw0..].iter().step_by(p.stride.1)).for_each(|(d, s)| *d = *s);
                }
            })
        };
        let chunks = rows_per_channel * n;
        if matches!(par, Parallelism::Rayon(_)) && col.len() >= super::PAR_THRESHOLD {
            col.par_chunks_mut(chunks).enumerate().for_each(|(c, rows)| fill(c, rows));
        } else {
            col.chunks_mut(chunks).enumerate().for_each(|(c, rows)| fill(c, rows));
        }
        View { data: col, rs: n, cs: 1 }
    }

    /// Adds the `[ckk, cols]` matrix `col` back onto the input positions it was read
    /// from; `dx` starts at group `gi`'s first channel of the tile's first sample.
    fn col2im(&self, col: &[f32], t: Tile, dx: &mut [f32]) {
        let (p, n) = (&self.p, t.cols(self));
        self.for_each_window_row(t, 0..self.cin_g, |row, b, c, oh, ih, (lo, hi), iw0| {
            let Some(ih) = ih else { return };
            let src = &col[row * n + (b * t.nr + oh - t.r0) * self.wo..][lo..hi];
            let dst = &mut dx[(b * p.c_in + c) * self.plane + ih * p.w_in..][..p.w_in];
            if p.stride.1 == 1 {
                // two equal slices: the compiler vectorises this, not the `step_by` walk
                dst[iw0..iw0 + src.len()].iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst[iw0..].iter_mut().step_by(p.stride.1).zip(src).for_each(|(d, s)| *d += s);
            }
        });
    }

    /// The walk shared by im2col and col2im: calls `f(row, b, c, oh, ih, (lo, hi), iw0)`
    /// for every column-matrix row `row = (c, ki, kj)` of the channels `cs`, sample `b`
    /// of the tile and output row `oh`. `ih` is the input row (None in the padding);
    /// output columns `lo..hi` read inside the input, starting at input column `iw0` and
    /// stepping by the stride.
    fn for_each_window_row(&self, t: Tile, cs: std::ops::Range<usize>, mut f: impl FnMut(usize, usize, usize, usize, Option<usize>, (usize, usize), usize)) {
        let p = &self.p;
        let ((sh, sw), (ph, pw), (dh, dw)) = (p.stride, p.padding, p.dilation);
        for c in cs {
            for ki in 0..p.kh {
                for kj in 0..p.kw {
                    let row = (c * p.kh + ki) * p.kw + kj;
                    let (lo, hi) = valid_range(kj * dw, pw, sw, p.w_in, self.wo);
                    // Only read when lo < hi, where it cannot underflow.
                    let iw0 = if lo < hi { lo * sw + kj * dw - pw } else { 0 };
                    for b in 0..t.nb {
                        for oh in t.r0..t.r0 + t.nr {
                            let ih = (oh * sh + ki * dh).checked_sub(ph).filter(|&ih| ih < p.h_in);
                            f(row, b, c, oh, ih, (lo, hi), iw0);
                        }
                    }
                }
            }
        }
    }

    /// The output gradient of tile `t`, group `gi`, as a `[c_out/g, cols]` matrix: a
    /// view for one sample, else gathered from NCHW into `buf`.
    fn grad_tile<'a>(&self, grad: &'a [f32], t: Tile, gi: usize, buf: &'a mut Vec<f32>) -> View<'a> {
        let grad = &grad[(t.b0 * self.p.c_out + gi * self.cout_g) * self.hw + t.r0 * self.wo..];
        if t.nb == 1 {
            return View { data: grad, rs: self.hw, cs: 1 };
        }
        let n = t.cols(self);
        let m = sized(buf, self.cout_g * n);
        for (c, row) in m.chunks_exact_mut(n).enumerate() {
            for (b, dst) in row.chunks_exact_mut(self.hw).enumerate() {
                dst.copy_from_slice(&grad[(b * self.p.c_out + c) * self.hw..][..self.hw]);
            }
        }
        View { data: m, rs: n, cs: 1 }
    }
}

/// Output positions `o` in `0..n_out` whose input position `o * stride + off - pad` lies
/// in `0..n_in`, as a range `lo..hi`.
fn valid_range(off: usize, pad: usize, stride: usize, n_in: usize, n_out: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(off).div_ceil(stride).min(n_out);
    let hi = (pad + n_in).saturating_sub(off).div_ceil(stride).clamp(lo, n_out);
    (lo, hi)
}

/// Scatters a `[channels, nb * hw]` matrix into NCHW (`sample` floats per sample).
fn unpack(m: &[f32], out: &mut [f32], channels: usize, sample: usize, hw: usize, nb: usize) {
    for (c, row) in m.chunks_exact(nb * hw).take(channels).enumerate() {
        for (b, src) in row.chunks_exact(hw).enumerate() {
            out[b * sample + c * hw..][..hw].copy_from_slice(src);
        }
    }
}

/// A strided matrix inside a slice: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `dst[m, n] = (dst if accumulate) + lhs[m, k] · rhs[k, n]`, element `(i, j)` of `dst`
/// at `i * dst_rs + j * dst_cs`.
#[allow(clippy::too_many_arguments)]
fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, dst_cs: usize, accumulate: bool, lhs: View, rhs: View, par: Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum; the GEMM would leave dst untouched.
        if !accumulate {
            (0..m).for_each(|i| (0..n).for_each(|j| dst[i * dst_rs + j * dst_cs] = 0.0));
        }
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, dst_cs) < dst.len(), "conv: GEMM destination out of bounds");
    assert!(last(m, k, lhs.rs, lhs.cs) < lhs.data.len(), "conv: GEMM lhs out of bounds");
    assert!(last(k, n, rhs.rs, rhs.cs) < rhs.data.len(), "conv: GEMM rhs out of bounds");
    // SAFETY: the asserts keep every element the GEMM reads or writes inside its slice,
    // and `dst` is a unique borrow, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

thread_local! {
    /// Per-thread scratch (column matrix, reordered gradient), reused across calls: a
    /// fresh multi-MiB buffer per call costs page faults comparable to a small GEMM.
    static SCRATCH: Cell<(Vec<f32>, Vec<f32>)> = const { Cell::new((Vec::new(), Vec::new())) };
}

/// Lends this thread's scratch buffers to `f`. They are taken out of the cell, so a
/// nested call (rayon may run another task here while a GEMM waits) gets fresh ones.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    let (mut a, mut b) = SCRATCH.with(Cell::take);
    let r = f(&mut a, &mut b);
    SCRATCH.with(|s| s.set((a, b)));
    r
}

/// The first `n` floats of `v`, growing it if needed (contents unspecified).
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;

    use crate::backend::cpu::test_rand as rand;

    /// Calls `f(x_index, w_index, out_index)` for every multiply-add of the convolution.
    fn naive_walk(p: &Conv2dParams, mut f: impl FnMut(usize, usize, usize)) {
        let (ho, wo, cin_g, cout_g) = (p.h_out(), p.w_out(), p.c_in / p.groups, p.c_out / p.groups);
        for b in 0..p.batch {
            for co in 0..p.c_out {
                let gi = co / cout_g;
                for oh in 0..ho {
                    for ow in 0..wo {
                        for ci in 0..cin_g {
                            for ki in 0..p.kh {
                                for kj in 0..p.kw {
                                    let ih = (oh * p.stride.0 + ki * p.dilation.0) as isize - p.padding.0 as isize;
                                    let iw = (ow * p.stride.1 + kj * p.dilation.1) as isize - p.padding.1 as isize;
                                    if ih < 0 || iw < 0 || ih >= p.h_in as isize || iw >= p.w_in as isize {
                                        continue;
                                    }
                                    let xi = ((b * p.c_in + gi * cin_g + ci) * p.h_in + ih as usize) * p.w_in + iw as usize;
                                    let wi = ((co * cin_g + ci) * p.kh + ki) * p.kw + kj;
                                    f(xi, wi, ((b * p.c_out + co) * ho + oh) * wo + ow);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn params(
        batch: usize,
        c_in: usize,
        hw: (usize, usize),
        c_out: usize,
        k: (usize, usize),
        stride: usize,
        pad: usize,
        dil: usize,
        groups: usize,
    ) -> Conv2dParams {
        Conv2dParams {
            batch,
            c_in,
            h_in: hw.0,
            w_in: hw.1,
            c_out,
            kh: k.0,
            kw: k.1,
            stride: (stride, stride),
            padding: (pad, pad),
            dilation: (dil, dil),
            groups,
        }
    }

    fn cases() -> Vec<Conv2dParams> {
        let mut v = vec![
            params(2, 3, (7, 9), 4, (3, 3), 1, 1, 1, 1),
            params(3, 4, (9, 8), 6, (3, 2), 2, 0, 1, 2),
            params(1, 5, (11, 10), 3, (3, 3), 2, 2, 2, 1),
            params(2, 6, (8, 7), 6, (3, 3), 1, 1, 1, 6),   // depthwise
            params(2, 4, (5, 6), 8, (3, 3), 2, 1, 1, 4),   // depthwise, channel multiplier 2
            params(3, 6, (5, 7), 4, (1, 1), 1, 0, 1, 2),   // pointwise fast path
            params(2, 5, (6, 5), 3, (1, 1), 2, 0, 1, 1),   // 1x1, strided
            params(1, 2, (13, 12), 3, (2, 5), 3, 2, 1, 1), // stride leaves a remainder
            params(2, 3, (6, 6), 2, (2, 2), 1, 1, 2, 1),
            params(4, 8, (3, 3), 5, (3, 3), 1, 1, 1, 1),
            params(1, 2, (4, 4), 2, (1, 1), 1, 0, 1, 1), // pointwise, one sample
        ];
        // Asymmetric stride, padding and dilation.
        let mut p = params(2, 3, (10, 9), 4, (3, 2), 1, 0, 1, 1);
        (p.stride, p.padding, p.dilation) = ((2, 1), (1, 0), (1, 2));
        v.push(p);
        v
    }

    #[test]
    fn conv2d_matches_naive() {
        for (i, p) in cases().into_iter().enumerate() {
            let (x, w) = (rand(p.input_shape().iter().product(), i as u64), rand(p.weight_shape().iter().product(), 100 + i as u64));
            let mut want = vec![0f32; p.output_shape().iter().product()];
            naive_walk(&p, |xi, wi, oi| want[oi] += x[xi] * w[wi]);
            assert_close(&conv2d(&x, &w, &p).unwrap(), &want, 1e-4, 1e-4, &format!("conv2d {p:?}"));
        }
    }

    #[test]
    fn backward_input_matches_naive() {
        for (i, p) in cases().into_iter().enumerate() {
            let (g, w) = (rand(p.output_shape().iter().product(), i as u64), rand(p.weight_shape().iter().product(), 200 + i as u64));
            let mut want = vec![0f32; p.input_shape().iter().product()];
            naive_walk(&p, |xi, wi, oi| want[xi] += g[oi] * w[wi]);
            assert_close(&conv2d_backward_input(&g, &w, &p).unwrap(), &want, 1e-4, 1e-4, &format!("backward_input {p:?}"));
        }
    }

    #[test]
    fn backward_weight_matches_naive() {
        for (i, p) in cases().into_iter().enumerate() {
            let (x, g) = (rand(p.input_shape().iter().product(), i as u64), rand(p.output_shape().iter().product(), 300 + i as u64));
            let mut want = vec![0f32; p.weight_shape().iter().product()];
            naive_walk(&p, |xi, wi, oi| want[wi] += x[xi] * g[oi]);
            assert_close(&conv2d_backward_weight(&x, &g, &p).unwrap(), &want, 1e-4, 1e-4, &format!("backward_weight {p:?}"));
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    /// <conv(x, w), g> = <x, backward_input(g, w)> = <w, backward_weight(x, g)>.
    #[test]
    fn backwards_are_adjoints() {
        for (i, p) in cases().into_iter().enumerate() {
            let x = rand(p.input_shape().iter().product(), i as u64);
            let w = rand(p.weight_shape().iter().product(), 400 + i as u64);
            let g = rand(p.output_shape().iter().product(), 500 + i as u64);
            let y = dot(&conv2d(&x, &w, &p).unwrap(), &g);
            let via_x = dot(&x, &conv2d_backward_input(&g, &w, &p).unwrap());
            let via_w = dot(&w, &conv2d_backward_weight(&x, &g, &p).unwrap());
            assert!((y - via_x).abs() < 1e-3 * (1.0 + y.abs()), "{p:?}: {y} vs {via_x}");
            assert!((y - via_w).abs() < 1e-3 * (1.0 + y.abs()), "{p:?}: {y} vs {via_w}");
        }
    }

    /// Shapes big enough to take the threaded paths, the multi-sample tiles and the
    /// row bands of one sample (a column matrix over the budget).
    #[test]
    fn large_shapes_match_naive() {
        let cases = [
            params(8, 16, (10, 10), 24, (3, 3), 1, 1, 1, 1),
            params(5, 32, (3, 3), 16, (3, 3), 1, 1, 1, 2),
            params(1, 64, (130, 130), 2, (3, 3), 1, 1, 1, 1), // 576 x 16900 columns: banded
            params(2, 64, (130, 129), 4, (1, 1), 1, 0, 1, 1), // pointwise, banded
        ];
        for (i, p) in cases.into_iter().enumerate() {
            let x = rand(p.input_shape().iter().product(), i as u64);
            let w = rand(p.weight_shape().iter().product(), 600 + i as u64);
            let g = rand(p.output_shape().iter().product(), 700 + i as u64);
            // Long sums round more: compare against the sum of |terms| of each output.
            let (mut y, mut dx, mut dw) = (vec![0f32; g.len()], vec![0f32; x.len()], vec![0f32; w.len()]);
            let (mut my, mut mdx, mut mdw) = (y.clone(), dx.clone(), dw.clone());
            naive_walk(&p, |xi, wi, oi| {
                let (xw, gw, xg) = (x[xi] * w[wi], g[oi] * w[wi], x[xi] * g[oi]);
                y[oi] += xw;
                my[oi] += xw.abs();
                dx[xi] += gw;
                mdx[xi] += gw.abs();
                dw[wi] += xg;
                mdw[wi] += xg.abs();
            });
            let tol = |got: &[f32], want: &[f32], mag: &[f32], what: &str| {
                for (j, ((a, b), m)) in got.iter().zip(want).zip(mag).enumerate() {
                    assert!((a - b).abs() <= 1e-4 + 1e-5 * m, "{what} {p:?} [{j}]: {a} vs {b}");
                }
            };
            tol(&conv2d(&x, &w, &p).unwrap(), &y, &my, "conv2d");
            tol(&conv2d_backward_input(&g, &w, &p).unwrap(), &dx, &mdx, "backward_input");
            tol(&conv2d_backward_weight(&x, &g, &p).unwrap(), &dw, &mdw, "backward_weight");
        }
    }

    #[test]
    fn empty_shapes() {
        for p in [params(0, 3, (5, 5), 4, (3, 3), 1, 1, 1, 1), params(2, 0, (5, 5), 4, (3, 3), 1, 1, 1, 1)] {
            let (x, w) = (vec![1.0; p.input_shape().iter().product()], vec![1.0; p.weight_shape().iter().product()]);
            let g = vec![1.0; p.output_shape().iter().product()];
            assert!(conv2d(&x, &w, &p).unwrap().iter().all(|&v| v == 0.0));
            assert_eq!(conv2d_backward_input(&g, &w, &p).unwrap().len(), x.len());
            assert_eq!(conv2d_backward_weight(&x, &g, &p).unwrap().len(), w.len());
        }
    }
}
