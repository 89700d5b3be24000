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
    /// Resolves a user's `--device` string and checks that the device can be used now,
    /// so that a bad choice fails before any work: `cuda[:N]` opens the GPU (context,
    /// kernels, cuBLAS) and reports why it cannot.
    pub fn parse_user(s: &str) -> crate::Result<Device> {
        let d: Device = s.parse()?;
        if let Device::Cuda(n) = d {
            crate::backend::cuda::cuda_device(n)?;
        }
        Ok(d)
    }

    /// `cuda:0` when a driver is present and the GPU opens, else the CPU, saying why on
    /// stderr (no driver, or the error that kept the GPU from opening).
    fn auto() -> Device {
        match crate::backend::cuda::probe(0) {
            Ok(Some(_)) => Device::Cuda(0),
            Ok(None) => {
                eprintln!("note: --device auto: no CUDA driver found (libcuda.so); using the CPU");
                Device::Cpu
            }
            Err(e) => {
                eprintln!("note: --device auto: {e}; using the CPU");
                Device::Cpu
            }
        }
    }
}

impl FromStr for Device {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Device> {
        let driver = crate::backend::cuda::cuda_driver_present;
        let no_driver = || crate::Error::Msg(format!("device `{s}`: no CUDA driver found (libcuda.so); use --device cpu"));
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda-emu" => Ok(Device::CudaEmu),
            "auto" => Ok(Device::auto()),
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
