//! Typed kernel launchers: one constant per kernel of kernels/*.cu, `k::<kernel>`, whose
//! `launch` takes the kernel's parameters as a tuple of Rust types, so rustc checks
//! every launch's argument count, order and types. build.rs generates the constants
//! from the parameter kinds the compiled kernels report (`build/launchers.rs`), so the
//! signatures are declared once, in the .cu files. A kernel name can only be made here:
//! `Gpu::launch` takes a `KernelName`, so no launch names a kernel by a string. The
//! emulator still checks every launch against the kernel (`check_signature`), a second
//! line behind these types (pointers are all `u64`, and structs are told by size).

use super::launch::{Arg, ConvGeom, Gpu, KernelLayout, LaunchCfg, PoolGeom};
use crate::{DType, Result};
use std::marker::PhantomData;

/// The name of a kernel of kernels/*.cu; only the generated launchers make one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelName(&'static str);

impl KernelName {
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// A Rust value a kernel parameter takes (device addresses are `u64`).
pub trait Param: Copy {
    fn arg(self) -> Arg;
}

macro_rules! params {
    ($($t:ty => $variant:ident),+) => {
        $(impl Param for $t {
            fn arg(self) -> Arg { Arg::$variant(self) }
        })+
    };
}
// the Rust type of each parameter kind, as `rust_type` in build/launchers.rs writes them
params!(u64 => Ptr, u32 => U32, i32 => I32, f32 => F32, KernelLayout => Layout, PoolGeom => Pool, ConvGeom => Conv);

/// A kernel's whole parameter list, as a tuple.
pub trait Params {
    /// Calls `f` with the arguments in parameter order, built on the stack.
    fn with_args<R>(self, f: impl FnOnce(&[Arg]) -> R) -> R;
}

macro_rules! tuple_params {
    ($($t:ident),*) => {
        impl<$($t: Param),*> Params for ($($t,)*) {
            #[allow(non_snake_case)]
            fn with_args<R>(self, f: impl FnOnce(&[Arg]) -> R) -> R {
                let ($($t,)*) = self;
                f(&[$($t.arg()),*])
            }
        }
    };
}
tuple_params!();
tuple_params!(A);
tuple_params!(A, B);
tuple_params!(A, B, C);
tuple_params!(A, B, C, D);
tuple_params!(A, B, C, D, E);
tuple_params!(A, B, C, D, E, F);
tuple_params!(A, B, C, D, E, F, G);
tuple_params!(A, B, C, D, E, F, G, H);
tuple_params!(A, B, C, D, E, F, G, H, I);
tuple_params!(A, B, C, D, E, F, G, H, I, J);
tuple_params!(A, B, C, D, E, F, G, H, I, J, K);
tuple_params!(A, B, C, D, E, F, G, H, I, J, K, L);

/// A kernel that takes the parameters `P`.
pub struct Kernel<P> {
    name: KernelName,
    params: PhantomData<fn(P)>,
}

impl<P> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P> Copy for Kernel<P> {}

impl<P: Params> Kernel<P> {
    const fn new(name: KernelName) -> Self {
        Kernel { name, params: PhantomData }
    }
    /// Runs the kernel on `g` (see `Gpu::launch`).
    pub fn launch<G: Gpu>(self, g: &G, cfg: LaunchCfg, params: P) -> Result<()> {
        params.with_args(|args| g.launch(self.name, cfg, args))
    }
}

/// The kernels of one family (`<family>[_v<N>]_<dtype>`), all taking `P`: for launches
/// that pick a version or dtype at run time.
pub struct Family<P: 'static> {
    kernels: &'static [(Option<u32>, DType, Kernel<P>)],
}

impl<P: Params + 'static> Family<P> {
    const fn new(kernels: &'static [(Option<u32>, DType, Kernel<P>)]) -> Self {
        Family { kernels }
    }
    /// Version `v` (`None`: the family is unversioned) for `dtype`. The callers pick
    /// versions from their op's `FusedOp::VERSIONS` and dtypes the family has, so a miss is a bug.
    pub fn get(&self, v: Option<u32>, dtype: DType) -> Kernel<P> {
        let found = self.kernels.iter().find(|(kv, kd, _)| *kv == v && *kd == dtype);
        found
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("no kernel of version {v:?} for {dtype:?} among {:?}", self.kernels.iter().map(|e| e.2.name.0).collect::<Vec<_>>()))
    }
}

/// The generated launchers, named as the kernels are in kernels/*.cu. Every kernel gets
/// one, including the emulator's self-test kernels that only C++ or tests launch. The
/// parameter tuples are the kernels' signatures, long as those are.
#[allow(non_upper_case_globals, dead_code, clippy::type_complexity)]
pub mod k {
    use super::*;
    include!(concat!(env!("OUT_DIR"), "/launchers.rs"));
}
