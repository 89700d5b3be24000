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
    pub fn name(&self) -> &'static str {
        self.name
    }
    fn inputs(&self) -> Option<Vec<Tensor>> {
        self.saved.lock().unwrap().as_ref().map(|(i, _)| i.clone())
    }
    fn take(&self) -> Option<(Vec<Tensor>, BackwardFn)> {
        self.saved.lock().unwrap().take()
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record the graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` without recording the graph (evaluation, optimiser updates, statistics).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Disables graph recording until dropped.
pub struct NoGradGuard(bool);
impl NoGradGuard {
    pub fn new() -> Self {
        NoGradGuard(GRAD_ENABLED.with(|g| g.replace(false)))
    }
}
impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}
impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0))
    }
}

/// The gradients of the leaves that required them, by tensor id.
#[derive(Default)]
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.0.remove(&t.id())
    }
    pub fn insert(&mut self, t: &Tensor, g: Tensor) {
        self.0.insert(t.id(), g);
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Tensors reachable from `root` through tracked inputs, inputs before their users,
/// and how many uses each leaf (a tracked tensor without a node) has among them.
fn topological_order(root: &Tensor) -> (Vec<Tensor>, HashMap<TensorId, usize>) {
    let mut order = vec![];
    let mut leaf_uses: HashMap<TensorId, usize> = HashMap::new();
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
            if !i.tracks_grad() {
                continue;
            }
            if i.node().is_none() {
                *leaf_uses.entry(i.id()).or_default() += 1;
            }
            if !visited.contains(&i.id()) {
                stack.push((i, false));
            }
        }
    }
    (order, leaf_uses)
}

pub fn backward(root: &Tensor) -> Result<Gradients> {
    backward_with(root, seed(root)?)
}

/// The gradient a backward from the scalar `root` starts from (1); an error for a root
/// that is not a scalar.
pub fn seed(root: &Tensor) -> Result<Tensor> {
    if root.elem_count() != 1 {
        bail!("backward: the root must be a scalar, got shape {:?}", root.dims());
    }
    root.ones_like()
}

/// Backward from `root` seeded with `grad` (same shape as root).
pub fn backward_with(root: &Tensor, grad: Tensor) -> Result<Gradients> {
    backward_hooked(root, grad, &mut |_, g| Ok(Some(g)))
}

/// Backward from `root` seeded with `grad`, handing each leaf's gradient to `on_leaf`
/// the moment it is final: right after the last backward step that uses the leaf, while
/// the rest of the pass is still to run. `on_leaf` returns the gradient to keep in the
/// result, or `None` when it took it (data parallelism starts averaging a parameter's
/// gradient with the other ranks' there, overlapped with the rest of the backward).
/// Leaves are handed over in the same order on every run of the same graph.
pub fn backward_hooked(root: &Tensor, grad: Tensor, on_leaf: &mut dyn FnMut(&Tensor, Tensor) -> Result<Option<Tensor>>) -> Result<Gradients> {
    if !root.tracks_grad() {
        bail!("backward: the root does not depend on any tensor that requires grad");
    }
    let _guard = NoGradGuard::new();
    let mut out = Gradients::default();
    if root.node().is_none() {
        // the root is itself a leaf
        if let Some(g) = on_leaf(root, grad)? {
            out.0.insert(root.id(), g);
        }
        return Ok(out);
    }
    let (order, mut leaf_uses) = topological_order(root);
    let mut pending: HashMap<TensorId, Tensor> = HashMap::new();
    pending.insert(root.id(), grad);
    // One use of `input` is over: if it was a leaf's last, its gradient is final.
    let mut release = |input: &Tensor, pending: &mut HashMap<TensorId, Tensor>, out: &mut Gradients| -> Result<()> {
        let Some(uses) = leaf_uses.get_mut(&input.id()) else { return Ok(()) };
        *uses -= 1;
        if *uses == 0 {
            if let Some(g) = pending.remove(&input.id()).map(|g| on_leaf(input, g)).transpose()?.flatten() {
                out.0.insert(input.id(), g);
            }
        }
        Ok(())
    };
    for t in order.iter().rev() {
        let Some(node) = t.node() else { continue };
        let Some(g) = pending.remove(&t.id()) else {
            // no gradient reached this op: its uses of leaves are over all the same
            for input in node.inputs().unwrap_or_default() {
                release(&input, &mut pending, &mut out)?;
            }
            continue;
        };
        let Some((inputs, f)) = node.take() else {
            bail!("backward through `{}` a second time: its saved tensors were freed by the first backward", node.name());
        };
        let needs: Vec<bool> = inputs.iter().map(|i| i.tracks_grad()).collect();
        let grads = f(&g, &needs)?;
        for ((input, gi), need) in inputs.iter().zip(grads).zip(needs) {
            if !need {
                continue;
            }
            if let Some(gi) = gi {
                if gi.dims() != input.dims() {
                    bail!("backward of `{}`: gradient shape {:?} differs from input shape {:?}", node.name(), gi.dims(), input.dims());
                }
                let acc = match pending.remove(&input.id()) {
                    Some(prev) => prev.add(&gi)?,
                    None => gi,
                };
                pending.insert(input.id(), acc);
            }
            release(input, &mut pending, &mut out)?;
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
    fn a_leaf_is_handed_over_once_final_before_the_ops_below_it_run() {
        use std::sync::Mutex;
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (x, w1, w2) = (var(&[1.0, 2.0]), var(&[3.0, -1.0]), var(&[0.5, 2.0]));
        let h = x.mul(&w1).unwrap();
        // an identity op that logs when its backward runs: the first layer's backward
        let probe_log = log.clone();
        let h = crate::ops::with_backward(&h, "probe", &[&h], move |dy, _| {
            probe_log.lock().unwrap().push("probe".into());
            Ok(vec![Some(dy.clone())])
        });
        // w1 is used twice, once in each layer: handed over once, with both uses summed
        let y = h.mul(&w2).unwrap().add(&w1).unwrap().sqr().unwrap().sum_all().unwrap();
        let names = [(x.id(), "x"), (w1.id(), "w1"), (w2.id(), "w2")];
        let mut seen = vec![];
        let grads = backward_hooked(&y, y.ones_like().unwrap(), &mut |leaf, g| {
            let name = names.iter().find(|(id, _)| *id == leaf.id()).unwrap().1;
            log.lock().unwrap().push(name.into());
            seen.push((name, g.to_vec_f32().unwrap()));
            Ok(None)
        })
        .unwrap();
        assert!(grads.is_empty(), "the hook took every gradient");
        let log = log.lock().unwrap().clone();
        assert_eq!(log[0], "w2", "w2's gradient is final before the first layer's backward: {log:?}");
        assert_eq!(log[1], "probe", "{log:?}");
        assert_eq!(log.len(), 4, "each leaf once: {log:?}");
        // d/dw of sum((x w1 w2 + w1)^2): the same values backward computes
        let (xv, a, b) = ([1.0f32, 2.0], [3.0f32, -1.0], [0.5f32, 2.0]);
        let r: Vec<f32> = (0..2).map(|i| 2.0 * (xv[i] * a[i] * b[i] + a[i])).collect();
        let want_w1: Vec<f32> = (0..2).map(|i| r[i] * (xv[i] * b[i] + 1.0)).collect();
        let want_w2: Vec<f32> = (0..2).map(|i| r[i] * xv[i] * a[i]).collect();
        let got = |n: &str| seen.iter().find(|(m, _)| *m == n).unwrap().1.clone();
        assert_eq!(got("w1"), want_w1);
        assert_eq!(got("w2"), want_w2);
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
