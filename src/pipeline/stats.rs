//! Statistics of repeated runs: the mean, the sample standard deviation and the 95%
//! confidence interval of the mean (Student's t), used for one variant over several
//! seeds and for the paired differences of two variants on the same seeds.

use serde::Serialize;

/// A sample summarised: `lo..hi` is the 95% confidence interval of the mean. With one
/// value there is no spread to estimate, so `std`, `lo` and `hi` are `None`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Interval {
    pub n: usize,
    pub mean: f64,
    pub std: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

impl Interval {
    /// `xs` summarised; `None` when empty.
    pub fn of(xs: &[f64]) -> Option<Interval> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Some(Interval { n, mean, std: None, lo: None, hi: None });
        }
        let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let half = t_quantile_975(n - 1) * std / (n as f64).sqrt();
        Some(Interval { n, mean, std: Some(std), lo: Some(mean - half), hi: Some(mean + half) })
    }

    /// Whether the interval lies wholly above (1) or below (-1) zero, or covers it (0).
    pub fn sign(&self) -> i32 {
        match (self.lo, self.hi) {
            (Some(lo), _) if lo > 0.0 => 1,
            (_, Some(hi)) if hi < 0.0 => -1,
            _ => 0,
        }
    }

    /// `mean ± half-width` with the interval, e.g. `23.4 ± 3.1 [20.3, 26.5]`, or the
    /// bare mean for one value.
    pub fn show(&self, digits: usize) -> String {
        match (self.lo, self.hi) {
            (Some(lo), Some(hi)) => format!("{:.d$} ± {:.d$} [{:.d$}, {:.d$}]", self.mean, (hi - lo) / 2.0, lo, hi, d = digits),
            _ => format!("{:.d$} (n = 1)", self.mean, d = digits),
        }
    }
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom: the two-sided 95%
/// interval's multiplier. Exact to three decimals from tables up to 30, then the
/// Cornish-Fisher expansion around the normal quantile (error below 1e-3).
pub fn t_quantile_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080,
        2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    assert!(df > 0, "t quantile of 0 degrees of freedom");
    if df <= TABLE.len() {
        return TABLE[df - 1];
    }
    let (z, v) = (1.959_963_985f64, df as f64);
    z + (z.powi(3) + z) / (4.0 * v) + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_and_interval_match_a_hand_computation() {
        // mean 3, sample variance 2.5, half-width 2.776 * sqrt(2.5 / 5)
        let i = Interval::of(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!((i.n, i.mean), (5, 3.0));
        assert!((i.std.unwrap() - 2.5f64.sqrt()).abs() < 1e-12);
        let half = 2.776 * (0.5f64).sqrt();
        assert!((i.lo.unwrap() - (3.0 - half)).abs() < 1e-12 && (i.hi.unwrap() - (3.0 + half)).abs() < 1e-12);
        assert_eq!(i.sign(), 1);
        assert_eq!(Interval::of(&[-1.0, 1.0, -2.0, 2.0]).unwrap().sign(), 0);
        assert_eq!(Interval::of(&[-3.0, -2.0, -4.0]).unwrap().sign(), -1);
    }

    #[test]
    fn one_value_has_no_interval_and_none_has_no_summary() {
        let i = Interval::of(&[7.0]).unwrap();
        assert_eq!((i.mean, i.std, i.lo, i.hi), (7.0, None, None, None));
        assert_eq!(i.sign(), 0);
        assert_eq!(i.show(1), "7.0 (n = 1)");
        assert!(Interval::of(&[]).is_none());
    }

    #[test]
    fn t_quantiles_join_the_table_and_tend_to_the_normal() {
        // published values: df 40 -> 2.021, 60 -> 2.000, 120 -> 1.980
        for (df, t) in [(40, 2.021), (60, 2.000), (120, 1.980)] {
            assert!((t_quantile_975(df) - t).abs() < 1e-3, "df {df}: {}", t_quantile_975(df));
        }
        assert!((t_quantile_975(31) - 2.040).abs() < 1e-3);
        assert!((t_quantile_975(100_000) - 1.96).abs() < 1e-3);
    }
}
