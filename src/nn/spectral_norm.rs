//! Spectral normalisation, as `torch.nn.utils.spectral_norm`: the layer computes with
//! `W / sigma(W)`, where sigma is estimated by power iteration on the weight viewed as a
//! matrix `[rows, -1]` (rows = weight dim `DIM`). Names match PyTorch's state_dict:
//! `weight_orig` (the parameter), `weight_u` `[rows]` and `weight_v` `[cols]` (buffers).
//!
//! Each training forward runs one power iteration (no grad) and stores u, v; evaluation
//! reuses them. The gradient flows through `W / sigma` with `sigma = u^T W v` as a
//! function of W and u, v held constant, which is what PyTorch differentiates.

use super::{join, Conv2d, ConvTranspose2d, Ctx, Linear, Module, Slot};
use crate::autograd::no_grad;
use crate::rng::Rng;
use crate::{Device, Result, Tensor};

/// PyTorch's default `eps` for the normalisations inside the power iteration.
const EPS: f32 = 1e-12;

/// A layer whose weight spectral norm can replace.
pub trait Weighted: Module {
    /// The weight dim that becomes the matrix rows: 0 for conv and linear, 1 for
    /// transposed conv (PyTorch's choice, so that rows are output channels).
    const DIM: usize;
    fn weight(&self) -> &Tensor;
    fn bias(&self) -> Option<&Tensor>;
    fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor>;
}

impl Weighted for Conv2d {
    const DIM: usize = 0;
    fn weight(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Conv2d::forward_with_weight(self, x, w)
    }
}

impl Weighted for ConvTranspose2d {
    const DIM: usize = 1;
    fn weight(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        ConvTranspose2d::forward_with_weight(self, x, w)
    }
}

impl Weighted for Linear {
    const DIM: usize = 0;
    fn weight(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn forward_with_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Linear::forward_with_weight(self, x, w)
    }
}

pub struct SpectralNorm<L: Weighted> {
    pub inner: L,
    pub u: Tensor,
    pub v: Tensor,
}

impl<L: Weighted> SpectralNorm<L> {
    /// Wraps `inner`; u and v start as normalised Gaussian vectors, as in PyTorch.
    pub fn new(inner: L, rng: &mut Rng) -> Result<Self> {
        let (rows, cols) = Self::matrix_dims(inner.weight());
        let u = Tensor::randn(&[rows], 0.0, 1.0, rng, Device::Cpu)?.l2_normalize(0, EPS)?;
        let v = Tensor::randn(&[cols], 0.0, 1.0, rng, Device::Cpu)?.l2_normalize(0, EPS)?;
        Ok(SpectralNorm { inner, u, v })
    }

    fn matrix_dims(w: &Tensor) -> (usize, usize) {
        let rows = w.dims()[L::DIM];
        (rows, w.elem_count() / rows)
    }

    /// The weight as a `[rows, cols]` matrix, differentiable.
    fn weight_matrix(&self) -> Result<Tensor> {
        let w = self.inner.weight();
        let (rows, cols) = Self::matrix_dims(w);
        let w = if L::DIM == 0 { w.clone() } else { w.transpose(0, L::DIM)? };
        w.reshape(&[rows, cols])
    }

    /// `W / sigma`. In training mode first runs one power iteration and updates u, v.
    pub fn weight(&self, train: bool) -> Result<Tensor> {
        let mat = self.weight_matrix()?;
        let (rows, cols) = (mat.dims()[0], mat.dims()[1]);
        // Fresh copies, never the buffers themselves: the graph built below keeps u and
        // v for backward, and the next training forward overwrites the buffers.
        let (u, v) = if train {
            no_grad(|| -> Result<(Tensor, Tensor)> {
                let m = mat.detach();
                let v = m.t()?.matmul(&self.u.reshape(&[rows, 1])?)?.reshape(&[cols])?.l2_normalize(0, EPS)?;
                let u = m.matmul(&v.reshape(&[cols, 1])?)?.reshape(&[rows])?.l2_normalize(0, EPS)?;
                self.u.assign(&u)?;
                self.v.assign(&v)?;
                Ok((u.detach(), v.detach()))
            })?
        } else {
            (self.u.deep_copy()?, self.v.deep_copy()?)
        };
        let sigma = u.reshape(&[1, rows])?.matmul(&mat)?.matmul(&v.reshape(&[cols, 1])?)?.reshape(&[])?;
        self.inner.weight().div(&sigma)
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.inner.forward_with_weight(x, &self.weight(ctx.train)?)
    }
}

impl<L: Weighted> Module for SpectralNorm<L> {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        if let Some(b) = self.inner.bias() {
            f(&join(prefix, "bias"), Slot::Parameter(b));
        }
        f(&join(prefix, "weight_orig"), Slot::Parameter(self.inner.weight()));
        f(&join(prefix, "weight_u"), Slot::Buffer(&self.u));
        f(&join(prefix, "weight_v"), Slot::Buffer(&self.v));
    }
}
