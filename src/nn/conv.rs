//! Convolution layers with PyTorch's weight layouts and default initialisation.

use super::init::{default_uniform, fan_in, kaiming_normal_fan_out, param};
use super::{join, Module, Slot};
use crate::rng::Rng;
use crate::{ConvOpts, Result, Tensor};

/// `nn.Conv2d`: weight `[c_out, c_in / groups, k, k]`, optional bias `[c_out]`.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub opts: ConvOpts,
}

impl Conv2d {
    /// PyTorch's default initialisation (see `init::default_uniform`).
    pub fn new(c_in: usize, c_out: usize, k: usize, opts: ConvOpts, bias: bool, rng: &mut Rng) -> Result<Conv2d> {
        let shape = [c_out, c_in / opts.groups, k, k];
        let fi = fan_in(&shape);
        let weight = default_uniform(&shape, fi, rng)?;
        let bias = if bias { Some(default_uniform(&[c_out], fi, rng)?) } else { None };
        Conv2d::from_tensors(weight, bias, opts)
    }

    /// torchvision's initialisation for ResNet/MobileNet/WRN convs: no bias,
    /// Kaiming-normal weights scaled by fan-out.
    pub fn kaiming(c_in: usize, c_out: usize, k: usize, opts: ConvOpts, rng: &mut Rng) -> Result<Conv2d> {
        let weight = kaiming_normal_fan_out(&[c_out, c_in / opts.groups, k, k], rng)?;
        Conv2d::from_tensors(weight, None, opts)
    }

    /// Wraps given tensors, marking them as parameters.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, opts: ConvOpts) -> Result<Conv2d> {
        Ok(Conv2d { weight: param(weight)?, bias: bias.map(param).transpose()?, opts })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_weight(x, &self.weight)
    }

    /// The same convolution with another weight (spectral norm substitutes `W / sigma`).
    pub fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.conv2d(w, self.bias.as_ref(), self.opts)
    }
}

impl Module for Conv2d {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Parameter(&self.weight));
        if let Some(b) = &self.bias {
            f(&join(prefix, "bias"), Slot::Parameter(b));
        }
    }
}

/// `nn.ConvTranspose2d`: weight `[c_in, c_out / groups, k, k]`, optional bias `[c_out]`.
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub opts: ConvOpts,
    pub output_padding: (usize, usize),
}

impl ConvTranspose2d {
    /// PyTorch's default initialisation; fan-in is read from weight dim 1 as PyTorch does.
    pub fn new(c_in: usize, c_out: usize, k: usize, opts: ConvOpts, output_padding: usize, bias: bool, rng: &mut Rng) -> Result<ConvTranspose2d> {
        let shape = [c_in, c_out / opts.groups, k, k];
        let fi = fan_in(&shape);
        let weight = default_uniform(&shape, fi, rng)?;
        let bias = if bias { Some(param(default_uniform(&[c_out], fi, rng)?)?) } else { None };
        Ok(ConvTranspose2d { weight: param(weight)?, bias, opts, output_padding: (output_padding, output_padding) })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_weight(x, &self.weight)
    }

    pub fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.conv_transpose2d(w, self.bias.as_ref(), self.opts, self.output_padding)
    }
}

impl Module for ConvTranspose2d {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Parameter(&self.weight));
        if let Some(b) = &self.bias {
            f(&join(prefix, "bias"), Slot::Parameter(b));
        }
    }
}
