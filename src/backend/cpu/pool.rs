//! Pooling, plane scatter/gather and nearest upsampling on the CPU. Every op works one
//! `[h, w]` plane at a time (planes are independent), in parallel over planes when the
//! output is large.

use super::simd::multiversion;
use super::{buffers, PAR_THRESHOLD};
use crate::backend::Pool2dParams;
use crate::{bail, Result};
use rayon::prelude::*;

/// Max pooling with PyTorch's semantics: padding never wins (it is -inf), the first
/// maximum in row-major window order wins ties, and a NaN wins over any number (the
/// last NaN of the window, as PyTorch's `val > max || isnan(val)` scan picks).
/// Returns the output and each maximum's flat index in its `h_in * w_in` input plane.
pub fn max_pool2d(x: &[f32], p: &Pool2dParams) -> Result<(Vec<f32>, Vec<u32>)> {
    debug_assert_eq!(x.len(), p.input_shape().iter().product::<usize>(), "Storage checks the params");
    let (ho, wo, plane) = (p.h_out(), p.w_out(), p.h_in * p.w_in);
    let mut idx = vec![0u32; p.batch * p.channels * ho * wo];
    // the outputs whose windows lie inside the plane's columns, scanned lanes across
    // outputs (`max_row_inside`); the edge ones one at a time below
    let (s, pad) = (p.stride.1, p.padding.1);
    let last_end = if p.w_in + pad >= p.kw { ((p.w_in + pad - p.kw) / s + 1).min(wo) } else { 0 };
    let inside = pad.div_ceil(s).min(last_end)..last_end;
    for_planes(&mut idx, ho * wo, |i, idx| {
        let x = &x[i * plane..][..plane];
        for oh in 0..ho {
            let rows = window(oh, p.stride.0, p.padding.0, p.kh, p.h_in);
            let out = &mut idx[oh * wo..(oh + 1) * wo];
            if !inside.is_empty() {
                max_row_inside(x, p.w_in, rows.clone(), s, inside.start * s - pad, p.kw, &mut out[inside.clone()]);
            }
            for ow in (0..wo).filter(|ow| !inside.contains(ow)) {
                let cols = window(ow, p.stride.1, p.padding.1, p.kw, p.w_in);
                let (mut best, mut best_i) = (f32::NEG_INFINITY, rows.start * p.w_in + cols.start);
                for ih in rows.clone() {
                    let start = ih * p.w_in + cols.start;
                    for (j, &v) in x[start..start + cols.len()].iter().enumerate() {
                        if v > best || v.is_nan() {
                            (best, best_i) = (v, start + j);
                        }
                    }
                }
                out[ow] = best_i as u32;
            }
        }
    });
    let out = gather_planes(x, &p.input_shape(), &idx, &p.output_shape())?;
    Ok((out, idx))
}

multiversion! {
    /// `max_pool2d`'s scan for consecutive outputs of one output row whose windows lie
    /// inside the plane's columns (the first one's starts at column `c0`): the same
    /// row-major order and rule, for 16 outputs at a time held in registers, so the
    /// compare-and-select chains of different outputs run side by side.
    fn max_row_inside(x: &[f32], w_in: usize, rows: std::ops::Range<usize>, stride: usize, c0: usize, kw: usize, best_i: &mut [u32]) {
        const L: usize = 16;
        for (chunk, out) in best_i.chunks_mut(L).enumerate() {
            let o0 = chunk * L;
            let n = out.len();
            let mut best = [f32::NEG_INFINITY; L];
            let mut bi = [0u32; L];
            for (l, bi) in bi[..n].iter_mut().enumerate() {
                *bi = (rows.start * w_in + c0 + (o0 + l) * stride) as u32;
            }
            for ih in rows.clone() {
                for k in 0..kw {
                    let first = ih * w_in + c0 + k + o0 * stride;
                    let mut v = [f32::NEG_INFINITY; L];
                    for (l, v) in v[..n].iter_mut().enumerate() {
                        *v = x[first + l * stride];
                    }
                    for l in 0..L {
                        let wins = v[l] > best[l] || v[l].is_nan();
                        best[l] = if wins { v[l] } else { best[l] };
                        bi[l] = if wins { (first + l * stride) as u32 } else { bi[l] };
                    }
                }
            }
            out.copy_from_slice(&bi[..n]);
        }
    }
}

/// `out[plane, idx[i]] += src[i]` within each plane, `out` zero-initialised with
/// `out_plane` elements per plane. `src_shape` is `[b, c, ...]`: `b * c` planes.
pub fn scatter_add_planes(src: &[f32], src_shape: &[usize], idx: &[u32], out_plane: usize) -> Result<Vec<f32>> {
    let (planes, len) = plane_split(src_shape, "scatter_add_planes")?;
    if src.len() != planes * len || idx.len() != src.len() {
        bail!("scatter_add_planes: {} values and {} indices for shape {src_shape:?}", src.len(), idx.len());
    }
    if let Some(i) = idx.iter().find(|&&i| i as usize >= out_plane) {
        bail!("scatter_add_planes: index {i} out of range for planes of {out_plane} elements");
    }
    let mut out = buffers::zeroed(planes * out_plane);
    for_planes(&mut out, out_plane, |p, out| {
        let (src, idx) = (&src[p * len..][..len], &idx[p * len..][..len]);
        src.iter().zip(idx).for_each(|(v, &i)| out[i as usize] += v);
    });
    Ok(out)
}

/// `out[i] = src[plane(i), idx[i]]`: `src` is `[b, c, ...]`, `idx` is `[b, c, ...]` with
/// the same `b * c` planes; the output has `idx`'s shape.
pub fn gather_planes(src: &[f32], src_shape: &[usize], idx: &[u32], idx_shape: &[usize]) -> Result<Vec<f32>> {
    let (planes, plane) = plane_split(src_shape, "gather_planes")?;
    let (idx_planes, len) = plane_split(idx_shape, "gather_planes")?;
    if planes != idx_planes || src.len() != planes * plane || idx.len() != planes * len {
        bail!("gather_planes: source {src_shape:?} and indices {idx_shape:?} do not have the same planes");
    }
    if let Some(i) = idx.iter().find(|&&i| i as usize >= plane) {
        bail!("gather_planes: index {i} out of range for planes of {plane} elements");
    }
    let out = buffers::filled(idx.len(), |out| {
        for_planes(out, len, |p, out| {
            let (src, idx) = (&src[p * plane..][..plane], &idx[p * len..][..len]);
            out.iter_mut().zip(idx).for_each(|(o, &i)| *o = src[i as usize]);
        });
    });
    Ok(out)
}

/// Average pooling with zero padding counted in the divisor (PyTorch's default
/// `count_include_pad=True`). Without ceil mode no window reaches past the padding, so
/// the divisor is always `kh * kw`.
pub fn avg_pool2d(x: &[f32], p: &Pool2dParams) -> Result<Vec<f32>> {
    debug_assert_eq!(x.len(), p.input_shape().iter().product::<usize>(), "Storage checks the params");
    let (ho, wo, plane) = (p.h_out(), p.w_out(), p.h_in * p.w_in);
    let scale = 1.0 / (p.kh * p.kw) as f32;
    let out = buffers::filled(p.batch * p.channels * ho * wo, |out| {
        for_planes(out, ho * wo, |i, out| {
            let x = &x[i * plane..][..plane];
            for oh in 0..ho {
                let rows = window(oh, p.stride.0, p.padding.0, p.kh, p.h_in);
                for ow in 0..wo {
                    let cols = window(ow, p.stride.1, p.padding.1, p.kw, p.w_in);
                    let sum: f32 = rows.clone().map(|ih| x[ih * p.w_in..][cols.clone()].iter().sum::<f32>()).sum();
                    out[oh * wo + ow] = sum * scale;
                }
            }
        });
    });
    Ok(out)
}

/// The gradient of `avg_pool2d`: each output gradient spread evenly over its window.
pub fn avg_pool2d_backward(g: &[f32], p: &Pool2dParams) -> Result<Vec<f32>> {
    let (ho, wo, plane) = (p.h_out(), p.w_out(), p.h_in * p.w_in);
    debug_assert_eq!(g.len(), p.batch * p.channels * ho * wo, "Storage checks the params");
    // Sum the covering windows' gradients, then scale once: the CUDA kernel does the
    // same, so no multiply-add is there for nvcc to fuse and the two agree exactly.
    let scale = 1.0 / (p.kh * p.kw) as f32;
    let mut dx = buffers::zeroed(p.batch * p.channels * plane);
    for_planes(&mut dx, plane, |i, dx| {
        let g = &g[i * ho * wo..][..ho * wo];
        for oh in 0..ho {
            let rows = window(oh, p.stride.0, p.padding.0, p.kh, p.h_in);
            for ow in 0..wo {
                let (cols, v) = (window(ow, p.stride.1, p.padding.1, p.kw, p.w_in), g[oh * wo + ow]);
                rows.clone().for_each(|ih| dx[ih * p.w_in..][cols.clone()].iter_mut().for_each(|d| *d += v));
            }
        }
        dx.iter_mut().for_each(|d| *d *= scale);
    });
    Ok(dx)
}

/// Nearest upsampling by integer factors: `[b, c, h, w]` (`shape`) to
/// `[b, c, h * sh, w * sw]`, each input pixel copied into an `sh x sw` block.
pub fn upsample_nearest2d(x: &[f32], shape: &[usize], (sh, sw): (usize, usize)) -> Result<Vec<f32>> {
    let [b, c, h, w] = nchw(shape, x.len(), "upsample_nearest2d")?;
    let (ho, wo) = (h * sh, w * sw);
    let out = buffers::filled(b * c * ho * wo, |out| {
        for_planes(out, ho * wo, |i, out| {
            let x = &x[i * h * w..][..h * w];
            // Build each output row once, then copy it to the other sh - 1 rows.
            for (src, rows) in x.chunks_exact(w).zip(out.chunks_exact_mut(sh * wo)) {
                let (first, rest) = rows.split_at_mut(wo);
                first.chunks_exact_mut(sw).zip(src).for_each(|(o, &v)| o.iter_mut().for_each(|o| *o = v));
                rest.chunks_exact_mut(wo).for_each(|row| row.copy_from_slice(first));
            }
        });
    });
    Ok(out)
}

/// The gradient of `upsample_nearest2d`: `g` has the upsampled shape `shape`
/// `[b, c, h * sh, w * sw]`; returns `[b, c, h, w]`, each element the sum of its block.
pub fn upsample_nearest2d_backward(g: &[f32], shape: &[usize], (sh, sw): (usize, usize)) -> Result<Vec<f32>> {
    let [b, c, ho, wo] = nchw(shape, g.len(), "upsample_nearest2d_backward")?;
    if sh == 0 || sw == 0 || ho % sh != 0 || wo % sw != 0 {
        bail!("upsample_nearest2d_backward: gradient {shape:?} is not a multiple of the scale ({sh}, {sw})");
    }
    let (h, w) = (ho / sh, wo / sw);
    let mut dx = buffers::zeroed(b * c * h * w);
    for_planes(&mut dx, h * w, |i, dx| {
        let g = &g[i * ho * wo..][..ho * wo];
        for (oh, row) in g.chunks_exact(wo).enumerate() {
            let dst = &mut dx[oh / sh * w..][..w];
            // One value at a time, in row-major order: the CUDA kernel's summation order.
            dst.iter_mut().zip(row.chunks_exact(sw)).for_each(|(d, block)| block.iter().for_each(|v| *d += v));
        }
    });
    Ok(dx)
}

/// Input rows (or columns) that output position `o` pools, clipped to the input.
fn window(o: usize, stride: usize, pad: usize, k: usize, n: usize) -> std::ops::Range<usize> {
    let start = o * stride;
    start.saturating_sub(pad)..(start + k).saturating_sub(pad).min(n)
}

/// Runs `f(plane_index, plane)` over the `len`-element planes of `out`, in parallel when
/// `out` is large (several small planes per task, to amortise rayon's overhead).
fn for_planes<T: Send>(out: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if len == 0 {
        return;
    }
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(len).with_min_len((4096 / len).max(1)).enumerate().for_each(|(i, o)| f(i, o));
    } else {
        out.chunks_mut(len).enumerate().for_each(|(i, o)| f(i, o));
    }
}

/// `(b * c, product of the rest)` of a `[b, c, ...]` shape.
fn plane_split(shape: &[usize], op: &str) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        bail!("{op}: expected a [batch, channels, ...] shape, got {shape:?}");
    }
    Ok((shape[0] * shape[1], shape[2..].iter().product()))
}

fn nchw(shape: &[usize], len: usize, op: &str) -> Result<[usize; 4]> {
    match shape {
        &[b, c, h, w] if b * c * h * w == len => Ok([b, c, h, w]),
        _ => bail!("{op}: expected a contiguous [b, c, h, w] tensor, got shape {shape:?} with {len} elements"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;

    use crate::backend::cpu::test_rand as rand;

    fn params(
        batch: usize,
        channels: usize,
        (h_in, w_in): (usize, usize),
        (kh, kw): (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Pool2dParams {
        Pool2dParams { batch, channels, h_in, w_in, kh, kw, stride, padding }
    }

    fn cases() -> Vec<Pool2dParams> {
        vec![
            params(2, 3, (7, 9), (3, 3), (2, 2), (1, 1)),
            params(1, 2, (8, 8), (2, 2), (2, 2), (0, 0)),
            params(2, 2, (9, 6), (3, 2), (1, 2), (1, 0)),
            params(3, 4, (5, 5), (5, 5), (1, 1), (2, 2)),
            params(4, 64, (32, 32), (3, 3), (2, 2), (1, 1)), // the ResNet stem pool, threaded
            params(1, 2, (9, 75), (3, 3), (2, 2), (1, 1)),   // rows of several 16-output blocks
            params(1, 2, (4, 40), (2, 3), (1, 3), (0, 1)),   // stride 3
            params(1, 2, (3, 1), (3, 3), (1, 1), (1, 1)),    // a one-column plane: no window inside
        ]
    }

    /// Calls `f(plane, out_index_in_plane, Some(in_index_in_plane))` for each window
    /// position of each output, in row-major window order (None in the padding).
    fn naive_windows(p: &Pool2dParams, mut f: impl FnMut(usize, usize, Option<usize>)) {
        for plane in 0..p.batch * p.channels {
            for oh in 0..p.h_out() {
                for ow in 0..p.w_out() {
                    for ki in 0..p.kh {
                        for kj in 0..p.kw {
                            let ih = (oh * p.stride.0 + ki) as isize - p.padding.0 as isize;
                            let iw = (ow * p.stride.1 + kj) as isize - p.padding.1 as isize;
                            let inside = ih >= 0 && iw >= 0 && ih < p.h_in as isize && iw < p.w_in as isize;
                            f(plane, oh * p.w_out() + ow, inside.then(|| ih as usize * p.w_in + iw as usize));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_matches_naive() {
        for (n, p) in cases().into_iter().enumerate() {
            // Quantised values make ties common, exercising first-maximum-wins.
            let x: Vec<f32> = rand(p.input_shape().iter().product(), n as u64).iter().map(|v| (v * 4.0).round()).collect();
            let (o, hw) = (p.h_out() * p.w_out(), p.h_in * p.w_in);
            let (mut want, mut want_i) = (vec![f32::NEG_INFINITY; p.batch * p.channels * o], vec![u32::MAX; p.batch * p.channels * o]);
            naive_windows(&p, |plane, out, inp| {
                if let Some(i) = inp {
                    if want_i[plane * o + out] == u32::MAX || x[plane * hw + i] > want[plane * o + out] {
                        (want[plane * o + out], want_i[plane * o + out]) = (x[plane * hw + i], i as u32);
                    }
                }
            });
            let (got, got_i) = max_pool2d(&x, &p).unwrap();
            assert_eq!(got, want, "{p:?}");
            assert_eq!(got_i, want_i, "{p:?}");
        }
    }

    #[test]
    fn max_pool_nan_and_infinities() {
        let p = params(1, 1, (2, 4), (2, 2), (2, 2), (0, 0));
        let x = [1.0, f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NAN, 5.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        let (out, idx) = max_pool2d(&x, &p).unwrap();
        // PyTorch: a NaN beats everything and the last NaN of the window holds the index;
        // an all -inf window reports its first position.
        assert!(out[0].is_nan());
        assert_eq!((out[1], idx.as_slice()), (f32::NEG_INFINITY, &[4, 2][..]));
    }

    #[test]
    fn max_pool_padding_never_wins() {
        let p = params(1, 1, (3, 3), (3, 3), (1, 1), (1, 1));
        let (out, idx) = max_pool2d(&[-5.0; 9], &p).unwrap();
        assert!(out.iter().all(|&v| v == -5.0));
        assert_eq!(idx, [0, 0, 1, 0, 0, 1, 3, 3, 4]);
    }

    /// Scattering the output gradient to the argmax is the derivative of
    /// `sum(r * max_pool(x))`: check against central differences on a tie-free input.
    #[test]
    fn max_pool_backward_matches_finite_differences() {
        let p = params(2, 3, (7, 8), (3, 3), (2, 2), (1, 1));
        let n: usize = p.input_shape().iter().product();
        // Distinct values 0.01 apart: a 1e-3 nudge cannot change any argmax.
        let x: Vec<f32> = (0..n).map(|i| ((i * 37) % n) as f32 * 0.01).collect();
        let r = rand(p.output_shape().iter().product(), 7);
        let loss = |x: &[f32]| -> f64 { max_pool2d(x, &p).unwrap().0.iter().zip(&r).map(|(y, r)| (*y * *r) as f64).sum() };
        let (_, idx) = max_pool2d(&x, &p).unwrap();
        let grad = scatter_add_planes(&r, &p.output_shape(), &idx, p.h_in * p.w_in).unwrap();
        let eps = 1e-3;
        for i in 0..n {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&up) - loss(&down)) / (up[i] - down[i]) as f64;
            assert!((fd - grad[i] as f64).abs() < 1e-3, "element {i}: finite difference {fd}, scatter {}", grad[i]);
        }
    }

    #[test]
    fn scatter_and_gather() {
        // Two planes of 3 indices into planes of 4; repeated indices accumulate.
        let src = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0];
        let idx = [0, 3, 0, 2, 2, 1];
        let out = scatter_add_planes(&src, &[1, 2, 3], &idx, 4).unwrap();
        assert_eq!(out, [4.0, 0.0, 0.0, 2.0, 0.0, 30.0, 30.0, 0.0]);
        let back = gather_planes(&out, &[1, 2, 2, 2], &idx, &[1, 2, 3]).unwrap();
        assert_eq!(back, [4.0, 2.0, 4.0, 30.0, 30.0, 30.0]);
        let err = scatter_add_planes(&src, &[1, 2, 3], &[0, 4, 0, 0, 0, 0], 4).unwrap_err();
        assert!(err.to_string().contains("index 4"), "{err}");
        assert!(gather_planes(&out, &[1, 2, 4], &[0, 9, 0, 0, 0, 0], &[1, 2, 3]).is_err());
        // Large enough for the threaded path: gather undoes scatter for distinct indices.
        let (planes, len) = (64, 1024);
        let idx: Vec<u32> = (0..planes * len).map(|i| ((i % len) * 7 % len) as u32).collect();
        let src = rand(planes * len, 3);
        let out = scatter_add_planes(&src, &[4, 16, 32, 32], &idx, len).unwrap();
        assert_eq!(gather_planes(&out, &[4, 16, len], &idx, &[4, 16, 32, 32]).unwrap(), src);
    }

    #[test]
    fn avg_pool_matches_naive_and_backward_is_adjoint() {
        for (n, p) in cases().into_iter().enumerate() {
            let x = rand(p.input_shape().iter().product(), n as u64);
            let g = rand(p.output_shape().iter().product(), 50 + n as u64);
            let (o, hw, k) = (p.h_out() * p.w_out(), p.h_in * p.w_in, (p.kh * p.kw) as f32);
            let (mut want, mut want_dx) = (vec![0f32; g.len()], vec![0f32; x.len()]);
            naive_windows(&p, |plane, out, inp| {
                if let Some(i) = inp {
                    want[plane * o + out] += x[plane * hw + i] / k;
                    want_dx[plane * hw + i] += g[plane * o + out] / k;
                }
            });
            assert_close(&avg_pool2d(&x, &p).unwrap(), &want, 1e-5, 1e-5, &format!("avg_pool2d {p:?}"));
            assert_close(&avg_pool2d_backward(&g, &p).unwrap(), &want_dx, 1e-5, 1e-5, &format!("avg_pool2d_backward {p:?}"));
        }
    }

    #[test]
    fn upsample_nearest_and_backward() {
        for (shape, scale) in [([2, 3, 4, 5], (2, 2)), ([1, 2, 3, 2], (3, 1)), ([4, 32, 16, 16], (2, 3))] {
            let x = rand(shape.iter().product(), 1);
            let up = upsample_nearest2d(&x, &shape, scale).unwrap();
            let [b, c, h, w] = shape;
            let (ho, wo) = (h * scale.0, w * scale.1);
            let g = rand(up.len(), 2);
            let mut want_dx = vec![0f32; x.len()];
            for plane in 0..b * c {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let src = plane * h * w + oh / scale.0 * w + ow / scale.1;
                        assert_eq!(up[(plane * ho + oh) * wo + ow], x[src]);
                        want_dx[src] += g[(plane * ho + oh) * wo + ow];
                    }
                }
            }
            let dx = upsample_nearest2d_backward(&g, &[b, c, ho, wo], scale).unwrap();
            assert_close(&dx, &want_dx, 1e-5, 1e-5, "upsample backward");
        }
        assert!(upsample_nearest2d_backward(&[0.0; 10], &[1, 1, 2, 5], (2, 2)).is_err());
    }
}
