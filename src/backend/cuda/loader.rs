//! Loading the kernels into a context. Per kernels/*.cu file: the nvcc fatbin that
//! build.rs embedded (cubins for sm_80 and sm_90, PTX for later cards) when it has code
//! this card and driver accept; otherwise the embedded source compiled by NVRTC for the
//! card's architecture, once per process and architecture. The fatbin fails when the
//! build had no nvcc, on cards older than sm_80, or when the driver is older than the
//! nvcc that wrote the PTX (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).

use super::kernels::{nvrtc_compile, nvrtc_present, KernelModule, MODULES};
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// NVRTC output by (kernel file, architecture): devices of one kind share it.
static COMPILED: Mutex<Vec<(&'static str, &'static str, Ptx)>> = Mutex::new(Vec::new());

/// One module per kernel file, loaded into `ctx` (a device of compute capability `cc`),
/// with where its code came from ("the fatbin", or "NVRTC for sm_86 (the fatbin: why not)").
pub fn load_modules(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Vec<(Arc<CudaModule>, String)>> {
    let mut out = vec![];
    for m in MODULES {
        let fatbin_error = match m.fatbin {
            Some(image) => match ctx.load_module(Ptx::from_binary(image.to_vec())) {
                Ok(module) => {
                    out.push((module, "the fatbin".to_string()));
                    continue;
                }
                Err(e) => driver_error(e),
            },
            None => "none embedded (built without nvcc)".to_string(),
        };
        let ptx = compiled(m, cc, &fatbin_error)?;
        let module = ctx.load_module(ptx).map_err(|e| {
            Error::Msg(format!(
                "kernels/{}.cu: the driver refused the PTX that NVRTC made for {} ({}); the fatbin: {fatbin_error}. CUDA 13 PTX needs driver 580 or newer",
                m.name,
                arch(cc),
                driver_error(e)
            ))
        })?;
        out.push((module, format!("NVRTC for {} (the fatbin: {fatbin_error})", arch(cc))));
    }
    Ok(out)
}

/// The NVRTC compilation of `m` for `cc`, compiled on first request.
fn compiled(m: &'static KernelModule, cc: (i32, i32), fatbin_error: &str) -> Result<Ptx> {
    let arch = arch(cc);
    let mut cache = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, ptx)) = cache.iter().find(|(n, a, _)| *n == m.name && *a == arch) {
        return Ok(ptx.clone());
    }
    if !nvrtc_present() {
        return Err(Error::Msg(format!(
            "kernels/{}.cu has no code for this card in its embedded fatbin ({fatbin_error}), and libnvrtc.so.13 was not found to compile it for {arch} (neither by the loader nor in pip's nvidia/*/lib folders): `pip install nvidia-cuda-nvrtc`, or run scripts/install-cuda-tools.sh and set DFKD_PYTHON_SITE=tools/cuda",
            m.name
        )));
    }
    let ptx = nvrtc_compile(m, arch)?;
    cache.push((m.name, arch, ptx.clone()));
    Ok(ptx)
}

/// NVRTC's name for a compute capability, e.g. "sm_86"; interned because cudarc's
/// compile options take a `&'static str`.
fn arch(cc: (i32, i32)) -> &'static str {
    static NAMES: Mutex<Option<HashMap<(i32, i32), &'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    names.get_or_insert_with(HashMap::new).entry(cc).or_insert_with(|| Box::leak(format!("sm_{}{}", cc.0, cc.1).into_boxed_str()))
}

/// "CUDA_ERROR_X (description)", as the driver words it.
pub(super) fn driver_error(e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}
