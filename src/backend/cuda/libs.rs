//! Where the CUDA libraries come from. cudarc opens libcuda, libcublas and libnvrtc by
//! bare name (`libcublas.so`, ..., `libcublas.so.13`: `cudarc::get_lib_name_candidates`),
//! so it finds only what the dynamic loader finds: a system install, the loader cache or
//! LD_LIBRARY_PATH as it was when the process started. Users often have them elsewhere:
//! pip's NVIDIA wheels (PyTorch's dependencies, `nvidia-cublas`, `nvidia-nccl-cu13`)
//! put them in `<site-packages>/nvidia/<package>/lib`. So:
//! - `site_dirs` lists the site-packages folders of the `python3` on the PATH, and those
//!   in `DFKD_PYTHON_SITE` (e.g. a `pip --target` folder such as tools/cuda);
//! - `ensure` preloads cuBLAS or NVRTC from their `nvidia/*/lib` folders when the loader
//!   alone does not find them: glibc answers a dlopen of a bare name with an already
//!   loaded library whose soname it is, and the sonames (libcublas.so.13,
//!   libnvrtc.so.13) are among cudarc's names, so cudarc then gets the preloaded files;
//! - NCCL's soname, libnccl.so.2, is not among cudarc's names for it, so preloading
//!   cannot help there: `nccl_lib.rs` opens it itself, from the path `find` gives;
//! - `loaded_from` names the file a symbol was loaded from, for the logs and
//!   `distill doctor`.

use std::ffi::{c_void, CStr, OsStr};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The site-packages folders to search: `DFKD_PYTHON_SITE`'s (colon-separated) first,
/// then the `sys.path` of the `python3` on the PATH (none when there is no python3).
pub fn site_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = std::env::var_os("DFKD_PYTHON_SITE").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
        dirs.extend(python_sys_path(OsStr::new("python3")));
        dirs
    })
}

/// "the site-packages folders a, b" or why there are none, for messages.
pub fn searched_sites() -> String {
    let dirs = site_dirs();
    if dirs.is_empty() {
        return "no site-packages (no python3 on the PATH, DFKD_PYTHON_SITE unset)".into();
    }
    format!("the site-packages {}", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))
}

/// `sys.path` of the interpreter `python`, existing folders only; empty when it does not run.
pub fn python_sys_path(python: &OsStr) -> Vec<PathBuf> {
    let out = std::process::Command::new(python)
        .args(["-c", "import sys; print('\\n'.join(sys.path))"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).filter(|p| p.is_dir()).collect(),
        _ => vec![],
    }
}

/// The library folders of NVIDIA's wheels under the site folders `sites`:
/// `<site>/nvidia/<package>/lib`, packages in name order (`cu13` holds every CUDA 13
/// library; older wheels have one package per library, `cublas`, `nccl`, ...).
pub fn nvidia_lib_dirs(sites: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = vec![];
    for site in sites {
        let Ok(entries) = std::fs::read_dir(site.join("nvidia")) else { continue };
        let mut libs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
        libs.sort();
        out.extend(libs);
    }
    out
}

/// The first of `dirs` that holds a file named `file`, as its path.
pub fn find(file: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(file)).find(|p| p.is_file())
}

/// A CUDA library that cudarc loads by name, and the files that make it up when
/// loaded from a folder: dependencies first (so that the last one's dlopen finds them
/// already loaded), the library itself last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLib {
    Cublas,
    Nvrtc,
}

impl CudaLib {
    fn files(self) -> &'static [&'static str] {
        match self {
            CudaLib::Cublas => &["libcublasLt.so.13", "libcublas.so.13"],
            CudaLib::Nvrtc => &["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"],
        }
    }

    /// Whether cudarc's own search loads it.
    fn present(self) -> bool {
        // SAFETY: each only tries to dlopen the library and reports whether it loaded.
        unsafe {
            match self {
                CudaLib::Cublas => cudarc::cublas::sys::is_culib_present(),
                CudaLib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            }
        }
    }
}

/// Makes `lib` loadable by cudarc: true when cudarc finds it by itself, or once its
/// files have been preloaded from the first `nvidia/*/lib` folder of `site_dirs` that
/// holds them all. Decided once per process and library.
pub fn ensure(lib: CudaLib) -> bool {
    static CUBLAS: OnceLock<bool> = OnceLock::new();
    static NVRTC: OnceLock<bool> = OnceLock::new();
    let cell = match lib {
        CudaLib::Cublas => &CUBLAS,
        CudaLib::Nvrtc => &NVRTC,
    };
    *cell.get_or_init(|| lib.present() || (preload(lib.files(), &nvidia_lib_dirs(site_dirs())).is_some() && lib.present()))
}

/// Loads `files` (in order, globally, for the life of the process) from the first of
/// `dirs` that holds them all; returns that folder.
pub fn preload(files: &[&str], dirs: &[PathBuf]) -> Option<PathBuf> {
    let dir = dirs.iter().find(|d| files.iter().all(|f| d.join(f).is_file()))?;
    for f in files {
        let path = dir.join(f);
        // SAFETY: NVIDIA's libraries run no initialisers that depend on the caller;
        // the handle is leaked on purpose so the library stays loaded for cudarc.
        let lib = unsafe { libloading::os::unix::Library::open(Some(&path), libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL) };
        std::mem::forget(lib.ok()?);
    }
    Some(dir.clone())
}

/// The file the code at `addr` was loaded from (dladdr), if it belongs to a library.
pub(crate) fn loaded_from(addr: *const c_void) -> Option<PathBuf> {
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables and fills `info`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname points at the loader's NUL-terminated name of the object.
    let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
    let path = PathBuf::from(name);
    Some(std::fs::canonicalize(&path).unwrap_or(path))
}

/// The file `symbol` of `lib` was loaded from.
pub fn library_file(lib: &libloading::Library, symbol: &str) -> Option<PathBuf> {
    // SAFETY: the symbol is only used as an address, never called.
    let sym = unsafe { lib.get::<*const c_void>(symbol.as_bytes()) }.ok()?;
    loaded_from(*sym)
}
