//! dfkd: a tensor engine with reverse-mode autograd, a CPU reference backend and CUDA
//! kernels, and on it data-free knowledge distillation for fine-grained visual
//! categorization (DFKD-FGVC).

// The CPU kernels index register-blocked accumulators and shapes by position on
// purpose: the loops unroll over fixed counts, and iterator forms of them spilled.
#![allow(clippy::needless_range_loop)]

pub mod allocator;
pub mod backend;
pub mod data;
mod device;
mod dtype;
mod error;
pub mod failpoint;
pub mod fused;
mod layout;
pub mod profile;
pub mod rng;

pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use layout::{broadcast_shape, Layout};
pub mod autograd;
pub mod ops;
mod tensor;
// Tensor::from_ndarray / to_ndarray; the ndarray version they take is re-exported
mod arrays;
pub use ndarray;

pub use autograd::{no_grad, Gradients};
pub use ops::{ConvOpts, Reduction};
pub use tensor::{Tensor, TensorId};
pub mod checkpoint;
pub mod commands;
pub mod models;
pub mod nn;
pub mod optim;
pub mod parallel;
pub mod pipeline;

pub mod testing;
