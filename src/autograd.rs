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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, Tensor};
    use std::sync::Arc;

    fn var(v: &[f32]) -> Tensor {
        let t = Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap();
        t.set_requires_grad(true).unwrap();
        t
    }

    #[test]
    fn gradients_accumulate_over_uses() {
        let x = var(&[1.0, 2.0, 3.0]);
        // y = x*x + 3x: dy/dx = 2x + 3
        let y = x.mul(&x).unwrap().add(&x.scale(3.0).unwrap()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec_f32().unwrap(), vec![5.0, 7.0, 9.0]);
    }

    #[test]
    fn frozen_parameters_pass_gradients_to_inputs_without_receiving_any() {
        let w = var(&[2.0, -1.0]);
        w.set_requires_grad(false).unwrap(); // a frozen "teacher"
        let z = var(&[0.5, 0.25]); // the "generator output"
        let loss = z.mul(&w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(g.get(&z).unwrap().to_vec_f32().unwrap(), vec![2.0, -1.0]);
    }

    #[test]
    fn no_grad_and_detach_cut_the_graph() {
        let x = var(&[1.0]);
        let y = no_grad(|| x.exp().unwrap());
        assert!(!y.tracks_grad());
        let d = x.exp().unwrap().detach();
        assert!(!d.tracks_grad());
        assert!(d.add(&x).unwrap().sum_all().unwrap().backward().is_ok());
    }

    #[test]
    fn saved_tensors_are_freed_by_backward_and_a_second_backward_is_an_error() {
        let x = var(&[0.5, 1.5]);
        let y = x.exp().unwrap();
        let saved = Arc::downgrade(y.storage_arc());
        let loss = y.sum_all().unwrap();
        drop(y);
        assert!(saved.upgrade().is_some(), "the graph holds exp's output until backward");
        loss.backward().unwrap();
        assert!(saved.upgrade().is_none(), "backward must free saved activations");
        let err = loss.backward().err().unwrap().to_string();
        assert!(err.contains("second time"), "{err}");
    }

    #[test]
    fn diamond_graphs_are_ordered_correctly() {
        // b depends on a, and the root uses both: a's gradient must include b's path
        let x = var(&[2.0]);
        let a = x.scale(3.0).unwrap();
        let b = a.sqr().unwrap();
        let root = b.add(&a).unwrap().sum_all().unwrap(); // 9x^2 + 3x -> 18x + 3 = 39
        assert_eq!(root.backward().unwrap().get(&x).unwrap().to_vec_f32().unwrap(), vec![39.0]);
    }
}
