//! Where a tensor's storage lives. The CPU backend is the reference; the CUDA backend
//! (and its CPU emulation) add variants here and a storage variant in `backend`,
//! without touching op definitions or models.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA kernels compiled as C++ and run on the CPU by the kernel emulator:
    /// slow, always available, and how the kernels are tested without a GPU.
    CudaEmu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl Device {
    /// Resolves a user's `--device` string. `auto` picks the fastest device present.
    pub fn parse_user(s: &str) -> crate::Result<Device> {
        s.parse()
    }
}

impl FromStr for Device {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Device> {
        let driver = crate::backend::cuda::cuda_driver_present;
        let no_driver = || crate::Error::Msg("no CUDA driver found (libcuda.so); use --device cpu".into());
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda-emu" => Ok(Device::CudaEmu),
            // CUDA when present, once its storage exists (backend::cuda); until then the
            // CPU, so that `auto` never picks a device that cannot hold tensors.
            "auto" => Ok(Device::Cpu),
            "cuda" if driver() => Ok(Device::Cuda(0)),
            s if s.starts_with("cuda:") => match s["cuda:".len()..].parse() {
                Ok(n) if driver() => Ok(Device::Cuda(n)),
                Ok(_) => Err(no_driver()),
                Err(_) => Err(crate::Error::Msg(format!("device `{s}`: expected cuda:N with N a GPU ordinal"))),
            },
            "cuda" => Err(no_driver()),
            s => Err(crate::Error::Msg(format!("unknown device `{s}`: expected cpu, cuda[:N], cuda-emu or auto"))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::CudaEmu => write!(f, "cuda-emu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
