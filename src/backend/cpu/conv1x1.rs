//! 1x1 convolutions (stride 1, no padding, groups allowed), direct, with AVX2 and FMA:
//! the high-order attention's projections and the attention modules' other 1x1s in the
//! CPU demo. With 2-64 input channels per group they do a few multiply-adds per output
//! float and are bound by memory and per-call costs, which im2col + GEMM adds to: the
//! GEMM packs its operands, and on 8x8 planes several samples are copied into one column
//! matrix and back. A 1x1 convolution of one sample and group is the product
//!
//! ```text
//! out[co, j] = sum over ci of  w[co, ci] * x[ci, j]        (j: output pixel)
//! ```
//!
//! of the weights with the input planes. Its register block is 4 output channels by 24
//! pixels: twelve 8-lane accumulators, fed by 3 input loads and 4 weight broadcasts per
//! input channel. Pixel ranges are the outer loop, so their input rows stay in L1 while
//! every channel block reads them. The input
//! gradient is the same product with the transposed weights, and the weight gradient a
//! dot product along the planes:
//!
//! ```text
//! dw[co, ci] = sum over samples and j of  grad[co, j] * x[ci, j]
//! ```
//!
//! with 4 x 3 (co, ci) pairs per register block, over L1-sized pixel chunks of large
//! planes or, on small planes, over groups of samples that share the block's loads and
//! stores of its lane sums. In a demo iteration on a 2-core AMD EPYC these
//! convolutions took 23-28% less time than through the GEMM (docs/PERF.md). Strided 1x1
//! convolutions (the ResNet shortcuts) keep the GEMM path: subsampling the input first
//! made them slower there. AVX-512 CPUs keep it too (not measured there).

use super::{buffers, conv3x3};
use crate::backend::Conv2dParams;
use rayon::prelude::*;

/// f32 lanes of an AVX2 vector.
const LANES: usize = 8;
/// Output channels of a register block.
pub(super) const CO_BLOCK: usize = 4;
/// Vectors of pixels of a register block of the product: 4 x 2 vectors keep eight
/// accumulators, enough to hide the FMA latency on two ports. With 3 (twelve, plus
/// three input vectors and a broadcast: all 16 registers) LLVM spilled an accumulator
/// to the stack every iteration, and products with 32-64 input channels took 16-42%
/// longer (`examples/winograd_ab`'s method, alternating; commit 799bc02, a 2-core AMD EPYC).
const PIX_VECTORS: usize = 2;
/// Input channels of a register block of the weight gradient.
const CI_BLOCK: usize = 3;
/// Floats of the input rows of one pixel range of the product, and of the gradient and
/// input rows of one pixel chunk of the weight gradient: they stay in a 32 KiB L1.
const CHUNK_FLOATS: usize = 6 * 1024;
/// Floats of the planes of the samples that share the weight gradient's register blocks
/// (192 KiB, in a 512 KiB L2).
const L2_FLOATS: usize = 48 * 1024;

/// Whether `conv2d`, `conv2d_backward_input` and `conv2d_backward_weight` run here.
pub fn applies(p: &Conv2dParams) -> bool {
    shape_fits(p) && conv3x3::runs_avx2()
}

/// The shapes this module computes, on any CPU with AVX2 and FMA.
fn shape_fits(p: &Conv2dParams) -> bool {
    p.kh == 1
        && p.kw == 1
        && p.h_in > 0
        && p.w_in > 0
        && p.padding == (0, 0)
        && p.dilation == (1, 1)
        && p.stride == (1, 1)
        && p.groups > 0
        && p.c_in.is_multiple_of(p.groups)
        && p.c_out.is_multiple_of(p.groups)
}

/// Sizes of one product: `groups` blocks of `[c_dst] = [c_dst x c_src] · [c_src]` over `hw` pixels.
#[derive(Clone, Copy, Debug)]
struct Product {
    groups: usize,
    /// Channels per group read (`c_src`) and written (`c_dst`).
    c_src: usize,
    c_dst: usize,
    /// Output pixels per plane.
    hw: usize,
}

impl Product {
    fn src_sample(&self) -> usize {
        self.groups * self.c_src * self.hw
    }
    fn dst_sample(&self) -> usize {
        self.groups * self.c_dst * self.hw
    }
}

/// `conv2d(x, w)` for a `p` that `applies`.
pub fn conv2d(x: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    products(x, w, p, false)
}

/// The input gradient of `conv2d(x, w)` for a `p` that `applies`: the product with the
/// transposed weights.
pub fn conv2d_backward_input(grad: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    products(grad, w, p, true)
}

/// Every sample's product of `src` with the weights, or with their transpose.
fn products(src: &[f32], w: &[f32], p: &Conv2dParams, transposed: bool) -> Vec<f32> {
    assert!(shape_fits(p) && conv3x3::supports_avx2(), "conv1x1 called for {p:?} (or without AVX2)");
    let (cig, cog) = (p.c_in / p.groups, p.c_out / p.groups);
    let (c_src, c_dst) = if transposed { (cog, cig) } else { (cig, cog) };
    let pr = Product { groups: p.groups, c_src, c_dst, hw: p.h_in * p.w_in };
    assert!(src.len() == p.batch * pr.src_sample() && w.len() == p.c_out * cig, "conv1x1: operand sizes");
    let packed = pack(pr.groups, pr.c_dst, pr.c_src, |g, d, s| if transposed { w[(g * cog + s) * cig + d] } else { w[(g * cog + d) * cig + s] });
    let n = pr.src_sample();
    buffers::filled(p.batch * pr.dst_sample(), |dst| for_each_sample(&pr, dst, |b, dst, par| product(&src[b * n..][..n], &packed, &pr, dst, par)))
}

/// The gradient of `conv2d(x, w)` in `w` for a `p` that `applies`.
pub fn conv2d_backward_weight(x: &[f32], grad: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(shape_fits(p) && conv3x3::supports_avx2(), "conv1x1::conv2d_backward_weight called for {p:?} (or without AVX2)");
    let (cig, cog, hw) = (p.c_in / p.groups, p.c_out / p.groups, p.h_in * p.w_in);
    let (in_sample, out_sample) = (p.c_in * hw, p.c_out * hw);
    assert!(x.len() == p.batch * in_sample && grad.len() == p.batch * out_sample, "conv1x1: operand sizes");
    let threads = rayon::current_num_threads().clamp(1, p.batch.max(1));
    let per = p.batch.div_ceil(threads).max(1);
    // samples whose planes of one group share each register block's pass: as many as fit
    // in L2 together (on 8x8 planes a block per sample spent more time loading and
    // storing its lane sums than multiplying)
    let group = (L2_FLOATS / ((cig + cog) * hw).max(1)).clamp(1, 32);
    let partials: Vec<Vec<f32>> = (0..threads)
        .into_par_iter()
        .map(|t| {
            // lane sums of every weight, reduced once at the end
            let mut sums = vec![[0f32; LANES]; p.c_out * cig];
            // from the recycled buffers, as the tensor this becomes goes back to them
            let mut dw = buffers::zeroed(p.c_out * cig);
            let samples = (t * per)..((t + 1) * per).min(p.batch);
            for b0 in samples.clone().step_by(group) {
                let bs = b0..(b0 + group).min(samples.end);
                for g in 0..p.groups {
                    let xs: Vec<&[f32]> = bs.clone().map(|b| &x[b * in_sample + g * cig * hw..][..cig * hw]).collect();
                    let gs: Vec<&[f32]> = bs.clone().map(|b| &grad[b * out_sample + g * cog * hw..][..cog * hw]).collect();
                    let (sums, dw) = (&mut sums[g * cog * cig..][..cog * cig], &mut dw[g * cog * cig..][..cog * cig]);
                    accumulate(&xs, &gs, cig, cog, hw, sums, dw);
                }
            }
            for (d, s) in dw.iter_mut().zip(&sums) {
                *d += s.iter().sum::<f32>();
            }
            dw
        })
        .collect();
    buffers::sum(partials)
}

/// Runs `f(sample, dst_of_the_sample, parallel_inside)` for every sample of `dst`: a
/// sample per task, or with fewer samples than threads (batch-1 inference) one after
/// the other with the threads inside.
fn for_each_sample(pr: &Product, dst: &mut [f32], f: impl Fn(usize, &mut [f32], bool) + Sync) {
    let n = pr.dst_sample();
    if n == 0 {
        return;
    }
    let batch = dst.len() / n;
    if batch >= rayon::current_num_threads() {
        dst.par_chunks_mut(n).enumerate().for_each(|(b, dst)| f(b, dst, false));
    } else {
        dst.chunks_mut(n).enumerate().for_each(|(b, dst)| f(b, dst, true));
    }
}

/// Weights as `[group][channel block][c_src][block width]`, the layout `channel_block`
/// reads; `at(g, d, s)` reads the weight from source channel `s` to destination
/// channel `d` of group `g`.
pub(super) fn pack(groups: usize, c_dst: usize, c_src: usize, at: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    let mut packed = Vec::with_capacity(groups * c_dst * c_src);
    for g in 0..groups {
        for d0 in (0..c_dst).step_by(CO_BLOCK) {
            let width = CO_BLOCK.min(c_dst - d0);
            for s in 0..c_src {
                packed.extend((d0..d0 + width).map(|d| at(g, d, s)));
            }
        }
    }
    packed
}

/// `dst[g][d][j] = sum over s of w[g][d][s] * src[g][s][j]` for one sample, its channel
/// blocks on the threads when `parallel`.
fn product(src: &[f32], packed: &[f32], pr: &Product, dst: &mut [f32], parallel: bool) {
    assert!(src.len() == pr.src_sample() && dst.len() == pr.dst_sample() && packed.len() == pr.groups * pr.c_dst * pr.c_src, "conv1x1: product sizes");
    // (group, first channel, width, the block's rows of dst)
    let mut blocks = vec![];
    let mut rest = dst;
    for g in 0..pr.groups {
        for d0 in (0..pr.c_dst).step_by(CO_BLOCK) {
            let width = CO_BLOCK.min(pr.c_dst - d0);
            let (block, tail) = rest.split_at_mut(width * pr.hw);
            blocks.push((g, d0, width, block));
            rest = tail;
        }
    }
    let one = |(g, d0, width, block): (usize, usize, usize, &mut [f32]), j0: usize, n: usize| {
        let src = &src[g * pr.c_src * pr.hw..][..pr.c_src * pr.hw];
        let w = &packed[(g * pr.c_dst + d0) * pr.c_src..][..width * pr.c_src];
        channel_block(src, w, pr.c_src, pr.hw, width, j0, n, block);
    };
    if parallel {
        blocks.into_par_iter().for_each(|b| one(b, 0, pr.hw));
    } else {
        // pixel ranges outermost, so their input rows stay in L1 across channel blocks
        let step = (CHUNK_FLOATS / pr.c_src.max(1) / (PIX_VECTORS * LANES)).max(1) * PIX_VECTORS * LANES;
        for j0 in (0..pr.hw).step_by(step) {
            let n = step.min(pr.hw - j0);
            for (g, d0, width, block) in blocks.iter_mut() {
                one((*g, *d0, *width, &mut **block), j0, n);
            }
        }
    }
}

/// Pixels `j0..j0 + n` of `width` destination channels (`dst`: their planes of `hw`).
#[allow(clippy::too_many_arguments)]
pub(super) fn channel_block(src: &[f32], w: &[f32], c_src: usize, hw: usize, width: usize, j0: usize, n: usize, dst: &mut [f32]) {
    debug_assert!(src.len() == c_src * hw && w.len() == width * c_src && dst.len() == width * hw && j0 + n <= hw);
    let mut j = j0;
    while j < j0 + n {
        let vectors = ((j0 + n - j) / LANES).min(PIX_VECTORS);
        if vectors == 0 {
            // fewer than 8 pixels left: plain sums
            for q in 0..width {
                for jj in j..j0 + n {
                    dst[q * hw + jj] = (0..c_src).map(|s| w[s * width + q] * src[s * hw + jj]).sum();
                }
            }
            break;
        }
        // SAFETY: the block reads src[s*hw + j + v*8 + l] (s < c_src, v < vectors,
        // l < 8: j + 8*vectors <= j0 + n <= hw), w[s*width + q] (q < width) and writes
        // dst[q*hw + j + ...] inside the same bounds; `applies` checked AVX2 and FMA.
        unsafe {
            let (s, wp, d) = (src.as_ptr().add(j), w.as_ptr(), dst.as_mut_ptr().add(j));
            match (width, vectors) {
                (4, 3) => block::<4, 3>(s, wp, d, c_src, hw),
                (4, 2) => block::<4, 2>(s, wp, d, c_src, hw),
                (4, 1) => block::<4, 1>(s, wp, d, c_src, hw),
                (3, 3) => block::<3, 3>(s, wp, d, c_src, hw),
                (3, 2) => block::<3, 2>(s, wp, d, c_src, hw),
                (3, 1) => block::<3, 1>(s, wp, d, c_src, hw),
                (2, 3) => block::<2, 3>(s, wp, d, c_src, hw),
                (2, 2) => block::<2, 2>(s, wp, d, c_src, hw),
                (2, 1) => block::<2, 1>(s, wp, d, c_src, hw),
                (1, 3) => block::<1, 3>(s, wp, d, c_src, hw),
                (1, 2) => block::<1, 2>(s, wp, d, c_src, hw),
                _ => block::<1, 1>(s, wp, d, c_src, hw),
            }
        }
        j += vectors * LANES;
    }
}

/// `dst[q*hw + v*8 + l] = sum over s < c_src of w[s*CO + q] * src[s*hw + v*8 + l]`.
///
/// # Safety
/// The CPU has AVX2 and FMA; the reads and writes above lie inside the caller's slices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const CO: usize, const PV: usize>(src: *const f32, w: *const f32, dst: *mut f32, c_src: usize, hw: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); PV]; CO];
    for s in 0..c_src {
        let xs: [__m256; PV] = std::array::from_fn(|v| _mm256_loadu_ps(src.add(s * hw + v * LANES)));
        for (q, acc) in acc.iter_mut().enumerate() {
            let wq = _mm256_broadcast_ss(&*w.add(s * CO + q));
            for v in 0..PV {
                acc[v] = _mm256_fmadd_ps(wq, xs[v], acc[v]);
            }
        }
    }
    for (q, acc) in acc.iter().enumerate() {
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(dst.add(q * hw + v * LANES), *a);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block<const CO: usize, const PV: usize>(_: *const f32, _: *const f32, _: *mut f32, _: usize, _: usize) {
    unreachable!("`applies` is false without AVX2")
}

/// Adds the weight gradient of a group of samples (their planes of one group of
/// channels: inputs `xs`, output gradients `gs`): lane sums of whole vectors into
/// `sums[co*c_in + ci]`, the pixels past the last whole vector straight into `dw`.
fn accumulate(xs: &[&[f32]], gs: &[&[f32]], c_in: usize, c_out: usize, hw: usize, sums: &mut [[f32; LANES]], dw: &mut [f32]) {
    assert!(
        xs.len() == gs.len()
            && xs.iter().all(|x| x.len() == c_in * hw)
            && gs.iter().all(|g| g.len() == c_out * hw)
            && sums.len() == c_out * c_in
            && dw.len() == c_out * c_in,
        "conv1x1: weight gradient sizes"
    );
    let whole = hw / LANES * LANES;
    // one sample's planes in L1-sized pixel chunks, or several samples' whole planes
    let chunk = if xs.len() == 1 { (CHUNK_FLOATS / (c_in + c_out).max(1) / LANES).max(1) * LANES } else { whole.max(LANES) };
    for j0 in (0..whole).step_by(chunk) {
        let nvec = chunk.min(whole - j0) / LANES;
        for co0 in (0..c_out).step_by(CO_BLOCK) {
            let co_n = CO_BLOCK.min(c_out - co0);
            let gp: Vec<*const f32> = gs.iter().map(|g| g[co0 * hw + j0..].as_ptr()).collect();
            for ci0 in (0..c_in).step_by(CI_BLOCK) {
                let ci_n = CI_BLOCK.min(c_in - ci0);
                let xp: Vec<*const f32> = xs.iter().map(|x| x[ci0 * hw + j0..].as_ptr()).collect();
                let mut acc = [[0f32; LANES]; CO_BLOCK * CI_BLOCK];
                for q in 0..co_n {
                    for r in 0..ci_n {
                        acc[q * CI_BLOCK + r] = sums[(co0 + q) * c_in + ci0 + r];
                    }
                }
                // SAFETY: for every sample the block reads grad[(co0+q)*hw + j0 + 8v + l]
                // (q < co_n, v < nvec, l < 8: j0 + 8*nvec <= whole <= hw) and
                // x[(ci0+r)*hw + ...] (r < ci_n) inside that sample's slices, which
                // outlive the pointers; `applies` checked AVX2 and FMA.
                unsafe {
                    let (g, x) = (&gp[..], &xp[..]);
                    match (co_n, ci_n) {
                        (4, 3) => dot_block::<4, 3>(g, x, hw, nvec, &mut acc),
                        (4, 2) => dot_block::<4, 2>(g, x, hw, nvec, &mut acc),
                        (4, 1) => dot_block::<4, 1>(g, x, hw, nvec, &mut acc),
                        (3, 3) => dot_block::<3, 3>(g, x, hw, nvec, &mut acc),
                        (3, 2) => dot_block::<3, 2>(g, x, hw, nvec, &mut acc),
                        (3, 1) => dot_block::<3, 1>(g, x, hw, nvec, &mut acc),
                        (2, 3) => dot_block::<2, 3>(g, x, hw, nvec, &mut acc),
                        (2, 2) => dot_block::<2, 2>(g, x, hw, nvec, &mut acc),
                        (2, 1) => dot_block::<2, 1>(g, x, hw, nvec, &mut acc),
                        (1, 3) => dot_block::<1, 3>(g, x, hw, nvec, &mut acc),
                        (1, 2) => dot_block::<1, 2>(g, x, hw, nvec, &mut acc),
                        _ => dot_block::<1, 1>(g, x, hw, nvec, &mut acc),
                    }
                }
                for q in 0..co_n {
                    for r in 0..ci_n {
                        sums[(co0 + q) * c_in + ci0 + r] = acc[q * CI_BLOCK + r];
                    }
                }
            }
        }
    }
    if whole < hw {
        for (x, g) in xs.iter().zip(gs) {
            for co in 0..c_out {
                for ci in 0..c_in {
                    dw[co * c_in + ci] += (whole..hw).map(|j| g[co * hw + j] * x[ci * hw + j]).sum::<f32>();
                }
            }
        }
    }
}

/// `acc[q*3 + r][l] += sum over samples s and v < nvec of g[s][q*hw + 8v + l] *
/// x[s][r*hw + 8v + l]`.
///
/// # Safety
/// The CPU has AVX2 and FMA; the reads above lie inside the caller's slices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block<const CO: usize, const CI: usize>(
    gs: &[*const f32],
    xs: &[*const f32],
    hw: usize,
    nvec: usize,
    acc: &mut [[f32; LANES]; CO_BLOCK * CI_BLOCK],
) {
    use std::arch::x86_64::*;
    let mut a: [[__m256; CI]; CO] = std::array::from_fn(|q| std::array::from_fn(|r| _mm256_loadu_ps(acc[q * CI_BLOCK + r].as_ptr())));
    for (&g, &x) in gs.iter().zip(xs) {
        for v in 0..nvec {
            let j = v * LANES;
            let xv: [__m256; CI] = std::array::from_fn(|r| _mm256_loadu_ps(x.add(r * hw + j)));
            for (q, a) in a.iter_mut().enumerate() {
                let gv = _mm256_loadu_ps(g.add(q * hw + j));
                for r in 0..CI {
                    a[r] = _mm256_fmadd_ps(gv, xv[r], a[r]);
                }
            }
        }
    }
    for (q, a) in a.iter().enumerate() {
        for (r, v) in a.iter().enumerate() {
            _mm256_storeu_ps(acc[q * CI_BLOCK + r].as_mut_ptr(), *v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_block<const CO: usize, const CI: usize>(_: &[*const f32], _: &[*const f32], _: usize, _: usize, _: &mut [[f32; LANES]; CO_BLOCK * CI_BLOCK]) {
    unreachable!("`applies` is false without AVX2")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_rand as rand;

    fn params(batch: usize, c_in: usize, (h, w): (usize, usize), c_out: usize, groups: usize) -> Conv2dParams {
        Conv2dParams { batch, c_in, h_in: h, w_in: w, c_out, kh: 1, kw: 1, stride: (1, 1), padding: (0, 0), dilation: (1, 1), groups }
    }

    /// The three passes against the definition in f64, on every CPU with AVX2 (AVX-512
    /// ones included, which run the GEMM path in training): the demo's shapes, planes
    /// with a tail of fewer than 8 pixels, channel counts off the 4 x 3 blocks, groups,
    /// one sample (the threads inside it), an odd batch, and weight gradients whose
    /// sample groups are full (8 samples of 88 channels x 8x8 share a pass) or cut short.
    #[test]
    fn matches_the_definition() {
        if !conv3x3::supports_avx2() {
            return eprintln!("skipped: no AVX2 and FMA");
        }
        let cases = [
            params(3, 16, (32, 32), 24, 1),
            params(2, 12, (8, 8), 48, 3),
            params(1, 64, (8, 8), 96, 1),
            params(3, 5, (7, 9), 7, 1),
            params(5, 6, (3, 5), 9, 3),
            params(37, 64, (8, 8), 24, 1),
            params(2, 8, (9, 7), 12, 2),
            params(4, 3, (1, 1), 2, 1),
        ];
        for (i, p) in cases.into_iter().enumerate() {
            let (ho, wo) = (p.h_in, p.w_in);
            let (cig, cog) = (p.c_in / p.groups, p.c_out / p.groups);
            let x = rand(p.batch * p.c_in * p.h_in * p.w_in, 500 + i as u64);
            let w = rand(p.c_out * cig, 600 + i as u64);
            let gy = rand(p.batch * p.c_out * ho * wo, 700 + i as u64);
            let (mut y, mut dx, mut dw) = (vec![0f64; gy.len()], vec![0f64; x.len()], vec![0f64; w.len()]);
            for b in 0..p.batch {
                for co in 0..p.c_out {
                    let g = co / cog;
                    for ci in 0..cig {
                        let wv = w[co * cig + ci] as f64;
                        for oh in 0..ho {
                            for ow in 0..wo {
                                let xi = ((b * p.c_in + g * cig + ci) * p.h_in + oh) * p.w_in + ow;
                                let yi = ((b * p.c_out + co) * ho + oh) * wo + ow;
                                y[yi] += wv * x[xi] as f64;
                                dx[xi] += wv * gy[yi] as f64;
                                dw[co * cig + ci] += gy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
            let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
            // sums of at most 64 products (forward, input gradient) or 3 * 1024 (weight
            // gradient) of numbers in [-1, 1]
            let what = |pass: &str| format!("conv1x1 {pass} {p:?}");
            crate::testing::assert_close(&conv2d(&x, &w, &p), &f32s(y), 1e-5, 1e-5, &what("forward"));
            crate::testing::assert_close(&conv2d_backward_input(&gy, &w, &p), &f32s(dx), 1e-5, 1e-5, &what("input gradient"));
            crate::testing::assert_close(&conv2d_backward_weight(&x, &gy, &p), &f32s(dw), 1e-4, 1e-5, &what("weight gradient"));
        }
    }
}
