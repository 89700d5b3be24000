//! Where a tensor's storage lives. The CPU backend is the reference; the CUDA backend
//! (and its CPU emulation) add variants here and a storage variant in `backend`,
//! without touching op definitions or models.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
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
        match s {
            "cpu" | "auto" => Ok(Device::Cpu),
            s if s.starts_with("cuda") => Err(crate::Error::Msg(format!(
                "device `{s}` was asked for, but this build has no CUDA backend; use --device cpu"
            ))),
            s => Err(crate::Error::Msg(format!("unknown device `{s}`: expected cpu, cuda[:N] or auto"))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
        }
    }
}
