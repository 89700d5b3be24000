//! Layers that own tensors, and the `Module` trait that names those tensors exactly as
//! PyTorch's `state_dict` does, so checkpoints move between the two unchanged.
//!
//! - Parameters are leaf tensors with `requires_grad`; the optimiser updates them in place.
//! - Buffers (BatchNorm running statistics, spectral-norm vectors) are plain tensors
//!   updated in place with `Tensor::assign`.
//! - Stateless ops (relu, leaky_relu, max/avg pooling) stay `Tensor` methods: a layer
//!   type exists only where there is state to own and name.
//! - Train vs eval is not stored in the layers: every forward that depends on it takes a
//!   `Ctx`, so the mode is visible where the model is called and one model can run in
//!   both modes (e.g. a frozen teacher in eval next to a training student).

mod batch_norm;
mod conv;
mod dropout;
pub mod ema;
pub mod init;
mod linear;
mod spectral_norm;

pub use batch_norm::BatchNorm2d;
pub use conv::{Conv2d, ConvTranspose2d};
pub use dropout::Dropout;
pub use linear::Linear;
pub use spectral_norm::{SpectralNorm, Weighted};

use crate::{Device, Error, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether a named tensor is trained or only tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    Parameter,
    Buffer,
}

/// One named piece of module state, as `Module::visit` reports it.
pub enum Slot<'a> {
    Parameter(&'a Tensor),
    Buffer(&'a Tensor),
    /// A host-side integer that PyTorch stores as an int64 scalar tensor
    /// (BatchNorm's `num_batches_tracked`). Kept on the host so that counting batches
    /// never touches the device.
    Counter(&'a Counter),
}

/// A host-side counter (see `Slot::Counter`). Atomic so that forward can take `&self`.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed)
    }
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// `prefix.name`, or `name` at the root: how PyTorch builds state_dict keys.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Anything that owns named tensors. Implementations only list their state in
/// `visit`; everything else (parameter lists, freezing, checkpoints) is built on it.
pub trait Module {
    /// Calls `f` on every tensor and counter with its full state_dict key under `prefix`
    /// (`""` at the root), in PyTorch's registration order.
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>));

    /// The trainable tensors, in state_dict order (what an optimiser is given).
    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters().into_iter().map(|(_, t)| t).collect()
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        self.visit("", &mut |name, slot| {
            if let Slot::Parameter(t) = slot {
                out.push((name.to_string(), t.clone()));
            }
        });
        out
    }

    /// Parameters and buffers with their kind (counters are not tensors and are left out).
    fn named_tensors(&self) -> Vec<(String, Tensor, TensorKind)> {
        let mut out = vec![];
        self.visit("", &mut |name, slot| match slot {
            Slot::Parameter(t) => out.push((name.to_string(), t.clone(), TensorKind::Parameter)),
            Slot::Buffer(t) => out.push((name.to_string(), t.clone(), TensorKind::Buffer)),
            Slot::Counter(_) => {}
        });
        out
    }

    /// Number of trainable scalars (what PyTorch's `sum(p.numel() for p in parameters())` counts).
    fn num_parameters(&self) -> usize {
        self.parameters().iter().map(|t| t.elem_count()).sum()
    }

    /// Moves every parameter and buffer to `device` in place (layers are built on the
    /// CPU). Tensors keep their ids, so an optimiser made before the move still finds
    /// its parameters; its state must not exist yet (move before the first step).
    fn to_device(&self, device: Device) -> Result<()> {
        let mut result = Ok(());
        self.visit("", &mut |name, slot| {
            let t = match slot {
                Slot::Parameter(t) | Slot::Buffer(t) => t,
                Slot::Counter(_) => return,
            };
            if result.is_ok() {
                result = t.move_to(device).map_err(|e| Error::Msg(format!("moving `{name}` to {device}: {e}")));
            }
        });
        result
    }

    /// `frozen = true` turns `requires_grad` off on every parameter: gradients still flow
    /// *through* the module to its input (the generator step backpropagates through a
    /// frozen teacher and student), but none are kept for the module's own weights.
    fn freeze(&self, frozen: bool) -> Result<()> {
        self.parameters().iter().try_for_each(|p| p.set_requires_grad(!frozen))
    }
}

/// State threaded through one forward pass: the mode, and optionally a record of the
/// input of every BatchNorm layer (for the BN-statistics loss of DeepInversion/DFKD).
/// Recording keeps Arc clones of tensors the pass computes anyway; it is opt-in only
/// because in a no-grad evaluation it would keep every activation alive.
#[derive(Default)]
pub struct Ctx {
    pub train: bool,
    recording: bool,
    bn_inputs: Vec<Tensor>,
    bn_running: Vec<(Tensor, Tensor)>,
}

impl Ctx {
    pub fn new(train: bool) -> Ctx {
        Ctx { train, ..Ctx::default() }
    }
    pub fn train() -> Ctx {
        Ctx::new(true)
    }
    pub fn eval() -> Ctx {
        Ctx::new(false)
    }
    /// A context that also records BatchNorm inputs.
    pub fn recording(train: bool) -> Ctx {
        Ctx { train, recording: true, ..Ctx::default() }
    }

    /// Called by `BatchNorm2d::forward` with its input and its running statistics.
    pub fn record_bn(&mut self, input: &Tensor, running_mean: &Tensor, running_var: &Tensor) {
        if self.recording {
            self.bn_inputs.push(input.clone());
            self.bn_running.push((running_mean.clone(), running_var.clone()));
        }
    }

    /// The recorded BN inputs and the (running_mean, running_var) of the layer that
    /// consumed each, in forward order; leaves the record empty.
    pub fn take_bn_records(&mut self) -> (Vec<Tensor>, Vec<(Tensor, Tensor)>) {
        (std::mem::take(&mut self.bn_inputs), std::mem::take(&mut self.bn_running))
    }
}
