//! Vectorisable math for the fused CPU loops. `std`'s `exp` calls libm one value at a
//! time, which keeps a loop around it scalar; `exp` here is branch-free f32 arithmetic
//! and bit operations that the compiler turns into SIMD. `multiversion!` compiles a
//! function three times, for baseline x86-64 (SSE2, 4 lanes), AVX2+FMA (8 lanes) and
//! AVX-512 (16 lanes), and picks at run time: the crate is built without
//! `-C target-cpu`. The loops are written lane by lane (reductions keep `LANES`
//! explicit accumulators, and no multiply-add is contracted), so every variant gives
//! the same bits.

/// e^x with a relative error under 2e-7 (Cephes' `expf`: Cody-Waite reduction by ln 2,
/// a degree-6 polynomial, the exponent written into the float's bits). Below -87.34
/// the result flushes to 0 (libm gives denormals there); above 88.72 it is +inf; NaN
/// stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.722_83;
    // round(x * log2(e)) by the 1.5 * 2^23 trick: no libm `floor` call, and the
    // integer lands in the low mantissa bits of `t`
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // 2^n: t's bits are 0x4b40_0000 + n
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4b40_0000 - 127) << 23);
    if x < LO {
        0.0
    } else {
        e * scale
    }
}

/// `1 / (1 + e^-x)`, as `UnaryOp::Sigmoid`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Defines a function whose body is compiled for baseline x86-64, for AVX2+FMA and
/// for AVX-512 (F, BW, VL), the widest the CPU has being used. The body must be safe
/// code; bodies of closures it calls are inlined into each copy.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])* #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($a: $t),*) $(-> $r)? { body($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) $(-> $r)? { body($($a),*) }
                if $crate::backend::cpu::simd::has_avx512() {
                    // SAFETY: `avx512` only needs the CPU features just detected.
                    return unsafe { avx512($($a),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: `avx2` only needs the CPU features just detected.
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// Whether the CPU has the AVX-512 subsets `multiversion!`'s widest variant needs.
/// `DFKD_NO_AVX512=1` turns it off (to compare the variants).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("DFKD_NO_AVX512").is_none()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("fma")
    })
}

/// Lanes of the independent accumulators the vectorised reductions keep (two AVX2
/// registers): a single running sum would serialise on the add latency.
pub const LANES: usize = 16;

/// `acc[i % LANES]` folds element i; `tree` then combines the lanes (deterministic).
#[inline(always)]
pub fn fold_lanes(x: &[f32], init: f32, mut f: impl FnMut(f32, f32) -> f32) -> [f32; LANES] {
    let mut acc = [init; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = f(acc[i], c[i]);
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        acc[i] = f(acc[i], v);
    }
    acc
}

/// Combines the lanes pairwise (4 levels, not 15 dependent steps: this fixed cost is
/// per plane, and planes of 4x4 are common).
#[inline(always)]
pub fn tree(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            acc[i] = f(acc[i], acc[i + n]);
        }
    }
    acc[0]
}

multiversion! {
    /// The sum of `x` in [`LANES`] interleaved partial sums combined by [`tree`]: the
    /// compiler vectorises it (a plain `iter().sum()` may not reassociate, so it stays
    /// one dependent add per element), and the order is fixed, so results repeat.
    pub fn sum(x: &[f32]) -> f32 { tree(fold_lanes(x, 0.0, |a, v| a + v), |a, b| a + b) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.36e-4; // [-87.2, 87.2]
            let (got, want) = (super::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "relative error {worst}");
        // flushed to 0 where libm gives denormals
        assert!((-1040..-874).all(|i| {
            let x = i as f32 * 0.1;
            super::exp(x) == 0.0 && x.exp() < 1.2e-38
        }));
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(super::exp(0.0), 1.0);
    }
}
