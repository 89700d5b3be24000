//! An average of a model's weights, kept beside the training and swapped in at the
//! end: exponential and moving (timm's `ModelEmaV2`, TensorFlow's
//! `ExponentialMovingAverage`), or equal over the snapshots given (stochastic weight
//! averaging, PyTorch's `swa_utils.AveragedModel`). Every parameter *and* buffer
//! (BatchNorm running statistics) is averaged; an equal average over distant snapshots
//! then wants its statistics recomputed (`pipeline::teacher`).

use crate::nn::{ema, Module};
use crate::{bail, no_grad, Result, Tensor};

/// The average of every parameter and buffer of one module, held beside it on its
/// device (updated by tensor ops, as `nn::ema`: no copy to the host per step).
pub struct WeightAverage {
    /// The exponential decay; `None`: an equal average of every update.
    decay: Option<f32>,
    updates: u64,
    /// Each tensor (the live one, written by `swap`), its state_dict name, and its average.
    slots: Vec<(Tensor, String, Tensor)>,
}

impl WeightAverage {
    /// Starts the average at `module`'s current values. `decay` in [0, 1).
    pub fn new(module: &dyn Module, decay: f32) -> Result<WeightAverage> {
        if !(0.0..1.0).contains(&decay) {
            bail!("the weight average's decay must lie in [0, 1), not {decay}");
        }
        WeightAverage::start(module, Some(decay))
    }

    /// An equal average of the values at each `update` (the starting values count
    /// only until the first update replaces them).
    pub fn equal(module: &dyn Module) -> Result<WeightAverage> {
        WeightAverage::start(module, None)
    }

    fn start(module: &dyn Module, decay: Option<f32>) -> Result<WeightAverage> {
        let slots = module.named_tensors().into_iter().map(|(name, t, _)| Ok((t.clone(), name, t.deep_copy()?))).collect::<Result<Vec<_>>>()?;
        Ok(WeightAverage { decay, updates: 0, slots })
    }

    /// The decay of the next update: `min(decay, (1 + k) / (10 + k))` after k updates
    /// (TensorFlow's `num_updates` warm-up), so early updates weigh the new weights
    /// heavily and the starting point is soon forgotten; over a short run the average
    /// spans about its last tenth. An equal average: `k / (k + 1)`.
    pub fn next_decay(&self) -> f32 {
        let k = self.updates as f64;
        match self.decay {
            Some(decay) => (decay as f64).min((1.0 + k) / (10.0 + k)) as f32,
            None => (k / (k + 1.0)) as f32,
        }
    }

    /// Updates made so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// `average = d * average + (1 - d) * live` for every tensor, `d` = `next_decay()`.
    pub fn update(&mut self) -> Result<()> {
        let d = self.next_decay();
        no_grad(|| self.slots.iter().try_for_each(|(t, _, avg)| ema::blend(avg, t, d)))?;
        self.updates += 1;
        Ok(())
    }

    /// Exchanges the module's values with the average: afterwards the module holds the
    /// average and this holds what the module held (a second call swaps back).
    pub fn swap(&mut self) -> Result<()> {
        for (t, _, avg) in &self.slots {
            let held = avg.deep_copy()?;
            avg.assign(t)?;
            t.assign(&held)?;
        }
        Ok(())
    }

    /// The held values by state_dict name, in the module's order, on the host.
    pub fn values(&self) -> Result<Vec<(&str, Vec<f32>)>> {
        self.slots.iter().map(|(_, n, v)| Ok((n.as_str(), v.to_vec_f32()?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::BatchNorm2d;
    use crate::Device;

    fn values(m: &dyn Module) -> Vec<Vec<f32>> {
        m.named_tensors().iter().map(|(_, t, _)| t.to_vec_f32().unwrap()).collect()
    }

    fn set(bn: &BatchNorm2d, w: [f32; 2], b: [f32; 2], mean: [f32; 2], var: [f32; 2]) {
        for (t, v) in [(&bn.weight, w), (&bn.bias, b), (&bn.running_mean, mean), (&bn.running_var, var)] {
            t.assign(&Tensor::from_vec(v.to_vec(), &[2], Device::Cpu).unwrap()).unwrap();
        }
    }

    /// Three updates against a hand computation, parameters and buffers alike, the
    /// decay's warm-up included; then the swap and its inverse.
    #[test]
    fn averages_parameters_and_buffers_by_hand() {
        let bn = BatchNorm2d::new(2).unwrap();
        set(&bn, [1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]);
        let mut avg = WeightAverage::new(&bn, 0.5).unwrap();
        // decays: min(0.5, 1/10) = 0.1, min(0.5, 2/11) = 2/11, then min(0.5, 3/12) = 0.25
        assert_eq!(avg.next_decay(), 0.1);
        set(&bn, [3.0, 4.0], [1.0, -1.0], [10.0, 0.0], [2.0, 4.0]);
        avg.update().unwrap();
        assert!((avg.next_decay() - 2.0 / 11.0).abs() < 1e-7);
        set(&bn, [5.0, 0.0], [2.0, 2.0], [0.0, 20.0], [3.0, 1.0]);
        avg.update().unwrap();
        assert_eq!(avg.next_decay(), 0.25);
        set(&bn, [7.0, 8.0], [0.0, 4.0], [0.0, 0.0], [1.0, 1.0]);
        avg.update().unwrap();
        assert_eq!(avg.updates(), 3);
        // by hand, in f64: a1 = 0.1 a0 + 0.9 x1; a2 = 2/11 a1 + 9/11 x2; a3 = 0.25 a2 + 0.75 x3
        let hand = |a0: f64, x1: f64, x2: f64, x3: f64| {
            let a1 = 0.1 * a0 + 0.9 * x1;
            let a2 = 2.0 / 11.0 * a1 + 9.0 / 11.0 * x2;
            0.25 * a2 + 0.75 * x3
        };
        let want = [
            [hand(1.0, 3.0, 5.0, 7.0), hand(2.0, 4.0, 0.0, 8.0)],
            [hand(0.0, 1.0, 2.0, 0.0), hand(0.0, -1.0, 2.0, 4.0)],
            [hand(0.0, 10.0, 0.0, 0.0), hand(0.0, 0.0, 20.0, 0.0)],
            [hand(1.0, 2.0, 3.0, 1.0), hand(1.0, 4.0, 1.0, 1.0)],
        ];
        let names: Vec<&str> = avg.values().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight", "bias", "running_mean", "running_var"]);
        for ((_, got), want) in avg.values().unwrap().into_iter().zip(&want) {
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
        let last = values(&bn);
        let averaged: Vec<Vec<f32>> = avg.values().unwrap().into_iter().map(|(_, v)| v).collect();
        avg.swap().unwrap();
        assert_eq!(values(&bn), averaged);
        assert_eq!(avg.values().unwrap().into_iter().map(|(_, v)| v).collect::<Vec<_>>(), last);
        avg.swap().unwrap();
        assert_eq!(values(&bn), last);
    }

    /// The equal average of three snapshots is their mean (the starting values left out).
    #[test]
    fn an_equal_average_is_the_mean_of_the_updates() {
        let bn = BatchNorm2d::new(2).unwrap();
        set(&bn, [100.0, 100.0], [100.0, 100.0], [100.0, 100.0], [100.0, 100.0]);
        let mut avg = WeightAverage::equal(&bn).unwrap();
        for (i, x) in [[1.0, -2.0], [4.0, 0.5], [7.0, 3.0]].into_iter().enumerate() {
            assert!((avg.next_decay() - i as f32 / (i as f32 + 1.0)).abs() < 1e-7);
            set(&bn, x, [x[1], x[0]], [2.0 * x[0], 0.0], [x[0].abs(), 1.0]);
            avg.update().unwrap();
        }
        let want = [[4.0, 0.5], [0.5, 4.0], [8.0, 0.0], [4.0, 1.0]];
        for ((_, got), want) in avg.values().unwrap().into_iter().zip(&want) {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn refuses_a_decay_outside_the_unit_interval() {
        let bn = BatchNorm2d::new(1).unwrap();
        assert!(WeightAverage::new(&bn, 1.0).is_err());
        assert!(WeightAverage::new(&bn, -0.1).is_err());
        assert!(WeightAverage::new(&bn, 0.0).is_ok());
    }
}
