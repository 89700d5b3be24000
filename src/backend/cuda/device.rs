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

use super::alloc::{size_class, AllocStats, FreeLists};
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
    functions: Mutex<HashMap<String, CudaFunction>>,
    blas: Mutex<CudaBlas>,
    free: Mutex<FreeLists<sys::CUdeviceptr>>,
    pub(super) sync_each_launch: bool,
    no_cache: bool,
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
            // no error path in drop: a failure here resurfaces at the next sync
            let _ = self.dev.synchronize();
            self.dev.lock_free().put(self.class, self.ptr);
            for (_, ptr) in self.dev.lock_free().drain() {
                // SAFETY: the block came from cuMemAlloc, its buffer is being dropped,
                // and the stream was synchronised above, so no queued work uses it.
                let _ = unsafe { drv::free_sync(ptr) };
            }
            return;
        }
        self.dev.lock_free().put(self.class, self.ptr);
    }
}

impl CudaBuf {
    pub fn device(&self) -> &'static CudaDev { self.dev }
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
        let modules = loader::load_modules(&ctx, (major, minor)).map_err(|e| Error::Msg(format!("cuda:{ordinal} ({describe}): {e}")))?;
        // SAFETY: only tries to dlopen libcublas and reports whether it loaded.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!(
                "cuda:{ordinal} ({describe}): libcublas.so.13 not found; install the CUDA 13 runtime libraries (cuBLAS) and put their folder on LD_LIBRARY_PATH"
            );
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Msg(format!("cuda:{ordinal} ({describe}): cannot create a cuBLAS handle: {e}")))?;
        let flag = |name: &str| std::env::var_os(name).is_some_and(|v| v != "0");
        Ok(CudaDev {
            ordinal,
            describe,
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            free: Mutex::new(FreeLists::default()),
            sync_each_launch: flag("DFKD_CUDA_SYNC"),
            no_cache: flag("DFKD_CUDA_NO_CACHE"),
        })
    }

    pub fn ordinal(&self) -> usize { self.ordinal }
    pub fn describe(&self) -> &str { &self.describe }
    pub fn alloc_stats(&self) -> AllocStats { self.lock_free().stats() }

    /// Peak memory bandwidth in GB/s from the driver's memory clock and bus width
    /// (double data rate); `None` when the driver does not report them.
    pub fn peak_bandwidth_gbs(&self) -> Option<f64> {
        use sys::CUdevice_attribute::{CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH as BUS, CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE as CLOCK};
        let (khz, bits) = (self.ctx.attribute(CLOCK).ok()?, self.ctx.attribute(BUS).ok()?);
        (khz > 0 && bits > 0).then(|| 2.0 * khz as f64 * 1e3 * bits as f64 / 8.0 / 1e9)
    }

    /// An error about this device: "cuda:N: what: driver error".
    pub(super) fn error(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Msg(format!("cuda:{}: {what}: {e}", self.ordinal))
    }

    /// Makes the context current on the calling thread (the data loader and rayon
    /// threads may create tensors too); a no-op when it already is.
    pub(super) fn bind(&self) -> Result<()> { self.ctx.bind_to_thread().map_err(|e| self.error("binding the context to this thread", driver_error(e))) }

    /// A stream of its own on this device (NCCL's), ordered against the device's
    /// stream by events only (a non-blocking stream: no implicit ordering with it).
    pub(super) fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.bind()?;
        self.ctx.new_stream().map_err(|e| self.error("creating a stream", driver_error(e)))
    }

    fn lock_free(&self) -> MutexGuard<'_, FreeLists<sys::CUdeviceptr>> { self.free.lock().unwrap_or_else(|e| e.into_inner()) }

    pub(super) fn blas(&self) -> MutexGuard<'_, CudaBlas> { self.blas.lock().unwrap_or_else(|e| e.into_inner()) }

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

    /// The kernel `name` from whichever module defines it, looked up once.
    pub(super) fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let mut fns = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fns.get(name) {
            return Ok(f.cu_function());
        }
        self.bind()?;
        for m in &self.modules {
            if let Ok(f) = m.load_function(name) {
                let raw = f.cu_function();
                fns.insert(name.to_string(), f);
                return Ok(raw);
            }
        }
        bail!("cuda:{}: no kernel named `{name}` in kernels/*.cu", self.ordinal)
    }
}
