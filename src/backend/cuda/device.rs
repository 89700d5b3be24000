//! A CUDA GPU: per ordinal one context, its default stream, the kernel
//! modules, a cuBLAS handle and the caching allocator, opened on first use and kept
//! for the life of the process (buffers hold `&'static CudaDev`, so dropping one only
//! returns it to the cache). `gpu.rs` makes it the ops' `Gpu`.
//!
//! Everything runs on the one stream, in issue order, so no events are needed between
//! kernels, GEMMs and copies, and a buffer dropped on the host may be reused at once
//! (see `alloc.rs`). Kernel faults surface at the next synchronisation (a copy to the
//! host); `DFKD_CUDA_SYNC=1` synchronises after every launch to name the kernel.
//! `DFKD_CUDA_NO_CACHE=1` frees every buffer on drop instead of caching it, so that
//! compute-sanitizer's memcheck sees use-after-free and leaks (slow: it synchronises).
//! An error in a drop (ours, or one cudarc records for an event or stream) is reported
//! once, by the next call, naming the operation that failed rather than that call's.

use super::alloc::{size_class, AllocStats, FreeLists};
use super::cublas;
use super::kernels::{kernel_module, MODULES};
use super::libs::{self, CudaLib};
use super::loader::{self, driver_error};
use crate::backend::cpu::buffers;
use crate::backend::{BackendStorage, CpuStorage};
use crate::{bail, DType, Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub struct CudaDev {
    ordinal: usize,
    /// e.g. "NVIDIA H100 80GB HBM3, sm_90", for messages.
    describe: String,
    ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    modules: Vec<Arc<CudaModule>>,
    /// Per module, where its code came from (`loader::load_modules`).
    module_origins: Vec<String>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: Mutex<CudaBlas>,
    free: Mutex<FreeLists<sys::CUdeviceptr>>,
    pub(super) sync_each_launch: bool,
    no_cache: bool,
    /// An error in one of our drops (which cannot return it), with the operation that
    /// failed: reported once, by the next call that binds the context.
    deferred: Mutex<Option<String>>,
}

/// Device memory from the caching allocator: `len` elements of `dtype` at `ptr`, in a
/// block of `class` bytes that goes back to the device's cache on drop.
pub struct CudaBuf {
    dev: &'static CudaDev,
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) len: usize,
    pub(super) dtype: DType,
    class: usize,
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf[cuda:{}, {} x {}]", self.dev.ordinal, self.len, self.dtype.as_str())
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if self.class == 0 {
            return;
        }
        if self.dev.no_cache {
            // no error path in drop: a failure is reported by the device's next call
            if let Err(e) = self.dev.synchronize() {
                self.dev.defer(format!("synchronisation before freeing a buffer ({e})"));
            }
            self.dev.lock_free().put(self.class, self.ptr);
            for (_, ptr) in self.dev.lock_free().drain() {
                // SAFETY: the block came from cuMemAlloc, its buffer is being dropped,
                // and the stream was synchronised above, so no queued work uses it.
                if let Err(e) = unsafe { drv::free_sync(ptr) } {
                    self.dev.defer(format!("cuMemFree of a dropped buffer ({})", driver_error(e)));
                }
            }
            return;
        }
        self.dev.lock_free().put(self.class, self.ptr);
    }
}

impl CudaBuf {
    pub fn device(&self) -> &'static CudaDev {
        self.dev
    }
}

/// The devices opened so far. Opening compiles kernels (when NVRTC is needed) and is
/// not cached on failure, so a later call reports the same error again.
static DEVICES: Mutex<Vec<&'static CudaDev>> = Mutex::new(Vec::new());

/// The device `cuda:ordinal`, opened on first use.
pub fn get(ordinal: usize) -> Result<&'static CudaDev> {
    let mut devs = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devs.iter().find(|d| d.ordinal == ordinal) {
        return Ok(d);
    }
    // cudarc panics instead of returning an error when libcuda lacks a symbol (a driver
    // older than the CUDA 13 API we pin): report that as an error naming the device.
    let dev = std::panic::catch_unwind(|| CudaDev::open(ordinal)).unwrap_or_else(|p| {
        let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        Err(Error::Msg(format!("cuda:{ordinal}: the CUDA driver failed while opening the device ({why}); dfkd needs driver 580 or newer (CUDA 13)")))
    })?;
    let dev: &'static CudaDev = Box::leak(Box::new(dev));
    devs.push(dev);
    Ok(dev)
}

/// `cuda:ordinal` if it was opened already.
pub fn is_open(ordinal: usize) -> Option<&'static CudaDev> {
    DEVICES.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|d| d.ordinal == ordinal).copied()
}

impl CudaDev {
    fn open(ordinal: usize) -> Result<CudaDev> {
        if !super::cuda_driver_present() {
            bail!("cuda:{ordinal}: no CUDA driver found (libcuda.so); use --device cpu");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            let visible = match CudaContext::device_count() {
                Ok(n) => format!("{n} CUDA device(s) visible"),
                Err(e) => format!("no CUDA device visible ({})", driver_error(e)),
            };
            Error::Msg(format!("cuda:{ordinal}: cannot create a CUDA context ({}); {visible}", driver_error(e)))
        })?;
        let fail = |what: &str, e: DriverError| Error::Msg(format!("cuda:{ordinal}: {what}: {}", driver_error(e)));
        let (major, minor) = ctx.compute_capability().map_err(|e| fail("reading the compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let describe = format!("{name}, sm_{major}{minor}");
        let (modules, module_origins) =
            loader::load_modules(&ctx, (major, minor)).map_err(|e| Error::Msg(format!("cuda:{ordinal} ({describe}): {e}")))?.into_iter().unzip();
        if !libs::ensure(CudaLib::Cublas) {
            bail!(
                "cuda:{ordinal} ({describe}): libcublas.so.13 not found, neither by the loader nor in pip's nvidia/*/lib folders of {}; install the CUDA 13 runtime libraries (e.g. `pip install nvidia-cublas`) or put their folder on LD_LIBRARY_PATH",
                libs::searched_sites()
            );
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Msg(format!("cuda:{ordinal} ({describe}): cannot create a cuBLAS handle: {e}")))?;
        cublas::pin_math_mode(&blas).map_err(|e| Error::Msg(format!("cuda:{ordinal} ({describe}): {e}")))?;
        eprintln!("cuda:{ordinal}: {describe}; {}", loaded_libraries().join("; "));
        let flag = |name: &str| std::env::var_os(name).is_some_and(|v| v != "0");
        Ok(CudaDev {
            ordinal,
            describe,
            ctx,
            stream,
            modules,
            module_origins,
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            free: Mutex::new(FreeLists::default()),
            sync_each_launch: flag("DFKD_CUDA_SYNC"),
            no_cache: flag("DFKD_CUDA_NO_CACHE"),
            deferred: Mutex::new(None),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn describe(&self) -> &str {
        &self.describe
    }
    pub fn alloc_stats(&self) -> AllocStats {
        self.lock_free().stats()
    }

    /// Peak memory bandwidth in GB/s from the driver's memory clock and bus width
    /// (double data rate); `None` when the driver does not report them.
    pub fn peak_bandwidth_gbs(&self) -> Option<f64> {
        use sys::CUdevice_attribute::{CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH as BUS, CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE as CLOCK};
        let (khz, bits) = (self.ctx.attribute(CLOCK).ok()?, self.ctx.attribute(BUS).ok()?);
        (khz > 0 && bits > 0).then(|| 2.0 * khz as f64 * 1e3 * bits as f64 / 8.0 / 1e9)
    }

    /// What `distill doctor` shows of the card, as (what, value) rows.
    pub fn properties(&self) -> Vec<(String, String)> {
        use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as SMS;
        let gib = |b: usize| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        let mut rows = vec![("card".to_string(), self.describe.clone())];
        rows.push(("SMs".into(), self.ctx.attribute(SMS).map(|n| n.to_string()).unwrap_or_else(driver_error)));
        let mem = match (self.ctx.total_mem(), self.ctx.mem_get_info()) {
            (Ok(total), Ok((free, _))) => format!("{} ({} free)", gib(total), gib(free)),
            (Err(e), _) | (_, Err(e)) => driver_error(e),
        };
        rows.push(("memory".into(), mem));
        if let Some(gbs) = self.peak_bandwidth_gbs() {
            rows.push(("peak bandwidth".into(), format!("{gbs:.0} GB/s")));
        }
        for (m, origin) in MODULES.iter().zip(&self.module_origins) {
            rows.push((format!("kernels/{}.cu", m.name), format!("{} kernels, from {origin}", m.kernels.len())));
        }
        rows
    }

    /// An error about this device: "cuda:N: what: driver error".
    pub(super) fn error(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Msg(format!("cuda:{}: {what}: {e}", self.ordinal))
    }

    /// Makes the context current on the calling thread (the data loader and rayon
    /// threads may create tensors too); a no-op when it already is. First reports,
    /// once, an error that a drop could not return.
    pub(super) fn bind(&self) -> Result<()> {
        if let Some(what) = self.deferred.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bail!("cuda:{}: an earlier {what} failed (reported at the next call)", self.ordinal);
        }
        self.check_recorded("a call cudarc made while dropping an event, stream or module (reported at the next call)")?;
        self.ctx.bind_to_thread().map_err(|e| self.error("binding the context to this thread", driver_error(e)))
    }

    /// An error cudarc recorded in a drop (it keeps the last one and would return it
    /// from some later, unrelated call), reported once as `what`'s.
    pub(super) fn check_recorded(&self, what: &str) -> Result<()> {
        self.ctx.check_err().map_err(|e| self.error(what, driver_error(e)))
    }

    /// Keeps an error of a drop for the next call to report.
    fn defer(&self, what: String) {
        self.deferred.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(what);
    }

    /// A stream of its own on this device (NCCL's), ordered against the device's
    /// stream by events only (a non-blocking stream: no implicit ordering with it).
    pub(super) fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.bind()?;
        self.ctx.new_stream().map_err(|e| self.error("creating a stream", driver_error(e)))
    }

    fn lock_free(&self) -> MutexGuard<'_, FreeLists<sys::CUdeviceptr>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn blas(&self) -> MutexGuard<'_, CudaBlas> {
        self.blas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for all queued work; reports a kernel fault as this device's error.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| self.error("a queued kernel or copy failed", driver_error(e)))
    }

    /// Uninitialised device memory for `len` elements of `dtype`, from the cache when
    /// a block of its size class is free.
    pub(super) fn alloc_uninit(&'static self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = len.checked_mul(dtype.size_in_bytes()).ok_or_else(|| self.error("allocation", format!("{len} elements overflow")))?;
        let class = size_class(bytes);
        if class == 0 {
            return Ok(CudaBuf { dev: self, ptr: 0, len, dtype, class });
        }
        if let Some(ptr) = self.lock_free().take(class) {
            return Ok(CudaBuf { dev: self, ptr, len, dtype, class });
        }
        self.bind()?;
        // SAFETY: cuMemAlloc of `class` bytes in the current (bound) context.
        let ptr = match unsafe { drv::malloc_sync(class) } {
            Ok(p) => p,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // the cache may hold enough in other size classes: free it all, retry
                self.empty_cache()?;
                // SAFETY: as above.
                unsafe { drv::malloc_sync(class) }.map_err(|e| {
                    let s = self.lock_free().stats();
                    self.error(&format!("out of memory allocating {bytes} bytes ({} MiB in use by tensors)", s.in_use >> 20), driver_error(e))
                })?
            }
            Err(e) => return Err(self.error(&format!("allocating {bytes} bytes"), driver_error(e))),
        };
        self.lock_free().note_new(class);
        Ok(CudaBuf { dev: self, ptr, len, dtype, class })
    }

    /// Returns every cached block to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        // blocks in the cache may still be read by queued kernels
        self.synchronize()?;
        for (_, ptr) in self.lock_free().drain() {
            // SAFETY: the block came from cuMemAlloc, is in no live buffer (it was on a
            // free list) and no queued work uses it (synchronised above).
            unsafe { drv::free_sync(ptr) }.map_err(|e| self.error("freeing cached memory", driver_error(e)))?;
        }
        Ok(())
    }

    /// A zeroed buffer filled on the device.
    pub fn zeros(&'static self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let b = self.alloc_uninit(len, dtype)?;
        if b.class > 0 {
            self.bind()?;
            // SAFETY: the block has at least len * size bytes; stream-ordered like every use.
            unsafe { drv::memset_d8_async(b.ptr, 0, len * dtype.size_in_bytes(), self.stream.cu_stream()) }
                .map_err(|e| self.error("memset", driver_error(e)))?;
        }
        Ok(b)
    }

    /// Copies a host buffer to the device.
    pub fn upload(&'static self, cpu: &CpuStorage) -> Result<CudaBuf> {
        let b = self.alloc_uninit(cpu.len(), cpu.dtype())?;
        if b.class == 0 {
            return Ok(b);
        }
        self.bind()?;
        let s = self.stream.cu_stream();
        // SAFETY: the block holds the whole source. A copy from pageable memory returns
        // once the source has been staged, so the host buffer may be dropped after.
        let r = unsafe {
            match cpu {
                CpuStorage::F32(v) => drv::memcpy_htod_async(b.ptr, v.as_slice(), s),
                CpuStorage::F16(v) => drv::memcpy_htod_async(b.ptr, v.as_slice(), s),
                CpuStorage::BF16(v) => drv::memcpy_htod_async(b.ptr, v.as_slice(), s),
                CpuStorage::U32(v) => drv::memcpy_htod_async(b.ptr, v.as_slice(), s),
            }
        };
        r.map_err(|e| self.error("copy to the device", driver_error(e)))?;
        Ok(b)
    }

    /// Copies a buffer to the host, after all queued work.
    pub fn download(&self, b: &CudaBuf) -> Result<CpuStorage> {
        let mut out = match b.dtype {
            DType::F32 => CpuStorage::F32(buffers::zeroed(b.len)),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; b.len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; b.len]),
            DType::U32 => CpuStorage::U32(vec![0; b.len]),
        };
        if b.class == 0 {
            return Ok(out);
        }
        self.bind()?;
        let s = self.stream.cu_stream();
        // SAFETY: the destination has exactly the buffer's length; the stream is
        // synchronised below before the host reads it.
        let r = unsafe {
            match &mut out {
                CpuStorage::F32(v) => drv::memcpy_dtoh_async(v.as_mut_slice(), b.ptr, s),
                CpuStorage::F16(v) => drv::memcpy_dtoh_async(v.as_mut_slice(), b.ptr, s),
                CpuStorage::BF16(v) => drv::memcpy_dtoh_async(v.as_mut_slice(), b.ptr, s),
                CpuStorage::U32(v) => drv::memcpy_dtoh_async(v.as_mut_slice(), b.ptr, s),
            }
        };
        r.map_err(|e| self.error("copy to the host (or an earlier kernel faulted; DFKD_CUDA_SYNC=1 names it)", driver_error(e)))?;
        self.synchronize()?;
        Ok(out)
    }

    /// The kernel `name` from the module that defines it (build.rs's map), looked up once.
    pub(super) fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let mut fns = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fns.get(name) {
            return Ok(f.cu_function());
        }
        let Some(m) = kernel_module(name) else { bail!("cuda:{}: no kernel named `{name}` in kernels/*.cu", self.ordinal) };
        self.bind()?;
        let f =
            self.modules[m].load_function(name).map_err(|e| self.error(&format!("kernel `{name}` from kernels/{}.cu", MODULES[m].name), driver_error(e)))?;
        let raw = f.cu_function();
        fns.insert(name.to_string(), f);
        Ok(raw)
    }
}

/// Which libcuda, libcublas and libnvrtc this process loaded, from where, e.g.
/// "libcublas 13.0.2 from /usr/lib/x86_64-linux-gnu/libcublas.so.13.0.2.14" (cudarc
/// tries several names; the file it got is the one that counts).
pub fn loaded_libraries() -> Vec<String> {
    let mut out = vec![];
    if super::cuda_driver_present() {
        let mut v = 0;
        // SAFETY: writes one int.
        let version = match unsafe { sys::cuDriverGetVersion(&mut v) }.result() {
            Ok(()) => format!("{}.{}", v / 1000, v % 1000 / 10),
            Err(e) => format!("version unknown: {}", driver_error(e)),
        };
        // SAFETY: the driver loaded (checked above); the symbol is only used as an address.
        let path = libs::library_file(unsafe { sys::culib() }, "cuInit");
        out.push(format!("libcuda (CUDA {version}) from {}", shown(path)));
    } else {
        out.push("libcuda not found (the NVIDIA driver)".into());
    }
    if libs::ensure(CudaLib::Cublas) {
        use cudarc::cublas::sys as b;
        let prop = |p| {
            let mut v = 0;
            // SAFETY: writes one int.
            unsafe { b::cublasGetProperty(p, &mut v) };
            v
        };
        let version = format!(
            "{}.{}.{}",
            prop(b::libraryPropertyType::MAJOR_VERSION),
            prop(b::libraryPropertyType::MINOR_VERSION),
            prop(b::libraryPropertyType::PATCH_LEVEL)
        );
        // SAFETY: cuBLAS loaded (checked above); the symbol is only used as an address.
        out.push(format!("libcublas {version} from {}", shown(libs::library_file(unsafe { b::culib() }, "cublasCreate_v2"))));
    } else {
        out.push("libcublas not found".into());
    }
    if libs::ensure(CudaLib::Nvrtc) {
        use cudarc::nvrtc::sys as n;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { n::nvrtcVersion(&mut major, &mut minor) };
        // SAFETY: NVRTC loaded (checked above); the symbol is only used as an address.
        out.push(format!("libnvrtc {major}.{minor} from {}", shown(libs::library_file(unsafe { n::culib() }, "nvrtcVersion"))));
    } else {
        out.push("libnvrtc not found".into());
    }
    out
}

fn shown(path: Option<std::path::PathBuf>) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_else(|| "an unknown file".into())
}
