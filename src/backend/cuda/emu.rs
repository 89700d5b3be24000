//! The emulator as a `Gpu`: device memory is host memory (a `CpuStorage`), and a launch
//! calls the kernel's C++ entry (kernels compiled by build.rs through kernels/emu), which
//! runs every block on the emulator's thread pool and returns when all are done.

use super::kernels::{emu_entry, emu_error, EmuConfig};
use super::launch::{marshal, Arg, Gpu, LaunchCfg};
use super::storage::GpuStorage;
use crate::backend::{BackendStorage, CpuStorage};
use crate::{bail, DType, Device, Layout, Result};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug)]
pub struct Emu;

/// Memory of the emulated CUDA device: host buffers that only emulated kernels (or a
/// listed CPU fallback) touch.
#[derive(Clone, Debug)]
pub struct EmuStorage(CpuStorage);

impl EmuStorage {
    pub fn from_cpu(cpu: CpuStorage) -> EmuStorage { EmuStorage(cpu) }
}

impl GpuStorage for EmuStorage {
    type G = Emu;
    fn gpu(&self) -> Emu { Emu }
    fn buf(&self) -> &CpuStorage { &self.0 }
    fn buf_mut(&mut self) -> &mut CpuStorage { &mut self.0 }
    fn wrap(b: CpuStorage) -> Self { EmuStorage(b) }
}

impl Gpu for Emu {
    type Buf = CpuStorage;

    fn device(&self) -> Device { Device::CudaEmu }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
        })
    }
    fn dtype(&self, b: &CpuStorage) -> DType { b.dtype() }
    fn len(&self, b: &CpuStorage) -> usize { b.len() }
    fn ptr(&self, b: &CpuStorage, offset: usize) -> u64 {
        assert!(offset <= b.len(), "offset {offset} past a buffer of {}", b.len());
        let base = match b {
            CpuStorage::F32(v) => v.as_ptr() as u64,
            CpuStorage::F16(v) => v.as_ptr() as u64,
            CpuStorage::BF16(v) => v.as_ptr() as u64,
            CpuStorage::U32(v) => v.as_ptr() as u64,
        };
        base + (offset * b.dtype().size_in_bytes()) as u64
    }
    fn ptr_mut(&self, b: &mut CpuStorage, offset: usize) -> u64 {
        assert!(offset <= b.len(), "offset {offset} past a buffer of {}", b.len());
        let size = b.dtype().size_in_bytes();
        let base = match b {
            CpuStorage::F32(v) => v.as_mut_ptr() as u64,
            CpuStorage::F16(v) => v.as_mut_ptr() as u64,
            CpuStorage::BF16(v) => v.as_mut_ptr() as u64,
            CpuStorage::U32(v) => v.as_mut_ptr() as u64,
        };
        base + (offset * size) as u64
    }

    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<()> {
        let Some(entry) = emu_entry(kernel) else { bail!("cuda-emu: no kernel named `{kernel}` in kernels/*.cu") };
        let c = EmuConfig { grid: [cfg.grid, 1, 1], block: [cfg.block, 1, 1], shared_bytes: cfg.shared_bytes };
        let params = marshal(args);
        // SAFETY: `params` points at `args`' values, which outlive this call, in the
        // kernel's parameter order with the kernel's parameter types (ops.rs builds them
        // from the signatures in kernels/*.cu); buffer addresses come from live buffers
        // that the caller borrows for the duration of the launch, and the kernels stay
        // inside the lengths they are given. The launch is synchronous.
        let rc = unsafe { entry(&c, params.as_ptr()) };
        if rc != 0 {
            bail!("cuda-emu: launch of `{kernel}` ({cfg:?}) refused: {}", emu_error());
        }
        Ok(())
    }

    fn matmul(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<CpuStorage> {
        // the emulator has no cuBLAS: the CPU GEMM stands in
        fallback!("matmul", a.matmul(la, b, lb))
    }
    fn matmul_sum(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<CpuStorage> {
        fallback!("matmul", {
            let per_sample = a.matmul(la, b, lb)?;
            let (batch, mn) = (la.shape()[0], la.shape()[1] * lb.shape()[2]);
            per_sample.reduce(&Layout::contiguous(&[batch, mn]), crate::backend::ReduceOp::Sum, &[0])
        })
    }

    fn download(&self, b: &CpuStorage) -> Result<CpuStorage> { Ok(b.clone()) }
    fn upload(&self, cpu: CpuStorage) -> Result<CpuStorage> { Ok(cpu) }
}
