//! The weight gradient of `conv3x3`'s and `conv3x3_s2`'s convolutions, direct, with
//! AVX2 and FMA: the im2col + GEMM path writes the nine shifted copies of the input that
//! those kernels avoid in the forward, and on AVX2 CPUs that copying is a large share of
//! a student step.
//!
//! In the padded layout of `conv3x3` (rows of `w + 2`), output pixel (oh, ow) sits at
//! `j = oh * (w + 2) + ow` and its tap (ki, kj) reads the padded input at
//! `j + ki * (w + 2) + kj`. With the output gradient laid out the same way (zeros in the
//! two pad columns of each row), each weight's gradient is one dot product along the
//! plane:
//!
//! ```text
//! dw[co, ci, ki, kj] = sum over samples and j of  gpad[co, j] * xpad[ci, j + ki*(w+2) + kj]
//! ```
//!
//! Stride 2 is the same with `conv3x3_s2`'s phase planes (rows of `wo + 1`, each tap at
//! its offset there) in place of the padded input (`Geometry`).
//!
//! The register block is 4 output channels by the 3 taps of one kernel row: twelve
//! 8-lane accumulators, fed by 4 gradient and 3 input loads per 12 FMAs. Threads take
//! runs of samples and sum their private gradients at the end. AVX-512 CPUs keep the
//! GEMM path, which reached 200-250 GFLOP/s there (`conv.rs`).

use super::buffers;
use super::conv3x3::{self, pad};
use super::conv3x3_s2;
use crate::backend::Conv2dParams;
use rayon::prelude::*;

/// Output channels of a register block.
const CO_BLOCK: usize = 4;
/// f32 lanes of an AVX2 vector.
const LANES: usize = 8;

/// Whether `conv2d_backward_weight` computes this convolution's weight gradient: the
/// stride-1 convolutions of `conv3x3` and the stride-2 ones of `conv3x3_s2`.
/// Stride 2 only where the output rows have 16 or more pixels: with 8x8 outputs the
/// direct path was even with the GEMM at 32 -> 64 channels and slower at 64 -> 128
/// (4.6 against 3.9 ms, ResNet-18's layer2 at batch 32), and 2.5x slower on 4x4 outputs.
pub fn applies(p: &Conv2dParams) -> bool {
    conv3x3::runs_avx2() && (conv3x3::applies(p) || (conv3x3_s2::applies(p) && conv3x3_s2::out_hw(p).1 >= 16))
}

/// The shapes this module can compute, on any CPU with AVX2 and FMA (tests run them on
/// AVX-512 CPUs too).
fn shape_fits(p: &Conv2dParams) -> bool {
    conv3x3::applies(p) || (conv3x3_s2::shape_fits(p) && p.c_out.is_multiple_of(CO_BLOCK))
}

/// Where the dot products read, stride 1 or 2: the output gradient in rows of `row`
/// floats (zeros past `cols`), input channel `ci` at `ci * channel` of the prepared
/// input, tap `k` at `taps[k]` from the pixel's position there.
struct Geometry {
    rows: usize,
    cols: usize,
    row: usize,
    channel: usize,
    taps: [usize; 9],
}

impl Geometry {
    fn new(p: &Conv2dParams) -> Geometry {
        if p.stride == (1, 1) {
            // conv3x3's padded planes
            let wp = p.w_in + 2;
            Geometry { rows: p.h_in, cols: p.w_in, row: wp, channel: (p.h_in + 2) * wp, taps: std::array::from_fn(|k| k / 3 * wp + k % 3) }
        } else {
            // conv3x3_s2's phase planes
            let (ho, wo) = conv3x3_s2::out_hw(p);
            let (r, c) = (ho + 1, wo + 1);
            Geometry { rows: ho, cols: wo, row: c, channel: 4 * r * c, taps: conv3x3_s2::phase_taps(r, c) }
        }
    }

    /// Vectors of the dot products along a plane: they cover every output pixel.
    fn vectors(&self) -> usize {
        ((self.rows - 1) * self.row + self.cols).div_ceil(LANES)
    }

    /// One sample's input as the dot products read it, `c_in * channel + 7` floats or more.
    fn prepare(&self, x: &[f32], p: &Conv2dParams, xp: &mut Vec<f32>) {
        if p.stride == (1, 1) {
            pad(x, p, xp)
        } else {
            conv3x3_s2::phases(x, p, self.rows + 1, self.row, p.c_in * self.channel + 8, xp)
        }
    }
}

/// The gradient of `conv2d(x, w)` in `w`, for a `p` that `applies` (or `shape_fits`).
pub fn conv2d_backward_weight(x: &[f32], grad: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(shape_fits(p) && conv3x3::supports_avx2(), "conv3x3_weight called for {p:?}");
    let geo = Geometry::new(p);
    let (in_sample, out_sample) = (p.c_in * p.h_in * p.w_in, p.c_out * geo.rows * geo.cols);
    assert!(x.len() == p.batch * in_sample && grad.len() == p.batch * out_sample, "conv3x3_weight: operand sizes");
    let threads = rayon::current_num_threads().clamp(1, p.batch);
    let per = p.batch.div_ceil(threads);
    // samples that share one reduction of the lane sums: enough that their dot products
    // are ~64 vectors long (on 8x8 planes, reducing after every sample took longer
    // than the products)
    let group = (64 / geo.vectors()).clamp(1, 16);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            // from the recycled buffers, as the tensor this becomes goes back to them
            let mut dw = buffers::zeroed(p.c_out * p.c_in * 9);
            let (mut xps, mut gps) = (vec![vec![]; group], vec![vec![]; group]);
            let samples = (t * per)..((t + 1) * per).min(p.batch);
            for b0 in samples.clone().step_by(group) {
                let n = group.min(samples.end - b0);
                for (i, b) in (b0..b0 + n).enumerate() {
                    geo.prepare(&x[b * in_sample..][..in_sample], p, &mut xps[i]);
                    pad_grad(&grad[b * out_sample..][..out_sample], p.c_out, &geo, &mut gps[i]);
                }
                accumulate(&xps[..n], &gps[..n], p, &geo, &mut dw);
            }
            dw
        })
        .collect();
    buffers::sum(partials)
}

/// One sample's output gradient as the dot products read it, `[c_out][stride]` with
/// `stride = vectors * 8`: row oh at `oh * row`, zeros elsewhere.
fn pad_grad(g: &[f32], c_out: usize, geo: &Geometry, gp: &mut Vec<f32>) {
    let stride = geo.vectors() * LANES;
    gp.clear();
    gp.resize(c_out * stride, 0.0);
    for (co, plane) in g.chunks_exact(geo.rows * geo.cols).enumerate() {
        for (oh, row) in plane.chunks_exact(geo.cols).enumerate() {
            gp[co * stride + oh * geo.row..][..geo.cols].copy_from_slice(row);
        }
    }
}

/// Adds the contribution of the samples whose prepared operands are `xps` and `gps`.
fn accumulate(xps: &[Vec<f32>], gps: &[Vec<f32>], p: &Conv2dParams, geo: &Geometry, dw: &mut [f32]) {
    let nvec = geo.vectors();
    let stride = nvec * LANES;
    let max_tap = geo.taps.iter().copied().max().unwrap_or(0);
    // the kernel's reads rely on these lengths (see the SAFETY note)
    assert!(
        xps.iter().all(|xp| xp.len() >= (p.c_in - 1) * geo.channel + max_tap + stride)
            && gps.iter().all(|gp| gp.len() == p.c_out * stride)
            && p.c_out.is_multiple_of(CO_BLOCK),
        "conv3x3_weight: prepared operands"
    );
    for co0 in (0..p.c_out).step_by(CO_BLOCK) {
        for ci in 0..p.c_in {
            let mut sums = [[0f32; LANES]; CO_BLOCK * 9];
            for (xp, gp) in xps.iter().zip(gps) {
                // SAFETY: the kernel reads gp[co0*stride + q*stride + j] for q < 4,
                // j < stride: inside gp; and xp[ci*channel + taps[k] + j] for k < 9:
                // below (c_in-1)*channel + max tap + stride, asserted above; `applies`
                // checked AVX2 and FMA.
                unsafe { dot_block(&gp[co0 * stride..], stride, &xp[ci * geo.channel..], &geo.taps, nvec, &mut sums) };
            }
            for (q, sums) in sums.chunks_exact(9).enumerate() {
                let dst = &mut dw[((co0 + q) * p.c_in + ci) * 9..][..9];
                for (d, s) in dst.iter_mut().zip(sums) {
                    *d += s.iter().sum::<f32>();
                }
            }
        }
    }
}

/// `sums[q*9 + k][l] += sum over v < nvec of g[q*stride + 8v + l] * x[taps[k] + 8v + l]`:
/// lane-wise dot products of 4 gradient planes with the 9 shifted input planes.
///
/// # Safety
/// The CPU has AVX2 and FMA; `g` holds `3*stride + nvec*8` floats and `x`
/// `max(taps) + nvec*8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block(g: &[f32], stride: usize, x: &[f32], taps: &[usize; 9], nvec: usize, sums: &mut [[f32; LANES]; CO_BLOCK * 9]) {
    use std::arch::x86_64::*;
    debug_assert!(g.len() >= (CO_BLOCK - 1) * stride + nvec * LANES && x.len() >= taps.iter().max().unwrap_or(&0) + nvec * LANES);
    let (g, x) = (g.as_ptr(), x.as_ptr());
    // a kernel row (3 taps) at a time: twelve accumulators
    for ki in 0..3 {
        let row: [*const f32; 3] = std::array::from_fn(|kj| x.add(taps[ki * 3 + kj]));
        let mut acc: [[__m256; 3]; CO_BLOCK] = std::array::from_fn(|q| std::array::from_fn(|kj| _mm256_loadu_ps(sums[q * 9 + ki * 3 + kj].as_ptr())));
        for v in 0..nvec {
            let j = v * LANES;
            let xs: [__m256; 3] = std::array::from_fn(|kj| _mm256_loadu_ps(row[kj].add(j)));
            for (q, acc) in acc.iter_mut().enumerate() {
                let gv = _mm256_loadu_ps(g.add(q * stride + j));
                for kj in 0..3 {
                    acc[kj] = _mm256_fmadd_ps(gv, xs[kj], acc[kj]);
                }
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            for kj in 0..3 {
                _mm256_storeu_ps(sums[q * 9 + ki * 3 + kj].as_mut_ptr(), acc[kj]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_block(_: &[f32], _: usize, _: &[f32], _: &[usize; 9], _: usize, _: &mut [[f32; LANES]; CO_BLOCK * 9]) {
    unreachable!("`applies` is false without AVX2")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_rand as rand;

    fn params(batch: usize, c_in: usize, h: usize, w: usize, c_out: usize, stride: usize) -> Conv2dParams {
        Conv2dParams { batch, c_in, h_in: h, w_in: w, c_out, kh: 3, kw: 3, stride: (stride, stride), padding: (1, 1), dilation: (1, 1), groups: 1 }
    }

    /// Against the definition in f64 on every CPU with AVX2 (AVX-512 ones included,
    /// which run the GEMM path in training). Stride 1: a one-row plane, rows that are
    /// no multiple of 8, one sample (one thread's share empty), an odd batch, and sample
    /// groups that are full (6 samples of 8x8 share a reduction) or cut short. Stride 2:
    /// the demo's two shapes, odd and unequal sides.
    #[test]
    fn matches_the_definition() {
        let cases = [
            params(3, 3, 7, 9, 16, 1),
            params(2, 16, 8, 8, 32, 1),
            params(1, 32, 1, 8, 16, 1),
            params(5, 16, 4, 17, 64, 1),
            params(2, 64, 8, 8, 16, 1),
            params(37, 16, 8, 8, 16, 1),
            params(3, 16, 32, 32, 32, 2),
            params(2, 32, 16, 16, 64, 2),
            params(3, 5, 9, 11, 8, 2),
            params(2, 16, 15, 8, 4, 2),
        ];
        if !conv3x3::supports_avx2() {
            return eprintln!("skipped: no AVX2 and FMA");
        }
        for (i, p) in cases.into_iter().enumerate() {
            let s = p.stride.0;
            let (ho, wo) = ((p.h_in - 1) / s + 1, (p.w_in - 1) / s + 1);
            let (x, g) = (rand(p.batch * p.c_in * p.h_in * p.w_in, 300 + i as u64), rand(p.batch * p.c_out * ho * wo, 350 + i as u64));
            let (mut want, mut mag) = (vec![0f64; p.c_out * p.c_in * 9], vec![0f64; p.c_out * p.c_in * 9]);
            for b in 0..p.batch {
                for co in 0..p.c_out {
                    for ci in 0..p.c_in {
                        for k in 0..9 {
                            for oh in 0..ho {
                                for ow in 0..wo {
                                    let (ih, iw) = ((oh * s + k / 3).wrapping_sub(1), (ow * s + k % 3).wrapping_sub(1));
                                    if ih >= p.h_in || iw >= p.w_in {
                                        continue;
                                    }
                                    let xv = x[((b * p.c_in + ci) * p.h_in + ih) * p.w_in + iw] as f64;
                                    let gv = g[((b * p.c_out + co) * ho + oh) * wo + ow] as f64;
                                    want[(co * p.c_in + ci) * 9 + k] += xv * gv;
                                    mag[(co * p.c_in + ci) * 9 + k] += (xv * gv).abs();
                                }
                            }
                        }
                    }
                }
            }
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            // two f32 roundings of the largest sum of |products| (up to 592 terms)
            let tol = 1e-5f32.max(2.0 * f32::EPSILON * mag.iter().cloned().fold(0.0, f64::max) as f32);
            crate::testing::assert_close(&conv2d_backward_weight(&x, &g, &p), &want, tol, 1e-5, &format!("conv3x3 weight gradient {p:?}"));
        }
    }
}
