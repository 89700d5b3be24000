//! `Tensor`: a shared, immutable view (layout) on a storage buffer, plus the autograd
//! node that produced it. Cloning a tensor is cheap (an `Arc`). Parameters are leaves
//! with `requires_grad`; optimisers update their storage in place.

use crate::autograd::{self, Node};
use crate::backend::{CpuStorage, Storage};
use crate::rng::Rng;
use crate::{bail, DType, Device, Error, Layout, Result, WithDType};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

pub struct TensorInner {
    id: TensorId,
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    dtype: DType,
    node: Option<Node>,
    requires_grad: AtomicBool,
}

#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}[{}, {}]", self.dims(), self.dtype().as_str(), self.device())?;
        if let Some(n) = &self.0.node {
            write!(f, " <- {}", n.name())?;
        }
        Ok(())
    }
}

impl Tensor {
    // ---- construction ----------------------------------------------------------

    pub(crate) fn from_parts(storage: Arc<RwLock<Storage>>, layout: Layout, node: Option<Node>) -> Tensor {
        let dtype = storage.read().unwrap().dtype();
        Tensor(Arc::new(TensorInner { id: TensorId::new(), storage, layout, dtype, node, requires_grad: AtomicBool::new(false) }))
    }

    /// A fresh contiguous tensor owning `storage`.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        debug_assert_eq!(storage.len(), shape.iter().product::<usize>());
        Tensor::from_parts(Arc::new(RwLock::new(storage)), Layout::contiguous(shape), None)
    }

    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize], device: Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            bail!("from_vec: {} elements do not fill shape {shape:?} ({n})", data.len());
        }
        let cpu = match T::DTYPE {
            DType::F32 => CpuStorage::F32(bytemuck::cast_vec(data)),
            DType::U32 => CpuStorage::U32(bytemuck::cast_vec(data)),
            DType::F16 => CpuStorage::F16(bytemuck::cast_vec(data)),
            DType::BF16 => CpuStorage::BF16(bytemuck::cast_vec(data)),
        };
        Ok(Tensor::from_storage(Storage::from_cpu(cpu, device)?, shape))
    }

    pub fn from_slice(data: &[f32], shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    pub fn full(value: f32, shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value; shape.iter().product()], shape, device)
    }
    /// Zeros made on the device itself (no host buffer to copy on a GPU).
    pub fn zeros(shape: &[usize], device: Device) -> Result<Tensor> {
        Ok(Tensor::from_storage(Storage::zeros(shape.iter().product(), DType::F32, device)?, shape))
    }
    pub fn ones(shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, device)
    }
    pub fn scalar(value: f32, device: Device) -> Result<Tensor> {
        Tensor::full(value, &[], device)
    }
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.dims(), self.device())
    }
    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.dims(), self.device())
    }

    /// Normal(mean, std) samples from `rng`.
    pub fn randn(shape: &[usize], mean: f32, std: f32, rng: &mut Rng, device: Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| mean + std * rng.normal()).collect::<Vec<f32>>(), shape, device)
    }
    /// Uniform[lo, hi) samples from `rng`.
    pub fn rand(shape: &[usize], lo: f32, hi: f32, rng: &mut Rng, device: Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.range(lo, hi)).collect::<Vec<f32>>(), shape, device)
    }

    // ---- accessors -------------------------------------------------------------

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn dims(&self) -> &[usize] {
        self.0.layout.shape()
    }
    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }
    pub fn elem_count(&self) -> usize {
        self.0.layout.elem_count()
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// Read from the storage rather than cached: `move_to` swaps the storage of every
    /// tensor sharing it at once.
    pub fn device(&self) -> Device {
        self.storage().device()
    }
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    pub(crate) fn node(&self) -> Option<&Node> {
        self.0.node.as_ref()
    }
    pub(crate) fn storage_arc(&self) -> &Arc<RwLock<Storage>> {
        &self.0.storage
    }

    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap()
    }
    /// Write access for in-place updates (optimisers, running statistics, loading).
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write().unwrap()
    }

    /// Size of dim `d`; negative counts from the end.
    pub fn dim(&self, d: isize) -> Result<usize> {
        Ok(self.dims()[self.axis(d)?])
    }

    /// Resolves a possibly negative axis.
    pub fn axis(&self, d: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let a = if d < 0 { d + r } else { d };
        if a < 0 || a >= r.max(1) {
            bail!("axis {d} out of range for shape {:?}", self.dims());
        }
        Ok(a as usize)
    }

    /// Shape as `[n, c, h, w]`, or an error naming `op`.
    pub fn dims4(&self, op: &'static str) -> Result<[usize; 4]> {
        match *self.dims() {
            [a, b, c, d] => Ok([a, b, c, d]),
            _ => bail!("{op}: expected a 4-D NCHW tensor, got shape {:?}", self.dims()),
        }
    }
    pub fn dims2(&self, op: &'static str) -> Result<[usize; 2]> {
        match *self.dims() {
            [a, b] => Ok([a, b]),
            _ => bail!("{op}: expected a 2-D tensor, got shape {:?}", self.dims()),
        }
    }

    // ---- autograd flags ---------------------------------------------------------

    /// Whether gradients flow to or through this tensor.
    pub fn tracks_grad(&self) -> bool {
        self.0.node.is_some() || self.requires_grad()
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad.load(Ordering::Relaxed)
    }
    /// Marks a leaf as a trainable variable (or freezes it). Only leaves carry the flag.
    pub fn set_requires_grad(&self, on: bool) -> Result<()> {
        if self.0.node.is_some() {
            bail!("set_requires_grad on a non-leaf tensor (made by {}); detach it first", self.node().unwrap().name());
        }
        self.0.requires_grad.store(on, Ordering::Relaxed);
        Ok(())
    }
    /// A leaf sharing this storage, cut from the graph.
    pub fn detach(&self) -> Tensor {
        Tensor::from_parts(self.0.storage.clone(), self.0.layout.clone(), None)
    }
    /// A new leaf variable with its own copy of the data.
    pub fn to_var(&self) -> Result<Tensor> {
        let t = self.deep_copy()?;
        t.set_requires_grad(true)?;
        Ok(t)
    }

    /// Runs backward from this scalar; returns the gradients of every leaf that requires them.
    pub fn backward(&self) -> Result<autograd::Gradients> {
        autograd::backward(self)
    }

    // ---- data movement -----------------------------------------------------------

    /// A contiguous copy with its own storage, cut from the graph.
    pub fn deep_copy(&self) -> Result<Tensor> {
        let s = self.storage().copy_strided(self.layout())?;
        Ok(Tensor::from_storage(s, self.dims()))
    }

    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let s = self.storage().copy_strided(self.layout())?.to_device(device)?;
        Ok(Tensor::from_storage(s, self.dims()))
    }

    /// Moves the storage to `device` in place: the tensor keeps its id (optimiser state
    /// and gradients are keyed by it), and views sharing the storage move with it. For
    /// parameters and buffers (`Module::to_device`); not recorded by autograd.
    pub fn move_to(&self, device: Device) -> Result<()> {
        if device == self.device() {
            return Ok(());
        }
        // the whole buffer, so that every view's layout stays valid
        let moved = self.storage().to_device(device)?;
        *self.storage_mut() = moved;
        Ok(())
    }

    /// Converts the element type. Differentiable between float types.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let s = self.storage().to_dtype(self.layout(), dtype)?;
        let src = self.dtype();
        Ok(crate::ops::from_op(s, self.dims(), "to_dtype", &[self], move |g, _| Ok(vec![Some(g.to_dtype(src)?)])))
    }

    /// The elements in row-major order as f32 (copies to the host if needed).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        let cpu = self.storage().to_cpu()?;
        Ok(cpu.to_f32_vec(self.layout()))
    }
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        let t = self.contiguous()?;
        let cpu = t.storage().to_cpu()?;
        let r = t.layout().contiguous_range().unwrap();
        Ok(cpu.u32("to_vec_u32")?[r].to_vec())
    }
    pub fn to_scalar(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            bail!("to_scalar: tensor of shape {:?} has {} elements", self.dims(), self.elem_count());
        }
        Ok(self.to_vec_f32()?[0])
    }

    /// Overwrites this tensor's (contiguous, whole) storage with `src`'s values. Used
    /// for parameters and buffers; not recorded by autograd.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.dims() != self.dims() {
            return Err(Error::ShapeMismatch { op: "assign", lhs: self.dims().to_vec(), rhs: src.dims().to_vec() });
        }
        if !self.is_contiguous() || self.layout().offset() != 0 || self.storage().len() != self.elem_count() {
            bail!("assign: destination must own its whole contiguous storage");
        }
        if Arc::ptr_eq(&self.0.storage, &src.0.storage) && self.layout() == src.layout() {
            return Ok(());
        }
        let new = src.to_dtype(self.dtype())?.to_device(self.device())?;
        let new = new.storage().copy_strided(new.layout())?;
        *self.storage_mut() = new;
        Ok(())
    }
}
