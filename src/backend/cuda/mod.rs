//! The CUDA backend: our kernels (kernels/*.cu) driven from one host implementation
//! (`ops.rs`, and `attention.rs` for the fused attention kernels, written against the
//! `Gpu` trait in `launch.rs`) on two devices:
//! - `Device::CudaEmu`: the kernels compiled as C++ and run on the CPU by the kernel
//!   emulator (kernels/emu). Always available; it is how CI, which has no GPU, tests
//!   every kernel against the CPU reference (tests/cuda_parity.rs).
//! - `Device::Cuda(n)`: a GPU through cudarc (driver loaded at run time). Its storage
//!   is not written yet: asking for it is an error that says so.
//!
//! Ops without a kernel of ours run the CPU reference on the emulator's host buffers,
//! and only those listed in `CPU_FALLBACKS`: the list is the one place that says what
//! the emulator does not exercise yet, and `fallback!` refuses (at compile time) an op
//! missing from it.

pub mod attention;
mod emu;
mod kernels;
mod launch;
mod ops;

pub use attention::{force_version, VERSIONS};
pub use kernels::{embedded_fatbins, emulator_selftest, nvrtc_compile_all, nvrtc_present};

use super::{BackendStorage, BinaryOp, Conv2dParams, CpuStorage, Pool2dParams, ReduceOp, UnaryOp, UpdateRule};
use crate::{DType, Device, Layout, Result};
use emu::Emu;

/// Ops the CUDA devices run through the CPU reference rather than a kernel of ours,
/// and why.
pub const CPU_FALLBACKS: &[(&str, &str)] = &[
    ("to_dtype", "no f16/bf16/u32 conversion kernels yet (f32 -> f32 uses the copy kernel)"),
    ("matmul", "GEMM is cuBLAS's job on a GPU; the emulator has no cuBLAS and uses the CPU GEMM (for matmul and for the GEMMs of conv2d and its gradients, whose im2col/col2im are kernels)"),
];

const fn listed(op: &str) -> bool {
    let mut i = 0;
    while i < CPU_FALLBACKS.len() {
        let (a, b) = (CPU_FALLBACKS[i].0.as_bytes(), op.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Runs the CPU reference for `$op`, which must be listed in `CPU_FALLBACKS`.
macro_rules! fallback {
    ($op:literal, $e:expr) => {{
        const { assert!(listed($op), concat!("CPU fallback `", $op, "` is not listed in CPU_FALLBACKS")) };
        $e
    }};
}

/// Memory of the emulated CUDA device: host buffers that only emulated kernels (or a
/// listed CPU fallback) touch.
#[derive(Clone, Debug)]
pub struct EmuStorage(CpuStorage);

impl EmuStorage {
    pub fn from_cpu(cpu: CpuStorage) -> EmuStorage { EmuStorage(cpu) }
}

/// `CudaEmu` is always there; `Cuda` needs libcuda, and its storage is still to come.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda and reports whether it loaded.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl BackendStorage for EmuStorage {
    fn device(&self) -> Device { Device::CudaEmu }
    fn dtype(&self) -> DType { self.0.dtype() }
    fn len(&self) -> usize { self.0.len() }
    fn to_cpu(&self) -> Result<CpuStorage> { Ok(self.0.clone()) }

    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self> {
        if dtype == self.0.dtype() {
            return self.copy_strided(l);
        }
        fallback!("to_dtype", self.0.to_dtype(l, dtype).map(EmuStorage))
    }
    fn copy_strided(&self, l: &Layout) -> Result<Self> { ops::copy_strided(&Emu, &self.0, l).map(EmuStorage) }
    fn copy_into(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> { ops::copy_into(&Emu, &self.0, l, &mut dst.0, dst_l) }
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> { ops::unary(&Emu, &self.0, l, op).map(EmuStorage) }
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self> {
        ops::binary(&Emu, &self.0, l, &rhs.0, rhs_l, op).map(EmuStorage)
    }
    fn reduce(&self, l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<Self> { ops::reduce(&Emu, &self.0, l, op, dims).map(EmuStorage) }
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self> {
        fallback!("matmul", self.0.matmul(l, &rhs.0, rhs_l).map(EmuStorage))
    }
    fn softmax_last(&self, l: &Layout, log: bool) -> Result<Self> { ops::softmax_last(&Emu, &self.0, l, log).map(EmuStorage) }
    fn conv2d(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        ops::conv2d(&Emu, &self.0, l, &w.0, w_l, p).map(EmuStorage)
    }
    fn conv2d_backward_input(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        ops::conv2d_backward_input(&Emu, &self.0, l, &w.0, w_l, p).map(EmuStorage)
    }
    fn conv2d_backward_weight(&self, l: &Layout, grad: &Self, grad_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        ops::conv2d_backward_weight(&Emu, &self.0, l, &grad.0, grad_l, p).map(EmuStorage)
    }
    fn max_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<(Self, Self)> {
        ops::max_pool2d(&Emu, &self.0, l, p).map(|(o, i)| (EmuStorage(o), EmuStorage(i)))
    }
    fn scatter_add_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout, out_plane: usize) -> Result<Self> {
        ops::scatter_add_planes(&Emu, &self.0, l, &idx.0, idx_l, out_plane).map(EmuStorage)
    }
    fn gather_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout) -> Result<Self> {
        ops::gather_planes(&Emu, &self.0, l, &idx.0, idx_l).map(EmuStorage)
    }
    fn avg_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<Self> { ops::avg_pool2d(&Emu, &self.0, l, p).map(EmuStorage) }
    fn avg_pool2d_backward(&self, l: &Layout, p: &Pool2dParams) -> Result<Self> {
        ops::avg_pool2d_backward(&Emu, &self.0, l, p).map(EmuStorage)
    }
    fn upsample_nearest2d(&self, l: &Layout, scale: (usize, usize)) -> Result<Self> {
        ops::upsample_nearest2d(&Emu, &self.0, l, scale).map(EmuStorage)
    }
    fn upsample_nearest2d_backward(&self, l: &Layout, scale: (usize, usize)) -> Result<Self> {
        ops::upsample_nearest2d_backward(&Emu, &self.0, l, scale).map(EmuStorage)
    }
    fn batch_norm_train(&self, l: &Layout, gamma: &Self, beta: &Self, eps: f32) -> Result<(Self, Self, Self)> {
        let (y, m, s) = ops::batch_norm_train(&Emu, &self.0, l, &gamma.0, &beta.0, eps)?;
        Ok((EmuStorage(y), EmuStorage(m), EmuStorage(s)))
    }
    fn batch_norm_backward(&self, l: &Layout, dy: &Self, mean: &Self, invstd: &Self, gamma: &Self) -> Result<(Self, Self, Self)> {
        let (dx, dg, db) = ops::batch_norm_backward(&Emu, &self.0, l, &dy.0, &mean.0, &invstd.0, &gamma.0)?;
        Ok((EmuStorage(dx), EmuStorage(dg), EmuStorage(db)))
    }
    fn optimizer_update(&mut self, grad: &Self, state: &mut [&mut Self], rule: UpdateRule) -> Result<()> {
        let mut bufs: Vec<&mut CpuStorage> = state.iter_mut().map(|s| &mut s.0).collect();
        ops::optimizer_update(&Emu, &mut self.0, &grad.0, &mut bufs, rule)
    }
    fn spatial_attention(&self, l: &Layout, f: &Self, f_l: &Layout, k: f32) -> Result<(Self, Self)> {
        attention::spatial_attention(&Emu, &self.0, l, &f.0, f_l, k).map(|(y, s)| (EmuStorage(y), EmuStorage(s)))
    }
    fn spatial_attention_backward(&self, l: &Layout, f: &Self, f_l: &Layout, dy: &Self, dy_l: &Layout, stats: &Self, k: f32) -> Result<(Self, Self)> {
        attention::spatial_attention_backward(&Emu, &self.0, l, &f.0, f_l, &dy.0, dy_l, &stats.0, k).map(|(a, f)| (EmuStorage(a), EmuStorage(f)))
    }
    fn hoa_products(&self, l: &Layout, order: usize) -> Result<Self> { attention::hoa_products(&Emu, &self.0, l, order).map(EmuStorage) }
    fn hoa_products_backward(&self, l: &Layout, dh: &Self, dh_l: &Layout, order: usize) -> Result<Self> {
        attention::hoa_products_backward(&Emu, &self.0, l, &dh.0, dh_l, order).map(EmuStorage)
    }
    fn hoa_combine(&self, l: &Layout, f: &Self, f_l: &Layout, order: usize) -> Result<Self> {
        attention::hoa_combine(&Emu, &self.0, l, &f.0, f_l, order).map(EmuStorage)
    }
    fn hoa_combine_backward(&self, l: &Layout, f: &Self, f_l: &Layout, dy: &Self, dy_l: &Layout, order: usize) -> Result<(Self, Self)> {
        attention::hoa_combine_backward(&Emu, &self.0, l, &f.0, f_l, &dy.0, dy_l, order).map(|(u, f)| (EmuStorage(u), EmuStorage(f)))
    }
    fn contrastive_normalize(&self, l: &Layout, s: &Self, s_l: &Layout, eps: f32) -> Result<(Self, Self)> {
        attention::contrastive_normalize(&Emu, &self.0, l, &s.0, s_l, eps).map(|(z, n)| (EmuStorage(z), EmuStorage(n)))
    }
    fn contrastive_normalize_backward(&self, l: &Layout, norms: &Self, dzhat: &Self, eps: f32, dtype: DType) -> Result<(Self, Self)> {
        attention::contrastive_normalize_backward(&Emu, &self.0, l, &norms.0, &dzhat.0, eps, dtype).map(|(t, s)| (EmuStorage(t), EmuStorage(s)))
    }
    fn contrastive_rows(&self, l: &Layout, tau: f32) -> Result<(Self, Self)> {
        attention::contrastive_rows_fwd(&Emu, &self.0, l, tau).map(|(a, b)| (EmuStorage(a), EmuStorage(b)))
    }
    fn contrastive_sym(&self, l: &Layout, lse: &Self, dloss: &Self, dloss_l: &Layout, tau: f32) -> Result<Self> {
        attention::contrastive_sym(&Emu, &self.0, l, &lse.0, &dloss.0, dloss_l, tau).map(EmuStorage)
    }
}
