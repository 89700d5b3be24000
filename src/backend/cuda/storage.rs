//! `BackendStorage` for both CUDA devices, written once: every method hands the
//! storage's buffer to the op implementation in `ops.rs` (or to the device's GEMM),
//! with the device the buffer lives on. The emulator's `EmuStorage` and the GPU's
//! `CudaStorage` only say how to reach their buffer and device (`GpuStorage`).

use super::device::{self, CudaBuf};
use super::launch::Gpu;
use super::ops;
use crate::backend::{BackendStorage, BinaryOp, Conv2dParams, CpuStorage, Pool2dParams, ReduceOp, UnaryOp, UpdateRule};
use crate::fused::{FusedOp, Pass};
use crate::{DType, Device, Layout, Result};

/// A storage that is one buffer of a `Gpu`.
pub trait GpuStorage: Sized + Send + Sync {
    type G: Gpu;
    /// The device the buffer lives on.
    fn gpu(&self) -> Self::G;
    fn buf(&self) -> &<Self::G as Gpu>::Buf;
    fn buf_mut(&mut self) -> &mut <Self::G as Gpu>::Buf;
    fn wrap(b: <Self::G as Gpu>::Buf) -> Self;
}

type Buf<S> = <<S as GpuStorage>::G as Gpu>::Buf;

impl<S: GpuStorage> BackendStorage for S {
    fn device(&self) -> Device {
        self.gpu().device()
    }
    fn dtype(&self) -> DType {
        self.gpu().dtype(self.buf())
    }
    fn len(&self) -> usize {
        self.gpu().len(self.buf())
    }
    fn to_cpu(&self) -> Result<CpuStorage> {
        self.gpu().download(self.buf())
    }

    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return self.copy_strided(l);
        }
        fallback!("to_dtype", {
            let g = self.gpu();
            let converted = g.download(self.buf())?.to_dtype(l, dtype)?;
            g.upload(converted).map(S::wrap)
        })
    }
    fn copy_strided(&self, l: &Layout) -> Result<Self> {
        ops::copy_strided(&self.gpu(), self.buf(), l).map(S::wrap)
    }
    fn copy_into(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> {
        ops::copy_into(&self.gpu(), self.buf(), l, dst.buf_mut(), dst_l)
    }
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> {
        ops::unary(&self.gpu(), self.buf(), l, op).map(S::wrap)
    }
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self> {
        ops::binary(&self.gpu(), self.buf(), l, rhs.buf(), rhs_l, op).map(S::wrap)
    }
    fn reduce(&self, l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<Self> {
        ops::reduce(&self.gpu(), self.buf(), l, op, dims).map(S::wrap)
    }
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self> {
        self.gpu().matmul(self.buf(), l, rhs.buf(), rhs_l).map(S::wrap)
    }
    fn softmax_last(&self, l: &Layout, log: bool) -> Result<Self> {
        ops::softmax_last(&self.gpu(), self.buf(), l, log).map(S::wrap)
    }
    fn conv2d(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        ops::conv2d(&self.gpu(), self.buf(), l, w.buf(), w_l, p).map(S::wrap)
    }
    fn conv2d_backward_input(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        ops::conv2d_backward_input(&self.gpu(), self.buf(), l, w.buf(), w_l, p).map(S::wrap)
    }
    fn conv2d_backward_weight(&self, l: &Layout, grad: &Self, grad_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        ops::conv2d_backward_weight(&self.gpu(), self.buf(), l, grad.buf(), grad_l, p).map(S::wrap)
    }
    fn max_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<(Self, Self)> {
        ops::max_pool2d(&self.gpu(), self.buf(), l, p).map(|(o, i)| (S::wrap(o), S::wrap(i)))
    }
    fn scatter_add_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout, out_plane: usize) -> Result<Self> {
        ops::scatter_add_planes(&self.gpu(), self.buf(), l, idx.buf(), idx_l, out_plane).map(S::wrap)
    }
    fn gather_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout) -> Result<Self> {
        ops::gather_planes(&self.gpu(), self.buf(), l, idx.buf(), idx_l).map(S::wrap)
    }
    fn avg_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<Self> {
        ops::avg_pool2d(&self.gpu(), self.buf(), l, p).map(S::wrap)
    }
    fn avg_pool2d_backward(&self, l: &Layout, p: &Pool2dParams) -> Result<Self> {
        ops::avg_pool2d_backward(&self.gpu(), self.buf(), l, p).map(S::wrap)
    }
    fn upsample_nearest2d(&self, l: &Layout, scale: (usize, usize)) -> Result<Self> {
        ops::upsample_nearest2d(&self.gpu(), self.buf(), l, scale).map(S::wrap)
    }
    fn upsample_nearest2d_backward(&self, l: &Layout, scale: (usize, usize)) -> Result<Self> {
        ops::upsample_nearest2d_backward(&self.gpu(), self.buf(), l, scale).map(S::wrap)
    }
    fn batch_norm_train(&self, l: &Layout, gamma: &Self, beta: &Self, eps: f32) -> Result<(Self, Self, Self)> {
        let (y, m, s) = ops::batch_norm_train(&self.gpu(), self.buf(), l, gamma.buf(), beta.buf(), eps)?;
        Ok((S::wrap(y), S::wrap(m), S::wrap(s)))
    }
    fn batch_norm_backward(&self, l: &Layout, dy: &Self, mean: &Self, invstd: &Self, gamma: &Self) -> Result<(Self, Self, Self)> {
        let (dx, dg, db) = ops::batch_norm_backward(&self.gpu(), self.buf(), l, dy.buf(), mean.buf(), invstd.buf(), gamma.buf())?;
        Ok((S::wrap(dx), S::wrap(dg), S::wrap(db)))
    }
    fn channel_affine(&self, l: &Layout, scale: &Self, shift: &Self) -> Result<Self> {
        ops::channel_affine(&self.gpu(), self.buf(), l, scale.buf(), shift.buf()).map(S::wrap)
    }
    fn optimizer_update(&mut self, grad: &Self, state: &mut [&mut Self], rule: UpdateRule) -> Result<()> {
        let g = self.gpu();
        let mut bufs: Vec<&mut Buf<S>> = state.iter_mut().map(|s| s.buf_mut()).collect();
        ops::optimizer_update(&g, self.buf_mut(), grad.buf(), &mut bufs, rule)
    }
}

/// One pass of a fused op (`crate::fused`) on the buffers of `x`, which the caller
/// (`Storage::apply_fused`) has checked share a device; `x` is not empty.
pub(crate) fn run_fused<S: GpuStorage, O: FusedOp>(op: &O, pass: Pass, x: &[(&S, &Layout)]) -> Result<Vec<S>> {
    let g = x[0].0.gpu();
    let bufs: Vec<(&Buf<S>, &Layout)> = x.iter().map(|&(s, l)| (s.buf(), l)).collect();
    Ok(op.gpu(&g, pass, &bufs)?.into_iter().map(S::wrap).collect())
}

/// kernels/conv.cu's im2col alone, for the benches.
pub fn im2col<S: GpuStorage>(x: &S, l: &Layout, p: &Conv2dParams) -> Result<S> {
    ops::im2col_of(&x.gpu(), x.buf(), l, p).map(S::wrap)
}

/// Memory of a CUDA GPU.
#[derive(Debug)]
pub struct CudaStorage(CudaBuf);

impl CudaStorage {
    /// Copies a host buffer to `cuda:ordinal` (opening the device on first use).
    pub fn from_cpu(cpu: &CpuStorage, ordinal: usize) -> Result<CudaStorage> {
        device::get(ordinal)?.upload(cpu).map(CudaStorage)
    }
    /// Zeros filled on the device, without a host buffer.
    pub fn zeros(len: usize, dtype: DType, ordinal: usize) -> Result<CudaStorage> {
        device::get(ordinal)?.zeros(len, dtype).map(CudaStorage)
    }
    pub(super) fn from_buf(b: CudaBuf) -> CudaStorage {
        CudaStorage(b)
    }
    pub(super) fn buf_ref(&self) -> &CudaBuf {
        &self.0
    }
}

impl GpuStorage for CudaStorage {
    type G = &'static device::CudaDev;
    fn gpu(&self) -> Self::G {
        self.0.device()
    }
    fn buf(&self) -> &CudaBuf {
        &self.0
    }
    fn buf_mut(&mut self) -> &mut CudaBuf {
        &mut self.0
    }
    fn wrap(b: CudaBuf) -> Self {
        CudaStorage(b)
    }
}
