//! Stride-2 3x3 convolutions (padding 1), forward and input gradient, direct, on
//! `conv3x3`'s AVX2 kernel: the first convolution of each downsampling ResNet stage.
//! Through im2col + GEMM their column matrices are copied with a stride of 2 (a scalar
//! walk), and half of the stride-2 forward's time went to those copies on a 2-core AMD
//! EPYC (`perf`).
//!
//! Split into its four *phases* (even or odd rows, even or odd columns) the padded
//! input becomes four planes of the output's size (plus a row and a column), and every
//! tap reads one of them at a fixed offset:
//!
//! ```text
//! P[a][b][i][j] = xpad[2i + a][2j + b]
//! out[oh, ow] = sum over ci, ki, kj of  w[co, ci, ki, kj] * P[ki % 2][kj % 2][oh + ki/2][ow + kj/2]
//! ```
//!
//! which is the stride-1 kernel's walk over consecutive positions of a plane with rows
//! of `wo + 1`, taps at offsets into the phase planes. The input gradient splits the
//! same way, by the phase of the input pixel: even rows take tap row 1 of the output
//! gradient's row i; odd rows take tap row 0 of row i + 1 and tap row 2 of row i (so the
//! gradient gets a zero row and column at its far end), and likewise for columns. Each
//! phase of the input gradient is then a walk with 1, 2 or 4 taps, 9 in all.
//!
//! The weight gradient's dot products read the same phase planes (`conv3x3_weight`).
//! AVX-512 CPUs keep im2col + GEMM for all three passes (not measured there).

use super::buffers;
use super::conv3x3::{self, for_each_block, pack, Isa, Walk};
use crate::backend::Conv2dParams;

/// Channels of the AVX2 kernel's block.
const LANES: usize = 16;
/// Most input channels of the convolution the kernel walks (its weight block of
/// 16 x 9 x channels floats stays in L1), as for stride 1 (`conv3x3::Isa::max_c_in`).
const MAX_C_IN: usize = 64;

/// Whether `conv2d` computes this forward convolution.
pub fn applies(p: &Conv2dParams) -> bool {
    shape_fits(p) && small_enough(p) && p.c_out.is_multiple_of(LANES) && p.c_in <= MAX_C_IN && conv3x3::runs_avx2()
}

/// Whether `conv2d_backward_input` computes this convolution's input gradient.
pub fn applies_backward_input(p: &Conv2dParams) -> bool {
    shape_fits(p) && small_enough(p) && p.c_in.is_multiple_of(LANES) && p.c_out <= MAX_C_IN && conv3x3::runs_avx2()
}

/// Floats of one sample's input above which its phase planes leave L2 and the GEMM is
/// faster: ResNet-18's 64 channels of 56x56 (batch-1 inference at 224 px) took 10-25%
/// longer here, while 16 x 32x32 and 64 x 16x16 (16 Ki floats) took half as long.
const MAX_INPUT: usize = 32 * 1024;

/// Whether the direct path is faster for this size of sample (see `MAX_INPUT`).
fn small_enough(p: &Conv2dParams) -> bool {
    p.c_in * p.h_in * p.w_in <= MAX_INPUT
}

/// Stride-2 3x3 convolutions with padding 1, on planes of 8 or more pixels a side (on
/// smaller ones the 6-pixel blocks are mostly empty, as for stride 1).
pub(super) fn shape_fits(p: &Conv2dParams) -> bool {
    p.is_dense_3x3(2) && p.h_in >= 8 && p.w_in >= 8
}

pub(super) fn out_hw(p: &Conv2dParams) -> (usize, usize) {
    ((p.h_in - 1) / 2 + 1, (p.w_in - 1) / 2 + 1)
}

/// `conv2d(x, w)` for a `p` that `applies` (or any stride-2 shape of `shape_fits` with
/// 16-channel output blocks, on a CPU with AVX2 and FMA).
pub fn conv2d(x: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(shape_fits(p) && p.c_out.is_multiple_of(LANES) && conv3x3::supports_avx2(), "conv3x3_s2::conv2d called for {p:?}");
    let (ho, wo) = out_hw(p);
    // phase planes of (ho + 1) x (wo + 1)
    let (r, c) = (ho + 1, wo + 1);
    let taps = phase_taps(r, c);
    let walk = Walk { rows: ho, cols: wo, row: c, channel: 4 * r * c, taps: &taps };
    let packed = pack(Isa::Avx2, w, p.c_out, p.c_in, |co, ci, k| w[(co * p.c_in + ci) * 9 + k]);
    let (in_sample, ohw) = (p.c_in * p.h_in * p.w_in, ho * wo);
    assert_eq!(x.len(), p.batch * in_sample, "conv3x3_s2: input size");
    // every output element is written by one row store of its block's walk
    buffers::filled(p.batch * p.c_out * ohw, |out| {
        for_each_block(
            x,
            in_sample,
            out,
            p.c_out * ohw,
            LANES * ohw,
            |x, xp| phases(x, p, r, c, walk.input_len(p.c_in), xp),
            |xp, i, out| {
                let wblock = &packed[i * LANES * p.c_in * 9..][..LANES * p.c_in * 9];
                walk.channels_avx2(xp, p.c_in, wblock, |ch, oh, row| out[ch * ohw + oh * wo..][..wo].copy_from_slice(row));
            },
        )
    })
}

/// Where tap (ki, kj) = k of an output pixel reads in the phase planes of `r x c`.
pub(super) fn phase_taps(r: usize, c: usize) -> [usize; 9] {
    std::array::from_fn(|k| {
        let (ki, kj) = (k / 3, k % 3);
        ((ki % 2) * 2 + kj % 2) * r * c + (ki / 2) * c + kj / 2
    })
}

/// One sample's padded input as its four phase planes per channel, `[c_in][a][b][r][c]`
/// with `P[a][b][i][j] = xpad[2i + a][2j + b]` (zero outside the input), into `xp`, which
/// ends up `len` floats long or more.
pub(super) fn phases(x: &[f32], p: &Conv2dParams, r: usize, c: usize, len: usize, xp: &mut Vec<f32>) {
    xp.clear();
    xp.resize(len.max(p.c_in * 4 * r * c), 0.0);
    phases_data(x, p, r, c, xp);
}

/// The input's floats of `phases` into `xp`, which already holds zeros (or the same
/// layout's zeros from before) everywhere else.
pub(super) fn phases_data(x: &[f32], p: &Conv2dParams, r: usize, c: usize, xp: &mut [f32]) {
    let (h, w) = (p.h_in, p.w_in);
    let rc = r * c;
    assert!(xp.len() >= p.c_in * 4 * rc && r > h.div_ceil(2) && c > w / 2, "conv3x3_s2: phase planes too small");
    for (ci, plane) in x.chunks_exact(h * w).enumerate() {
        let phases = &mut xp[ci * 4 * rc..][..4 * rc];
        for (ih, src) in plane.chunks_exact(w).enumerate() {
            // padded row ih + 1 is row i of phase a
            let (a, i) = ((ih + 1) % 2, ih.div_ceil(2));
            let (b0, b1) = phases[a * 2 * rc..][..2 * rc].split_at_mut(rc);
            // padded column iw + 1: odd columns (b = 1, j = iw / 2) from even iw, even
            // columns (b = 0, j = iw / 2 + 1) from odd iw; over pairs, which the
            // compiler vectorises
            let (even, odd) = (&mut b1[i * c..][..c], &mut b0[i * c + 1..][..c - 1]);
            for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
            if w % 2 == 1 {
                even[w / 2] = src[w - 1];
            }
        }
    }
}

/// The input gradient of `conv2d(x, w)` for a `p` that `applies_backward_input` (or any
/// stride-2 shape of `shape_fits` with 16-channel input blocks, on a CPU with AVX2).
pub fn conv2d_backward_input(grad: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(shape_fits(p) && p.c_in.is_multiple_of(LANES) && conv3x3::supports_avx2(), "conv3x3_s2::conv2d_backward_input called for {p:?}");
    let (h, wd) = (p.h_in, p.w_in);
    let (ho, wo) = out_hw(p);
    // the output gradient with a zero row and column at the far end
    let (r, c) = (ho + 1, wo + 1);
    // per input phase (a, b): its taps as (ki, kj, offset into the padded gradient)
    let rows = |a: usize| if a == 0 { vec![(1, 0)] } else { vec![(0, 1), (2, 0)] };
    let parts: Vec<(usize, usize, Vec<usize>, Vec<usize>)> = (0..4)
        .map(|ab| {
            let (a, b) = (ab / 2, ab % 2);
            let taps: Vec<(usize, usize)> =
                rows(a).into_iter().flat_map(|(ki, di)| rows(b).into_iter().map(move |(kj, dj)| (ki * 3 + kj, di * c + dj))).collect();
            (a, b, taps.iter().map(|t| t.0).collect(), taps.iter().map(|t| t.1).collect())
        })
        .collect();
    // per phase: weights [ci block][co][tap][16 ci]
    let packed: Vec<Vec<f32>> = parts
        .iter()
        .map(|(_, _, ks, _)| {
            let mut v = Vec::with_capacity(p.c_in * p.c_out * ks.len());
            for ci0 in (0..p.c_in).step_by(LANES) {
                for co in 0..p.c_out {
                    for &k in ks {
                        v.extend((ci0..ci0 + LANES).map(|ci| w[(co * p.c_in + ci) * 9 + k]));
                    }
                }
            }
            v
        })
        .collect();
    let walks: Vec<Walk> =
        parts.iter().map(|(a, b, _, offsets)| Walk { rows: (h - a).div_ceil(2), cols: (wd - b).div_ceil(2), row: c, channel: r * c, taps: offsets }).collect();
    let len = walks.iter().map(|walk| walk.input_len(p.c_out)).max().unwrap_or(0);
    let (g_sample, hw) = (p.c_out * ho * wo, h * wd);
    assert_eq!(grad.len(), p.batch * g_sample, "conv3x3_s2: gradient size");
    // every input pixel is in one phase; the two column phases of a row phase are
    // written to `cols`, then interleaved into whole rows (over pairs, which the
    // compiler vectorises: stores with a stride of 2 took as long as the products)
    let (c0, c1) = (wd.div_ceil(2), wd / 2);
    buffers::filled(p.batch * p.c_in * hw, |dx| {
        for_each_block(
            grad,
            g_sample,
            dx,
            p.c_in * hw,
            LANES * hw,
            |g, gp| pad_far(g, p.c_out, (ho, wo), len, gp),
            |gp, i, dx| {
                let mut cols = [vec![0f32; LANES * h.div_ceil(2) * c0], vec![0f32; LANES * h.div_ceil(2) * c1]];
                for a in 0..2 {
                    let rows = walks[2 * a].rows;
                    for (b, cols) in cols.iter_mut().enumerate() {
                        let (walk, ks, packed) = (&walks[2 * a + b], parts[2 * a + b].2.len(), &packed[2 * a + b]);
                        let wblock = &packed[i * LANES * p.c_out * ks..][..LANES * p.c_out * ks];
                        walk.channels_avx2(gp, p.c_out, wblock, |ch, ri, row| cols[(ch * rows + ri) * walk.cols..][..walk.cols].copy_from_slice(row));
                    }
                    for ch in 0..LANES {
                        for ri in 0..rows {
                            let dst = &mut dx[ch * hw + (2 * ri + a) * wd..][..wd];
                            let (even, odd) = (&cols[0][(ch * rows + ri) * c0..][..c0], &cols[1][(ch * rows + ri) * c1..][..c1]);
                            for (pair, (e, o)) in dst.chunks_exact_mut(2).zip(even.iter().zip(odd)) {
                                pair[0] = *e;
                                pair[1] = *o;
                            }
                            if wd % 2 == 1 {
                                dst[wd - 1] = even[c0 - 1];
                            }
                        }
                    }
                }
            },
        )
    })
}

/// One sample's output gradient (`channels` planes of `ho x wo`) with a zero row below
/// and a zero column right of each plane, into `gp`, `len` floats long or more.
fn pad_far(g: &[f32], channels: usize, (ho, wo): (usize, usize), len: usize, gp: &mut Vec<f32>) {
    let c = wo + 1;
    gp.clear();
    gp.resize(len.max(channels * (ho + 1) * c), 0.0);
    for (ch, plane) in g.chunks_exact(ho * wo).enumerate() {
        for (i, row) in plane.chunks_exact(wo).enumerate() {
            gp[ch * (ho + 1) * c + i * c..][..wo].copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_rand as rand;

    fn params(batch: usize, c_in: usize, h: usize, w: usize, c_out: usize) -> Conv2dParams {
        Conv2dParams { batch, c_in, h_in: h, w_in: w, c_out, kh: 3, kw: 3, stride: (2, 2), padding: (1, 1), dilation: (1, 1), groups: 1 }
    }

    /// Both passes against the definition in f64 on every CPU with AVX2 (AVX-512 ones
    /// included, which do not use them in training): the demo's two shapes, odd sides
    /// (a phase one row or column short), unequal sides, one sample (its channel blocks
    /// on the threads) and an odd batch.
    #[test]
    fn matches_the_definition() {
        if !conv3x3::supports_avx2() {
            return eprintln!("skipped: no AVX2 and FMA");
        }
        let cases = [params(2, 16, 32, 32, 32), params(3, 32, 16, 16, 64), params(1, 16, 9, 11, 16), params(5, 16, 8, 13, 32), params(2, 48, 15, 8, 16)];
        for (n, p) in cases.into_iter().enumerate() {
            let (ho, wo) = out_hw(&p);
            let x = rand(p.batch * p.c_in * p.h_in * p.w_in, 800 + n as u64);
            let w = rand(p.c_out * p.c_in * 9, 850 + n as u64);
            let g = rand(p.batch * p.c_out * ho * wo, 900 + n as u64);
            let (mut y, mut dx) = (vec![0f64; g.len()], vec![0f64; x.len()]);
            let (mut y_mag, mut dx_mag) = (vec![0f64; g.len()], vec![0f64; x.len()]);
            for b in 0..p.batch {
                for co in 0..p.c_out {
                    for oh in 0..ho {
                        for ow in 0..wo {
                            let yi = ((b * p.c_out + co) * ho + oh) * wo + ow;
                            for ci in 0..p.c_in {
                                for k in 0..9 {
                                    let (ih, iw) = ((2 * oh + k / 3).wrapping_sub(1), (2 * ow + k % 3).wrapping_sub(1));
                                    if ih >= p.h_in || iw >= p.w_in {
                                        continue;
                                    }
                                    let xi = ((b * p.c_in + ci) * p.h_in + ih) * p.w_in + iw;
                                    let wv = w[(co * p.c_in + ci) * 9 + k] as f64;
                                    y[yi] += wv * x[xi] as f64;
                                    y_mag[yi] += (wv * x[xi] as f64).abs();
                                    dx[xi] += wv * g[yi] as f64;
                                    dx_mag[xi] += (wv * g[yi] as f64).abs();
                                }
                            }
                        }
                    }
                }
            }
            // 1e-5, or two f32 roundings of the largest sum of |products|
            let tol = |mag: &[f64]| 1e-5f32.max(2.0 * f32::EPSILON * mag.iter().cloned().fold(0.0, f64::max) as f32);
            let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
            crate::testing::assert_close(&conv2d(&x, &w, &p), &f32s(y), tol(&y_mag), 1e-5, &format!("stride-2 forward {p:?}"));
            crate::testing::assert_close(&conv2d_backward_input(&g, &w, &p), &f32s(dx), tol(&dx_mag), 1e-5, &format!("stride-2 input gradient {p:?}"));
        }
    }
}
