//! The compiled kernels as build.rs embedded them: the emulator's launch entries (the
//! kernels compiled as C++, linked in), and per kernels/*.cu file the flattened source
//! for NVRTC and, when nvcc was found at build time, a fatbin (sm_80, sm_90, PTX).

use crate::{Error, Result};
use std::ffi::{c_char, c_void, CStr};

/// Launch configuration of an emulated launch; twin of `emu::Config` in cuda_emu.h.
#[repr(C)]
pub struct EmuConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}
super::launch::assert_twin!(EmuConfig, size 28, grid @ 0, block @ 12, shared_bytes @ 24);

/// `emu_launch_<kernel>(cfg, args)`: runs the kernel to completion on the CPU; `args`
/// points at each argument's value, as cuLaunchKernel's `kernelParams`. Returns 0, or
/// 1 for a bad configuration (reason in `emu_last_error`).
pub type EmuLaunch = unsafe extern "C" fn(*const EmuConfig, *const *mut c_void) -> i32;

/// `emu_params_<kernel>()`: the kernel's parameter kinds, e.g. "u4,s72,p,p,f4,f4"
/// (`emu::signature` in cuda_emu.h), as a static NUL-terminated string.
pub type EmuParams = unsafe extern "C" fn() -> *const c_char;

pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    pub fatbin: Option<&'static [u8]>,
    /// The kernels the file defines, sorted.
    pub kernels: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

extern "C" {
    fn emu_last_error() -> *const c_char;
    fn emu_selftest(launch_ms: *mut f64) -> i32;
}

/// The emulator entry of `kernel`, if some kernels/*.cu defines it.
pub fn emu_entry(kernel: &str) -> Option<EmuLaunch> {
    EMU_KERNELS.binary_search_by_key(&kernel, |(n, _)| n).ok().map(|i| EMU_KERNELS[i].1)
}

/// The index in `MODULES` of the kernel file that defines `kernel`: a GPU looks a kernel
/// up in that module only (a lookup in a module without it is a CUDA API error, which
/// compute-sanitizer reports).
pub fn kernel_module(kernel: &str) -> Option<usize> {
    EMU_KERNELS.binary_search_by_key(&kernel, |(n, _)| n).ok().and_then(|i| KERNEL_MODULE[i])
}

/// The parameter kinds of `kernel` (see `EmuParams`), if some kernels/*.cu defines it.
pub fn emu_params(kernel: &str) -> Option<&'static str> {
    let i = EMU_KERNELS.binary_search_by_key(&kernel, |(n, _)| n).ok()?;
    // SAFETY: emu_params_<kernel> returns a function-local static std::string's buffer:
    // NUL-terminated, ASCII, alive and unchanged for the rest of the process.
    Some(unsafe { CStr::from_ptr(EMU_PARAMS[i]()) }.to_str().expect("parameter kinds are ASCII"))
}

/// The reason the last emulated launch on this thread was refused.
pub fn emu_error() -> String {
    // SAFETY: emu_last_error returns a pointer to a NUL-terminated thread-local string
    // that stays valid until the next launch on this thread; we copy it at once.
    unsafe { CStr::from_ptr(emu_last_error()) }.to_string_lossy().into_owned()
}

/// Runs the emulator's own semantic checks (kernels/emu/selftest.cu): returns the
/// number of failed checks (printed to stderr) and the best time in ms of one launch of
/// 64 blocks x 256 threads with two barriers and a warp reduction.
pub fn emulator_selftest() -> (i32, f64) {
    let mut ms = 0.0;
    // SAFETY: emu_selftest only writes the f64 it is given.
    let failures = unsafe { emu_selftest(&mut ms) };
    (failures, ms)
}

/// Whether libnvrtc loads: by the loader's search, or preloaded from pip's wheels
/// (`libs::ensure`).
pub fn nvrtc_present() -> bool {
    super::libs::ensure(super::libs::CudaLib::Nvrtc)
}

/// Compiles one kernel file's embedded source to PTX with NVRTC for `arch` (e.g.
/// "sm_90"): what the runtime does when no embedded fatbin loads on the user's card.
pub fn nvrtc_compile(m: &KernelModule, arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch), name: Some(format!("{}.cu", m.name)), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(m.source, opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            e => format!("{e:?}"),
        };
        Error::Msg(format!("NVRTC failed on kernels/{}.cu for {arch}:\n{log}", m.name))
    })
}

/// Compiles every kernel file with NVRTC; returns their names. Needs libnvrtc.
pub fn nvrtc_compile_all(arch: &'static str) -> Result<Vec<&'static str>> {
    if !nvrtc_present() {
        return Err(Error::Msg(format!(
            "libnvrtc.so.13 not found, neither by the loader nor in pip's nvidia/*/lib folders of {}: install the CUDA tools (scripts/install-cuda-tools.sh) and set DFKD_PYTHON_SITE=tools/cuda",
            super::libs::searched_sites()
        )));
    }
    MODULES.iter().map(|m| nvrtc_compile(m, arch).map(|_| m.name)).collect()
}

/// Per kernel file: its name, how many kernels it defines, and the code its embedded
/// fatbin carries (`None`: built without nvcc or nvcc failed on it, so NVRTC compiles it
/// at run time).
pub fn fatbin_report() -> Vec<(&'static str, usize, Option<&'static [&'static str]>)> {
    MODULES.iter().map(|m| (m.name, m.kernels.len(), m.fatbin.map(|_| FATBIN_TARGETS))).collect()
}

/// How many kernel files carry an nvcc fatbin (built when nvcc was found), of how many.
pub fn embedded_fatbins() -> (usize, usize) {
    (MODULES.iter().filter(|m| m.fatbin.is_some()).count(), MODULES.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// build.rs's kernel-to-module map agrees with each module's own list, and every
    /// kernel is in exactly one module: a GPU looks each kernel up there only.
    #[test]
    fn every_kernel_maps_to_the_module_that_lists_it() {
        assert_eq!(KERNEL_MODULE.len(), EMU_KERNELS.len());
        let mapped: Vec<&str> = EMU_KERNELS.iter().map(|(n, _)| *n).filter(|n| kernel_module(n).is_some()).collect();
        assert_eq!(MODULES.iter().map(|m| m.kernels.len()).sum::<usize>(), mapped.len());
        for name in mapped {
            let m = kernel_module(name).unwrap();
            assert!(MODULES[m].kernels.contains(&name), "{name} mapped to kernels/{}.cu, which does not list it", MODULES[m].name);
        }
        // the emulator's self-test kernels (kernels/emu/selftest.cu) run on the emulator only
        assert!(emu_entry("st_bad_write_range").is_some());
        assert_eq!(kernel_module("st_bad_write_range"), None);
        assert_eq!(kernel_module("no_such_kernel"), None);
    }
}
