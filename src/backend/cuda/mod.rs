//! The CUDA backend: our kernels (kernels/*.cu) driven from one host implementation
//! (`ops.rs`, and each fused op's `gpu.rs` in `crate::fused`, written against the `Gpu`
//! trait in `launch.rs`) on two devices:
//! - `Device::CudaEmu`: the kernels compiled as C++ and run on the CPU by the kernel
//!   emulator (kernels/emu). Always available; it is how CI, which has no GPU, tests
//!   every kernel against the CPU reference (tests/cuda_parity.rs).
//! - `Device::Cuda(n)`: a GPU through cudarc, the driver loaded at run time
//!   (`device.rs`: context, stream, caching allocator `alloc.rs`, kernel modules
//!   `loader.rs`; GEMMs through cuBLAS, `cublas.rs`).
//!
//! Both storages get their `BackendStorage` from one generic implementation
//! (`storage.rs`). Ops without a kernel of ours run the CPU reference, and only those
//! listed in `CPU_FALLBACKS`: the list is the one place that says what the kernels do
//! not cover yet, and `fallback!` refuses (at compile time) an op missing from it.

/// Ops the CUDA devices run through the CPU reference rather than a kernel of ours,
/// and why.
pub const CPU_FALLBACKS: &[(&str, &str)] = &[
    ("to_dtype", "no f16/bf16/u32 conversion kernels yet: the GPU copies to the host, converts and copies back (f32 -> f32 uses the copy kernel)"),
    ("matmul", "on the emulator only: it has no cuBLAS and uses the CPU GEMM (for matmul and for the GEMMs of conv2d and its gradients, whose im2col/col2im are kernels); a GPU uses cuBLAS"),
];

pub(crate) const fn listed(op: &str) -> bool {
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
        const { assert!($crate::backend::cuda::listed($op), concat!("CPU fallback `", $op, "` is not listed in CPU_FALLBACKS")) };
        $e
    }};
}

// Bottom-up: each module uses only those above it.
mod alloc;
mod cublas;
mod device;
mod emu;
mod gpu;
mod kernels;
mod launch;
mod launchers;
pub mod libs;
mod loader;
pub mod nccl;
pub mod nccl_lib;
mod ops;
#[cfg(test)]
mod signatures;
mod storage;

pub use alloc::AllocStats;
pub use device::loaded_libraries;
pub use emu::EmuStorage;
pub use kernels::{embedded_fatbins, emulator_selftest, fatbin_report, nvrtc_compile_all, nvrtc_present};
pub use storage::CudaStorage;

// What the fused ops' launches (`crate::fused`, each op's gpu.rs) are written with.
pub(crate) use launch::{check_u32, Gpu, LaunchCfg};
pub(crate) use launchers::k::{self, family};
pub(crate) use ops::{bn_dims, per_channel};
pub(crate) use storage::run_fused;

/// Whether libcuda loads. `Device::Cuda` needs it (and a GPU, `cuda_device`).
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda and reports whether it loaded.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Opens `cuda:ordinal` (context, kernels, cuBLAS) if it is not open yet, and
/// describes it ("NVIDIA H100 80GB HBM3, sm_90"); the error says why it cannot be used.
pub fn cuda_device(ordinal: usize) -> crate::Result<String> {
    device::get(ordinal).map(|d| d.describe().to_string())
}

/// What `distill doctor` shows of `cuda:ordinal` (opened if it is not yet): card, SMs,
/// memory, bandwidth, and where each kernel module's code came from.
pub fn cuda_properties(ordinal: usize) -> crate::Result<Vec<(String, String)>> {
    device::get(ordinal).map(|d| d.properties())
}

/// For code that uses a GPU when there is one: `Ok(None)` without a CUDA driver;
/// otherwise opens `cuda:ordinal` and describes it, or says why it cannot be used.
pub fn probe(ordinal: usize) -> crate::Result<Option<String>> {
    if !cuda_driver_present() {
        return Ok(None);
    }
    cuda_device(ordinal).map(Some)
}

/// Waits for the work queued on `cuda:ordinal` (for timing); a no-op on an unopened device.
pub fn cuda_synchronize(ordinal: usize) -> crate::Result<()> {
    match device::is_open(ordinal) {
        Some(d) => d.synchronize(),
        None => Ok(()),
    }
}

/// How long `iters` runs of `f` take on `cuda:ordinal`, queued back to back: launches
/// are asynchronous, so the clock starts and stops after a synchronisation, and the
/// synchronisation's cost is spread over the runs. For the benches.
pub fn time_queued(ordinal: usize, iters: u64, f: &dyn Fn()) -> std::time::Duration {
    let sync = || cuda_synchronize(ordinal).expect("synchronize");
    sync();
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    sync();
    t0.elapsed()
}

/// Seconds per run of `f` on `cuda:ordinal`: the median of 7 batches of 10 queued runs,
/// after 3 warm-up runs.
pub fn median_queued(ordinal: usize, f: &dyn Fn()) -> f64 {
    time_queued(ordinal, 3, f);
    let mut t: Vec<f64> = (0..7).map(|_| time_queued(ordinal, 10, f).as_secs_f64() / 10.0).collect();
    t.sort_by(f64::total_cmp);
    t[3]
}

/// The peak memory bandwidth of `cuda:ordinal` in GB/s, if the driver reports it.
pub fn cuda_peak_bandwidth_gbs(ordinal: usize) -> crate::Result<Option<f64>> {
    device::get(ordinal).map(|d| d.peak_bandwidth_gbs())
}

/// kernels/conv.cu's im2col alone on a CUDA device's contiguous NCHW input: the column
/// buffer `[b, c_in * kh * kw, h_out * w_out]`. For the benches.
pub fn im2col(x: &crate::backend::Storage, l: &crate::Layout, p: &crate::backend::Conv2dParams) -> crate::Result<crate::backend::Storage> {
    use crate::backend::Storage;
    match x {
        Storage::CudaEmu(s) => storage::im2col(s, l, p).map(Storage::CudaEmu),
        Storage::Cuda(s) => storage::im2col(s, l, p).map(Storage::Cuda),
        Storage::Cpu(_) => crate::bail!("im2col is a CUDA kernel; the tensor is on the cpu"),
    }
}

/// The caching allocator's counters of `cuda:ordinal`, once it is open.
pub fn cuda_alloc_stats(ordinal: usize) -> Option<AllocStats> {
    device::is_open(ordinal).map(|d| d.alloc_stats())
}
