//! The backend ops that have kernels, written once against `Gpu`: the emulator and a
//! real GPU run exactly this host code. Each checks dtypes, picks the kernel and the
//! launch geometry, and launches it through its typed launcher (`launchers::k`).

use super::launch::{check_u32, ConvGeom, Gpu, KernelLayout, LaunchCfg, PoolGeom};
use super::launchers::{k, Kernel};
use crate::backend::{BinaryOp, Conv2dParams, Pool2dParams, ReduceOp, UnaryOp, UpdateRule};
use crate::{bail, DType, Error, Layout, Result};

fn want_f32<G: Gpu>(g: &G, b: &G::Buf, op: &'static str) -> Result<()> {
    match g.dtype(b) {
        DType::F32 => Ok(()),
        got => Err(Error::DType { op, expected: DType::F32, got }),
    }
}

/// The op's parameters as the unary kernels' `p0, p1`.
fn unary_params(op: UnaryOp) -> (f32, f32) {
    match op {
        UnaryOp::LeakyRelu(s) | UnaryOp::LeakyStep(s) | UnaryOp::Powf(s) => (s, 0.0),
        UnaryOp::Clamp(a, b) | UnaryOp::InRange(a, b) | UnaryOp::Affine(a, b) => (a, b),
        _ => (0.0, 0.0),
    }
}

/// The unary kernel of `op`: `(n, lx, x, y, p0, p1)`.
fn unary_kernel(op: UnaryOp) -> Kernel<(u32, KernelLayout, u64, u64, f32, f32)> {
    match op {
        UnaryOp::Neg => k::uneg_f32,
        UnaryOp::Recip => k::urecip_f32,
        UnaryOp::Exp => k::uexp_f32,
        UnaryOp::Log => k::ulog_f32,
        UnaryOp::Sqrt => k::usqrt_f32,
        UnaryOp::Sqr => k::usqr_f32,
        UnaryOp::Abs => k::uabs_f32,
        UnaryOp::Sign => k::usign_f32,
        UnaryOp::Relu => k::urelu_f32,
        UnaryOp::Sigmoid => k::usigmoid_f32,
        UnaryOp::Tanh => k::utanh_f32,
        UnaryOp::LeakyRelu(_) => k::uleaky_relu_f32,
        UnaryOp::LeakyStep(_) => k::uleaky_step_f32,
        UnaryOp::Powf(_) => k::upowf_f32,
        UnaryOp::Clamp(..) => k::uclamp_f32,
        UnaryOp::InRange(..) => k::uin_range_f32,
        UnaryOp::Affine(..) => k::uaffine_f32,
    }
}

/// The binary kernel of `op`: `(n, la, a, lb, b, y)`.
fn binary_kernel(op: BinaryOp) -> Kernel<(u32, KernelLayout, u64, KernelLayout, u64, u64)> {
    match op {
        BinaryOp::Add => k::badd_f32,
        BinaryOp::Sub => k::bsub_f32,
        BinaryOp::Mul => k::bmul_f32,
        BinaryOp::Div => k::bdiv_f32,
        BinaryOp::Max => k::bmax_f32,
        BinaryOp::Min => k::bmin_f32,
        BinaryOp::Eq => k::beq_f32,
        BinaryOp::Gt => k::bgt_f32,
        BinaryOp::WherePositive => k::bwhere_positive_f32,
    }
}

/// The reduction kernel of `op`: `(n_out, n_red, kept, red, x, y)`.
fn reduce_kernel(op: ReduceOp) -> Kernel<(u32, u32, KernelLayout, KernelLayout, u64, u64)> {
    match op {
        ReduceOp::Sum => k::rsum_f32,
        ReduceOp::Max => k::rmax_f32,
        ReduceOp::Min => k::rmin_f32,
    }
}

pub fn unary<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, op: UnaryOp) -> Result<G::Buf> {
    want_f32(g, x, "unary")?;
    let n = check_u32(l.elem_count())?;
    let mut y = g.alloc(n as usize, DType::F32)?;
    if n > 0 {
        let (p0, p1) = unary_params(op);
        let args = (n, KernelLayout::new(l)?, g.ptr(x, 0), g.ptr_mut(&mut y, 0), p0, p1);
        unary_kernel(op).launch(g, LaunchCfg::elementwise(n), args)?;
    }
    Ok(y)
}

pub fn binary<G: Gpu>(g: &G, a: &G::Buf, la: &Layout, b: &G::Buf, lb: &Layout, op: BinaryOp) -> Result<G::Buf> {
    want_f32(g, a, "binary")?;
    want_f32(g, b, "binary")?;
    if la.shape() != lb.shape() {
        bail!("binary {op:?}: operands must be broadcast to one shape, got {:?} and {:?}", la.shape(), lb.shape());
    }
    let n = check_u32(la.elem_count())?;
    let mut y = g.alloc(n as usize, DType::F32)?;
    if n > 0 {
        let kl = KernelLayout::joint(&[la, lb])?;
        let args = (n, kl[0], g.ptr(a, 0), kl[1], g.ptr(b, 0), g.ptr_mut(&mut y, 0));
        binary_kernel(op).launch(g, LaunchCfg::elementwise(n), args)?;
    }
    Ok(y)
}

/// Strided copies move bits: 32-bit words for f32/u32, 16-bit for f16/bf16.
fn copy_kernel(dtype: DType) -> Kernel<(u32, KernelLayout, u64, u64)> {
    match dtype {
        DType::F32 | DType::U32 => k::copy32,
        DType::F16 | DType::BF16 => k::copy16,
    }
}

fn copy_into_kernel(dtype: DType) -> Kernel<(u32, KernelLayout, u64, KernelLayout, u64)> {
    match dtype {
        DType::F32 | DType::U32 => k::copy32_into,
        DType::F16 | DType::BF16 => k::copy16_into,
    }
}

pub fn copy_strided<G: Gpu>(g: &G, x: &G::Buf, l: &Layout) -> Result<G::Buf> {
    let dtype = g.dtype(x);
    let n = check_u32(l.elem_count())?;
    let mut y = g.alloc(n as usize, dtype)?;
    if n > 0 {
        let args = (n, KernelLayout::new(l)?, g.ptr(x, 0), g.ptr_mut(&mut y, 0));
        copy_kernel(dtype).launch(g, LaunchCfg::elementwise(n), args)?;
    }
    Ok(y)
}

pub fn copy_into<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, dst: &mut G::Buf, dst_l: &Layout) -> Result<()> {
    if l.shape() != dst_l.shape() {
        bail!("copy_into: shapes {:?} and {:?} differ", l.shape(), dst_l.shape());
    }
    if g.dtype(x) != g.dtype(dst) {
        bail!("copy_into: dtypes {:?} and {:?} differ", g.dtype(x), g.dtype(dst));
    }
    let n = check_u32(l.elem_count())?;
    if n > 0 {
        let kl = KernelLayout::joint(&[l, dst_l])?;
        let args = (n, kl[0], g.ptr(x, 0), kl[1], g.ptr_mut(dst, 0));
        copy_into_kernel(g.dtype(x)).launch(g, LaunchCfg::elementwise(n), args)?;
    }
    Ok(())
}

/// Splits the view into the kept dims (in output order) and the reduced dims, as the
/// CPU reference does; the kernel reduces `x[kept(o) + red(j)]` over j.
pub fn reduce<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, op: ReduceOp, dims: &[usize]) -> Result<G::Buf> {
    want_f32(g, x, "reduce")?;
    if let Some(&d) = dims.iter().find(|&&d| d >= l.rank()) {
        bail!("reduce: axis {d} out of range for shape {:?}", l.shape());
    }
    let pick = |red: bool, offset| {
        let ds: Vec<usize> = (0..l.rank()).filter(|d| dims.contains(d) == red).collect();
        let shape: Vec<usize> = ds.iter().map(|&d| l.shape()[d]).collect();
        let strides: Vec<usize> = ds.iter().map(|&d| l.strides()[d]).collect();
        if shape.is_empty() {
            Layout::new(vec![1], vec![0], offset)
        } else {
            Layout::new(shape, strides, offset)
        }
    };
    let (kept, red) = (pick(false, l.offset()), pick(true, 0));
    let (n_out, n_red) = (check_u32(kept.elem_count())?, check_u32(red.elem_count())?);
    check_u32(l.offset() + l.elem_count())?;
    let mut y = g.alloc(n_out as usize, DType::F32)?;
    if n_out > 0 {
        let args = (n_out, n_red, KernelLayout::new(&kept)?, KernelLayout::new(&red)?, g.ptr(x, 0), g.ptr_mut(&mut y, 0));
        reduce_kernel(op).launch(g, LaunchCfg::rows(n_out, n_red), args)?;
    }
    Ok(y)
}

pub fn softmax_last<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, log: bool) -> Result<G::Buf> {
    want_f32(g, x, "softmax")?;
    let Some(range) = l.contiguous_range() else {
        bail!("softmax: expected a contiguous input, got strides {:?} for shape {:?}", l.strides(), l.shape());
    };
    let n = check_u32(range.end)?;
    let d = *l.shape().last().unwrap_or(&1) as u32;
    let mut y = g.alloc(l.elem_count(), DType::F32)?;
    if l.elem_count() > 0 && d > 0 {
        let rows = (l.elem_count() / d as usize) as u32;
        debug_assert!(rows <= n);
        let args = (rows, d, g.ptr(x, range.start), g.ptr_mut(&mut y, 0));
        let kernel = if log { k::log_softmax_f32 } else { k::softmax_f32 };
        kernel.launch(g, LaunchCfg::rows(rows, d), args)?;
    }
    Ok(y)
}

pub fn optimizer_update<G: Gpu>(g: &G, p: &mut G::Buf, grad: &G::Buf, state: &mut [&mut G::Buf], rule: UpdateRule) -> Result<()> {
    want_f32(g, p, "optimizer_update")?;
    want_f32(g, grad, "optimizer_update")?;
    let len = g.len(p);
    if g.len(grad) != len || state.iter().any(|s| g.len(s) != len || g.dtype(s) != DType::F32) {
        bail!("optimizer update: parameter, gradient and state lengths differ");
    }
    let n = check_u32(len)?;
    let (pp, gp) = (g.ptr_mut(p, 0), g.ptr(grad, 0));
    match (rule, state) {
        (UpdateRule::Sgd { lr, momentum, weight_decay, nesterov }, [buf]) => {
            let args = (n, pp, gp, g.ptr_mut(buf, 0), lr, momentum, weight_decay, nesterov as i32);
            k::sgd_f32.launch(g, LaunchCfg::elementwise(n), args)
        }
        (UpdateRule::Adam { lr, beta1, beta2, eps, weight_decay, step }, [m, v]) => {
            // the CPU reference's f32 arithmetic for the bias corrections
            let bc1 = 1.0 - beta1.powi(step as i32);
            let bc2 = 1.0 - beta2.powi(step as i32);
            let args = (n, pp, gp, g.ptr_mut(m, 0), g.ptr_mut(v, 0), beta1, beta2, eps, weight_decay, lr / bc1, bc2.sqrt());
            k::adam_f32.launch(g, LaunchCfg::elementwise(n), args)
        }
        (rule, s) => bail!("optimizer update {rule:?}: wrong number of state buffers ({})", s.len()),
    }
}

/// The start of a contiguous f32 view, or an error naming the op.
fn contiguous<G: Gpu>(g: &G, b: &G::Buf, l: &Layout, op: &'static str) -> Result<usize> {
    want_f32(g, b, op)?;
    match l.contiguous_range() {
        Some(r) if r.end <= g.len(b) => Ok(check_u32(r.end).map(|_| r.start)?),
        _ => bail!("{op}: expected a contiguous input, got strides {:?} for shape {:?}", l.strides(), l.shape()),
    }
}

/// `Storage` has run `Pool2dParams::check`; the kernels read and write out of bounds if
/// a direct call skipped it, hence a hard assert rather than a second error message.
fn assert_pool_operand(l: &Layout, shape: [usize; 4]) {
    assert_eq!(l.elem_count(), shape.iter().product::<usize>(), "Pool2dParams::check runs first (in Storage)");
}

pub fn max_pool2d<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, p: &Pool2dParams) -> Result<(G::Buf, G::Buf)> {
    let off = contiguous(g, x, l, "max_pool2d")?;
    assert_pool_operand(l, p.input_shape());
    let n = check_u32(p.output_shape().iter().product())?;
    let (mut y, mut idx) = (g.alloc(n as usize, DType::F32)?, g.alloc(n as usize, DType::U32)?);
    let args = (n, PoolGeom::new(p), g.ptr(x, off), g.ptr_mut(&mut y, 0), g.ptr_mut(&mut idx, 0));
    k::max_pool2d_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok((y, idx))
}

pub fn avg_pool2d<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, p: &Pool2dParams) -> Result<G::Buf> {
    let off = contiguous(g, x, l, "avg_pool2d")?;
    assert_pool_operand(l, p.input_shape());
    let n = check_u32(p.output_shape().iter().product())?;
    let mut y = g.alloc(n as usize, DType::F32)?;
    let args = (n, PoolGeom::new(p), g.ptr(x, off), g.ptr_mut(&mut y, 0));
    k::avg_pool2d_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(y)
}

/// `grad` has the pooled shape; returns the input-shaped gradient.
pub fn avg_pool2d_backward<G: Gpu>(g: &G, grad: &G::Buf, l: &Layout, p: &Pool2dParams) -> Result<G::Buf> {
    let off = contiguous(g, grad, l, "avg_pool2d_backward")?;
    assert_pool_operand(l, p.output_shape());
    let n = check_u32(p.input_shape().iter().product())?;
    let mut dx = g.alloc(n as usize, DType::F32)?;
    let args = (n, PoolGeom::new(p), g.ptr(grad, off), g.ptr_mut(&mut dx, 0));
    k::avg_pool2d_backward_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(dx)
}

/// `(b * c, elements per plane)` of a `[b, c, ...]` shape.
fn planes(shape: &[usize], op: &str) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        bail!("{op}: expected a [batch, channels, ...] shape, got {shape:?}");
    }
    Ok((shape[0] * shape[1], shape[2..].iter().product()))
}

/// The index buffer of gather/scatter: contiguous u32.
fn indices<G: Gpu>(g: &G, idx: &G::Buf, l: &Layout, op: &'static str) -> Result<usize> {
    match (g.dtype(idx), l.contiguous_range()) {
        (DType::U32, Some(r)) if r.end <= g.len(idx) => Ok(r.start),
        (DType::U32, _) => bail!("{op}: expected contiguous indices"),
        (got, _) => Err(Error::DType { op, expected: DType::U32, got }),
    }
}

/// `out[i] = src[plane(i), idx[i]]`. Indices past a plane read 0 (no device-side error
/// path; the indices come from max_pool2d, always in range).
pub fn gather_planes<G: Gpu>(g: &G, src: &G::Buf, l: &Layout, idx: &G::Buf, idx_l: &Layout) -> Result<G::Buf> {
    let off = contiguous(g, src, l, "gather_planes")?;
    let ioff = indices(g, idx, idx_l, "gather_planes")?;
    let ((planes_s, plane), (planes_i, len)) = (planes(l.shape(), "gather_planes")?, planes(idx_l.shape(), "gather_planes")?);
    if planes_s != planes_i {
        bail!("gather_planes: source {:?} and indices {:?} do not have the same planes", l.shape(), idx_l.shape());
    }
    let n = check_u32(idx_l.elem_count())?;
    let mut out = g.alloc(n as usize, DType::F32)?;
    let args = (n, len as u32, plane as u32, g.ptr(src, off), g.ptr(idx, ioff), g.ptr_mut(&mut out, 0));
    k::gather_planes_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(out)
}

/// `out[plane, idx[i]] += src[i]` into zeroed planes of `out_plane` elements. Indices
/// past a plane are skipped.
pub fn scatter_add_planes<G: Gpu>(g: &G, src: &G::Buf, l: &Layout, idx: &G::Buf, idx_l: &Layout, out_plane: usize) -> Result<G::Buf> {
    let off = contiguous(g, src, l, "scatter_add_planes")?;
    let ioff = indices(g, idx, idx_l, "scatter_add_planes")?;
    let (planes, len) = planes(l.shape(), "scatter_add_planes")?;
    if idx_l.elem_count() != l.elem_count() {
        bail!("scatter_add_planes: {} values and {} indices", l.elem_count(), idx_l.elem_count());
    }
    let n = check_u32(l.elem_count())?;
    let mut out = g.zeros(check_u32(planes * out_plane)? as usize, DType::F32)?;
    let args = (n, len as u32, out_plane as u32, g.ptr(src, off), g.ptr(idx, ioff), g.ptr_mut(&mut out, 0));
    k::scatter_add_planes_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(out)
}

fn nchw(l: &Layout, op: &str) -> Result<[usize; 4]> {
    match l.shape() {
        &[b, c, h, w] => Ok([b, c, h, w]),
        s => bail!("{op}: expected an NCHW tensor, got shape {s:?}"),
    }
}

pub fn upsample_nearest2d<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, (sh, sw): (usize, usize)) -> Result<G::Buf> {
    let off = contiguous(g, x, l, "upsample_nearest2d")?;
    let [b, c, h, w] = nchw(l, "upsample_nearest2d")?;
    let n = check_u32(b * c * h * sh * w * sw)?;
    let mut y = g.alloc(n as usize, DType::F32)?;
    let u = |v: usize| v as u32;
    let args = (n, u(h), u(w), u(sh), u(sw), g.ptr(x, off), g.ptr_mut(&mut y, 0));
    k::upsample_nearest2d_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(y)
}

/// `grad` has the upsampled shape `[b, c, h * sh, w * sw]`; returns `[b, c, h, w]`.
pub fn upsample_nearest2d_backward<G: Gpu>(g: &G, grad: &G::Buf, l: &Layout, (sh, sw): (usize, usize)) -> Result<G::Buf> {
    let off = contiguous(g, grad, l, "upsample_nearest2d_backward")?;
    let [b, c, ho, wo] = nchw(l, "upsample_nearest2d_backward")?;
    if sh == 0 || sw == 0 || ho % sh != 0 || wo % sw != 0 {
        bail!("upsample_nearest2d_backward: gradient {:?} is not a multiple of the scale ({sh}, {sw})", l.shape());
    }
    let (h, w) = (ho / sh, wo / sw);
    let n = check_u32(b * c * h * w)?;
    let mut dx = g.alloc(n as usize, DType::F32)?;
    let u = |v: usize| v as u32;
    let args = (n, u(h), u(w), u(sh), u(sw), g.ptr(grad, off), g.ptr_mut(&mut dx, 0));
    k::upsample_nearest2d_backward_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(dx)
}

/// `(n, c, spatial)` of a contiguous `[n, c, ...]` batch-norm input, and its offset.
pub(crate) fn bn_dims<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, op: &'static str) -> Result<(usize, [u32; 3])> {
    let off = contiguous(g, x, l, op)?;
    let shape = l.shape();
    if shape.len() < 2 || shape[0] * shape[2..].iter().product::<usize>() == 0 {
        bail!("{op}: expected a [n, c, ...] input with values per channel, got shape {shape:?}");
    }
    Ok((off, [shape[0] as u32, shape[1] as u32, shape[2..].iter().product::<usize>() as u32]))
}

pub(crate) fn per_channel<G: Gpu>(g: &G, v: &G::Buf, c: u32, name: &str) -> Result<()> {
    if g.dtype(v) != DType::F32 || g.len(v) != c as usize {
        bail!("batch_norm: {name} must be {c} f32 values, got {} of {:?}", g.len(v), g.dtype(v));
    }
    Ok(())
}

pub fn batch_norm_train<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, gamma: &G::Buf, beta: &G::Buf, eps: f32) -> Result<(G::Buf, G::Buf, G::Buf)> {
    let (off, [n, c, s]) = bn_dims(g, x, l, "batch_norm")?;
    per_channel(g, gamma, c, "gamma")?;
    per_channel(g, beta, c, "beta")?;
    let total = n * c * s;
    let (mut y, mut mean, mut invstd) = (g.alloc(total as usize, DType::F32)?, g.alloc(c as usize, DType::F32)?, g.alloc(c as usize, DType::F32)?);
    let (xp, mp, ip) = (g.ptr(x, off), g.ptr_mut(&mut mean, 0), g.ptr_mut(&mut invstd, 0));
    k::bn_stats_f32.launch(g, LaunchCfg::rows(c, n * s), (n, c, s, eps, xp, mp, ip))?;
    let apply = (total, c, s, xp, mp, ip, g.ptr(gamma, 0), g.ptr(beta, 0), g.ptr_mut(&mut y, 0));
    k::bn_apply_f32.launch(g, LaunchCfg::elementwise(total), apply)?;
    Ok((y, mean, invstd))
}

/// `x * scale[c] + shift[c]` (kernels/batch_norm.cu).
pub fn channel_affine<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, scale: &G::Buf, shift: &G::Buf) -> Result<G::Buf> {
    let (off, [n, c, s]) = bn_dims(g, x, l, "channel_affine")?;
    per_channel(g, scale, c, "scale")?;
    per_channel(g, shift, c, "shift")?;
    let total = n * c * s;
    let mut y = g.alloc(total as usize, DType::F32)?;
    let args = (total, c, s, g.ptr(x, off), g.ptr(scale, 0), g.ptr(shift, 0), g.ptr_mut(&mut y, 0));
    k::channel_affine_f32.launch(g, LaunchCfg::elementwise(total), args)?;
    Ok(y)
}

/// Returns `(dx, dgamma, dbeta)`; `dy` has `x`'s layout.
pub fn batch_norm_backward<G: Gpu>(
    g: &G,
    x: &G::Buf,
    l: &Layout,
    dy: &G::Buf,
    mean: &G::Buf,
    invstd: &G::Buf,
    gamma: &G::Buf,
) -> Result<(G::Buf, G::Buf, G::Buf)> {
    let (off, [n, c, s]) = bn_dims(g, x, l, "batch_norm_backward")?;
    let dy_off = contiguous(g, dy, l, "batch_norm_backward")?;
    for (v, name) in [(mean, "mean"), (invstd, "invstd"), (gamma, "gamma")] {
        per_channel(g, v, c, name)?;
    }
    let total = n * c * s;
    let (mut dx, mut dgamma, mut dbeta) = (g.alloc(total as usize, DType::F32)?, g.alloc(c as usize, DType::F32)?, g.alloc(c as usize, DType::F32)?);
    let (xp, dyp, mp, ip) = (g.ptr(x, off), g.ptr(dy, dy_off), g.ptr(mean, 0), g.ptr(invstd, 0));
    let (dgp, dbp) = (g.ptr_mut(&mut dgamma, 0), g.ptr_mut(&mut dbeta, 0));
    k::bn_backward_reduce_f32.launch(g, LaunchCfg::rows(c, n * s), (n, c, s, xp, dyp, mp, ip, dgp, dbp))?;
    let args = (total, c, s, n * s, xp, dyp, mp, ip, g.ptr(gamma, 0), dgp, dbp, g.ptr_mut(&mut dx, 0));
    k::bn_backward_dx_f32.launch(g, LaunchCfg::elementwise(total), args)?;
    Ok((dx, dgamma, dbeta))
}

// Convolution as GEMMs over column buffers `col[b, c_in * kh * kw, h_out * w_out]`
// (kernels/conv.cu), one GEMM per group. With K = c_in/groups * kh * kw columns per
// group and L = h_out * w_out: forward out_g = W_g [c_out/g, K] x col_g [K, L];
// input gradient col_g = W_gᵀ x grad_g, then col2im; weight gradient
// dW_g = sum over the batch of grad_g x col_gᵀ (`Gpu::matmul_sum`).

struct ConvDims {
    b: usize,
    co_g: usize,
    k_g: usize,
    l: usize,
}

/// The GEMM dimensions of params that passed `Conv2dParams::check` (in `Storage`).
fn conv_dims(p: &Conv2dParams) -> Result<ConvDims> {
    check_u32(p.batch * p.c_in * p.kh * p.kw * p.h_out() * p.w_out())?;
    Ok(ConvDims { b: p.batch, co_g: p.c_out / p.groups, k_g: p.c_in / p.groups * p.kh * p.kw, l: p.h_out() * p.w_out() })
}

/// The start of a contiguous operand with `shape`'s element count. `Storage` has
/// checked the shape; the kernels would read out of bounds if a direct call skipped
/// that, hence a hard assert rather than a second error message.
fn conv_operand<G: Gpu>(g: &G, b: &G::Buf, l: &Layout, shape: [usize; 4], op: &'static str) -> Result<usize> {
    let off = contiguous(g, b, l, op)?;
    assert_eq!(l.elem_count(), shape.iter().product::<usize>(), "{op}: Conv2dParams::check runs first (in Storage)");
    Ok(off)
}

/// The column buffer `[b, c_in * kh * kw, h_out * w_out]` of a contiguous input alone
/// (for benches; the convolutions call `im2col` below).
pub fn im2col_of<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, p: &Conv2dParams) -> Result<G::Buf> {
    // a bench entry beside `Storage`, so it runs the family's check itself
    p.check("im2col", &[("input", l, Conv2dParams::input_shape)])?;
    conv_dims(p)?;
    let off = conv_operand(g, x, l, p.input_shape(), "im2col")?;
    im2col(g, x, off, p)
}

fn im2col<G: Gpu>(g: &G, x: &G::Buf, off: usize, p: &Conv2dParams) -> Result<G::Buf> {
    let n = check_u32(p.batch * p.c_in * p.kh * p.kw * p.h_out() * p.w_out())?;
    let mut col = g.alloc(n as usize, DType::F32)?;
    let args = (n, ConvGeom::new(p), g.ptr(x, off), g.ptr_mut(&mut col, 0));
    k::im2col_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(col)
}

/// Writes the `[b, rows, cols]` result of group `gi` into rows `gi * rows..` of a
/// `[b, rows * groups, cols]` output, or returns it as is for one group.
fn place_group<G: Gpu>(g: &G, part: G::Buf, out: &mut Option<G::Buf>, gi: usize, groups: usize, [b, rows, cols]: [usize; 3]) -> Result<()> {
    if groups == 1 {
        *out = Some(part);
        return Ok(());
    }
    let dst = match out {
        Some(d) => d,
        None => out.insert(g.alloc(b * rows * groups * cols, DType::F32)?),
    };
    let dst_l = Layout::new(vec![b, rows, cols], vec![rows * groups * cols, cols, 1], gi * rows * cols);
    copy_into(g, &part, &Layout::contiguous(&[b, rows, cols]), dst, &dst_l)
}

pub fn conv2d<G: Gpu>(g: &G, x: &G::Buf, lx: &Layout, w: &G::Buf, lw: &Layout, p: &Conv2dParams) -> Result<G::Buf> {
    let d = conv_dims(p)?;
    let (xo, wo) = (conv_operand(g, x, lx, p.input_shape(), "conv2d")?, conv_operand(g, w, lw, p.weight_shape(), "conv2d")?);
    let col = im2col(g, x, xo, p)?;
    let ck = p.c_in * p.kh * p.kw;
    let mut out = None;
    for gi in 0..p.groups {
        let w_g = Layout::new(vec![d.b, d.co_g, d.k_g], vec![0, d.k_g, 1], wo + gi * d.co_g * d.k_g);
        let col_g = Layout::new(vec![d.b, d.k_g, d.l], vec![ck * d.l, d.l, 1], gi * d.k_g * d.l);
        let part = g.matmul(w, &w_g, &col, &col_g)?;
        place_group(g, part, &mut out, gi, p.groups, [d.b, d.co_g, d.l])?;
    }
    Ok(out.expect("groups >= 1"))
}

/// `grad` is the output gradient `[b, c_out, h_out, w_out]`; returns the input gradient.
pub fn conv2d_backward_input<G: Gpu>(g: &G, grad: &G::Buf, lg: &Layout, w: &G::Buf, lw: &Layout, p: &Conv2dParams) -> Result<G::Buf> {
    let op = "conv2d_backward_input";
    let d = conv_dims(p)?;
    let (go, wo) = (conv_operand(g, grad, lg, p.output_shape(), op)?, conv_operand(g, w, lw, p.weight_shape(), op)?);
    let mut col = None;
    for gi in 0..p.groups {
        let w_t = Layout::new(vec![d.b, d.k_g, d.co_g], vec![0, 1, d.k_g], wo + gi * d.co_g * d.k_g);
        let grad_g = Layout::new(vec![d.b, d.co_g, d.l], vec![p.c_out * d.l, d.l, 1], go + gi * d.co_g * d.l);
        let part = g.matmul(w, &w_t, grad, &grad_g)?;
        place_group(g, part, &mut col, gi, p.groups, [d.b, d.k_g, d.l])?;
    }
    let col = col.expect("groups >= 1");
    let n = check_u32(p.input_shape().iter().product())?;
    let mut dx = g.alloc(n as usize, DType::F32)?;
    let args = (n, ConvGeom::new(p), g.ptr(&col, 0), g.ptr_mut(&mut dx, 0));
    k::col2im_f32.launch(g, LaunchCfg::elementwise(n), args)?;
    Ok(dx)
}

/// `x` is the input, `grad` the output gradient; returns `[c_out, c_in/groups, kh, kw]`.
pub fn conv2d_backward_weight<G: Gpu>(g: &G, x: &G::Buf, lx: &Layout, grad: &G::Buf, lg: &Layout, p: &Conv2dParams) -> Result<G::Buf> {
    let op = "conv2d_backward_weight";
    let d = conv_dims(p)?;
    let (xo, go) = (conv_operand(g, x, lx, p.input_shape(), op)?, conv_operand(g, grad, lg, p.output_shape(), op)?);
    let col = im2col(g, x, xo, p)?;
    let ck = p.c_in * p.kh * p.kw;
    let mut dw = None;
    for gi in 0..p.groups {
        let grad_g = Layout::new(vec![d.b, d.co_g, d.l], vec![p.c_out * d.l, d.l, 1], go + gi * d.co_g * d.l);
        let col_t = Layout::new(vec![d.b, d.l, d.k_g], vec![ck * d.l, 1, d.l], gi * d.k_g * d.l);
        let part = g.matmul_sum(grad, &grad_g, &col, &col_t)?;
        place_group(g, part, &mut dw, gi, p.groups, [1, d.co_g, d.k_g])?;
    }
    Ok(dw.expect("groups >= 1"))
}
