//! `BackendStorage` for both CUDA devices, written once: every method hands the
//! storage's buffer to the op implementation in `ops.rs` (or to the device's GEMM),
//! with the device the buffer lives on. The emulator's `EmuStorage` and the GPU's
//! `CudaStorage` only say how to reach their buffer and device (`GpuStorage`).

use super::device::{self, CudaBuf};
use super::launch::Gpu;
use super::{attention, ops};
use crate::backend::{BackendStorage, BinaryOp, Conv2dParams, CpuStorage, Pool2dParams, ReduceOp, UnaryOp, UpdateRule};
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
    fn channel_stats(&self, l: &Layout) -> Result<Self> {
        ops::channel_stats(&self.gpu(), self.buf(), l).map(S::wrap)
    }
    fn channel_stats_backward(&self, l: &Layout, stats: &Self, dstats: &Self) -> Result<Self> {
        ops::channel_stats_backward(&self.gpu(), self.buf(), l, stats.buf(), dstats.buf()).map(S::wrap)
    }
    fn spatial_attention(&self, l: &Layout, f: &Self, f_l: &Layout, k: f32) -> Result<(Self, Self)> {
        attention::spatial_attention(&self.gpu(), self.buf(), l, f.buf(), f_l, k).map(|(y, s)| (S::wrap(y), S::wrap(s)))
    }
    fn spatial_attention_backward(&self, l: &Layout, f: &Self, f_l: &Layout, dy: &Self, dy_l: &Layout, stats: &Self, k: f32) -> Result<(Self, Self)> {
        attention::spatial_attention_backward(&self.gpu(), self.buf(), l, f.buf(), f_l, dy.buf(), dy_l, stats.buf(), k).map(|(a, f)| (S::wrap(a), S::wrap(f)))
    }
    fn hoa_products(&self, l: &Layout, order: usize) -> Result<Self> {
        attention::hoa_products(&self.gpu(), self.buf(), l, order).map(S::wrap)
    }
    fn hoa_products_backward(&self, l: &Layout, dh: &Self, dh_l: &Layout, order: usize) -> Result<Self> {
        attention::hoa_products_backward(&self.gpu(), self.buf(), l, dh.buf(), dh_l, order).map(S::wrap)
    }
    fn hoa_combine(&self, l: &Layout, f: &Self, f_l: &Layout, order: usize) -> Result<Self> {
        attention::hoa_combine(&self.gpu(), self.buf(), l, f.buf(), f_l, order).map(S::wrap)
    }
    fn hoa_combine_backward(&self, l: &Layout, f: &Self, f_l: &Layout, dy: &Self, dy_l: &Layout, order: usize) -> Result<(Self, Self)> {
        attention::hoa_combine_backward(&self.gpu(), self.buf(), l, f.buf(), f_l, dy.buf(), dy_l, order).map(|(u, f)| (S::wrap(u), S::wrap(f)))
    }
    fn normalized_distance(&self, l: &Layout, b: &Self, b_l: &Layout, eps: f32) -> Result<(Self, Self)> {
        attention::normalized_distance(&self.gpu(), self.buf(), l, b.buf(), b_l, eps).map(|(d, s)| (S::wrap(d), S::wrap(s)))
    }
    fn normalized_distance_backward(&self, l: &Layout, b: &Self, b_l: &Layout, stats: &Self, g: &Self, g_l: &Layout, eps: f32) -> Result<(Self, Self)> {
        attention::normalized_distance_backward(&self.gpu(), self.buf(), l, b.buf(), b_l, stats.buf(), g.buf(), g_l, eps).map(|(a, b)| (S::wrap(a), S::wrap(b)))
    }
    fn contrastive_normalize(&self, l: &Layout, s: &Self, s_l: &Layout, eps: f32) -> Result<(Self, Self)> {
        attention::contrastive_normalize(&self.gpu(), self.buf(), l, s.buf(), s_l, eps).map(|(z, n)| (S::wrap(z), S::wrap(n)))
    }
    fn contrastive_normalize_backward(&self, l: &Layout, norms: &Self, dzhat: &Self, eps: f32, dtype: DType) -> Result<(Self, Self)> {
        attention::contrastive_normalize_backward(&self.gpu(), self.buf(), l, norms.buf(), dzhat.buf(), eps, dtype).map(|(t, s)| (S::wrap(t), S::wrap(s)))
    }
    fn contrastive_rows(&self, l: &Layout, tau: f32) -> Result<(Self, Self)> {
        attention::contrastive_rows_fwd(&self.gpu(), self.buf(), l, tau).map(|(a, b)| (S::wrap(a), S::wrap(b)))
    }
    fn contrastive_sym(&self, l: &Layout, lse: &Self, dloss: &Self, dloss_l: &Layout, tau: f32) -> Result<Self> {
        attention::contrastive_sym(&self.gpu(), self.buf(), l, lse.buf(), dloss.buf(), dloss_l, tau).map(S::wrap)
    }
    fn optimizer_update(&mut self, grad: &Self, state: &mut [&mut Self], rule: UpdateRule) -> Result<()> {
        let g = self.gpu();
        let mut bufs: Vec<&mut Buf<S>> = state.iter_mut().map(|s| s.buf_mut()).collect();
        ops::optimizer_update(&g, self.buf_mut(), grad.buf(), &mut bufs, rule)
    }
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
