//! Fused batch norm in training mode on the CPU. `x` is `[n, c, ...spatial]`; statistics
//! are per channel over the batch and the spatial positions, `m = n * spatial` values,
//! each channel being `n` strided planes of `spatial` values.

use super::simd::multiversion;
use super::{buffers, PAR_THRESHOLD};
use crate::{bail, Result};
use rayon::prelude::*;

/// Returns `(y, mean, invstd)` with `y = (x - mean) * invstd * gamma + beta`,
/// `invstd = 1 / sqrt(var + eps)` and `var` the biased batch variance. The statistics
/// come from two passes (mean, then centred squares) summed in f64, so a large mean
/// cannot cancel the variance away.
pub fn forward_train(x: &[f32], shape: &[usize], gamma: &[f32], beta: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (c, s, m) = dims(shape, x.len(), "batch_norm")?;
    check_param(gamma, c, "gamma")?;
    check_param(beta, c, "beta")?;
    let stats: Vec<(f32, f32)> = per_channel(c, x.len(), |ch| {
        let (mean, var) = mean_var(x, c, s, m, ch);
        (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
    });
    let y = buffers::filled(x.len(), |y| {
        for_planes(y, c, s, |i, ch, y| {
            let (mean, scale, shift) = (stats[ch].0, stats[ch].1 * gamma[ch], beta[ch]);
            y.iter_mut().zip(&x[i * s..][..s]).for_each(|(y, &x)| *y = (x - mean) * scale + shift);
        });
    });
    Ok((y, stats.iter().map(|s| s.0).collect(), stats.iter().map(|s| s.1).collect()))
}

/// `y = x * scale[c] + shift[c]`, one pass: batch norm in evaluation mode (its
/// statistics folded into a scale and a shift), and its input gradient (no shift).
pub fn channel_affine(x: &[f32], shape: &[usize], scale: &[f32], shift: &[f32]) -> Result<Vec<f32>> {
    let (c, s, _) = dims(shape, x.len(), "channel_affine")?;
    check_param(scale, c, "scale")?;
    check_param(shift, c, "shift")?;
    Ok(buffers::filled(x.len(), |y| {
        for_planes(y, c, s, |i, ch, y| affine_plane(&x[i * s..][..s], scale[ch], shift[ch], y));
    }))
}

multiversion! {
    fn affine_plane(x: &[f32], a: f32, b: f32, y: &mut [f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * a + b);
    }
}

/// The CPU reference of the fused op `fused::channel_stats`, kept here for the helpers
/// it shares with `forward_train`. Returns `[2, c]`: per channel the mean, then the
/// biased variance. They are `forward_train`'s statistics without the normalisation
/// (DFKD's BN-statistics loss compares them with the running ones), in two f64 passes
/// where `mean` and `var` make about four float passes.
pub fn channel_stats(x: &[f32], shape: &[usize]) -> Result<Vec<f32>> {
    let (c, s, m) = dims(shape, x.len(), "channel_stats")?;
    let stats: Vec<(f64, f64)> = per_channel(c, x.len(), |ch| mean_var(x, c, s, m, ch));
    Ok(stats.iter().map(|s| s.0 as f32).chain(stats.iter().map(|s| s.1 as f32)).collect())
}

/// The gradient of `channel_stats` given `stats` and its gradient `dstats` (`[2, c]`
/// each): `dx = dmean / m + dvar * 2 (x - mean) / m`, one pass.
pub fn channel_stats_backward(x: &[f32], shape: &[usize], stats: &[f32], dstats: &[f32]) -> Result<Vec<f32>> {
    let (c, s, m) = dims(shape, x.len(), "channel_stats_backward")?;
    for (v, name) in [(stats, "statistics"), (dstats, "statistics' gradient")] {
        check_param(v, 2 * c, name)?;
    }
    Ok(buffers::filled(x.len(), |dx| {
        for_planes(dx, c, s, |i, ch, dx| {
            let (mean, b, a) = (stats[ch], dstats[ch] / m as f32, 2.0 * dstats[c + ch] / m as f32);
            dx.iter_mut().zip(&x[i * s..][..s]).for_each(|(dx, &x)| *dx = b + a * (x - mean));
        });
    }))
}

/// Channel `ch`'s mean and biased variance from two passes (mean, then centred squares)
/// summed in f64, so a large mean cannot cancel the variance away.
fn mean_var(x: &[f32], c: usize, s: usize, m: usize, ch: usize) -> (f64, f64) {
    let mean = planes(x, c, s, ch).map(sum_f64).sum::<f64>() / m as f64;
    let sq: f64 = planes(x, c, s, ch).map(|p| sum_sq_dev(p, mean)).sum();
    (mean, sq / m as f64)
}

/// Returns `(dx, dgamma, dbeta)`: `dbeta = Σ dy`, `dgamma = Σ dy * xhat` and
/// `dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)`, `xhat = (x - mean) * invstd`.
pub fn backward(x: &[f32], shape: &[usize], dy: &[f32], mean: &[f32], invstd: &[f32], gamma: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (c, s, m) = dims(shape, x.len(), "batch_norm_backward")?;
    if dy.len() != x.len() {
        bail!("batch_norm_backward: gradient has {} elements, input {}", dy.len(), x.len());
    }
    for (v, name) in [(mean, "mean"), (invstd, "invstd"), (gamma, "gamma")] {
        check_param(v, c, name)?;
    }
    let sums: Vec<(f32, f32)> = per_channel(c, x.len(), |ch| {
        let dbeta: f64 = planes(dy, c, s, ch).map(sum_f64).sum();
        let mean = mean[ch] as f64;
        let dot: f64 = planes(x, c, s, ch).zip(planes(dy, c, s, ch)).map(|(x, dy)| sum_dev_dot(x, dy, mean)).sum();
        (dbeta as f32, (dot * invstd[ch] as f64) as f32)
    });
    let dx = buffers::filled(x.len(), |dx| {
        for_planes(dx, c, s, |i, ch, dx| {
            // dx = k * (dy - dbeta / m - (x - mean) * invstd * dgamma / m), per-channel terms hoisted.
            let ((dbeta, dgamma), mean, invstd) = (sums[ch], mean[ch], invstd[ch]);
            let (k, db, dg) = (gamma[ch] * invstd, dbeta / m as f32, invstd * dgamma / m as f32);
            let (x, dy) = (&x[i * s..][..s], &dy[i * s..][..s]);
            dx.iter_mut().zip(x.iter().zip(dy)).for_each(|(dx, (&x, &dy))| *dx = k * (dy - db - (x - mean) * dg));
        });
    });
    Ok((dx, sums.iter().map(|s| s.1).collect(), sums.iter().map(|s| s.0).collect()))
}

/// `(channels, spatial, values per channel)` of a `[n, c, ...]` shape.
fn dims(shape: &[usize], len: usize, op: &str) -> Result<(usize, usize, usize)> {
    if shape.len() < 2 || shape.iter().product::<usize>() != len {
        bail!("{op}: expected a contiguous [n, c, ...] input, got shape {shape:?} with {len} elements");
    }
    let spatial: usize = shape[2..].iter().product();
    if shape[0] * spatial == 0 {
        bail!("{op}: no values per channel to normalise over in shape {shape:?}");
    }
    Ok((shape[1], spatial, shape[0] * spatial))
}

fn check_param(v: &[f32], c: usize, name: &str) -> Result<()> {
    if v.len() != c {
        bail!("batch_norm: {name} has {} elements for {c} channels", v.len());
    }
    Ok(())
}

/// The `n` planes of channel `ch` in an `[n, c, s]` buffer.
fn planes(x: &[f32], c: usize, s: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(c * s).map(move |sample| &sample[ch * s..][..s])
}

/// `f(channel)` for every channel, in parallel when the tensor is large.
fn per_channel<T: Send>(c: usize, len: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if len >= PAR_THRESHOLD {
        (0..c).into_par_iter().map(f).collect()
    } else {
        (0..c).map(f).collect()
    }
}

/// `f(plane_index, channel, plane)` over the `[s]` planes of an `[n, c, s]` output, in
/// parallel (several small planes per task) when it is large.
fn for_planes(out: &mut [f32], c: usize, s: usize, f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(s).with_min_len((4096 / s).max(1)).enumerate().for_each(|(i, o)| f(i, i % c, o));
    } else {
        out.chunks_mut(s).enumerate().for_each(|(i, o)| f(i, i % c, o));
    }
}

multiversion! {
    /// `Σ x` in f64.
    fn sum_f64(x: &[f32]) -> f64 { sum_f64_pairs(x, x, |v, _| v as f64) }
}

multiversion! {
    /// `Σ (x - mean)²` in f64.
    fn sum_sq_dev(x: &[f32], mean: f64) -> f64 { sum_f64_pairs(x, x, |v, _| (v as f64 - mean) * (v as f64 - mean)) }
}

multiversion! {
    /// `Σ (x - mean) dy` in f64.
    fn sum_dev_dot(x: &[f32], dy: &[f32], mean: f64) -> f64 { sum_f64_pairs(x, dy, |x, dy| (x as f64 - mean) * dy as f64) }
}

/// `Σ f(a[i], b[i])` in f64 with eight independent accumulators: float addition is not
/// associative, so a single accumulator would be one serial chain the compiler cannot
/// vectorise. Inlined into each `multiversion!` copy, one AVX-512 register of lanes.
#[inline(always)]
fn sum_f64_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&a, &b)| f(a, b)).sum();
    for (a, b) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(a[l], b[l]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;

    use crate::backend::cpu::test_rand as rand;

    /// The textbook forward in f64: `(y, mean, invstd)`.
    fn naive(x: &[f64], shape: &[usize], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (c, s) = (shape[1], shape[2..].iter().product::<usize>());
        let ch = |i: usize| i / s % c;
        let m = (x.len() / c) as f64;
        let mut mean = vec![0f64; c];
        x.iter().enumerate().for_each(|(i, v)| mean[ch(i)] += v / m);
        let mut var = vec![0f64; c];
        x.iter().enumerate().for_each(|(i, v)| var[ch(i)] += (v - mean[ch(i)]).powi(2) / m);
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let y = x.iter().enumerate().map(|(i, v)| (v - mean[ch(i)]) * invstd[ch(i)] * gamma[ch(i)] + beta[ch(i)]).collect();
        (y, mean, invstd)
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&v| v as f64).collect()
    }

    /// The f64 reference rounded to f32, for `assert_close`.
    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&v| v as f32).collect()
    }

    const SHAPES: [&[usize]; 4] = [&[4, 3, 5, 6], &[8, 5], &[2, 3, 7], &[16, 32, 16, 16]];

    #[test]
    fn forward_matches_naive() {
        for (n, shape) in SHAPES.into_iter().enumerate() {
            let c = shape[1];
            // An offset mean checks that the variance does not cancel away.
            let x: Vec<f32> = rand(shape.iter().product(), n as u64).iter().map(|v| 100.0 + 3.0 * v).collect();
            let (gamma, beta) = (rand(c, 10), rand(c, 11));
            let (y, mean, invstd) = forward_train(&x, shape, &gamma, &beta, 1e-5).unwrap();
            let (wy, wmean, winvstd) = naive(&f64s(&x), shape, &f64s(&gamma), &f64s(&beta), 1e-5);
            assert_close(&mean, &f32s(&wmean), 1e-6, 1e-6, "mean");
            assert_close(&invstd, &f32s(&winvstd), 1e-5, 1e-5, "invstd");
            assert_close(&y, &f32s(&wy), 1e-4, 1e-4, "y");
        }
    }

    #[test]
    fn channel_stats_match_naive_and_their_gradient_is_the_formula() {
        for (n, shape) in SHAPES.into_iter().enumerate() {
            let (c, len) = (shape[1], shape.iter().product::<usize>());
            let m = (len / c) as f64;
            let x: Vec<f32> = rand(len, 20 + n as u64).iter().map(|v| 100.0 + 3.0 * v).collect();
            let stats = channel_stats(&x, shape).unwrap();
            let (_, wmean, winvstd) = naive(&f64s(&x), shape, &vec![1.0; c], &vec![0.0; c], 0.0);
            let wvar: Vec<f64> = winvstd.iter().map(|s| 1.0 / (s * s)).collect();
            assert_close(&stats[..c], &f32s(&wmean), 1e-6, 1e-6, "mean");
            assert_close(&stats[c..], &f32s(&wvar), 1e-5, 1e-5, "var");
            // d(sum(dmean * mean + dvar * var))/dx = dmean / m + dvar * 2 (x - mean) / m
            let dstats = rand(2 * c, 30 + n as u64);
            let dx = channel_stats_backward(&x, shape, &stats, &dstats).unwrap();
            let s = len / shape[0] / c;
            let want: Vec<f64> = (0..len)
                .map(|i| {
                    let ch = i / s % c;
                    dstats[ch] as f64 / m + dstats[c + ch] as f64 * 2.0 * (x[i] as f64 - wmean[ch]) / m
                })
                .collect();
            assert_close(&dx, &f32s(&want), 1e-5, 1e-5, "dx");
        }
    }

    /// The gradients of `sum(y * r)` against central differences of the f64 forward.
    #[test]
    fn backward_matches_finite_differences() {
        for (n, shape) in SHAPES[..3].iter().enumerate() {
            let c = shape[1];
            let x = rand(shape.iter().product(), 20 + n as u64);
            let (gamma, beta, r) = (rand(c, 21), rand(c, 22), rand(x.len(), 23));
            let (_, mean, invstd) = forward_train(&x, shape, &gamma, &beta, 1e-3).unwrap();
            let (dx, dgamma, dbeta) = backward(&x, shape, &r, &mean, &invstd, &gamma).unwrap();
            let (x, gamma, beta, r) = (f64s(&x), f64s(&gamma), f64s(&beta), f64s(&r));
            let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 { naive(x, shape, g, b, 1e-3).0.iter().zip(&r).map(|(y, r)| y * r).sum() };
            let h = 1e-6;
            let fd = |v: &[f64], at: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
                (0..v.len())
                    .map(|i| {
                        let (mut up, mut down) = (v.to_vec(), v.to_vec());
                        up[i] += h;
                        down[i] -= h;
                        (at(&up) - at(&down)) / (2.0 * h)
                    })
                    .collect()
            };
            assert_close(&dx, &f32s(&fd(&x, &|x| loss(x, &gamma, &beta))), 1e-3, 1e-3, "dx");
            assert_close(&dgamma, &f32s(&fd(&gamma, &|g| loss(&x, g, &beta))), 1e-3, 1e-3, "dgamma");
            assert_close(&dbeta, &f32s(&fd(&beta, &|b| loss(&x, &gamma, b))), 1e-3, 1e-3, "dbeta");
        }
    }

    /// The threaded path against the closed-form gradient in f64.
    #[test]
    fn backward_large_matches_formula() {
        let shape = SHAPES[3];
        let (c, s) = (shape[1], 256);
        let x = rand(shape.iter().product(), 30);
        let (gamma, dy) = (rand(c, 31), rand(x.len(), 32));
        let (_, mean, invstd) = forward_train(&x, shape, &gamma, &vec![0.0; c], 1e-5).unwrap();
        let (dx, dgamma, dbeta) = backward(&x, shape, &dy, &mean, &invstd, &gamma).unwrap();
        let m = (x.len() / c) as f64;
        let ch = |i: usize| i / s % c;
        let xhat = |i: usize| (x[i] as f64 - mean[ch(i)] as f64) * invstd[ch(i)] as f64;
        let (mut wdb, mut wdg) = (vec![0f64; c], vec![0f64; c]);
        for i in 0..x.len() {
            wdb[ch(i)] += dy[i] as f64;
            wdg[ch(i)] += dy[i] as f64 * xhat(i);
        }
        let wdx: Vec<f64> =
            (0..x.len()).map(|i| gamma[ch(i)] as f64 * invstd[ch(i)] as f64 / m * (m * dy[i] as f64 - wdb[ch(i)] - xhat(i) * wdg[ch(i)])).collect();
        assert_close(&dbeta, &f32s(&wdb), 1e-5, 1e-5, "dbeta");
        assert_close(&dgamma, &f32s(&wdg), 1e-5, 1e-5, "dgamma");
        assert_close(&dx, &f32s(&wdx), 1e-4, 1e-4, "dx");
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(forward_train(&[0.0; 6], &[6], &[1.0], &[0.0], 1e-5).is_err());
        assert!(forward_train(&[0.0; 6], &[2, 3], &[1.0; 2], &[0.0; 3], 1e-5).is_err());
        assert!(backward(&[0.0; 6], &[2, 3], &[0.0; 5], &[0.0; 3], &[1.0; 3], &[1.0; 3]).is_err());
    }
}
