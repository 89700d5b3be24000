//! A CUDA GPU as the `Gpu` the ops are written against: launches through the driver
//! (the device and its modules: `device.rs`), GEMMs through cuBLAS (`cublas.rs`). Kept
//! apart so that the modules read bottom-up: loader <- device <- cublas <- gpu.

use super::cublas;
use super::device::{CudaBuf, CudaDev};
use super::launch::{marshal, Arg, Gpu, LaunchCfg};
use super::launchers::KernelName;
use super::loader::driver_error;
use crate::backend::CpuStorage;
use crate::{DType, Device, Layout, Result};
use cudarc::driver::result as drv;

impl Gpu for &'static CudaDev {
    type Buf = CudaBuf;

    fn device(&self) -> Device {
        Device::Cuda(self.ordinal())
    }
    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        self.alloc_uninit(len, dtype)
    }
    fn zeros(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        CudaDev::zeros(self, len, dtype)
    }
    fn dtype(&self, b: &CudaBuf) -> DType {
        b.dtype
    }
    fn len(&self, b: &CudaBuf) -> usize {
        b.len
    }
    fn ptr(&self, b: &CudaBuf, offset: usize) -> u64 {
        assert!(offset <= b.len, "offset {offset} past a buffer of {}", b.len);
        b.ptr + (offset * b.dtype.size_in_bytes()) as u64
    }
    fn ptr_mut(&self, b: &mut CudaBuf, offset: usize) -> u64 {
        self.ptr(b, offset)
    }

    fn launch(&self, kernel: KernelName, cfg: LaunchCfg, args: &[Arg]) -> Result<()> {
        let kernel = kernel.as_str();
        let f = self.function(kernel)?;
        let mut params = marshal(args);
        self.bind()?;
        // SAFETY: `f` is a kernel of a module this device keeps loaded; `params` points
        // at `args`' values, in the kernel's parameter order and types (the typed
        // launchers build them from the kernel's compiled signature; every emulated
        // launch of the same lists checks them again, `check_signature`), and
        // cuLaunchKernel copies them before returning. Buffer addresses come from live buffers of this device that
        // the caller borrows across the launch; since all work is on one stream, a
        // buffer dropped afterwards is reused only by work queued after this kernel.
        unsafe { drv::launch_kernel(f, (cfg.grid, 1, 1), (cfg.block, 1, 1), cfg.shared_bytes, self.stream.cu_stream(), &mut params) }
            .map_err(|e| self.error(&format!("launch of `{kernel}` ({cfg:?})"), driver_error(e)))?;
        if self.sync_each_launch {
            self.stream.synchronize().map_err(|e| self.error(&format!("kernel `{kernel}` ({cfg:?}) failed"), driver_error(e)))?;
        }
        Ok(())
    }

    fn matmul(&self, a: &CudaBuf, la: &Layout, b: &CudaBuf, lb: &Layout) -> Result<CudaBuf> {
        cublas::matmul(self, a, la, b, lb, false)
    }
    fn matmul_sum(&self, a: &CudaBuf, la: &Layout, b: &CudaBuf, lb: &Layout) -> Result<CudaBuf> {
        cublas::matmul(self, a, la, b, lb, true)
    }

    fn download(&self, b: &CudaBuf) -> Result<CpuStorage> {
        CudaDev::download(self, b)
    }
    fn upload(&self, cpu: CpuStorage) -> Result<CudaBuf> {
        CudaDev::upload(self, &cpu)
    }
}
