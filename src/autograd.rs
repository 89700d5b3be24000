//! Reverse-mode automatic differentiation over a dynamic graph.
//!
//! Each op result that depends on a tracked tensor carries a `Node`: its inputs and a
//! one-shot closure mapping the output gradient to the inputs' gradients. `backward`
//! orders the graph topologically, runs the closures in reverse, adds up gradients of
//! tensors used more than once, and takes each closure as it runs, so the saved
//! activations are freed during the pass (a second backward through the same graph is
//! an error, as in PyTorch). Backward closures are built from tensor ops, so every
//! backend differentiates the same way.

use crate::{bail, Result, Tensor, TensorId};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Maps the output gradient (and which inputs need one) to the inputs' gradients.
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

pub struct Node {
    name: &'static str,
    saved: Mutex<Option<(Vec<Tensor>, BackwardFn)>>,
}

impl Node {
    pub fn new(name: &'static str, inputs: Vec<Tensor>, f: BackwardFn) -> Node {
        Node { name, saved: Mutex::new(Some((inputs, f))) }
    }
    pub fn name(&self) -> &'static str { self.name }
    fn inputs(&self) -> Option<Vec<Tensor>> {
        self.saved.lock().unwrap().as_ref().map(|(i, _)| i.clone())
    }
    fn take(&self) -> Option<(Vec<Tensor>, BackwardFn)> { self.saved.lock().unwrap().take() }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record the graph.
pub fn is_grad_enabled() -> bool { GRAD_ENABLED.with(|g| g.get()) }

/// Runs `f` without recording the graph (evaluation, optimiser updates, statistics).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Disables graph recording until dropped.
pub struct NoGradGuard(bool);
impl NoGradGuard {
    pub fn new() -> Self { NoGradGuard(GRAD_ENABLED.with(|g| g.replace(false))) }
}
impl Default for NoGradGuard {
    fn default() -> Self { Self::new() }
}
impl Drop for NoGradGuard {
    fn drop(&mut self) { GRAD_ENABLED.with(|g| g.set(self.0)) }
}

/// The gradients of the leaves that required them, by tensor id.
#[derive(Default)]
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> { self.0.get(&t.id()) }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> { self.0.remove(&t.id()) }
    pub fn insert(&mut self, t: &Tensor, g: Tensor) { self.0.insert(t.id(), g); }
    pub fn len(&self) -> usize { self.0.len() }
    pub fn is_empty(&self) -> bool { self.0.is_empty() }
}

/// Tensors reachable from `root` through tracked inputs, inputs before their users.
fn topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = vec![];
    let mut visited = HashSet::new();
    // Iterative post-order DFS, marking on expansion: deep graphs (ResNets, unrolled
    // generators) must not overflow the stack.
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !visited.insert(t.id()) {
            continue;
        }
        let inputs = t.node().and_then(|n| n.inputs()).unwrap_or_default();
        stack.push((t, true));
        for i in inputs {
            if i.tracks_grad() && !visited.contains(&i.id()) {
                stack.push((i, false));
            }
        }
    }
    order
}

pub fn backward(root: &Tensor) -> Result<Gradients> {
    if root.elem_count() != 1 {
        bail!("backward: the root must be a scalar, got shape {:?}", root.dims());
    }
    backward_with(root, root.ones_like()?)
}

/// Backward from `root` seeded with `grad` (same shape as root).
pub fn backward_with(root: &Tensor, grad: Tensor) -> Result<Gradients> {
    if !root.tracks_grad() {
        bail!("backward: the root does not depend on any tensor that requires grad");
    }
    let _guard = NoGradGuard::new();
    let order = topological_order(root);
    let mut pending: HashMap<TensorId, Tensor> = HashMap::new();
    pending.insert(root.id(), grad);
    let mut out = Gradients::default();
    for t in order.iter().rev() {
        let Some(g) = pending.remove(&t.id()) else { continue };
        let Some(node) = t.node() else {
            if t.requires_grad() {
                out.0.insert(t.id(), g);
            }
            continue;
        };
        let Some((inputs, f)) = node.take() else {
            bail!("backward through `{}` a second time: its saved tensors were freed by the first backward", node.name());
        };
        let needs: Vec<bool> = inputs.iter().map(|i| i.tracks_grad()).collect();
        let grads = f(&g, &needs)?;
        for ((input, gi), need) in inputs.iter().zip(grads).zip(needs) {
            let Some(gi) = gi else { continue };
            if !need {
                continue;
            }
            if gi.dims() != input.dims() {
                bail!("backward of `{}`: gradient shape {:?} differs from input shape {:?}", node.name(), gi.dims(), input.dims());
            }
            let acc = match pending.remove(&input.id()) {
                Some(prev) => prev.add(&gi)?,
                None => gi,
            };
            pending.insert(input.id(), acc);
        }
    }
    Ok(out)
}
