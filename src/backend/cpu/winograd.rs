//! Winograd F(2x2, 3x3) for stride-1 3x3 convolutions on AVX2 CPUs: 16 multiply-adds
//! per 2x2 output tile and channel pair where the direct kernel (`conv3x3`) does 36.
//! Each 4x4 input tile `d` (stride 2 over the padded input) and each 3x3 filter `g` are
//! transformed,
//!
//! ```text
//! V = Bᵀ d B   (per input channel and tile)      U = G g Gᵀ   (per channel pair, once a call)
//! M[ξ] = U[ξ] · V[ξ]   for each of the 16 positions ξ of the 4x4 transform domain
//! Y = Aᵀ M A   (the 2x2 output tile, per output channel)
//! ```
//!
//! with Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]
//! and Aᵀ = [1 1 1 0; 0 1 -1 -1] (Lavin and Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016). The 16 products over the channels are 1x1 convolutions of
//! the transformed tiles, and run on `conv1x1`'s register blocks; the transforms are
//! adds and subtracts over 8 tiles at a time, which read the input's four stride-2
//! phases (`conv3x3_s2::phases`) so that the same corner of 8 neighbouring tiles is 8
//! consecutive floats.
//!
//! Tiles are processed a few tile rows at a time, so a block's transformed input and
//! products stay in L2. The input gradient is the same convolution of the output
//! gradient with the flipped, transposed filters, as in `conv3x3`.
//!
//! The transforms add up to 4 x 4 inputs before the products, so rounding errors are
//! a few times the direct sum's (the tests bound them); the ½ in G is exact.

use super::conv3x3::{self, transposed};
use super::{buffers, conv1x1, conv3x3_s2};
use crate::backend::Conv2dParams;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// f32 lanes of an AVX2 vector: tiles per transform step.
const LANES: usize = 8;
/// Floats of one tile block's transformed input or products (`[16][channels][tiles]`):
/// 64 KiB each, in a 512 KiB L2 (of 8, 16, 24 and 32 Ki floats, 16 measured fastest on
/// the demo's shapes, `examples/winograd_ab`).
const BLOCK_FLOATS: usize = 16 * 1024;

/// Whether `applies` may choose this path (see `set_enabled`).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Lets `conv2d` take this path where it applies (the default), or runs the direct
/// kernels and the GEMM instead: to compare the two (`examples/winograd_ab`), or to rule
/// the transforms' rounding out when chasing a numerical difference.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed)
}

/// Whether `conv2d` computes this forward convolution here.
pub fn applies(p: &Conv2dParams) -> bool {
    shape_fits(p)
        // where it measured faster than the direct kernel or the GEMM (`examples/
        // winograd_ab`): 16 or more input channels (with 3 the products are too short
        // to pay for the transforms), 16 or more tiles a sample (8x8 planes), and the
        // transformed filters (16 c_in c_out floats, read once a tile block) at most
        // 1 MiB, as with 128 channels in and out
        && p.c_in >= 16
        && p.h_in.div_ceil(2) * p.w_in.div_ceil(2) >= 16
        && p.c_in * p.c_out <= 128 * 128
        // samples go to the threads: with fewer samples than threads (batch-1
        // inference on 2 or more) the direct kernel runs, whose channel blocks spread
        // over them
        && p.batch >= rayon::current_num_threads()
        && conv3x3::runs_avx2()
        && ENABLED.load(Ordering::Relaxed)
}

/// The convolutions this module computes, given AVX2 and enough samples.
fn shape_fits(p: &Conv2dParams) -> bool {
    p.is_dense_3x3(1) && p.h_in >= 2 && p.w_in >= 2
}

/// Whether `conv2d_backward_input` computes this convolution's input gradient here.
pub fn applies_backward_input(p: &Conv2dParams) -> bool {
    applies(&transposed(p))
}

/// `conv2d(x, w)` for a `p` that `applies`.
pub fn conv2d(x: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(applies(p), "winograd::conv2d called for {p:?}");
    forward(x, w, p)
}

fn forward(x: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let u = transform_filters(p.c_out, p.c_in, |co, ci, k| w[(co * p.c_in + ci) * 9 + k]);
    run(x, &u, p)
}

/// The input gradient of `conv2d(x, w)` for a `p` that `applies_backward_input`:
/// `grad` convolved with `w` flipped in both spatial axes, in and out channels swapped.
pub fn conv2d_backward_input(grad: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(applies_backward_input(p), "winograd::conv2d_backward_input called for {p:?}");
    backward_input(grad, w, p)
}

fn backward_input(grad: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let q = transposed(p);
    let u = transform_filters(q.c_out, q.c_in, |ci, co, k| w[(co * p.c_in + ci) * 9 + 8 - k]);
    run(grad, &u, &q)
}

/// `U = G g Gᵀ` of every filter, as 16 products' weights (one per ξ) in `conv1x1`'s
/// packed layout; `at(co, ci, k)` reads tap k of the filter from input `ci` to output
/// `co`.
fn transform_filters(c_out: usize, c_in: usize, at: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    const G: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    let transform = |co: usize, ci: usize| -> [f32; 16] {
        let g: [[f32; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| at(co, ci, i * 3 + j)));
        // G g: 4 x 3
        let gg: [[f32; 3]; 4] = std::array::from_fn(|a| std::array::from_fn(|j| (0..3).map(|i| G[a][i] * g[i][j]).sum()));
        std::array::from_fn(|xi| (0..3).map(|j| gg[xi / 4][j] * G[xi % 4][j]).sum())
    };
    let u: Vec<[f32; 16]> = (0..c_out * c_in).map(|k| transform(k / c_in, k % c_in)).collect();
    // each ξ a "group" of the packing
    conv1x1::pack(16, c_out, c_in, |xi, co, ci| u[co * c_in + ci][xi])
}

/// Tile geometry of one sample.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    /// Output tiles per column and per row (a last half tile on odd sizes).
    th: usize,
    tw: usize,
    /// Rows and columns of each input phase plane: a tile's 4x4 input spans 2 of each.
    r: usize,
    c: usize,
    /// Tile rows per block.
    rows: usize,
}

impl Tiles {
    fn new(p: &Conv2dParams) -> Tiles {
        let (th, tw) = (p.h_in.div_ceil(2), p.w_in.div_ceil(2));
        // at least 16 tiles a block where the plane has them: the products' register
        // blocks are 16 tiles wide (8-tile blocks are bound by the FMA latency)
        let rows = (BLOCK_FLOATS / (16 * p.c_in.max(p.c_out) * tw)).max(16_usize.div_ceil(tw)).clamp(1, th);
        Tiles { th, tw, r: th + 1, c: tw + 1, rows }
    }

    /// Floats of one input channel's four phase planes.
    fn phase_channel(&self) -> usize {
        4 * self.r * self.c
    }

    /// Floats the phase planes of `c_in` channels take, with the slack the last
    /// transform step reads past them (up to tw + 7 floats).
    fn phases_len(&self, c_in: usize) -> usize {
        c_in * self.phase_channel() + self.tw + LANES
    }
}

/// Per-thread scratch, reused across calls.
#[derive(Default)]
struct Scratch {
    /// The phase planes of one sample, and the (channels, height, width) they are laid
    /// out for.
    phases: Vec<f32>,
    layout: Option<(usize, usize, usize)>,
    /// A block's transformed input and its products.
    v: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn run(x: &[f32], u: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let t = Tiles::new(p);
    let (in_sample, out_sample) = (p.c_in * p.h_in * p.w_in, p.c_out * p.h_in * p.w_in);
    assert!(x.len() == p.batch * in_sample && u.len() == 16 * p.c_in * p.c_out, "winograd: operand sizes");
    // every output element is written by `output_transform`
    buffers::filled(p.batch * out_sample, |out| {
        out.par_chunks_mut(out_sample).zip(x.par_chunks(in_sample)).for_each(|(out, x)| SCRATCH.with(|s| sample(x, u, p, &t, out, &mut s.borrow_mut())))
    })
}

/// One sample: its phase planes, then each block of tile rows transformed, multiplied
/// and transformed back into `out`.
fn sample(x: &[f32], u: &[f32], p: &Conv2dParams, t: &Tiles, out: &mut [f32], scratch: &mut Scratch) {
    let Scratch { phases: xp, layout, v, m } = scratch;
    // zeroed when the layout changes: the input's floats are rewritten for every sample,
    // and the padding around them stays zero
    let key = (p.c_in, p.h_in, p.w_in);
    if *layout != Some(key) {
        xp.clear();
        xp.resize(t.phases_len(p.c_in), 0.0);
        *layout = Some(key);
    }
    conv3x3_s2::phases_data(x, p, t.r, t.c, xp);
    let (c_in, c_out) = (p.c_in, p.c_out);
    for ty0 in (0..t.th).step_by(t.rows) {
        let nrows = t.rows.min(t.th - ty0);
        let n = nrows * t.tw;
        // the products run over whole vectors of tiles (a scalar tail is slow), into
        // the room each channel's row has for the transforms' last 8-lane step
        let n8 = n.next_multiple_of(LANES);
        let s = n8 + LANES;
        v.resize(16 * c_in * s, 0.0);
        m.resize(16 * c_out * s, 0.0);
        // SAFETY: the CPU has AVX2 and FMA (`applies`); the bounds are asserted inside.
        unsafe { input_transform(xp, c_in, t, ty0, nrows, s, v) };
        for xi in 0..16 {
            let src = &v[xi * c_in * s..][..c_in * s];
            for co0 in (0..c_out).step_by(conv1x1::CO_BLOCK) {
                let width = conv1x1::CO_BLOCK.min(c_out - co0);
                let w = &u[xi * c_out * c_in + co0 * c_in..][..width * c_in];
                conv1x1::channel_block(src, w, c_in, s, width, 0, n8, &mut m[(xi * c_out + co0) * s..][..width * s]);
            }
        }
        // SAFETY: as above
        unsafe { output_transform(m, c_out, t, ty0, nrows, s, p.h_in, p.w_in, out) };
    }
}

/// `v[ξ][ci][k] = (Bᵀ d B)[ξ]` of tile k (row-major from tile row `ty0`) of each input
/// channel, 8 tiles of a row per step.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform(xp: &[f32], c_in: usize, t: &Tiles, ty0: usize, nrows: usize, s: usize, v: &mut [f32]) {
    use std::arch::x86_64::*;
    let (c, plane) = (t.c, t.r * t.c);
    // the loads below read phase positions up to (th - 1 + 1)*c + tw + 7 of the last
    // channel's last plane; the stores write v[.. + k + 8] for k < nrows*tw <= s - 8
    assert!(xp.len() >= t.phases_len(c_in) && ty0 + nrows <= t.th && s >= nrows * t.tw + LANES && v.len() >= 16 * c_in * s, "winograd: input transform bounds");
    let (x, out) = (xp.as_ptr(), v.as_mut_ptr());
    for ci in 0..c_in {
        let base = x.add(ci * t.phase_channel());
        for ty in ty0..ty0 + nrows {
            for tx0 in (0..t.tw).step_by(LANES) {
                let q = ty * c + tx0;
                // d[i][j] = padded input row 2ty + i, column 2tx + j: phase (i % 2, j % 2),
                // phase row ty + i / 2, phase column tx + j / 2
                let d = |i: usize, j: usize| _mm256_loadu_ps(base.add(((i % 2) * 2 + j % 2) * plane + q + (i / 2) * c + j / 2));
                // Bᵀ d: rows
                let col = |j: usize| {
                    let (d0, d1, d2, d3) = (d(0, j), d(1, j), d(2, j), d(3, j));
                    [_mm256_sub_ps(d0, d2), _mm256_add_ps(d1, d2), _mm256_sub_ps(d2, d1), _mm256_sub_ps(d1, d3)]
                };
                let cols = [col(0), col(1), col(2), col(3)];
                let k = (ty - ty0) * t.tw + tx0;
                for (a, [e0, e1, e2, e3]) in (0..4).map(|a| (a, [cols[0][a], cols[1][a], cols[2][a], cols[3][a]])) {
                    // (Bᵀ d) B: columns of row a
                    let row = [_mm256_sub_ps(e0, e2), _mm256_add_ps(e1, e2), _mm256_sub_ps(e2, e1), _mm256_sub_ps(e1, e3)];
                    for (b, val) in row.into_iter().enumerate() {
                        _mm256_storeu_ps(out.add(((a * 4 + b) * c_in + ci) * s + k), val);
                    }
                }
            }
        }
    }
}

/// `out[co][2ty + a][2tx + b] = (Aᵀ M A)[a][b]` of each tile of the block, 8 tiles of
/// a row per step, the two output rows of each written whole.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform(m: &[f32], c_out: usize, t: &Tiles, ty0: usize, nrows: usize, s: usize, h: usize, w: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    // loads read m[.. + k + 8] for k < nrows*tw <= s - 8; stores stay inside row 2ty + a
    assert!(
        m.len() >= 16 * c_out * s && s >= nrows * t.tw + LANES && out.len() == c_out * h * w && 2 * (ty0 + nrows) <= h + 1,
        "winograd: output transform bounds"
    );
    let (mp, o) = (m.as_ptr(), out.as_mut_ptr());
    for co in 0..c_out {
        for ty in ty0..ty0 + nrows {
            for tx0 in (0..t.tw).step_by(LANES) {
                let k = (ty - ty0) * t.tw + tx0;
                let mv = |i: usize, j: usize| _mm256_loadu_ps(mp.add(((i * 4 + j) * c_out + co) * s + k));
                // Aᵀ M: two rows of four columns
                let rows: [[__m256; 4]; 2] = {
                    let col = |j: usize| {
                        let (m0, m1, m2, m3) = (mv(0, j), mv(1, j), mv(2, j), mv(3, j));
                        (_mm256_add_ps(_mm256_add_ps(m0, m1), m2), _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3))
                    };
                    let cs = [col(0), col(1), col(2), col(3)];
                    [std::array::from_fn(|j| cs[j].0), std::array::from_fn(|j| cs[j].1)]
                };
                let cols = (2 * (t.tw - tx0)).min(2 * LANES).min(w - 2 * tx0);
                for (a, e) in rows.iter().enumerate() {
                    let oh = 2 * ty + a;
                    if oh >= h {
                        continue;
                    }
                    // (Aᵀ M) A: the tiles' left and right output columns, interleaved
                    let y0 = _mm256_add_ps(_mm256_add_ps(e[0], e[1]), e[2]);
                    let y1 = _mm256_sub_ps(_mm256_sub_ps(e[1], e[2]), e[3]);
                    let (lo, hi) = (_mm256_unpacklo_ps(y0, y1), _mm256_unpackhi_ps(y0, y1));
                    let (first, second) = (_mm256_permute2f128_ps::<0x20>(lo, hi), _mm256_permute2f128_ps::<0x31>(lo, hi));
                    let dst = o.add(co * h * w + oh * w + 2 * tx0);
                    if cols == 2 * LANES {
                        _mm256_storeu_ps(dst, first);
                        _mm256_storeu_ps(dst.add(LANES), second);
                    } else {
                        let mut row = [0f32; 2 * LANES];
                        _mm256_storeu_ps(row.as_mut_ptr(), first);
                        _mm256_storeu_ps(row.as_mut_ptr().add(LANES), second);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_transform(_: &[f32], _: usize, _: &Tiles, _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("`applies` is false without AVX2")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform(_: &[f32], _: usize, _: &Tiles, _: usize, _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("`applies` is false without AVX2")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_rand as rand;

    fn params(batch: usize, c_in: usize, h: usize, w: usize, c_out: usize) -> Conv2dParams {
        Conv2dParams { batch, c_in, h_in: h, w_in: w, c_out, kh: 3, kw: 3, stride: (1, 1), padding: (1, 1), dilation: (1, 1), groups: 1 }
    }

    /// The convolution in f64 from its definition, and the sum of |products| of each
    /// output (what its rounding error scales with).
    fn reference(x: &[f32], w: &[f32], p: &Conv2dParams) -> (Vec<f32>, Vec<f64>) {
        let (h, wd) = (p.h_in as isize, p.w_in as isize);
        let n = p.batch * p.c_out * p.h_in * p.w_in;
        let (mut out, mut mag) = (vec![0f64; n], vec![0f64; n]);
        for b in 0..p.batch {
            for co in 0..p.c_out {
                for oh in 0..h {
                    for ow in 0..wd {
                        let o = ((b * p.c_out + co) * p.h_in + oh as usize) * p.w_in + ow as usize;
                        for ci in 0..p.c_in {
                            for k in 0..9 {
                                let (ih, iw) = (oh + k as isize / 3 - 1, ow + k as isize % 3 - 1);
                                if ih >= 0 && iw >= 0 && ih < h && iw < wd {
                                    let v = x[((b * p.c_in + ci) * p.h_in + ih as usize) * p.w_in + iw as usize] as f64 * w[(co * p.c_in + ci) * 9 + k] as f64;
                                    out[o] += v;
                                    mag[o] += v.abs();
                                }
                            }
                        }
                    }
                }
            }
        }
        (out.into_iter().map(|v| v as f32).collect(), mag)
    }

    /// 16 f32 roundings of the largest sum of |products| (each input is the sum of 4
    /// and each output of 9 transformed terms before and after the products), or 1e-5.
    fn tolerance(mag: &[f64]) -> f32 {
        1e-5f32.max(16.0 * f32::EPSILON * mag.iter().cloned().fold(0.0, f64::max) as f32)
    }

    /// Even and odd planes (a last half tile), planes narrower than 8 tiles and wider
    /// (a tail step), blocks of one tile row (64 channels), and 3-channel ends.
    fn cases() -> Vec<Conv2dParams> {
        vec![
            params(2, 16, 8, 8, 16),
            params(2, 3, 7, 9, 16),
            params(3, 16, 32, 32, 3),
            params(2, 64, 8, 8, 64),
            params(2, 5, 5, 13, 7),
            params(2, 32, 16, 18, 32),
            params(2, 8, 2, 3, 4),
            params(2, 96, 20, 20, 80),
        ]
    }

    fn skip() -> bool {
        let skip = !conv3x3::runs_avx2();
        if skip {
            eprintln!("skipped: this CPU does not run the AVX2 kernels (no AVX2 + FMA, or AVX-512)");
        }
        skip
    }

    #[test]
    fn forward_matches_the_definition() {
        if skip() {
            return;
        }
        for (i, p) in cases().into_iter().enumerate() {
            assert!(shape_fits(&p), "{p:?}");
            let (x, w) = (rand(p.batch * p.c_in * p.h_in * p.w_in, 300 + i as u64), rand(p.c_out * p.c_in * 9, 350 + i as u64));
            let (want, mag) = reference(&x, &w, &p);
            crate::testing::assert_close(&forward(&x, &w, &p), &want, tolerance(&mag), 1e-5, &format!("winograd forward {p:?}"));
        }
    }

    #[test]
    fn backward_input_matches_the_definition() {
        if skip() {
            return;
        }
        for (i, p) in cases().into_iter().enumerate() {
            let (g, w) = (rand(p.batch * p.c_out * p.h_in * p.w_in, 400 + i as u64), rand(p.c_out * p.c_in * 9, 450 + i as u64));
            // the input gradient is the transposed convolution: its definition is the
            // forward one with the flipped, transposed filters
            let q = transposed(&p);
            let wt: Vec<f32> =
                (0..p.c_in * p.c_out * 9).map(|j| (j / 9 / p.c_out, j / 9 % p.c_out, j % 9)).map(|(ci, co, k)| w[(co * p.c_in + ci) * 9 + 8 - k]).collect();
            let (want, mag) = reference(&g, &wt, &q);
            crate::testing::assert_close(&backward_input(&g, &w, &p), &want, tolerance(&mag), 1e-5, &format!("winograd backward input {p:?}"));
        }
    }
}
