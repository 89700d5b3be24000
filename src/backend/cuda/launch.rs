//! What every kernel launch shares, whether it runs on a GPU or on the emulator: the
//! strided-view argument, launch geometry, argument marshalling, and the `Gpu` trait the
//! op implementations (`ops.rs`) are written against.

use super::launchers::KernelName;
use crate::backend::cpu::coalesce;
use crate::{bail, DType, Layout, Result};
use std::ffi::c_void;

/// Max rank of a strided kernel argument after coalescing (`DFKD_MAX_DIMS`).
pub const MAX_DIMS: usize = 8;
/// Compile-time check of a `#[repr(C)]` twin of a kernel-side struct: its size and each
/// field's offset. The C++ side `static_assert`s the same numbers, and the test
/// `twins_agree_with_the_kernels` compares the two lists, so a field added, moved or
/// retyped on one side only stops the build or the tests (on a GPU it would be
/// silent garbage).
macro_rules! assert_twin {
    ($t:ty, size $size:literal, $($f:ident @ $off:literal),+ $(,)?) => {
        const _: () = {
            assert!(std::mem::size_of::<$t>() == $size);
            $(assert!(std::mem::offset_of!($t, $f) == $off);)+
        };
    };
}
pub(crate) use assert_twin;

/// Threads per block of element-wise kernels.
pub const BLOCK: u32 = 256;
/// Grid-stride kernels launch at most this many blocks: about 8 per SM on an H100
/// (132 SMs), and it bounds the emulator's fiber count per launch.
pub const MAX_BLOCKS: u32 = 1024;

/// Twin of `Strided` in kernels/common.cuh. `rank == 0` means contiguous from `offset`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    rank: u32,
    offset: u32,
    dims: [u32; MAX_DIMS],
    strides: [u32; MAX_DIMS],
}
assert_twin!(KernelLayout, size 72, rank @ 0, offset @ 4, dims @ 8, strides @ 40);

impl KernelLayout {
    /// The kernel argument for the views `ls` (same shape), coalesced jointly so that
    /// their elements pair up in row-major order.
    pub fn joint(ls: &[&Layout]) -> Result<Vec<KernelLayout>> {
        for l in ls {
            check_u32(l.offset() + max_offset(l))?;
        }
        if ls.iter().all(|l| l.is_contiguous()) {
            return Ok(ls.iter().map(|l| KernelLayout::contiguous(l.offset())).collect());
        }
        coalesce(ls)
            .iter()
            .map(|l| {
                if l.is_contiguous() {
                    return Ok(KernelLayout::contiguous(l.offset()));
                }
                if l.rank() > MAX_DIMS {
                    bail!("cuda: a strided view of rank {} (after merging dims) exceeds the kernels' {MAX_DIMS}", l.rank());
                }
                let mut k = KernelLayout { rank: l.rank() as u32, offset: l.offset() as u32, dims: [1; MAX_DIMS], strides: [0; MAX_DIMS] };
                for d in 0..l.rank() {
                    k.dims[d] = l.shape()[d] as u32;
                    k.strides[d] = l.strides()[d] as u32;
                }
                Ok(k)
            })
            .collect()
    }
    pub fn new(l: &Layout) -> Result<KernelLayout> {
        Ok(KernelLayout::joint(&[l])?[0])
    }
    pub fn contiguous(offset: usize) -> KernelLayout {
        KernelLayout { rank: 0, offset: offset as u32, dims: [1; MAX_DIMS], strides: [0; MAX_DIMS] }
    }
}

fn max_offset(l: &Layout) -> usize {
    l.shape().iter().zip(l.strides()).map(|(&n, &s)| n.saturating_sub(1) * s).sum()
}

/// Twin of `PoolGeom` in kernels/pool.cu: a pooling window's geometry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PoolGeom {
    h_in: u32,
    w_in: u32,
    h_out: u32,
    w_out: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
}
assert_twin!(PoolGeom, size 40, h_in @ 0, w_in @ 4, h_out @ 8, w_out @ 12, kh @ 16, kw @ 20, sh @ 24, sw @ 28, ph @ 32, pw @ 36);

impl PoolGeom {
    pub fn new(p: &crate::backend::Pool2dParams) -> PoolGeom {
        let u = |v: usize| v as u32;
        PoolGeom {
            h_in: u(p.h_in),
            w_in: u(p.w_in),
            h_out: u(p.h_out()),
            w_out: u(p.w_out()),
            kh: u(p.kh),
            kw: u(p.kw),
            sh: u(p.stride.0),
            sw: u(p.stride.1),
            ph: u(p.padding.0),
            pw: u(p.padding.1),
        }
    }
}

/// Twin of `ConvGeom` in kernels/conv.cu: a convolution's geometry for im2col/col2im.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    c_in: u32,
    h_in: u32,
    w_in: u32,
    h_out: u32,
    w_out: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
}
assert_twin!(ConvGeom, size 52, c_in @ 0, h_in @ 4, w_in @ 8, h_out @ 12, w_out @ 16, kh @ 20, kw @ 24, sh @ 28, sw @ 32, ph @ 36, pw @ 40, dh @ 44, dw @ 48);

impl ConvGeom {
    pub fn new(p: &crate::backend::Conv2dParams) -> ConvGeom {
        let u = |v: usize| v as u32;
        ConvGeom {
            c_in: u(p.c_in),
            h_in: u(p.h_in),
            w_in: u(p.w_in),
            h_out: u(p.h_out()),
            w_out: u(p.w_out()),
            kh: u(p.kh),
            kw: u(p.kw),
            sh: u(p.stride.0),
            sw: u(p.stride.1),
            ph: u(p.padding.0),
            pw: u(p.padding.1),
            dh: u(p.dilation.0),
            dw: u(p.dilation.1),
        }
    }
}

/// Kernels index with 32-bit integers (cheaper on the GPU); larger buffers are refused.
pub fn check_u32(n: usize) -> Result<u32> {
    if n >= 1 << 31 {
        bail!("cuda: {n} elements exceed the kernels' 32-bit indexing");
    }
    Ok(n as u32)
}

/// One kernel argument. Buffers are passed as addresses (device pointers on a GPU, host
/// pointers on the emulator), already advanced to the view's offset where a kernel
/// takes a plain pointer.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    I32(i32),
    F32(f32),
    Layout(KernelLayout),
    Pool(PoolGeom),
    Conv(ConvGeom),
}

impl Arg {
    /// Whether this argument has the kind `code` of a kernel parameter (`EmuParams`):
    /// "p" a pointer, "u4"/"i4"/"f4" a 4-byte number, "sN" an N-byte struct.
    pub fn fits(&self, code: &str) -> bool {
        match self {
            Arg::Ptr(_) => code == "p",
            Arg::U32(_) => code == "u4",
            Arg::I32(_) => code == "i4",
            Arg::F32(_) => code == "f4",
            Arg::Layout(_) => struct_of_size(code, std::mem::size_of::<KernelLayout>()),
            Arg::Pool(_) => struct_of_size(code, std::mem::size_of::<PoolGeom>()),
            Arg::Conv(_) => struct_of_size(code, std::mem::size_of::<ConvGeom>()),
        }
    }
}

fn struct_of_size(code: &str, size: usize) -> bool {
    code.strip_prefix('s').and_then(|n| n.parse().ok()) == Some(size)
}

/// Checks `args` against a kernel's parameter kinds (`EmuParams`): same count, and each
/// argument of its parameter's kind. The GPU would take any list and read garbage.
pub fn check_signature(kernel: &str, params: &str, args: &[Arg]) -> Result<()> {
    let codes: Vec<&str> = if params.is_empty() { vec![] } else { params.split(',').collect() };
    if codes.len() != args.len() || codes.iter().zip(args).any(|(c, a)| !a.fits(c)) {
        bail!("cuda: kernel `{kernel}` takes ({params}), the host passed {args:?}");
    }
    Ok(())
}

/// cuLaunchKernel's `kernelParams`: one pointer to each argument's value. The values
/// live in `args`, which must outlive the launch.
pub fn marshal(args: &[Arg]) -> Vec<*mut c_void> {
    args.iter()
        .map(|a| match a {
            Arg::Ptr(v) => v as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
            Arg::Layout(v) => v as *const KernelLayout as *mut c_void,
            Arg::Pool(v) => v as *const PoolGeom as *mut c_void,
            Arg::Conv(v) => v as *const ConvGeom as *mut c_void,
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
}

impl LaunchCfg {
    /// A grid-stride loop over `n` elements.
    pub fn elementwise(n: u32) -> LaunchCfg {
        LaunchCfg { grid: n.div_ceil(BLOCK).clamp(1, MAX_BLOCKS), block: BLOCK, shared_bytes: 0 }
    }
    /// One block per row (grid-stride over `rows`), its threads striding a row of
    /// `row_len`: a warp for short rows, up to 256 threads for long ones.
    pub fn rows(rows: u32, row_len: u32) -> LaunchCfg {
        LaunchCfg { grid: rows.clamp(1, 4 * MAX_BLOCKS), block: row_len.next_multiple_of(32).clamp(32, BLOCK), shared_bytes: 0 }
    }
    /// One warp per row, `BLOCK / 32` rows per block (grid-stride over rows): for rows
    /// too short to keep a whole block busy.
    pub fn warp_rows(rows: u32) -> LaunchCfg {
        LaunchCfg { grid: rows.div_ceil(BLOCK / 32).clamp(1, 4 * MAX_BLOCKS), block: BLOCK, shared_bytes: 0 }
    }
}

/// A device the kernels run on: the emulator or a CUDA GPU. Ops are written once
/// against this (`ops.rs`), so launch geometry, argument order and kernel choice are
/// the same on both.
pub trait Gpu {
    type Buf;
    fn device(&self) -> crate::Device;
    /// An uninitialised buffer, for an output its kernel writes in full: no fill pass
    /// on a GPU. The emulator fills it with all-ones bytes (NaN, u32::MAX), so an
    /// element a kernel forgets to write shows in the parity tests.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Buf>;
    /// A zeroed buffer, for outputs a kernel accumulates into (atomics) or empty sums.
    fn zeros(&self, len: usize, dtype: DType) -> Result<Self::Buf>;
    fn dtype(&self, b: &Self::Buf) -> DType;
    fn len(&self, b: &Self::Buf) -> usize;
    /// The address of element `offset` for a kernel that only reads it.
    fn ptr(&self, b: &Self::Buf, offset: usize) -> u64;
    /// The address of element `offset` for a kernel that writes it.
    fn ptr_mut(&self, b: &mut Self::Buf, offset: usize) -> u64;
    /// Runs `kernel` over `args` (in the kernel's parameter order) and returns when the
    /// launch is queued (GPU) or done (emulator). Called through the typed launchers
    /// (`launchers::k`), which build `args` from the kernel's parameter types.
    fn launch(&self, kernel: KernelName, cfg: LaunchCfg, args: &[Arg]) -> Result<()>;
    /// Batched GEMM `[b, m, k] x [b, k, n] -> [b, m, n]` on strided views (stride 0 on b
    /// broadcasts): cuBLAS on a GPU, the CPU GEMM on the emulator.
    fn matmul(&self, a: &Self::Buf, la: &Layout, b: &Self::Buf, lb: &Layout) -> Result<Self::Buf>;
    /// The same products summed over the batch, `[m, n]` (conv2d's weight gradient):
    /// cuBLAS accumulates into one output, so the per-sample products are never stored.
    fn matmul_sum(&self, a: &Self::Buf, la: &Layout, b: &Self::Buf, lb: &Layout) -> Result<Self::Buf>;
    /// A copy on the host, after all queued work.
    fn download(&self, b: &Self::Buf) -> Result<crate::backend::CpuStorage>;
    /// A buffer of this device holding `cpu`'s values.
    fn upload(&self, cpu: crate::backend::CpuStorage) -> Result<Self::Buf>;
}
