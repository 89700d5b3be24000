//! `nn.Linear`: weight `[out, in]`, optional bias `[out]`.

use super::init::{default_uniform, param};
use super::{join, Module, Slot};
use crate::rng::Rng;
use crate::{Result, Tensor};

pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// PyTorch's default initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    pub fn new(d_in: usize, d_out: usize, bias: bool, rng: &mut Rng) -> Result<Linear> {
        let weight = default_uniform(&[d_out, d_in], d_in, rng)?;
        let bias = if bias { Some(default_uniform(&[d_out], d_in, rng)?) } else { None };
        Linear::from_tensors(weight, bias)
    }

    /// Wraps given tensors, marking them as parameters.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        Ok(Linear { weight: param(weight)?, bias: bias.map(param).transpose()? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_weight(x, &self.weight)
    }

    pub fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.linear(w, self.bias.as_ref())
    }
}

impl Module for Linear {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Parameter(&self.weight));
        if let Some(b) = &self.bias {
            f(&join(prefix, "bias"), Slot::Parameter(b));
        }
    }
}
