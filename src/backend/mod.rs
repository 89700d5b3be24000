//! The backend seam. `BackendStorage` is everything a device must do: general
//! primitives, none specific to one model or loss. `Storage` is the enum over the
//! devices' storages, and each of its methods checks the device once and dispatches.
//! Tensor ops (`crate::ops`) only ever call `Storage`, so adding a device is adding a
//! variant here and an implementation of the trait, nothing else. Fused ops (SAM, MHA,
//! the normalised distance, NT-Xent, the BN statistics) are not here: each is a type in
//! `crate::fused` that `Storage::apply_fused` runs.
//!
//! Conventions for every method:
//! - inputs come with their `Layout` (any strides unless a method says "contiguous");
//! - outputs are fresh, contiguous, offset 0;
//! - f32 is the compute type: ops other than conversions reject other dtypes;
//! - ops with a parameter struct (`Conv2dParams`, `Pool2dParams`) have their geometry
//!   checked here, once, by the struct's `check`: backends may assume it holds.

pub mod cpu;
pub mod cuda;
pub mod ops;

pub use cpu::CpuStorage;
pub use cuda::{CudaStorage, EmuStorage};
pub use ops::{BinaryOp, Conv2dParams, Pool2dParams, ReduceOp, UnaryOp, UpdateRule};

use crate::fused::{FusedOp, Pass};
use crate::{DType, Device, Layout, Result};

/// What a device must implement. Methods mirror the primitive ops of `crate::ops`.
pub trait BackendStorage: Sized + Send + Sync {
    fn device(&self) -> Device;
    fn dtype(&self) -> DType;
    /// Number of elements in the buffer (not of any view on it).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn to_cpu(&self) -> Result<CpuStorage>;

    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self>;
    /// A contiguous copy of the view `l`.
    fn copy_strided(&self, l: &Layout) -> Result<Self>;
    /// Writes the view `l` of `self` into the view `dst_l` of `dst` (same shape).
    fn copy_into(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()>;

    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self>;
    /// Both layouts have the output's shape (broadcast dims have stride 0).
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self>;
    /// Reduces over `dims`; the output keeps them with size 1.
    fn reduce(&self, l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<Self>;
    /// `[b, m, k] x [b, k, n] -> [b, m, n]`; any strides (stride 0 on b broadcasts).
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self>;

    /// Softmax (or log-softmax) over the last dim of a contiguous tensor.
    fn softmax_last(&self, l: &Layout, log: bool) -> Result<Self>;

    // Convolution. Inputs contiguous. Weight is `[c_out, c_in/groups, kh, kw]`.
    fn conv2d(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self>;
    /// Gradient of conv2d's input given the output gradient; also conv_transpose2d's forward.
    fn conv2d_backward_input(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self>;
    /// Gradient of conv2d's weight: `self` is the input x, `grad` the output gradient.
    fn conv2d_backward_weight(&self, l: &Layout, grad: &Self, grad_l: &Layout, p: &Conv2dParams) -> Result<Self>;

    // Pooling over contiguous NCHW.
    /// Returns the output and, per output, the flat index of the max within its
    /// `h_in * w_in` plane (u32), as PyTorch's `return_indices=True`.
    fn max_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<(Self, Self)>;
    /// `out[plane, idx[i]] += self[i]` for each plane: max_pool2d's backward and max_unpool2d.
    fn scatter_add_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout, out_plane: usize) -> Result<Self>;
    /// `out[i] = self[plane, idx[i]]`: max_unpool2d's backward.
    fn gather_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout) -> Result<Self>;
    /// Average pooling, padding counted in the divisor (PyTorch's default).
    fn avg_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<Self>;
    fn avg_pool2d_backward(&self, l: &Layout, p: &Pool2dParams) -> Result<Self>;
    fn upsample_nearest2d(&self, l: &Layout, scale: (usize, usize)) -> Result<Self>;
    fn upsample_nearest2d_backward(&self, l: &Layout, scale: (usize, usize)) -> Result<Self>;

    // Batch norm in training mode over contiguous NCHW, fused.
    /// Returns `(y, mean, invstd)`, the last two per channel; `var` is biased.
    fn batch_norm_train(&self, l: &Layout, gamma: &Self, beta: &Self, eps: f32) -> Result<(Self, Self, Self)>;
    /// Returns `(dx, dgamma, dbeta)`.
    fn batch_norm_backward(&self, l: &Layout, dy: &Self, mean: &Self, invstd: &Self, gamma: &Self) -> Result<(Self, Self, Self)>;
    /// `x * scale[c] + shift[c]` over contiguous f32 `[n, c, ...]` (`scale`, `shift`: f32
    /// `[c]`): batch norm in evaluation mode, one pass.
    fn channel_affine(&self, l: &Layout, scale: &Self, shift: &Self) -> Result<Self>;
    /// One fused optimiser update, in place on contiguous buffers of the same length.
    /// `state` holds the rule's buffers (momentum; or Adam's m then v).
    fn optimizer_update(&mut self, grad: &Self, state: &mut [&mut Self], rule: UpdateRule) -> Result<()>;
}

/// The storage of a tensor on some device.
pub enum Storage {
    Cpu(CpuStorage),
    /// The CUDA kernels run on the CPU by the kernel emulator (`backend::cuda`).
    CudaEmu(EmuStorage),
    /// A CUDA GPU's memory (`backend::cuda`).
    Cuda(CudaStorage),
}

impl From<CpuStorage> for Storage {
    fn from(s: CpuStorage) -> Storage {
        Storage::Cpu(s)
    }
}
impl From<EmuStorage> for Storage {
    fn from(s: EmuStorage) -> Storage {
        Storage::CudaEmu(s)
    }
}
impl From<CudaStorage> for Storage {
    fn from(s: CudaStorage) -> Storage {
        Storage::Cuda(s)
    }
}

/// `$body` runs with `$s` bound to the device's storage; results go back into a
/// `Storage` with `.into()`.
macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Storage::Cpu($s) => $body,
            Storage::CudaEmu($s) => $body,
            Storage::Cuda($s) => $body,
        }
    };
}

/// Unwraps same-device operands or fails with a device-mismatch error. GPUs must also
/// agree on the ordinal.
macro_rules! same_device {
    ($op:literal, $a:expr, $($b:expr),+ => |$x:ident, $($y:ident),+| $body:expr) => {
        #[allow(unreachable_patterns)]
        match ($a, $($b),+) {
            (Storage::Cpu($x), $(Storage::Cpu($y)),+) => $body,
            (Storage::CudaEmu($x), $(Storage::CudaEmu($y)),+) => $body,
            (Storage::Cuda($x), $(Storage::Cuda($y)),+) if true $(&& $y.device() == $x.device())+ => $body,
            (a, b, ..) => return Err(crate::Error::DeviceMismatch { op: $op, lhs: a.device(), rhs: b.device() }),
        }
    };
}

impl Storage {
    pub fn device(&self) -> Device {
        dispatch!(self, s => s.device())
    }
    pub fn dtype(&self) -> DType {
        dispatch!(self, s => s.dtype())
    }
    pub fn len(&self) -> usize {
        dispatch!(self, s => s.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        dispatch!(self, s => s.to_cpu())
    }
    /// Moves a host buffer onto `device`.
    pub fn from_cpu(cpu: CpuStorage, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(cpu)),
            Device::CudaEmu => Ok(Storage::CudaEmu(EmuStorage::from_cpu(cpu))),
            Device::Cuda(n) => Ok(Storage::Cuda(CudaStorage::from_cpu(&cpu, n)?)),
        }
    }
    pub fn zeros(len: usize, dtype: DType, device: Device) -> Result<Storage> {
        if let Device::Cuda(n) = device {
            // filled on the device: no host buffer, no copy
            return Ok(Storage::Cuda(CudaStorage::zeros(len, dtype, n)?));
        }
        let cpu = match dtype {
            DType::F32 => CpuStorage::F32(cpu::buffers::zeroed(len)),
            DType::F16 => CpuStorage::F16(vec![half::f16::ZERO; len]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::ZERO; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
        };
        Storage::from_cpu(cpu, device)
    }
    pub fn to_device(&self, device: Device) -> Result<Storage> {
        if self.device() == device {
            return dispatch!(self, s => Ok(s.copy_strided(&Layout::contiguous(&[s.len()]))?.into()));
        }
        Storage::from_cpu(self.to_cpu()?, device)
    }

    pub fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Storage> {
        let _timer = crate::profile::scope("to_dtype", self.device(), || format!("{:?}", l.shape()));
        dispatch!(self, s => Ok(s.to_dtype(l, dtype)?.into()))
    }
    pub fn copy_strided(&self, l: &Layout) -> Result<Storage> {
        let _timer = crate::profile::scope("copy_strided", self.device(), || format!("{:?}", l.shape()));
        dispatch!(self, s => Ok(s.copy_strided(l)?.into()))
    }
    pub fn copy_into(&self, l: &Layout, dst: &mut Storage, dst_l: &Layout) -> Result<()> {
        let _timer = crate::profile::scope("copy_into", self.device(), || format!("{:?} -> {:?}", l.shape(), dst_l.shape()));
        same_device!("copy_into", self, dst => |a, b| a.copy_into(l, b, dst_l))
    }
    pub fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Storage> {
        let _timer = crate::profile::scope("unary", self.device(), || format!("{op:?} {:?}", l.shape()));
        dispatch!(self, s => Ok(s.unary(l, op)?.into()))
    }
    pub fn binary(&self, l: &Layout, rhs: &Storage, rhs_l: &Layout, op: BinaryOp) -> Result<Storage> {
        let _timer = crate::profile::scope("binary", self.device(), || format!("{op:?} {:?} {:?}", l.shape(), rhs_l.shape()));
        same_device!("binary", self, rhs => |a, b| Ok(a.binary(l, b, rhs_l, op)?.into()))
    }
    pub fn reduce(&self, l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<Storage> {
        let _timer = crate::profile::scope("reduce", self.device(), || format!("{op:?} {:?} over {dims:?}", l.shape()));
        dispatch!(self, s => Ok(s.reduce(l, op, dims)?.into()))
    }
    pub fn matmul(&self, l: &Layout, rhs: &Storage, rhs_l: &Layout) -> Result<Storage> {
        let _timer = crate::profile::scope("matmul", self.device(), || format!("{:?} x {:?}", l.shape(), rhs_l.shape()));
        same_device!("matmul", self, rhs => |a, b| Ok(a.matmul(l, b, rhs_l)?.into()))
    }
    pub fn softmax_last(&self, l: &Layout, log: bool) -> Result<Storage> {
        let _timer = crate::profile::scope("softmax_last", self.device(), || format!("{:?}", l.shape()));
        dispatch!(self, s => Ok(s.softmax_last(l, log)?.into()))
    }
    pub fn conv2d(&self, l: &Layout, w: &Storage, w_l: &Layout, p: &Conv2dParams) -> Result<Storage> {
        let _timer = crate::profile::scope("conv2d", self.device(), || p.describe());
        p.check("conv2d", &[("input", l, Conv2dParams::input_shape), ("weight", w_l, Conv2dParams::weight_shape)])?;
        same_device!("conv2d", self, w => |a, b| Ok(a.conv2d(l, b, w_l, p)?.into()))
    }
    pub fn conv2d_backward_input(&self, l: &Layout, w: &Storage, w_l: &Layout, p: &Conv2dParams) -> Result<Storage> {
        let _timer = crate::profile::scope("conv2d_backward_input", self.device(), || p.describe());
        p.check("conv2d_backward_input", &[("grad", l, Conv2dParams::output_shape), ("weight", w_l, Conv2dParams::weight_shape)])?;
        same_device!("conv2d_backward_input", self, w => |a, b| Ok(a.conv2d_backward_input(l, b, w_l, p)?.into()))
    }
    pub fn conv2d_backward_weight(&self, l: &Layout, g: &Storage, g_l: &Layout, p: &Conv2dParams) -> Result<Storage> {
        let _timer = crate::profile::scope("conv2d_backward_weight", self.device(), || p.describe());
        p.check("conv2d_backward_weight", &[("input", l, Conv2dParams::input_shape), ("grad", g_l, Conv2dParams::output_shape)])?;
        same_device!("conv2d_backward_weight", self, g => |a, b| Ok(a.conv2d_backward_weight(l, b, g_l, p)?.into()))
    }
    pub fn max_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<(Storage, Storage)> {
        let _timer = crate::profile::scope("max_pool2d", self.device(), || format!("{:?}", l.shape()));
        p.check("max_pool2d", &[("input", l, Pool2dParams::input_shape)])?;
        dispatch!(self, s => { let (o, i) = s.max_pool2d(l, p)?; Ok((o.into(), i.into())) })
    }
    pub fn scatter_add_planes(&self, l: &Layout, idx: &Storage, idx_l: &Layout, out_plane: usize) -> Result<Storage> {
        let _timer = crate::profile::scope("scatter_add_planes", self.device(), || format!("{:?}", l.shape()));
        same_device!("scatter_add_planes", self, idx => |a, b| Ok(a.scatter_add_planes(l, b, idx_l, out_plane)?.into()))
    }
    pub fn gather_planes(&self, l: &Layout, idx: &Storage, idx_l: &Layout) -> Result<Storage> {
        let _timer = crate::profile::scope("gather_planes", self.device(), || format!("{:?}", l.shape()));
        same_device!("gather_planes", self, idx => |a, b| Ok(a.gather_planes(l, b, idx_l)?.into()))
    }
    pub fn avg_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<Storage> {
        let _timer = crate::profile::scope("avg_pool2d", self.device(), || format!("{:?}", l.shape()));
        p.check("avg_pool2d", &[("input", l, Pool2dParams::input_shape)])?;
        dispatch!(self, s => Ok(s.avg_pool2d(l, p)?.into()))
    }
    pub fn avg_pool2d_backward(&self, l: &Layout, p: &Pool2dParams) -> Result<Storage> {
        let _timer = crate::profile::scope("avg_pool2d_backward", self.device(), || format!("{:?}", l.shape()));
        p.check("avg_pool2d_backward", &[("grad", l, Pool2dParams::output_shape)])?;
        dispatch!(self, s => Ok(s.avg_pool2d_backward(l, p)?.into()))
    }
    pub fn upsample_nearest2d(&self, l: &Layout, scale: (usize, usize)) -> Result<Storage> {
        let _timer = crate::profile::scope("upsample_nearest2d", self.device(), || format!("{:?}", l.shape()));
        dispatch!(self, s => Ok(s.upsample_nearest2d(l, scale)?.into()))
    }
    pub fn upsample_nearest2d_backward(&self, l: &Layout, scale: (usize, usize)) -> Result<Storage> {
        let _timer = crate::profile::scope("upsample_nearest2d_backward", self.device(), || format!("{:?}", l.shape()));
        dispatch!(self, s => Ok(s.upsample_nearest2d_backward(l, scale)?.into()))
    }
    pub fn batch_norm_train(&self, l: &Layout, gamma: &Storage, beta: &Storage, eps: f32) -> Result<(Storage, Storage, Storage)> {
        let _timer = crate::profile::scope("batch_norm_train", self.device(), || format!("{:?}", l.shape()));
        same_device!("batch_norm", self, gamma, beta => |x, g, b| {
            let (y, m, s) = x.batch_norm_train(l, g, b, eps)?;
            Ok((y.into(), m.into(), s.into()))
        })
    }
    pub fn batch_norm_backward(&self, l: &Layout, dy: &Storage, mean: &Storage, invstd: &Storage, gamma: &Storage) -> Result<(Storage, Storage, Storage)> {
        let _timer = crate::profile::scope("batch_norm_backward", self.device(), || format!("{:?}", l.shape()));
        same_device!("batch_norm_backward", self, dy, mean, invstd, gamma => |x, d, m, s, g| {
            let (dx, dg, db) = x.batch_norm_backward(l, d, m, s, g)?;
            Ok((dx.into(), dg.into(), db.into()))
        })
    }
    pub fn channel_affine(&self, l: &Layout, scale: &Storage, shift: &Storage) -> Result<Storage> {
        let _timer = crate::profile::scope("channel_affine", self.device(), || format!("{:?}", l.shape()));
        same_device!("channel_affine", self, scale, shift => |x, a, b| Ok(x.channel_affine(l, a, b)?.into()))
    }
    /// One pass of a fused op (`crate::fused`, as candle's `apply_op`) on the device its
    /// operands share: the op's CPU reference on the CPU, its launch on the emulator or
    /// a GPU. `N` is the number of results the pass returns.
    pub fn apply_fused<O: FusedOp, const N: usize>(op: &O, pass: Pass, x: &[(&Storage, &Layout)]) -> Result<[Storage; N]> {
        let name = match pass {
            Pass::Forward => O::NAME,
            Pass::Backward => O::BACKWARD_NAME,
        };
        let Some(&(first, l)) = x.first() else { crate::bail!("{name}: no operands") };
        let device = first.device();
        let _timer = crate::profile::scope(name, device, || format!("{:?}", l.shape()));
        if let Some((s, _)) = x.iter().find(|(s, _)| s.device() != device) {
            return Err(crate::Error::DeviceMismatch { op: name, lhs: device, rhs: s.device() });
        }
        macro_rules! operands {
            ($v:ident) => {
                x.iter()
                    .map(|&(s, l)| match s {
                        Storage::$v(s) => (s, l),
                        _ => unreachable!("devices checked above"),
                    })
                    .collect::<Vec<_>>()
            };
        }
        let out: Vec<Storage> = match first {
            Storage::Cpu(_) => op.cpu(pass, &operands!(Cpu))?.into_iter().map(Storage::Cpu).collect(),
            Storage::CudaEmu(_) => cuda::run_fused(op, pass, &operands!(CudaEmu))?.into_iter().map(Storage::CudaEmu).collect(),
            Storage::Cuda(_) => cuda::run_fused(op, pass, &operands!(Cuda))?.into_iter().map(Storage::Cuda).collect(),
        };
        match <[Storage; N]>::try_from(out) {
            Ok(out) => Ok(out),
            Err(out) => crate::bail!("{name}: {} results where its callers take {N}", out.len()),
        }
    }
    pub fn optimizer_update(&mut self, grad: &Storage, state: &mut [&mut Storage], rule: UpdateRule) -> Result<()> {
        let device = self.device();
        let _timer = crate::profile::scope("optimizer_update", device, || format!("[{}]", self.len()));
        if let Some(s) = state.iter().find(|s| s.device() != device) {
            return Err(crate::Error::DeviceMismatch { op: "optimizer_update", lhs: device, rhs: s.device() });
        }
        macro_rules! unwrap_state {
            ($v:ident) => {
                state
                    .iter_mut()
                    .map(|s| match &mut **s {
                        Storage::$v(c) => c,
                        _ => unreachable!("devices checked above"),
                    })
                    .collect::<Vec<_>>()
            };
        }
        match (self, grad) {
            (Storage::Cpu(p), Storage::Cpu(g)) => p.optimizer_update(g, &mut unwrap_state!(Cpu), rule),
            (Storage::CudaEmu(p), Storage::CudaEmu(g)) => p.optimizer_update(g, &mut unwrap_state!(CudaEmu), rule),
            (Storage::Cuda(p), Storage::Cuda(g)) if g.device() == device => p.optimizer_update(g, &mut unwrap_state!(Cuda), rule),
            (_, g) => Err(crate::Error::DeviceMismatch { op: "optimizer_update", lhs: device, rhs: g.device() }),
        }
    }
}
