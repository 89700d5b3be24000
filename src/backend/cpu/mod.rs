//! The CPU backend: the readable reference every other backend is checked against, and
//! the default for users without a GPU, so hot paths are multithreaded (rayon) and GEMM
//! goes through the `gemm` crate.

pub(crate) mod batch_norm;
pub(crate) mod buffers;
mod conv;
mod conv1x1;
mod conv3x3;
mod conv3x3_s2;
mod conv3x3_weight;
mod elementwise;
mod matmul;
mod optim;
mod pool;
mod reduce;
pub(crate) mod simd;
mod softmax;
mod winograd;

pub use winograd::set_enabled as set_winograd;

/// Also used by the CUDA backend to shape its strided kernel arguments.
pub(crate) use elementwise::coalesce;

use super::{BackendStorage, BinaryOp, Conv2dParams, Pool2dParams, ReduceOp, UnaryOp, UpdateRule};
use crate::{bail, DType, Device, Error, Layout, Result};
use half::{bf16, f16};
use std::borrow::Cow;

/// Work below this many elements stays on the calling thread: rayon's fork-join costs
/// a few microseconds, more than a small loop.
pub(crate) const PAR_THRESHOLD: usize = 1 << 15;

#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U32(Vec<u32>),
}

/// Deterministic values in [-1, 1) for the kernels' unit tests.
#[cfg(test)]
pub(crate) fn test_rand(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::rng::Rng::new(seed);
    (0..n).map(|_| rng.range(-1.0, 1.0)).collect()
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        if let CpuStorage::F32(v) = self {
            buffers::recycle(std::mem::take(v));
        }
    }
}

impl CpuStorage {
    pub fn f32(&self, op: &'static str) -> Result<&[f32]> {
        match self {
            CpuStorage::F32(v) => Ok(v),
            s => Err(Error::DType { op, expected: DType::F32, got: s.dtype() }),
        }
    }
    pub fn f32_mut(&mut self, op: &'static str) -> Result<&mut Vec<f32>> {
        match self {
            CpuStorage::F32(v) => Ok(v),
            s => Err(Error::DType { op, expected: DType::F32, got: s.dtype() }),
        }
    }
    pub fn u32(&self, op: &'static str) -> Result<&[u32]> {
        match self {
            CpuStorage::U32(v) => Ok(v),
            s => Err(Error::DType { op, expected: DType::U32, got: s.dtype() }),
        }
    }
    /// The contiguous f32 slice a layout covers, or an error naming the op.
    pub(crate) fn contiguous_f32<'a>(&'a self, l: &Layout, op: &'static str) -> Result<&'a [f32]> {
        let data = self.f32(op)?;
        match l.contiguous_range() {
            Some(r) => Ok(&data[r]),
            None => bail!("{op}: expected a contiguous input, got strides {:?} for shape {:?}", l.strides(), l.shape()),
        }
    }
    pub(crate) fn contiguous_u32<'a>(&'a self, l: &Layout, op: &'static str) -> Result<&'a [u32]> {
        let data = self.u32(op)?;
        match l.contiguous_range() {
            Some(r) => Ok(&data[r]),
            None => bail!("{op}: expected contiguous indices"),
        }
    }
    /// A contiguous f32 or bf16 view as f32: borrowed for f32, widened for bf16 (the
    /// fused attention ops take either and compute in f32).
    pub(crate) fn f32_view<'a>(&'a self, l: &Layout, op: &'static str) -> Result<Cow<'a, [f32]>> {
        match self {
            CpuStorage::BF16(v) => match l.contiguous_range() {
                Some(r) => Ok(Cow::Owned(v[r].iter().map(|x| x.to_f32()).collect())),
                None => bail!("{op}: expected a contiguous input, got strides {:?} for shape {:?}", l.strides(), l.shape()),
            },
            _ => self.contiguous_f32(l, op).map(Cow::Borrowed),
        }
    }
    /// f32 results stored as `dtype` (f32 or bf16, rounded to nearest even).
    pub(crate) fn from_f32_as(v: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::BF16 => {
                let out = CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect());
                buffers::recycle(v);
                out
            }
            _ => CpuStorage::F32(v),
        }
    }
    /// The elements of a view, in row-major order, as f32.
    pub fn to_f32_vec(&self, l: &Layout) -> Vec<f32> {
        fn gather<T: Copy>(v: &[T], l: &Layout, f: impl Fn(T) -> f32) -> Vec<f32> {
            let mut out = Vec::with_capacity(l.elem_count());
            l.for_each_run(|start, stride, n| out.extend((0..n).map(|i| f(v[start + i * stride]))));
            out
        }
        match self {
            CpuStorage::F32(v) => gather(v, l, |x| x),
            CpuStorage::F16(v) => gather(v, l, f16::to_f32),
            CpuStorage::BF16(v) => gather(v, l, bf16::to_f32),
            CpuStorage::U32(v) => gather(v, l, |x| x as f32),
        }
    }
}

impl BackendStorage for CpuStorage {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::U32(_) => DType::U32,
        }
    }
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
        }
    }
    fn to_cpu(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }

    fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Self> {
        let v = self.to_f32_vec(l);
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
            DType::U32 => CpuStorage::U32(v.into_iter().map(|x| x as u32).collect()),
        })
    }
    fn copy_strided(&self, l: &Layout) -> Result<Self> {
        elementwise::copy_strided(self, l)
    }
    fn copy_into(&self, l: &Layout, dst: &mut Self, dst_l: &Layout) -> Result<()> {
        elementwise::copy_into(self, l, dst, dst_l)
    }
    fn unary(&self, l: &Layout, op: UnaryOp) -> Result<Self> {
        elementwise::unary(self.f32("unary")?, l, op).map(CpuStorage::F32)
    }
    fn binary(&self, l: &Layout, rhs: &Self, rhs_l: &Layout, op: BinaryOp) -> Result<Self> {
        elementwise::binary(self.f32("binary")?, l, rhs.f32("binary")?, rhs_l, op).map(CpuStorage::F32)
    }
    fn reduce(&self, l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<Self> {
        reduce::reduce(self.f32("reduce")?, l, op, dims).map(CpuStorage::F32)
    }
    fn matmul(&self, l: &Layout, rhs: &Self, rhs_l: &Layout) -> Result<Self> {
        matmul::matmul(self.f32("matmul")?, l, rhs.f32("matmul")?, rhs_l).map(CpuStorage::F32)
    }
    fn softmax_last(&self, l: &Layout, log: bool) -> Result<Self> {
        softmax::softmax_last(self.contiguous_f32(l, "softmax")?, l, log).map(CpuStorage::F32)
    }
    fn conv2d(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        conv::conv2d(self.contiguous_f32(l, "conv2d")?, w.contiguous_f32(w_l, "conv2d")?, p).map(CpuStorage::F32)
    }
    fn conv2d_backward_input(&self, l: &Layout, w: &Self, w_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        let (g, w) = (self.contiguous_f32(l, "conv2d_backward_input")?, w.contiguous_f32(w_l, "conv2d_backward_input")?);
        conv::conv2d_backward_input(g, w, p).map(CpuStorage::F32)
    }
    fn conv2d_backward_weight(&self, l: &Layout, grad: &Self, grad_l: &Layout, p: &Conv2dParams) -> Result<Self> {
        let (x, g) = (self.contiguous_f32(l, "conv2d_backward_weight")?, grad.contiguous_f32(grad_l, "conv2d_backward_weight")?);
        conv::conv2d_backward_weight(x, g, p).map(CpuStorage::F32)
    }
    fn max_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<(Self, Self)> {
        let (o, i) = pool::max_pool2d(self.contiguous_f32(l, "max_pool2d")?, p)?;
        Ok((CpuStorage::F32(o), CpuStorage::U32(i)))
    }
    fn scatter_add_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout, out_plane: usize) -> Result<Self> {
        let (src, idx) = (self.contiguous_f32(l, "scatter_add_planes")?, idx.contiguous_u32(idx_l, "scatter_add_planes")?);
        pool::scatter_add_planes(src, l.shape(), idx, out_plane).map(CpuStorage::F32)
    }
    fn gather_planes(&self, l: &Layout, idx: &Self, idx_l: &Layout) -> Result<Self> {
        let (src, ix) = (self.contiguous_f32(l, "gather_planes")?, idx.contiguous_u32(idx_l, "gather_planes")?);
        pool::gather_planes(src, l.shape(), ix, idx_l.shape()).map(CpuStorage::F32)
    }
    fn avg_pool2d(&self, l: &Layout, p: &Pool2dParams) -> Result<Self> {
        pool::avg_pool2d(self.contiguous_f32(l, "avg_pool2d")?, p).map(CpuStorage::F32)
    }
    fn avg_pool2d_backward(&self, l: &Layout, p: &Pool2dParams) -> Result<Self> {
        pool::avg_pool2d_backward(self.contiguous_f32(l, "avg_pool2d_backward")?, p).map(CpuStorage::F32)
    }
    fn upsample_nearest2d(&self, l: &Layout, scale: (usize, usize)) -> Result<Self> {
        pool::upsample_nearest2d(self.contiguous_f32(l, "upsample_nearest2d")?, l.shape(), scale).map(CpuStorage::F32)
    }
    fn upsample_nearest2d_backward(&self, l: &Layout, scale: (usize, usize)) -> Result<Self> {
        pool::upsample_nearest2d_backward(self.contiguous_f32(l, "upsample_nearest2d_backward")?, l.shape(), scale).map(CpuStorage::F32)
    }
    fn batch_norm_train(&self, l: &Layout, gamma: &Self, beta: &Self, eps: f32) -> Result<(Self, Self, Self)> {
        let x = self.contiguous_f32(l, "batch_norm")?;
        let (y, m, s) = batch_norm::forward_train(x, l.shape(), gamma.f32("batch_norm")?, beta.f32("batch_norm")?, eps)?;
        Ok((CpuStorage::F32(y), CpuStorage::F32(m), CpuStorage::F32(s)))
    }
    fn batch_norm_backward(&self, l: &Layout, dy: &Self, mean: &Self, invstd: &Self, gamma: &Self) -> Result<(Self, Self, Self)> {
        let x = self.contiguous_f32(l, "batch_norm_backward")?;
        let dy = dy.contiguous_f32(l, "batch_norm_backward")?;
        let (dx, dg, db) = batch_norm::backward(x, l.shape(), dy, mean.f32("bn")?, invstd.f32("bn")?, gamma.f32("bn")?)?;
        Ok((CpuStorage::F32(dx), CpuStorage::F32(dg), CpuStorage::F32(db)))
    }
    fn channel_affine(&self, l: &Layout, scale: &Self, shift: &Self) -> Result<Self> {
        let op = "channel_affine";
        Ok(CpuStorage::F32(batch_norm::channel_affine(self.contiguous_f32(l, op)?, l.shape(), scale.f32(op)?, shift.f32(op)?)?))
    }
    fn optimizer_update(&mut self, grad: &Self, state: &mut [&mut Self], rule: UpdateRule) -> Result<()> {
        let g = grad.f32("optimizer_update")?;
        let mut bufs = Vec::with_capacity(state.len());
        for s in state.iter_mut() {
            bufs.push(s.f32_mut("optimizer_update")?.as_mut_slice());
        }
        optim::update(self.f32_mut("optimizer_update")?, g, &mut bufs, rule)
    }
}
