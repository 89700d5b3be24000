//! Optimisers (SGD with momentum/Nesterov, Adam) over parameter groups, and learning
//! rate schedules. Updates are fused backend kernels applied in place.

mod average;
mod schedule;

pub use average::WeightAverage;
pub use schedule::CosineSchedule;

use crate::backend::{Storage, UpdateRule};
use crate::{bail, Gradients, Result, Tensor, TensorId};
use std::collections::HashMap;

/// Parameters sharing one learning-rate multiplier and weight decay.
pub struct ParamGroup {
    pub params: Vec<Tensor>,
    /// Multiplies the optimiser's learning rate (so schedules scale every group).
    pub lr_scale: f32,
    pub weight_decay: f32,
}

impl ParamGroup {
    pub fn new(params: Vec<Tensor>, weight_decay: f32) -> Self {
        ParamGroup { params, lr_scale: 1.0, weight_decay }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sgd { momentum: f32, nesterov: bool },
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

pub struct Optimizer {
    kind: Kind,
    lr: f32,
    groups: Vec<ParamGroup>,
    state: HashMap<TensorId, Vec<Storage>>,
    steps: u32,
}

impl Optimizer {
    /// SGD as `torch.optim.SGD` (dampening 0).
    pub fn sgd(groups: Vec<ParamGroup>, lr: f32, momentum: f32, nesterov: bool) -> Self {
        Optimizer { kind: Kind::Sgd { momentum, nesterov }, lr, groups, state: HashMap::new(), steps: 0 }
    }
    /// Adam as `torch.optim.Adam` (L2 weight decay added to the gradient).
    pub fn adam(groups: Vec<ParamGroup>, lr: f32, beta1: f32, beta2: f32) -> Self {
        Optimizer { kind: Kind::Adam { beta1, beta2, eps: 1e-8 }, lr, groups, state: HashMap::new(), steps: 0 }
    }

    pub fn lr(&self) -> f32 {
        self.lr
    }
    pub fn set_lr(&mut self, lr: f32) {
        self.lr = lr
    }
    pub fn steps(&self) -> u32 {
        self.steps
    }
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Applies one update to every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        self.steps += 1;
        for group in &self.groups {
            let lr = self.lr * group.lr_scale;
            let rule = match self.kind {
                Kind::Sgd { momentum, nesterov } => UpdateRule::Sgd { lr, momentum, weight_decay: group.weight_decay, nesterov },
                Kind::Adam { beta1, beta2, eps } => UpdateRule::Adam { lr, beta1, beta2, eps, weight_decay: group.weight_decay, step: self.steps },
            };
            let n_state = match self.kind {
                Kind::Sgd { .. } => 1,
                Kind::Adam { .. } => 2,
            };
            for p in &group.params {
                let Some(g) = grads.get(p) else { continue };
                if g.dims() != p.dims() {
                    bail!("optimizer: gradient shape {:?} differs from parameter shape {:?}", g.dims(), p.dims());
                }
                let g = g.contiguous()?;
                let state = match self.state.entry(p.id()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let mut v = vec![];
                        for _ in 0..n_state {
                            v.push(Storage::zeros(p.elem_count(), p.dtype(), p.device())?);
                        }
                        e.insert(v)
                    }
                };
                let mut refs: Vec<&mut Storage> = state.iter_mut().collect();
                p.storage_mut().optimizer_update(&g.storage(), &mut refs, rule)?;
            }
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (for checkpoints): `"{name}.{i}"` for each
    /// state buffer of parameter `name`, plus `"step"`.
    pub fn state_tensors(&self, names: &HashMap<TensorId, String>) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), Tensor::from_vec(vec![self.steps as f32], &[1], crate::Device::Cpu)?)];
        for p in self.params() {
            let (Some(st), Some(name)) = (self.state.get(&p.id()), names.get(&p.id())) else { continue };
            for (i, s) in st.iter().enumerate() {
                let t = Tensor::from_storage(s.to_cpu().map(Storage::Cpu)?, p.dims());
                out.push((format!("{name}.{i}"), t));
            }
        }
        Ok(out)
    }

    /// Restores what `state_tensors` saved.
    pub fn load_state_tensors(&mut self, names: &HashMap<TensorId, String>, saved: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(step) = saved.get("step") {
            self.steps = step.to_scalar()? as u32;
        }
        let n_state = match self.kind {
            Kind::Sgd { .. } => 1,
            Kind::Adam { .. } => 2,
        };
        let params: Vec<Tensor> = self.params().cloned().collect();
        for p in params {
            let Some(name) = names.get(&p.id()) else { continue };
            let mut bufs = vec![];
            for i in 0..n_state {
                let Some(t) = saved.get(&format!("{name}.{i}")) else { break };
                if t.dims() != p.dims() {
                    bail!("optimizer state `{name}.{i}`: shape {:?}, parameter has {:?}", t.dims(), p.dims());
                }
                let t = t.to_device(p.device())?.contiguous()?;
                let s = t.storage().copy_strided(t.layout())?;
                bufs.push(s);
            }
            if bufs.len() == n_state {
                self.state.insert(p.id(), bufs);
            }
        }
        Ok(())
    }
}
