//! The fused-op seam. A fused op (a kernel that does what a chain of engine ops would,
//! in one pass) is one type implementing `FusedOp`, in its own folder here:
//! - `mod.rs`: the op type, its geometry checks, and the `Tensor` method that runs it
//!   with its backward rule (autograd);
//! - `cpu.rs`: the CPU reference, the readable loops every device is checked against;
//! - `gpu.rs`: the host side of its kernels (`kernels/<op>.cu`), written once against
//!   `Gpu`, so the kernel emulator and a real GPU run the same launches.
//!
//! `Storage::apply_fused` is the one dispatch (as candle's `apply_op`): it checks that
//! the operands share a device and calls the op's CPU reference or its GPU launch.
//! `BackendStorage` keeps only general primitives; SAM, MHA, MHAD's distance, NT-Xent
//! and the BN statistics all live here.
//!
//! Versions (llm.c style): a kernel family may have numbered variants side by side (the
//! .cu headers say what each changes). The op lists them in `FusedOp::VERSIONS`, its
//! launch picks a default per shape (`pick`), and `force_version` lets the parity tests
//! (tests/attention_parity.rs) and the bench (benches/attention.rs) run every one
//! against the CPU reference and time it.
//!
//! # Adding a fused op
//! 1. Write the kernels in `kernels/<op>.cu` (build.rs compiles every kernels/*.cu for
//!    the emulator, NVRTC and nvcc, and generates a typed launcher per kernel:
//!    `k::<kernel>`, or `family::<name>` for `<name>_v<N>_<dtype>` variants).
//! 2. Make a folder `src/fused/<op>/` with `mod.rs` (a type implementing `FusedOp`: its
//!    names, `VERSIONS`, and `cpu` and `gpu` for each `Pass`; then the `Tensor` method
//!    with `from_op` and a backward closure that calls `op.backward`), `cpu.rs` and
//!    `gpu.rs`, modelled on `spatial_attention/`.
//! 3. Register it: `pub mod <op>;` and one line in `OPS` below.
//! 4. Check it: parity of every version with the CPU on the emulator
//!    (tests/attention_parity.rs), the fused op against its composition of engine ops
//!    (tests/attention_fused.rs), gradients against finite differences
//!    (tests/gradcheck.rs), and a case in benches/attention.rs for the timings.

pub mod channel_stats;
pub mod high_order_attention;
pub mod normalized_distance;
pub mod nt_xent;
pub mod spatial_attention;

use crate::backend::cuda::check_u32;
pub(crate) use crate::backend::cuda::Gpu;
use crate::backend::{CpuStorage, Storage};
use crate::{bail, DType, Layout, Result};
use std::cell::RefCell;

/// Every fused op, one line each. Their kernel families and versions are what
/// `force_version`, the parity tests and the benches go through, and a test
/// (`cuda::signatures`) checks them against the versioned kernels of kernels/*.cu.
pub const OPS: &[OpInfo] = &[
    spatial_attention::SpatialAttention::INFO,
    high_order_attention::HoaProducts::INFO,
    high_order_attention::HoaCombine::INFO,
    normalized_distance::NormalizedDistance::INFO,
    nt_xent::ContrastiveNormalize::INFO,
    nt_xent::ContrastiveRows::INFO,
    channel_stats::ChannelStats::INFO,
];

/// What `OPS` records of an op.
#[derive(Clone, Copy, Debug)]
pub struct OpInfo {
    pub name: &'static str,
    pub versions: &'static [(&'static str, &'static [u32])],
}

/// One operand: a buffer and the view of it the op reads. Saved statistics are read
/// whole, whatever their layout says (`whole`).
pub type Input<'a, B> = (&'a B, &'a Layout);

/// Which of an op's two passes runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Inputs to outputs, plus what the backward pass needs saved.
    Forward,
    /// The saved values and the outputs' gradients to the inputs' gradients.
    Backward,
}

/// A fused op: its CPU reference and its GPU launch for each pass. The operands and
/// results of each pass are the op's own (its docs list them); `apply_fused` only
/// checks their device. Every pass returns fresh, contiguous buffers.
pub trait FusedOp {
    /// Its name in errors and profiles, forward and backward.
    const NAME: &'static str;
    const BACKWARD_NAME: &'static str;
    /// Its numbered kernel families and their versions; empty if each pass has one kernel.
    const VERSIONS: &'static [(&'static str, &'static [u32])] = &[];
    const INFO: OpInfo = OpInfo { name: Self::NAME, versions: Self::VERSIONS };

    fn cpu(&self, pass: Pass, x: &[Input<CpuStorage>]) -> Result<Vec<CpuStorage>>;
    fn gpu<G: Gpu>(&self, g: &G, pass: Pass, x: &[Input<G::Buf>]) -> Result<Vec<G::Buf>>;

    /// The forward pass on the inputs' device.
    fn forward<const N: usize>(&self, x: &[Input<Storage>]) -> Result<[Storage; N]>
    where
        Self: Sized,
    {
        Storage::apply_fused(self, Pass::Forward, x)
    }
    /// The backward pass on the inputs' device.
    fn backward<const N: usize>(&self, x: &[Input<Storage>]) -> Result<[Storage; N]>
    where
        Self: Sized,
    {
        Storage::apply_fused(self, Pass::Backward, x)
    }
}

/// `x` as exactly `N` operands, or an error naming the op.
pub(crate) fn operands<'a, B, const N: usize>(op: &str, x: &[Input<'a, B>]) -> Result<[Input<'a, B>; N]> {
    match <[Input<'a, B>; N]>::try_from(x) {
        Ok(a) => Ok(a),
        Err(_) => bail!("{op}: expected {N} operands, got {}", x.len()),
    }
}

/// The layout of a saved buffer read whole: `[len]`, contiguous.
pub fn whole(s: &Storage) -> Layout {
    Layout::contiguous(&[s.len()])
}

/// The element types the fused ops read and write; math is always f32.
pub fn check_dtype(op: &str, dtypes: &[DType]) -> Result<DType> {
    let d = dtypes[0];
    if !matches!(d, DType::F32 | DType::BF16) || dtypes.iter().any(|&x| x != d) {
        bail!("{op}: expected f32 or bf16 inputs of one dtype, got {dtypes:?}");
    }
    Ok(d)
}

/// The start of a contiguous view, or an error naming the op.
pub fn contiguous_start(l: &Layout, op: &str) -> Result<usize> {
    match l.contiguous_range() {
        Some(r) => Ok(r.start),
        None => bail!("{op}: expected a contiguous input, got strides {:?} for shape {:?}", l.strides(), l.shape()),
    }
}

// Shared by the ops' `gpu.rs`.

/// Planes (spatial attention) or rows (NT-Xent) up to this long get one warp each
/// instead of a block: a 256-thread block on a 7x7 plane leaves 207 threads idle.
pub(crate) const WARP_MAX: usize = 1024;

/// The start of a contiguous view that lies inside its buffer.
pub(crate) fn start<G: Gpu>(g: &G, b: &G::Buf, l: &Layout, op: &str) -> Result<usize> {
    let s = contiguous_start(l, op)?;
    if s + l.elem_count() > g.len(b) {
        bail!("{op}: view {:?} at offset {s} overruns a buffer of {}", l.shape(), g.len(b));
    }
    check_u32(s + l.elem_count())?;
    Ok(s)
}

/// An f32 buffer of exactly `len` values (saved statistics, row vectors).
pub(crate) fn whole_f32<G: Gpu>(g: &G, b: &G::Buf, len: usize, what: &str) -> Result<u64> {
    if g.dtype(b) != DType::F32 || g.len(b) != len {
        bail!("{what}: expected {len} f32 values, got {} of {:?}", g.len(b), g.dtype(b));
    }
    Ok(g.ptr(b, 0))
}

/// A size as a kernel argument; the callers have checked it fits (`check_u32`).
pub(crate) fn u(v: usize) -> u32 {
    v as u32
}

thread_local! {
    static FORCED: RefCell<Vec<(&'static str, u32)>> = const { RefCell::new(Vec::new()) };
}

/// Every versioned kernel family of the registered ops and its versions.
pub fn families() -> impl Iterator<Item = (&'static str, &'static [u32])> {
    OPS.iter().flat_map(|o| o.versions.iter().copied())
}

/// The versions of kernel family `family`, if a registered op has it.
pub fn versions(family: &str) -> Option<&'static [u32]> {
    families().find(|(n, _)| *n == family).map(|(_, v)| v)
}

/// Makes this thread's launches of `family` use version `v` (`None`: the default for
/// the shape again). Errors on an unknown family or version.
pub fn force_version(family: &str, v: Option<u32>) -> Result<()> {
    let Some((name, versions)) = families().find(|(n, _)| *n == family) else {
        bail!("unknown kernel family `{family}`");
    };
    if let Some(v) = v.filter(|v| !versions.contains(v)) {
        bail!("kernel family `{family}` has no version {v} (versions: {versions:?})");
    }
    FORCED.with(|f| {
        let mut f = f.borrow_mut();
        f.retain(|(n, _)| *n != name);
        f.extend(v.map(|v| (name, v)));
    });
    Ok(())
}

/// The version of `family` to launch: the forced one, else `default` (the op's choice
/// for the shape).
pub(crate) fn pick(family: &str, default: u32) -> u32 {
    FORCED.with(|f| f.borrow().iter().find(|(n, _)| *n == family).map_or(default, |&(_, v)| v))
}
