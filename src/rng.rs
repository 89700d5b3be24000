//! A small deterministic PRNG (xoshiro256**, seeded through splitmix64). The project
//! owns its generator so that "same seed, same numbers" holds across crate upgrades.

#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// The full generator state, to checkpoint a run and resume it exactly.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }
    pub fn from_state(s: [u64; 4]) -> Rng {
        Rng { s }
    }

    /// An independent stream derived from this seed and a label (e.g. a class index).
    pub fn fork(&self, label: u64) -> Rng {
        Rng::new(self.s[0] ^ label.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Gamma(shape, 1) (Marsaglia and Tsang, 2000), for any shape > 0: below 1 through
    /// `Gamma(a) = Gamma(a + 1) * U^(1/a)`.
    pub fn gamma(&mut self, shape: f32) -> f32 {
        assert!(shape > 0.0 && shape.is_finite(), "gamma: shape {shape} must be positive and finite");
        if shape < 1.0 {
            let boost = (self.uniform() as f64).max(f64::MIN_POSITIVE).powf(1.0 / shape as f64);
            return (self.gamma(shape + 1.0) as f64 * boost) as f32;
        }
        let d = shape as f64 - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal() as f64;
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = (self.uniform() as f64).max(f64::MIN_POSITIVE);
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return (d * v) as f32;
            }
        }
    }

    /// A draw from the Dirichlet distribution with these concentrations (all > 0): a
    /// probability vector whose mean is `alpha / sum(alpha)`.
    pub fn dirichlet(&mut self, alpha: &[f32]) -> Vec<f32> {
        let g: Vec<f64> = alpha.iter().map(|&a| self.gamma(a) as f64).collect();
        let sum: f64 = g.iter().sum();
        if sum > 0.0 {
            g.iter().map(|&x| (x / sum) as f32).collect()
        } else {
            // every component underflowed (all concentrations tiny): the largest wins
            let top = alpha.iter().enumerate().fold(0, |b, (i, &a)| if a > alpha[b] { i } else { b });
            (0..alpha.len()).map(|i| if i == top { 1.0 } else { 0.0 }).collect()
        }
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;
    #[test]
    fn deterministic_and_roughly_normal() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let xs: Vec<f32> = (0..20000).map(|_| a.normal()).collect();
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        assert!((0..1000).all(|_| a.below(10) < 10));
    }

    #[test]
    fn gamma_and_dirichlet_have_their_moments() {
        let mut r = Rng::new(3);
        // Gamma(k, 1) has mean k and variance k, above and below shape 1
        for k in [0.3f32, 1.0, 4.5] {
            let xs: Vec<f64> = (0..40000).map(|_| r.gamma(k) as f64).collect();
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
            assert!((mean - k as f64).abs() < 0.03 * k as f64 + 0.01, "gamma({k}) mean {mean}");
            assert!((var - k as f64).abs() < 0.1 * k as f64 + 0.02, "gamma({k}) var {var}");
            assert!(xs.iter().all(|&x| x >= 0.0));
        }
        // Dirichlet(alpha): sums to 1, mean alpha / sum(alpha)
        let alpha = [2.0f32, 0.5, 1.0, 0.1];
        let mut mean = [0f64; 4];
        let n = 20000;
        for _ in 0..n {
            let p = r.dirichlet(&alpha);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            for (m, x) in mean.iter_mut().zip(&p) {
                *m += *x as f64 / n as f64;
            }
        }
        let total: f32 = alpha.iter().sum();
        for (m, a) in mean.iter().zip(alpha) {
            assert!((m - (a / total) as f64).abs() < 0.01, "dirichlet mean {mean:?}");
        }
    }
}
