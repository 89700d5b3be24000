//! Finding the CUDA libraries where users have them (src/backend/cuda/libs.rs,
//! nccl_lib.rs), without a GPU: stub libraries built here with the C compiler, in
//! folders laid out like pip's wheels; the real NVRTC of the pinned CUDA tools when
//! scripts/install-cuda-tools.sh has put them in tools/cuda.

use dfkd::backend::cuda::libs;
use dfkd::backend::cuda::nccl_lib::NcclLib;
use std::path::{Path, PathBuf};
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dfkd-cuda-libs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles `source` (C) into the shared library `path` with soname `soname`.
fn stub_library(path: &Path, soname: &str, source: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = path.with_extension("c");
    std::fs::write(&c, source).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc).args(["-shared", "-fPIC", &format!("-Wl,-soname,{soname}"), "-o"]).arg(path).arg(&c).output().expect("a C compiler (cc)");
    assert!(out.status.success(), "{cc} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// NCCL's API as far as nccl_lib.rs uses it; ncclGetVersion says 2.28.5.
const NCCL_STUB: &str = r#"
int ncclGetVersion(int *v) { *v = 22805; return 0; }
int ncclCommInitAll(void **c, int n, const int *d) { return 0; }
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetUniqueId(ncclUniqueId *id) { return 0; }
int ncclCommInitRank(void **c, int n, ncclUniqueId id, int r) { return 0; }
int ncclAllReduce(const void *s, void *r, unsigned long n, int t, int o, void *c, void *st) { return 0; }
int ncclBroadcast(const void *s, void *r, unsigned long n, int t, int root, void *c, void *st) { return 0; }
int ncclAllGather(const void *s, void *r, unsigned long n, int t, void *c, void *st) { return 0; }
int ncclCommAbort(void *c) { return 0; }
int ncclCommFinalize(void *c) { return 0; }
int ncclCommDestroy(void *c) { return 0; }
int ncclGroupStart(void) { return 0; }
int ncclGroupEnd(void) { return 0; }
const char *ncclGetErrorString(int r) { return r == 3 ? "internal error (stub)" : "other (stub)"; }
"#;

/// Why nccl_lib.rs opens NCCL itself: the only name NCCL 2 ships under is not among
/// those cudarc tries. If a cudarc update adds it, cudarc's loader could be used again.
#[test]
fn cudarc_never_tries_the_name_nccl_ships_under() {
    let names = cudarc::get_lib_name_candidates("nccl");
    assert!(names.iter().any(|n| n == "libnccl.so"), "{names:?}");
    assert!(!names.iter().any(|n| n == "libnccl.so.2"), "cudarc now tries libnccl.so.2: {names:?}");
}

#[test]
fn libnccl_so_2_is_found_in_a_folder_laid_out_like_pips_wheel() {
    let site = temp_dir("nccl").join("site-packages");
    let lib = site.join("nvidia/nccl/lib/libnccl.so.2");
    stub_library(&lib, "libnccl.so.2", NCCL_STUB);
    // another wheel's folder, without NCCL, sorted first
    std::fs::create_dir_all(site.join("nvidia/cublas/lib")).unwrap();
    let dirs = libs::nvidia_lib_dirs(std::slice::from_ref(&site));
    assert_eq!(dirs, [site.join("nvidia/cublas/lib"), site.join("nvidia/nccl/lib")]);
    assert_eq!(libs::find("libnccl.so.2", &dirs), Some(lib.clone()));

    let nccl = NcclLib::open(&lib).unwrap();
    assert_eq!(nccl.path, std::fs::canonicalize(&lib).unwrap(), "the path logged is the file the functions came from");
    assert_eq!(nccl.version_string(), "2.28.5");
    assert_eq!(nccl.check("ncclAllReduce", 0), Ok(()));
    assert_eq!(nccl.check("ncclAllReduce", 3), Err("NCCL ncclAllReduce: internal error (stub) (ncclResult_t 3)".into()));
    // the search as the backend runs it: the loader's own first (this machine may have
    // a real NCCL), then the wheel folders; either way a library with every function
    let found = NcclLib::find(&dirs).unwrap();
    assert!(found.path.is_file(), "{}", found.path.display());

    // a library missing a function is refused, naming it
    let broken = site.join("nvidia/broken/lib/libnccl.so.2");
    stub_library(&broken, "libnccl.so.2", "int ncclGetVersion(int *v) { *v = 22805; return 0; }");
    let err = NcclLib::open(&broken).err().unwrap();
    assert!(err.contains("ncclCommInitAll"), "{err}");
    std::fs::remove_dir_all(site.parent().unwrap()).unwrap();
}

/// The mechanism `libs::ensure` relies on for cuBLAS and NVRTC: once a library is loaded
/// from its folder, a dlopen of its bare soname (as cudarc does) gets it, with no
/// LD_LIBRARY_PATH. A stub pair with a dependency, loaded dependency first.
#[test]
fn a_preloaded_library_answers_a_dlopen_of_its_soname() {
    let dir = temp_dir("preload").join("site-packages/nvidia/cu13/lib");
    stub_library(&dir.join("libdfkdstubLt.so.13"), "libdfkdstubLt.so.13", "int dfkd_stub_lt(void) { return 13; }");
    stub_library(&dir.join("libdfkdstub.so.13"), "libdfkdstub.so.13", "int dfkd_stub(void) { return 7; }");
    // SAFETY: the stubs run no initialisers.
    assert!(unsafe { libloading::Library::new("libdfkdstub.so.13") }.is_err(), "the loader alone must not find the stub");
    let files = ["libdfkdstubLt.so.13", "libdfkdstub.so.13"];
    assert_eq!(libs::preload(&files, &[PathBuf::from("/nonexistent"), dir.clone()]), Some(dir.clone()));
    // SAFETY: as above.
    let lib = unsafe { libloading::Library::new("libdfkdstub.so.13") }.expect("the preloaded stub answers its soname");
    // SAFETY: the stub's function has this signature.
    let f = unsafe { lib.get::<unsafe extern "C" fn() -> i32>(b"dfkd_stub") }.unwrap();
    assert_eq!(unsafe { f() }, 7);
    assert_eq!(libs::library_file(&lib, "dfkd_stub"), Some(std::fs::canonicalize(dir.join("libdfkdstub.so.13")).unwrap()));
    assert_eq!(libs::preload(&["libdfkdstub.so.99"], std::slice::from_ref(&dir)), None, "a folder without every file is not used");
    std::fs::remove_dir_all(dir.ancestors().nth(4).unwrap()).unwrap();
}

/// The real NVRTC of the pinned CUDA tools (a `pip --target` folder), found through
/// DFKD_PYTHON_SITE with no LD_LIBRARY_PATH, as `distill doctor` reports it; skipped
/// with a note when scripts/install-cuda-tools.sh has not run.
#[test]
fn doctor_finds_nvrtc_in_a_pip_target_folder_and_passes_on_the_emulator() {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cuda");
    if !tools.join("nvidia/cu13/lib/libnvrtc.so.13").is_file() {
        eprintln!("note: no tools/cuda (scripts/install-cuda-tools.sh): the NVRTC search is not checked");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["doctor", "--device", "cuda-emu"])
        .env("DFKD_PYTHON_SITE", &tools)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "doctor on the emulator: {text}{}", String::from_utf8_lossy(&out.stderr));
    let nvrtc = std::fs::canonicalize(tools.join("nvidia/cu13/lib/libnvrtc.so.13")).unwrap();
    assert!(text.contains(&format!("libnvrtc 13.0 from {}", nvrtc.display())), "{text}");
    assert!(text.contains("bit-equal to the CPU"), "{text}");
    assert!(text.lines().last().unwrap().contains("cuda-emu is ready"), "{text}");
}
