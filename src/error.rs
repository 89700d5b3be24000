//! One error type for the whole crate. Messages name the op, file or key at fault
//! and what was expected, because the user reading them has no debugger attached.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shapes {lhs:?} and {rhs:?} are incompatible")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },

    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType { op: &'static str, expected: crate::DType, got: crate::DType },

    #[error("{op}: tensors live on different devices ({lhs:?} and {rhs:?})")]
    DeviceMismatch { op: &'static str, lhs: crate::Device, rhs: crate::Device },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// `bail!("...{}", x)` returns `Err(Error::Msg(..))` from the current function.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::Msg(format!($($arg)*))) };
}
