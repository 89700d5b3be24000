//! libnccl, opened by us rather than by cudarc: cudarc tries `libnccl.so` and
//! `libnccl.so.{13,12,11,10,9,1}` but never `libnccl.so.2`, the only name NCCL 2 ships
//! under in pip's `nvidia-nccl-cu13` wheel and in most distributions (see `libs.rs`).
//! We open `libnccl.so.2` (or `libnccl.so`) through the loader's own search first, then
//! from the `nvidia/*/lib` folders of the site-packages, and call the few functions
//! `nccl.rs` needs through this table.

use super::libs;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub type Comm = *mut c_void;
pub type Stream = *mut c_void;
/// `ncclResult_t`: 0 is success (kept an integer: an unknown code must not be UB).
pub type Status = c_int;

/// `ncclFloat32` and `ncclSum` of nccl.h.
pub const FLOAT32: c_int = 7;
pub const SUM: c_int = 0;

/// `ncclUniqueId`: the bytes rank 0 makes and every rank of a multi-process
/// communicator passes to `ncclCommInitRank` (NCCL_UNIQUE_ID_BYTES).
pub const UNIQUE_ID_BYTES: usize = 128;
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId(pub [u8; UNIQUE_ID_BYTES]);

/// The names tried through the loader's search, then as files in the wheels' folders.
pub const FILE_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// The NCCL functions `nccl.rs` calls, from one loaded library.
pub struct NcclLib {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// `ncclGetVersion`'s code, e.g. 22805 for 2.28.5.
    pub version: c_int,
    pub comm_init_all: unsafe extern "C" fn(*mut Comm, c_int, *const c_int) -> Status,
    pub get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    /// `ncclCommInitRank(comm, nranks, id, rank)`: the id by value, as nccl.h declares it.
    pub comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> Status,
    pub all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> Status,
    pub broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> Status,
    pub all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> Status,
    pub comm_abort: unsafe extern "C" fn(Comm) -> Status,
    pub comm_finalize: unsafe extern "C" fn(Comm) -> Status,
    pub comm_destroy: unsafe extern "C" fn(Comm) -> Status,
    pub group_start: unsafe extern "C" fn() -> Status,
    pub group_end: unsafe extern "C" fn() -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    /// Keeps the function pointers valid.
    _lib: libloading::Library,
}

impl NcclLib {
    /// Opens the library at `path` (a bare name goes through the loader's search) and
    /// resolves every function; the error names the file and the missing function.
    pub fn open(path: &Path) -> Result<NcclLib, String> {
        // SAFETY: loading NCCL runs only its own initialisers.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("{}: {e}", path.display()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the type is the function's signature in nccl.h (NCCL 2.x).
                *unsafe { lib.get($name) }.map_err(|e| format!("{}: no {} ({e})", path.display(), $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> Status = sym!("ncclGetVersion");
        let mut version = 0;
        // SAFETY: writes one int.
        unsafe { get_version(&mut version) };
        let nccl = NcclLib {
            path: PathBuf::new(),
            version,
            comm_init_all: sym!("ncclCommInitAll"),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            all_reduce: sym!("ncclAllReduce"),
            broadcast: sym!("ncclBroadcast"),
            all_gather: sym!("ncclAllGather"),
            comm_abort: sym!("ncclCommAbort"),
            comm_finalize: sym!("ncclCommFinalize"),
            comm_destroy: sym!("ncclCommDestroy"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            get_error_string: sym!("ncclGetErrorString"),
            _lib: lib,
        };
        let path = libs::loaded_from(nccl.comm_init_all as *const c_void).unwrap_or_else(|| path.to_path_buf());
        Ok(NcclLib { path, ..nccl })
    }

    /// Opens the first of `FILE_NAMES` the loader finds, else the first found in `dirs`;
    /// the error lists what was tried.
    pub fn find(dirs: &[PathBuf]) -> Result<NcclLib, String> {
        let mut tried = vec![];
        for name in FILE_NAMES {
            match NcclLib::open(Path::new(name)) {
                Ok(l) => return Ok(l),
                Err(e) => tried.push(e),
            }
        }
        for name in FILE_NAMES {
            if let Some(path) = libs::find(name, dirs) {
                match NcclLib::open(&path) {
                    Ok(l) => return Ok(l),
                    Err(e) => tried.push(e),
                }
            }
        }
        let folders = if dirs.is_empty() { "none".to_string() } else { dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ") };
        Err(format!(
            "libnccl.so.2 not found (tried: {}; pip wheel folders searched: {folders}); install it, e.g. `pip install nvidia-nccl-cu13`",
            tried.join("; ")
        ))
    }

    /// "2.28.5"
    pub fn version_string(&self) -> String {
        let v = self.version;
        // NCCL_VERSION(X,Y,Z): X*10000 + Y*100 + Z from 2.9 on, X*1000 + Y*100 + Z before
        if v >= 10000 {
            format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
        } else {
            format!("{}.{}.{}", v / 1000, v / 100 % 10, v % 100)
        }
    }

    /// `Ok` for success, else "NCCL <what>: <NCCL's words> (ncclResult_t N)".
    pub fn check(&self, what: &str, status: Status) -> Result<(), String> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let words = unsafe { (self.get_error_string)(status) };
        let words = if words.is_null() { "unknown error".into() } else { unsafe { CStr::from_ptr(words) }.to_string_lossy().into_owned() };
        Err(format!("NCCL {what}: {words} (ncclResult_t {status})"))
    }
}

/// This process's NCCL, opened on first use from the loader's search or the
/// site-packages' wheels (`libs::site_dirs`).
pub fn nccl() -> Result<&'static NcclLib, String> {
    static LIB: OnceLock<Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(|| NcclLib::find(&libs::nvidia_lib_dirs(libs::site_dirs()))).as_ref().map_err(|e| e.clone())
}
