//! Weight initialisations, matching PyTorch's so that a model built here starts from
//! the same distribution as its PyTorch twin. All draw from `crate::rng::Rng`.

use crate::rng::Rng;
use crate::{Device, Result, Tensor};

/// `fan_in` as PyTorch computes it: `shape[1] * prod(shape[2..])`. For conv weights
/// `[c_out, c_in/g, k, k]` that is `c_in/g * k * k`; for a transposed conv's
/// `[c_in, c_out/g, k, k]` PyTorch also reads dim 1, i.e. `c_out/g * k * k`.
pub fn fan_in(shape: &[usize]) -> usize {
    shape[1] * shape[2..].iter().product::<usize>()
}

/// `fan_out` as PyTorch computes it: `shape[0] * prod(shape[2..])` (no division by groups).
pub fn fan_out(shape: &[usize]) -> usize {
    shape[0] * shape[2..].iter().product::<usize>()
}

/// A leaf that requires grad.
pub fn param(t: Tensor) -> Result<Tensor> {
    t.set_requires_grad(true)?;
    Ok(t)
}

/// PyTorch's default for conv and linear layers. `kaiming_uniform_(a = sqrt(5))` gives
/// bound `gain * sqrt(3 / fan_in)` with `gain = sqrt(2 / (1 + 5))`, i.e. `1 / sqrt(fan_in)`;
/// the bias uses the same bound.
pub fn default_uniform(shape: &[usize], fan_in: usize, rng: &mut Rng) -> Result<Tensor> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    Tensor::rand(shape, -bound, bound, rng, Device::Cpu)
}

/// torchvision's conv init: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`,
/// std `sqrt(2 / fan_out)`.
pub fn kaiming_normal_fan_out(shape: &[usize], rng: &mut Rng) -> Result<Tensor> {
    let std = (2.0 / fan_out(shape) as f32).sqrt();
    Tensor::randn(shape, 0.0, std, rng, Device::Cpu)
}
