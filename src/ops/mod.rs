//! Differentiable tensor ops, one family per file. Each op computes its forward through
//! `Storage` (so it runs on any backend) and records a backward closure built from
//! other tensor ops. The backward rule of every op is checked against finite
//! differences in `tests/gradcheck.rs`.

mod conv;
mod elementwise;
mod loss;
mod matmul;
mod norm;
mod pool;
mod reduce;
mod softmax;
mod views;

pub use conv::ConvOpts;
pub use loss::Reduction;

use crate::autograd::{is_grad_enabled, Node};
use crate::backend::Storage;
use crate::{Layout, Result, Tensor};
use std::sync::{Arc, RwLock};

/// Wraps a fresh contiguous result; records `backward` when any input is tracked.
pub(crate) fn from_op(
    storage: Storage,
    shape: &[usize],
    name: &'static str,
    inputs: &[&Tensor],
    backward: impl FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    Tensor::from_parts(Arc::new(RwLock::new(storage)), Layout::contiguous(shape), node(name, inputs, backward))
}

/// Like `from_op`, for backward rules that need the result `y` itself (exp, sigmoid...):
/// `make(y)` builds the closure from a node-less handle on the result's storage, so the
/// graph holds no cycle.
pub(crate) fn from_op_saving_output<F>(storage: Storage, shape: &[usize], name: &'static str, inputs: &[&Tensor], make: impl FnOnce(Tensor) -> F) -> Tensor
where
    F: FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
{
    let storage = Arc::new(RwLock::new(storage));
    let layout = Layout::contiguous(shape);
    let y = Tensor::from_parts(storage.clone(), layout.clone(), None);
    Tensor::from_parts(storage, layout, node(name, inputs, make(y)))
}

/// `result`, computed outside the op table (a collective), with a backward rule from
/// its gradient to the gradients of `inputs`.
pub(crate) fn with_backward(
    result: &Tensor,
    name: &'static str,
    inputs: &[&Tensor],
    backward: impl FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    Tensor::from_parts(result.storage_arc().clone(), result.layout().clone(), node(name, inputs, backward))
}

/// A result that is a view on `input`'s storage.
pub(crate) fn view_op(
    input: &Tensor,
    layout: Layout,
    name: &'static str,
    backward: impl FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    Tensor::from_parts(input.storage_arc().clone(), layout, node(name, &[input], backward))
}

fn node(
    name: &'static str,
    inputs: &[&Tensor],
    backward: impl FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Option<Node> {
    (is_grad_enabled() && inputs.iter().any(|t| t.tracks_grad())).then(|| Node::new(name, inputs.iter().map(|t| (*t).clone()).collect(), Box::new(backward)))
}
