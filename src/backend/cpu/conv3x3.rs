//! Direct 3x3 convolution (stride 1, padding 1, no dilation, no groups) with AVX-512 or
//! AVX2, for the small channel counts of the CPU demo (16-64 channels on 8x8 to 32x32
//! planes; `applies` says where it wins). There im2col + GEMM spends about as long
//! writing the column matrix (nine shifted copies of the input, 8-14% of a distillation
//! iteration with its `memcpy` calls on AVX-512, 22-27% on AVX2) as multiplying. Here
//! each sample's input is padded once and read in place:
//!
//! ```text
//! out[co, oh, ow] = sum over ci, ki, kj of  w[co, ci, ki, kj] * xpad[ci, oh + ki, ow + kj]
//! ```
//!
//! The register block is 32 output channels (two 16-lane vectors) by 8 pixels of one
//! output row: for each (ci, ki, kj), two weight loads and eight broadcasts feed
//! sixteen FMAs, with the input read where it lies instead of packed. Weights are
//! repacked once per call as `[co block][ci][ki][kj][32]`; a last block of 16 channels
//! uses one vector, whose eight accumulators are still the fewest that hide the FMA
//! latency on two FMA ports. Eight pixels divide the 8-, 16- and 32-pixel rows of the
//! demo and ResNet-18: with six (the GEMM microkernel's shape) the last block of each
//! row was a third to two thirds empty, and the forward took 12-46% longer (`cargo
//! bench --bench conv` on a 2-core Intel Xeon with AVX-512). The input gradient of a convolution
//! this path takes is the same convolution of the output gradient with the flipped,
//! transposed weights, so it runs here too when the input has a multiple of 16 channels.
//!
//! With AVX2 and FMA only (16 registers of 8 lanes) the block is 16 output channels by 6
//! pixels: twelve accumulators, two weight loads and six broadcasts per tap. Its six
//! pixels are consecutive in the *padded* plane, where output pixel (oh, ow) sits at
//! `oh * (w + 2) + ow` and reads its taps at fixed offsets from there, so a block runs
//! on across row ends and only the two pad columns of each row are computed in vain
//! (20% of the work on 8-pixel rows, 6% on 32; six pixels per row block would waste 33%
//! on 8-pixel rows). The taps are a list of offsets from the pixel (`Walk`), so
//! `conv3x3_s2` runs the same kernel over the phases of stride-2 convolutions.
//!
//! Without either (or for other shapes) `conv.rs`'s im2col path runs instead.

use super::buffers;
use crate::backend::Conv2dParams;
use rayon::prelude::*;
use std::cell::RefCell;

/// f32 lanes of one AVX-512 vector: output channels come in multiples of this.
const LANES: usize = 16;
/// Output pixels of an AVX-512 register block (of one output row).
const PIX: usize = 8;
/// Output pixels of an AVX2 register block (consecutive in the padded plane).
const PIX_AVX2: usize = 6;

/// The vector kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// 32-channel blocks (a last one of 16) by 8 pixels of one row.
    Avx512,
    /// 16-channel blocks by 6 pixels of the padded plane.
    Avx2,
}

impl Isa {
    /// Output channels of a full block.
    fn block_width(self) -> usize {
        match self {
            Isa::Avx512 => 2 * LANES,
            Isa::Avx2 => LANES,
        }
    }

    /// Most input channels for which this kernel beats im2col + GEMM (`cargo bench
    /// --bench conv`): AVX-512 up to 128 (ResNet-18's layer2, 128 x 8x8: -29% time
    /// forward, -22% backward; beyond 128 not measured). AVX2 up to 64 (a 2-core AMD
    /// EPYC: the demo's 16-64 channels -17% to -24% time forward, 64 x 16x16 even,
    /// 128 x 8x8 +19% forward, +11% backward).
    fn max_c_in(self) -> usize {
        match self {
            Isa::Avx512 => 128,
            Isa::Avx2 => 64,
        }
    }
}

/// Whether `conv2d` computes this forward convolution.
pub fn applies(p: &Conv2dParams) -> bool {
    p.is_dense_3x3(1)
        && p.c_out.is_multiple_of(LANES)
        // measured (`cargo bench --bench conv`, AVX-512): faster than im2col + GEMM on
        // rows of 8 or more pixels (+12% to +45% forward with 16-64 channels), slower on
        // 4x4 and 2x2 planes (the 8-pixel block is mostly empty); see `max_c_in`
        && p.w_in >= 8
        && best_isa().is_some_and(|isa| p.c_in <= isa.max_c_in())
}

/// Whether `conv2d_backward_input` computes this convolution's input gradient.
pub fn applies_backward_input(p: &Conv2dParams) -> bool {
    applies(&transposed(p))
}

/// Whether this CPU runs the AVX2 kernel (it has AVX2 and FMA but not AVX-512F).
pub fn runs_avx2() -> bool {
    best_isa() == Some(Isa::Avx2)
}

/// Whether this CPU can run the AVX2 kernel (AVX-512 CPUs can, though they run theirs).
pub(super) fn supports_avx2() -> bool {
    supported_isas().contains(&Isa::Avx2)
}

/// The widest kernel this CPU can run, if any, unless `simd_kernels_enabled` is false.
fn best_isa() -> Option<Isa> {
    if !simd_kernels_enabled() {
        return None;
    }
    supported_isas().first().copied()
}

/// Whether the hand-written vector convolutions (this module's, `conv3x3_s2`,
/// `conv1x1`, `winograd`) may run. `DFKD_NO_SIMD_KERNELS=1` in the environment (read
/// once) turns them all off, so every convolution takes `conv.rs`'s im2col + GEMM path:
/// other sums, the same results up to rounding. For judging how a run depends on
/// rounding (docs/RESULTS.md, teacher). `multiversion!` loops are unaffected: their
/// variants give the same bits.
pub fn simd_kernels_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DFKD_NO_SIMD_KERNELS").map_or(true, |v| v.is_empty() || v == "0"))
}

/// Every kernel this CPU can run, widest first.
fn supported_isas() -> Vec<Isa> {
    let mut isas = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
    }
    isas
}

/// The convolution whose forward is `p`'s input gradient: channels swapped (same planes,
/// as stride 1 and padding 1 keep the size).
pub(super) fn transposed(p: &Conv2dParams) -> Conv2dParams {
    Conv2dParams { c_in: p.c_out, c_out: p.c_in, ..*p }
}

/// `conv2d(x, w)` for a `p` that `applies`.
pub fn conv2d(x: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(applies(p), "conv3x3::conv2d called for {p:?}");
    conv2d_with(best_isa().expect("`applies` checked"), x, w, p)
}

fn conv2d_with(isa: Isa, x: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let packed = pack(isa, w, p.c_out, p.c_in, |co, ci, k| w[(co * p.c_in + ci) * 9 + k]);
    run(isa, x, &packed, p)
}

/// The input gradient of `conv2d(x, w)` for a `p` that `applies_backward_input`:
/// `grad` convolved with `w` flipped in both spatial axes, in and out channels swapped.
pub fn conv2d_backward_input(grad: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    assert!(applies_backward_input(p), "conv3x3::conv2d_backward_input called for {p:?}");
    conv2d_backward_input_with(best_isa().expect("`applies` checked"), grad, w, p)
}

fn conv2d_backward_input_with(isa: Isa, grad: &[f32], w: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let q = transposed(p);
    // the new weight [c_in][c_out][ki][kj] is w[c_out][c_in][2 - ki][2 - kj]: k -> 8 - k
    let packed = pack(isa, w, q.c_out, q.c_in, |ci, co, k| w[(co * p.c_in + ci) * 9 + 8 - k]);
    run(isa, grad, &packed, &q)
}

/// Weights as `[co block][ci][k][block width]` in `isa`'s blocks; `at(co, ci, k)` reads
/// the weight of output channel `co`, input `ci`, tap `k`.
pub(super) fn pack(isa: Isa, w: &[f32], c_out: usize, c_in: usize, at: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    debug_assert_eq!(w.len(), c_out * c_in * 9);
    let mut packed = vec![0f32; c_out * c_in * 9];
    for (co0, width) in blocks(isa, c_out) {
        let dst = &mut packed[co0 * c_in * 9..][..width * c_in * 9];
        for ci in 0..c_in {
            for k in 0..9 {
                for lane in 0..width {
                    dst[(ci * 9 + k) * width + lane] = at(co0 + lane, ci, k);
                }
            }
        }
    }
    packed
}

/// `(first channel, width)` of each output-channel block.
fn blocks(isa: Isa, c_out: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = isa.block_width();
    (0..c_out).step_by(full).map(move |co0| (co0, (c_out - co0).min(full)))
}

fn run(isa: Isa, x: &[f32], packed: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let hw = p.h_in * p.w_in;
    let channels = |xp: &[f32], co0: usize, out: &mut [f32]| match isa {
        Isa::Avx512 => channels(xp, packed, p, co0, out),
        Isa::Avx2 => channels_avx2(xp, packed, p, co0, out),
    };
    // every output element is written by exactly one block store in `channels`; the
    // blocks of `for_each_block` are those of `blocks`
    let (in_sample, out_sample) = (p.c_in * hw, p.c_out * hw);
    buffers::filled(p.batch * out_sample, |out| {
        for_each_block(x, in_sample, out, out_sample, isa.block_width() * hw, |x, xp| pad(x, p, xp), |xp, i, out| channels(xp, i * isa.block_width(), out))
    })
}

/// For every sample: `prepare(its input, buffer)`, then `block(&buffer, i, output block
/// i)` for the blocks of `block_len` floats of its output (the last one may be shorter).
/// Samples go to the threads, or with fewer samples than threads (batch-1 inference)
/// one sample's blocks do.
pub(super) fn for_each_block(
    x: &[f32],
    in_sample: usize,
    out: &mut [f32],
    out_sample: usize,
    block_len: usize,
    prepare: impl Fn(&[f32], &mut Vec<f32>) + Sync,
    block: impl Fn(&[f32], usize, &mut [f32]) + Sync,
) {
    let batch = x.len() / in_sample.max(1);
    assert!(x.len() == batch * in_sample && out.len() == batch * out_sample && block_len > 0, "conv3x3: sample sizes");
    if batch >= rayon::current_num_threads() {
        out.par_chunks_mut(out_sample).zip(x.par_chunks(in_sample)).for_each(|(out, x)| {
            PADDED.with(|xp| {
                let xp = &mut xp.borrow_mut();
                prepare(x, xp);
                out.chunks_mut(block_len).enumerate().for_each(|(i, out)| block(xp, i, out));
            })
        })
    } else {
        let mut xp = vec![];
        for (out, x) in out.chunks_mut(out_sample).zip(x.chunks(in_sample)) {
            prepare(x, &mut xp);
            out.par_chunks_mut(block_len).enumerate().for_each(|(i, out)| block(&xp, i, out));
        }
    }
}

thread_local! {
    /// Per-thread padded copy of one sample's input, reused across calls.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One sample's input `x` with a zero border, into `xp`: `[c_in][h + 2][w + 2]` plus the
/// floats the last register block reads past the end (`PIX + 2` covers both kernels').
pub(super) fn pad(x: &[f32], p: &Conv2dParams, xp: &mut Vec<f32>) {
    let (h, w) = (p.h_in, p.w_in);
    let (wp, plane) = (w + 2, (h + 2) * (w + 2));
    // the last block of a row reads up to PIX + 2 floats past the last padded row's end
    xp.clear();
    xp.resize(p.c_in * plane + PIX + 2, 0.0);
    for (c, src) in x.chunks_exact(h * w).enumerate() {
        for (r, row) in src.chunks_exact(w).enumerate() {
            xp[c * plane + (r + 1) * wp + 1..][..w].copy_from_slice(row);
        }
    }
}

/// Output channels `co0..co0 + out.len() / (h*w)` (one of `blocks`) of one sample, from
/// its padded input.
fn channels(xp: &[f32], packed: &[f32], p: &Conv2dParams, co0: usize, out: &mut [f32]) {
    let (h, w) = (p.h_in, p.w_in);
    let (wp, plane) = (w + 2, (h + 2) * (w + 2));
    let width = out.len() / (h * w);
    // the kernel's reads past a row end rely on this length (see the SAFETY note)
    assert!(xp.len() >= p.c_in * plane + PIX + 2 && (width == LANES || width == 2 * LANES), "conv3x3: padded input or block");
    let hw = h * w;
    let mut tile = [[0f32; 2 * LANES]; PIX];
    let wblock = &packed[co0 * p.c_in * 9..][..width * p.c_in * 9];
    for oh in 0..h {
        for ow0 in (0..w).step_by(PIX) {
            let at = oh * wp + ow0;
            // SAFETY: the kernel reads xp[at + ci*plane + ki*wp + r + kj] for ci < c_in,
            // ki, kj < 3, r < PIX: at most c_in*plane - wp + w + PIX + 1
            // (oh <= h-1, ow0 <= w-1, plane = (h+2)*wp), inside xp's
            // c_in*plane + PIX + 2 floats; wblock holds width*c_in*9 floats;
            // `applies` checked AVX-512F.
            unsafe {
                let xs = &xp[at..];
                if width == 2 * LANES {
                    block::<2>(xs, wp, plane, p.c_in, wblock, &mut tile);
                } else {
                    block::<1>(xs, wp, plane, p.c_in, wblock, &mut tile);
                }
            }
            let npix = PIX.min(w - ow0);
            for c in 0..width {
                let dst = &mut out[c * hw + oh * w + ow0..][..npix];
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = tile[r][c];
                }
            }
        }
    }
}

/// `tile[r][v*16 + l] = sum over ci, ki, kj of wblock[ci][ki*3+kj][v*16 + l] *
/// xs[ci*plane + ki*wp + r + kj]` for the PIX pixels r and NV*16 channels of a block.
///
/// # Safety
/// The CPU has AVX-512F; `xs` holds `(c_in-1)*plane + 2*wp + PIX + 2` floats and
/// `wblock` `c_in*9*NV*16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block<const NV: usize>(xs: &[f32], wp: usize, plane: usize, c_in: usize, wblock: &[f32], tile: &mut [[f32; 2 * LANES]; PIX]) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() >= (c_in - 1) * plane + 2 * wp + PIX + 2);
    debug_assert!(wblock.len() >= c_in * 9 * NV * LANES);
    let (x, wb) = (xs.as_ptr(), wblock.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); PIX]; NV];
    for ci in 0..c_in {
        for ki in 0..3 {
            let row = x.add(ci * plane + ki * wp);
            for kj in 0..3 {
                let wk = wb.add((ci * 9 + ki * 3 + kj) * NV * LANES);
                let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(wk.add(v * LANES)));
                for r in 0..PIX {
                    let b = _mm512_set1_ps(*row.add(r + kj));
                    for v in 0..NV {
                        acc[v][r] = _mm512_fmadd_ps(wv[v], b, acc[v][r]);
                    }
                }
            }
        }
    }
    for v in 0..NV {
        for r in 0..PIX {
            _mm512_storeu_ps(tile[r].as_mut_ptr().add(v * LANES), acc[v][r]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block<const NV: usize>(_: &[f32], _: usize, _: usize, _: usize, _: &[f32], _: &mut [[f32; 2 * LANES]; PIX]) {
    unreachable!("`applies` is false without AVX-512")
}

/// `channels` for the AVX2 kernel: 16 output channels `co0..co0 + 16` of one sample, in
/// blocks of 6 consecutive pixels of the padded plane (see the module comment).
fn channels_avx2(xp: &[f32], packed: &[f32], p: &Conv2dParams, co0: usize, out: &mut [f32]) {
    let (h, w) = (p.h_in, p.w_in);
    let wp = w + 2;
    let taps: [usize; 9] = std::array::from_fn(|k| k / 3 * wp + k % 3);
    let walk = Walk { rows: h, cols: w, row: wp, channel: (h + 2) * wp, taps: &taps };
    let wblock = &packed[co0 * p.c_in * 9..][..LANES * p.c_in * 9];
    let hw = h * w;
    walk.channels_avx2(xp, p.c_in, wblock, |c, oh, row| out[c * hw + oh * w..][..w].copy_from_slice(row));
}

/// How the AVX2 kernel walks a sample (`conv3x3_s2` walks its stride-2 phases this
/// way too): output pixel (oh, ow) is position `oh * row + ow` of a virtual plane, input
/// channel `ci` starts at `ci * channel` of the input, and tap `t` of a pixel reads
/// `taps[t]` floats on from the pixel's position there.
pub(super) struct Walk<'a> {
    pub rows: usize,
    pub cols: usize,
    pub row: usize,
    pub channel: usize,
    pub taps: &'a [usize],
}

impl Walk<'_> {
    /// Floats the input must hold for `c_in` channels: the last block reads up to 5
    /// pixels past the plane's last one.
    pub fn input_len(&self, c_in: usize) -> usize {
        (c_in - 1) * self.channel + self.taps.iter().max().map_or(0, |t| t + 1) + self.end() + 5
    }

    /// Positions below this hold every output pixel.
    fn end(&self) -> usize {
        (self.rows - 1) * self.row + self.cols
    }

    /// The 16 output channels whose weights are `wblock` (`[ci][tap][16]`), in blocks of
    /// 6 consecutive positions; `store(c, oh, pixels)` takes each output row.
    pub fn channels_avx2(&self, xp: &[f32], c_in: usize, wblock: &[f32], mut store: impl FnMut(usize, usize, &[f32])) {
        // the kernel's reads past a row end rely on these lengths (see the SAFETY note)
        assert!(
            self.rows > 0
                && self.cols > 0
                && self.cols <= self.row
                && c_in > 0
                && xp.len() >= self.input_len(c_in)
                && wblock.len() == LANES * c_in * self.taps.len(),
            "conv3x3: AVX2 walk over a short input or weight block"
        );
        let end = self.end();
        // Blocks land in `staged` in the padded layout, a channel every `stride` floats,
        // and whole rows are stored at the end. Stored straight into the output, the 16
        // channels of a pixel lie h*w floats apart: a multiple of 4 KiB on 32x32 planes,
        // so all 16 compete for one L1 set (measured: the stores took a sixth of the
        // time). `stride` is odd, and leaves room for the last block's 8-float stores.
        let stride = (end.next_multiple_of(PIX_AVX2) + 2) | 1;
        STAGED.with(|staged| {
            let staged = &mut staged.borrow_mut();
            staged.resize(LANES * stride, 0.0);
            // in increasing j0: each block's stores run 2 floats into the next block's
            // pixels, which that block then overwrites
            for j0 in (0..end).step_by(PIX_AVX2) {
                // SAFETY: the kernel reads xp[j0 + ci*channel + taps[t] + r] for
                // ci < c_in, r < 6: below (c_in-1)*channel + max tap + 1 + end + 5 =
                // input_len (j0 + r <= end + 4), asserted above; wblock holds
                // 16*c_in*taps floats; it writes staged[j0 + c*stride + r] for c < 16,
                // r < 8, inside staged as j0 + 8 <= stride; the callers checked AVX2 and FMA.
                unsafe {
                    let (xs, dst) = (&xp[j0..], &mut staged[j0..]);
                    // a constant tap count unrolls the tap loop (a runtime count cost
                    // batch-1 ResNet-18 inference 5-15%)
                    match self.taps.len() {
                        9 => block_avx2::<9>(xs, self.channel, c_in, self.taps.try_into().unwrap(), wblock, dst, stride),
                        4 => block_avx2::<4>(xs, self.channel, c_in, self.taps.try_into().unwrap(), wblock, dst, stride),
                        2 => block_avx2::<2>(xs, self.channel, c_in, self.taps.try_into().unwrap(), wblock, dst, stride),
                        1 => block_avx2::<1>(xs, self.channel, c_in, self.taps.try_into().unwrap(), wblock, dst, stride),
                        n => unreachable!("a walk of {n} taps"),
                    }
                };
            }
            for (c, staged) in staged.chunks_exact(stride).enumerate() {
                for oh in 0..self.rows {
                    store(c, oh, &staged[oh * self.row..][..self.cols]);
                }
            }
        })
    }
}

thread_local! {
    /// Per-thread staging of one AVX2 block of output channels, reused across calls.
    static STAGED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `dst[l*stride + r] = sum over ci, t of wblock[ci][t][l] * xs[ci*channel + taps[t] + r]`
/// for the 6 pixels r and 16 channels l of a block; it also writes `dst[l*stride + 6]`
/// and `dst[l*stride + 7]` (with zeros).
///
/// # Safety
/// The CPU has AVX2 and FMA; `xs` holds `(c_in-1)*channel + max(taps) + 6` floats,
/// `wblock` `c_in*taps*16` and `dst` `15*stride + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const T: usize>(xs: &[f32], channel: usize, c_in: usize, taps: &[usize; T], wblock: &[f32], dst: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    debug_assert!(xs.len() >= (c_in - 1) * channel + taps.iter().max().unwrap_or(&0) + PIX_AVX2);
    debug_assert!(wblock.len() >= c_in * taps.len() * LANES && dst.len() >= 15 * stride + 8);
    let (x, mut wk) = (xs.as_ptr(), wblock.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); PIX_AVX2]; 2];
    for ci in 0..c_in {
        let xc = x.add(ci * channel);
        for &tap in taps {
            let row = xc.add(tap);
            let (w0, w1) = (_mm256_loadu_ps(wk), _mm256_loadu_ps(wk.add(8)));
            wk = wk.add(LANES);
            for r in 0..PIX_AVX2 {
                let b = _mm256_broadcast_ss(&*row.add(r));
                acc[0][r] = _mm256_fmadd_ps(w0, b, acc[0][r]);
                acc[1][r] = _mm256_fmadd_ps(w1, b, acc[1][r]);
            }
        }
    }
    // acc[v][r] holds channels 8v..8v+8 of pixel r: transposed as an 8x8 block (pixels
    // 6 and 7 zero), each channel's pixels become one vector
    let d = dst.as_mut_ptr();
    let z = _mm256_setzero_ps();
    for (v, acc) in acc.iter().enumerate() {
        let r = [acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], z, z];
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // u[4h + i]: lanes (4h..4h+4 of pixels) in each 128-bit half
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (h, k) = (i / 4, i % 4);
            let (a, b) = (t[4 * h + k % 2], t[4 * h + 2 + k % 2]);
            if k < 2 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        for c in 0..8 {
            // channel c: pixels 0-3 from u[k], pixels 4-7 from u[4 + k], the half c / 4
            let k = [0, 2, 1, 3][c % 4];
            let col = if c < 4 { _mm256_permute2f128_ps::<0x20>(u[k], u[4 + k]) } else { _mm256_permute2f128_ps::<0x31>(u[k], u[4 + k]) };
            _mm256_storeu_ps(d.add((8 * v + c) * stride), col);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_avx2<const T: usize>(_: &[f32], _: usize, _: usize, _: &[usize; T], _: &[f32], _: &mut [f32], _: usize) {
    unreachable!("`applies` is false without AVX2")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_rand as rand;

    fn params(batch: usize, c_in: usize, h: usize, w: usize, c_out: usize) -> Conv2dParams {
        Conv2dParams { batch, c_in, h_in: h, w_in: w, c_out, kh: 3, kw: 3, stride: (1, 1), padding: (1, 1), dilation: (1, 1), groups: 1 }
    }

    /// Calls `f(x_index, w_index, out_index)` for every multiply-add of the convolution.
    fn walk(p: &Conv2dParams, mut f: impl FnMut(usize, usize, usize)) {
        let (h, wd) = (p.h_in as isize, p.w_in as isize);
        for b in 0..p.batch {
            for co in 0..p.c_out {
                for oh in 0..h {
                    for ow in 0..wd {
                        for ci in 0..p.c_in {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let (ih, iw) = (oh + ki - 1, ow + kj - 1);
                                    if ih < 0 || iw < 0 || ih >= h || iw >= wd {
                                        continue;
                                    }
                                    let xi = ((b * p.c_in + ci) * p.h_in + ih as usize) * p.w_in + iw as usize;
                                    let wi = ((co * p.c_in + ci) * 3 + ki as usize) * 3 + kj as usize;
                                    f(xi, wi, ((b * p.c_out + co) * p.h_in + oh as usize) * p.w_in + ow as usize);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Shapes with a 32-wide block, a 16-wide last block, rows that are not a multiple
    /// of the 8-pixel block, a one-row plane, and single samples (with 2+ threads those
    /// split by channel blocks instead of by sample).
    fn cases() -> Vec<Conv2dParams> {
        vec![
            params(2, 3, 7, 9, 16),
            params(3, 16, 8, 8, 32),
            params(2, 5, 5, 13, 48),
            params(1, 32, 1, 8, 16),
            params(2, 16, 4, 17, 64),
            params(1, 16, 9, 10, 48),
            params(2, 128, 8, 8, 32),
        ]
    }

    /// 1e-5, or two f32 roundings of the largest sum of |products| (f32 sums of 1,152
    /// terms, 128 channels x 9 taps, drift further than 1e-5 from the f64 reference).
    fn abs_tolerance(mag: &[f64]) -> f32 {
        1e-5f32.max(2.0 * f32::EPSILON * mag.iter().cloned().fold(0.0, f64::max) as f32)
    }

    const SKIP: &str = "skipped: this CPU has neither AVX-512F nor AVX2 + FMA, so the im2col path runs instead";

    /// Every kernel this CPU runs (an AVX-512 CPU checks the AVX2 kernel too).
    fn isas() -> Vec<Isa> {
        let isas = supported_isas();
        if isas.is_empty() {
            eprintln!("{SKIP}");
        }
        isas
    }

    #[test]
    fn forward_matches_the_definition() {
        for (isa, (i, p)) in isas().into_iter().flat_map(|isa| cases().into_iter().enumerate().map(move |c| (isa, c))) {
            let (x, w) = (rand(p.batch * p.c_in * p.h_in * p.w_in, i as u64), rand(p.c_out * p.c_in * 9, 50 + i as u64));
            let (mut want, mut mag) = (vec![0f64; p.batch * p.c_out * p.h_in * p.w_in], vec![0f64; p.batch * p.c_out * p.h_in * p.w_in]);
            walk(&p, |xi, wi, oi| {
                want[oi] += x[xi] as f64 * w[wi] as f64;
                mag[oi] += (x[xi] as f64 * w[wi] as f64).abs();
            });
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            crate::testing::assert_close(&conv2d_with(isa, &x, &w, &p), &want, abs_tolerance(&mag), 1e-5, &format!("conv3x3 {isa:?} forward {p:?}"));
        }
    }

    #[test]
    fn backward_input_matches_the_definition() {
        let cases: Vec<_> = cases().into_iter().filter(|p| p.c_in % LANES == 0).collect();
        assert!(cases.len() >= 3, "the cases exercise the input gradient");
        for (isa, (i, p)) in isas().into_iter().flat_map(|isa| cases.clone().into_iter().enumerate().map(move |c| (isa, c))) {
            let (g, w) = (rand(p.batch * p.c_out * p.h_in * p.w_in, 100 + i as u64), rand(p.c_out * p.c_in * 9, 150 + i as u64));
            let (mut want, mut mag) = (vec![0f64; p.batch * p.c_in * p.h_in * p.w_in], vec![0f64; p.batch * p.c_in * p.h_in * p.w_in]);
            walk(&p, |xi, wi, oi| {
                want[xi] += g[oi] as f64 * w[wi] as f64;
                mag[xi] += (g[oi] as f64 * w[wi] as f64).abs();
            });
            let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
            let got = conv2d_backward_input_with(isa, &g, &w, &p);
            crate::testing::assert_close(&got, &want, abs_tolerance(&mag), 1e-5, &format!("conv3x3 {isa:?} backward input {p:?}"));
        }
    }
}
