//! The emulator as a `Gpu`: device memory is host memory (a `CpuStorage`), and a launch
//! calls the kernel's C++ entry (kernels compiled by build.rs through kernels/emu), which
//! runs every block on the emulator's thread pool and returns when all are done.
//!
//! `DFKD_EMU_MEMCHECK=1` (or `end`) is the emulator's compute-sanitizer memcheck: every
//! buffer a launch gets is copied between guard pages for the launch, ending at the
//! upper one (kernels/emu/cuda_emu.cpp), so a kernel reading or writing past a buffer's
//! end stops the process with the kernel, argument and thread named. `start` puts the
//! buffer's start at the lower guard page instead, to catch accesses before it. Writes
//! into the canary on the buffer's other side, and writes into a buffer the host passed
//! read-only (`ptr`, not `ptr_mut`), are errors.

use super::kernels::{emu_entry, emu_error, emu_params, EmuConfig};
use super::launch::{check_signature, marshal, Arg, Gpu, LaunchCfg};
use super::launchers::KernelName;
use super::storage::GpuStorage;
use crate::backend::{BackendStorage, CpuStorage};
use crate::{bail, DType, Device, Layout, Result};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug)]
pub struct Emu;

/// Memory of the emulated CUDA device: host buffers that only emulated kernels (or a
/// listed CPU fallback) touch.
#[derive(Clone, Debug)]
pub struct EmuStorage(CpuStorage);

impl EmuStorage {
    pub fn from_cpu(cpu: CpuStorage) -> EmuStorage {
        EmuStorage(cpu)
    }
}

impl GpuStorage for EmuStorage {
    type G = Emu;
    fn gpu(&self) -> Emu {
        Emu
    }
    fn buf(&self) -> &CpuStorage {
        &self.0
    }
    fn buf_mut(&mut self) -> &mut CpuStorage {
        &mut self.0
    }
    fn wrap(b: CpuStorage) -> Self {
        EmuStorage(b)
    }
}

impl Gpu for Emu {
    type Buf = CpuStorage;

    fn device(&self) -> Device {
        Device::CudaEmu
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CpuStorage> {
        // what a GPU's uninitialised memory may hold: NaN, so unwritten elements show
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec![f32::from_bits(u32::MAX); len]),
            DType::F16 => CpuStorage::F16(vec![f16::from_bits(u16::MAX); len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_bits(u16::MAX); len]),
            DType::U32 => CpuStorage::U32(vec![u32::MAX; len]),
        })
    }
    fn zeros(&self, len: usize, dtype: DType) -> Result<CpuStorage> {
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; len]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; len]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; len]),
            DType::U32 => CpuStorage::U32(vec![0; len]),
        })
    }
    fn dtype(&self, b: &CpuStorage) -> DType {
        b.dtype()
    }
    fn len(&self, b: &CpuStorage) -> usize {
        b.len()
    }
    fn ptr(&self, b: &CpuStorage, offset: usize) -> u64 {
        assert!(offset <= b.len(), "offset {offset} past a buffer of {}", b.len());
        let base = match b {
            CpuStorage::F32(v) => v.as_ptr() as u64,
            CpuStorage::F16(v) => v.as_ptr() as u64,
            CpuStorage::BF16(v) => v.as_ptr() as u64,
            CpuStorage::U32(v) => v.as_ptr() as u64,
        };
        let addr = base + (offset * b.dtype().size_in_bytes()) as u64;
        memcheck::note(addr, base, b.len() * b.dtype().size_in_bytes(), false);
        addr
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
        let addr = base + (offset * size) as u64;
        memcheck::note(addr, base, b.len() * size, true);
        addr
    }

    fn launch(&self, kernel: KernelName, cfg: LaunchCfg, args: &[Arg]) -> Result<()> {
        let kernel = kernel.as_str();
        let (Some(entry), Some(params)) = (emu_entry(kernel), emu_params(kernel)) else { bail!("cuda-emu: no kernel named `{kernel}` in kernels/*.cu") };
        // the argument list against the kernel's parameters, which the GPU cannot check
        check_signature(kernel, params, args)?;
        let c = EmuConfig { grid: [cfg.grid, 1, 1], block: [cfg.block, 1, 1], shared_bytes: cfg.shared_bytes };
        let guarded = memcheck::enabled().then(|| memcheck::Guarded::new(kernel, args));
        let params = marshal(guarded.as_ref().map_or(args, |g| &g.args));
        // SAFETY: `params` points at `args`' values, which outlive this call, in the
        // kernel's parameter order with the kernel's parameter kinds (checked above
        // against the compiled kernel's signature); buffer addresses come from live buffers
        // that the caller borrows for the duration of the launch, and the kernels stay
        // inside the lengths they are given (or memcheck's guard pages stop the process).
        // The launch is synchronous.
        let rc = unsafe { entry(&c, params.as_ptr()) };
        let checked = guarded.map_or(Ok(()), |g| g.release());
        if rc != 0 {
            bail!("cuda-emu: launch of `{kernel}` ({cfg:?}) refused: {}", emu_error());
        }
        checked
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

    fn download(&self, b: &CpuStorage) -> Result<CpuStorage> {
        Ok(b.clone())
    }
    fn upload(&self, cpu: CpuStorage) -> Result<CpuStorage> {
        Ok(cpu)
    }
}

/// The memcheck mode (`DFKD_EMU_MEMCHECK=1`): the host side of the guarded copies.
mod memcheck {
    use super::*;

    extern "C" {
        fn emu_guard_alloc(src: *const c_void, bytes: usize, arg: c_int, kernel: *const c_char, at_start: c_int) -> *mut c_void;
        fn emu_guard_release(data: *mut c_void, dst: *mut c_void) -> c_int;
    }

    /// Where the buffers touch a guard page, from `DFKD_EMU_MEMCHECK`.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Off,
        End,
        Start,
    }

    fn mode() -> Mode {
        static MODE: OnceLock<Mode> = OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("DFKD_EMU_MEMCHECK").as_deref() {
            Err(_) | Ok("") | Ok("0") => Mode::Off,
            Ok("1") | Ok("end") => Mode::End,
            Ok("start") => Mode::Start,
            Ok(other) => panic!("DFKD_EMU_MEMCHECK={other}: expected 0, 1, end or start"),
        })
    }

    pub fn enabled() -> bool {
        mode() != Mode::Off
    }

    /// The buffer an address handed to a kernel points into.
    #[derive(Clone, Copy)]
    struct Extent {
        base: u64,
        bytes: usize,
        writable: bool,
    }

    thread_local! {
        /// Addresses made by `ptr`/`ptr_mut` on this thread and not yet launched with,
        /// keyed by address: the ops build a launch's arguments and launch at once.
        static PENDING: RefCell<HashMap<u64, Extent>> = RefCell::new(HashMap::new());
    }

    pub fn note(addr: u64, base: u64, bytes: usize, writable: bool) {
        if !enabled() {
            return;
        }
        PENDING.with_borrow_mut(|p| {
            if p.len() > 4096 {
                p.clear(); // addresses made but never launched with
            }
            let e = p.entry(addr).or_insert(Extent { base, bytes, writable });
            *e = Extent { base, bytes, writable: writable || (e.base == base && e.writable) };
        });
    }

    /// One buffer's guarded copy for the length of a launch.
    struct Copy {
        extent: Extent,
        data: *mut c_void,
        arg: usize,
    }

    /// A launch's arguments with every buffer swapped for its guarded copy.
    pub struct Guarded {
        kernel: String,
        pub args: Vec<Arg>,
        copies: Vec<Copy>,
    }

    impl Guarded {
        pub fn new(kernel: &str, args: &[Arg]) -> Guarded {
            let name = CString::new(kernel).unwrap_or_default();
            let mut g = Guarded { kernel: kernel.to_string(), args: args.to_vec(), copies: Vec::new() };
            for (i, a) in g.args.iter_mut().enumerate() {
                let Arg::Ptr(addr) = *a else { continue };
                let Some(e) = PENDING.with_borrow_mut(|p| p.remove(&addr)) else { continue };
                // one copy per buffer, however many of its addresses the kernel gets
                let data = match g.copies.iter_mut().find(|c| c.extent.base == e.base) {
                    Some(c) => {
                        c.extent.writable |= e.writable;
                        c.data
                    }
                    None => {
                        // SAFETY: `e` describes a live buffer of `bytes` bytes at `base`
                        // (made by `ptr`/`ptr_mut` for this launch); the copy is read only.
                        let at_start = (mode() == Mode::Start) as c_int;
                        let data = unsafe { emu_guard_alloc(e.base as *const c_void, e.bytes, i as c_int, name.as_ptr(), at_start) };
                        if data.is_null() {
                            continue; // the guard table is full: this one runs unguarded
                        }
                        g.copies.push(Copy { extent: e, data, arg: i });
                        data
                    }
                };
                *a = Arg::Ptr(data as u64 + (addr - e.base));
            }
            g
        }

        /// Copies the written buffers back and frees the guarded copies; an error names
        /// what the kernel wrote where it must not.
        pub fn release(self) -> Result<()> {
            let mut problems = Vec::new();
            for c in &self.copies {
                let bytes = c.extent.bytes;
                let dst = if c.extent.writable { c.extent.base as *mut c_void } else { std::ptr::null_mut() };
                if !c.extent.writable {
                    // SAFETY: both ranges hold `bytes` live bytes: the host buffer (kept
                    // alive by the caller across the launch) and the guarded copy.
                    let (orig, copy) =
                        unsafe { (std::slice::from_raw_parts(c.extent.base as *const u8, bytes), std::slice::from_raw_parts(c.data as *const u8, bytes)) };
                    if orig != copy {
                        problems.push(format!("wrote to argument #{}, which the host passed read-only", c.arg));
                    }
                }
                // SAFETY: `data` came from emu_guard_alloc; `dst` is null or the
                // writable host buffer of `bytes` bytes it was copied from.
                match unsafe { emu_guard_release(c.data, dst) } {
                    0 => {}
                    1 => problems.push(format!("wrote before the start of argument #{} ({bytes} bytes)", c.arg)),
                    _ => problems.push(format!("wrote past the end of argument #{} ({bytes} bytes)", c.arg)),
                }
            }
            if problems.is_empty() {
                Ok(())
            } else {
                bail!("cuda-emu memcheck: kernel `{}` {}", self.kernel, problems.join("; "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The emulator's checks must catch the deliberately wrong kernels of
    //! kernels/emu/selftest.cu. Memcheck is read from the environment once per process,
    //! and an access to a guard page ends the process, so each memcheck case runs in a
    //! child process of this test binary.
    use super::*;
    use crate::backend::cuda::launch::LaunchCfg;
    use crate::backend::cuda::launchers::k;

    const CASE: &str = "DFKD_EMU_TEST_CASE";

    fn one_block(threads: u32, shared_bytes: u32) -> LaunchCfg {
        LaunchCfg { grid: 1, block: threads, shared_bytes }
    }

    fn filled(n: usize) -> CpuStorage {
        CpuStorage::F32((0..n).map(|i| i as f32 + 0.5).collect())
    }

    /// Runs `case` of `check_child` under memcheck (`DFKD_EMU_MEMCHECK=end`);
    /// returns (exit success, stderr).
    fn run_child(case: &str) -> (bool, String) {
        run_child_in(case, "end")
    }

    fn run_child_in(case: &str, mode: &str) -> (bool, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "backend::cuda::emu::tests::check_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("DFKD_EMU_MEMCHECK", mode)
            .env(CASE, case)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The body of each child: launches one wrong (or right) kernel under memcheck and
    /// prints the launch's result. Not a test of its own: `run_child` starts it.
    #[test]
    #[ignore = "a child process of the emulator-check tests"]
    fn check_child() {
        let case = std::env::var(CASE).expect("started by run_child, which sets the case");
        assert!(memcheck::enabled());
        let g = Emu;
        let result = match case.as_str() {
            // y[0..=n] of n floats, y[-1..n] of n floats, and y[0..n] (in bounds); 62
            // floats: the end is not 16-byte aligned, yet y[62] is in the guard page
            "write_past_end" | "write_before_start" | "write_ok" => {
                let mut y = g.alloc(62, DType::F32).unwrap();
                let (first, last) = match case.as_str() {
                    "write_past_end" => (0, 62),
                    "write_before_start" => (-1, 61),
                    _ => (0, 61),
                };
                k::st_bad_write_range.launch(&g, one_block(32, 0), (g.ptr_mut(&mut y, 0), first, last))
            }
            "read_guard" => {
                let x = filled(64);
                let mut y = g.alloc(64, DType::F32).unwrap();
                k::st_bad_read_past_end.launch(&g, one_block(32, 0), (g.ptr(&x, 0), g.ptr_mut(&mut y, 0), 64))
            }
            "write_input" => {
                let x = filled(8);
                let mut y = g.alloc(8, DType::F32).unwrap();
                k::st_bad_write_input.launch(&g, one_block(32, 0), (g.ptr(&x, 0), g.ptr_mut(&mut y, 0)))
            }
            "divergent_barrier" => {
                let mut y = g.alloc(64, DType::F32).unwrap();
                k::st_bad_divergent_barrier.launch(&g, one_block(64, 0), (g.ptr_mut(&mut y, 0),))
            }
            other => panic!("unknown case {other}"),
        };
        eprintln!("launch result: {result:?}");
    }

    #[test]
    fn memcheck_catches_out_of_bounds_and_read_only_writes() {
        let (ok, err) = run_child("write_ok");
        assert!(ok && err.contains("launch result: Ok(())"), "an in-bounds kernel passes memcheck:\n{err}");

        let (ok, err) = run_child("write_past_end");
        assert!(!ok, "the process must stop:\n{err}");
        assert!(err.contains("kernel `st_bad_write_range` touched argument #0 (a buffer of 248 bytes) 0 bytes past its end, in thread (30,0,0)"), "{err}");

        let (ok, err) = run_child("read_guard");
        assert!(!ok, "the process must stop:\n{err}");
        assert!(err.contains("kernel `st_bad_read_past_end` touched argument #0 (a buffer of 256 bytes) 0 bytes past its end, in thread (31,0,0)"), "{err}");

        let (_, err) = run_child("write_before_start");
        assert!(err.contains("kernel `st_bad_write_range` wrote before the start of argument #0 (248 bytes)"), "{err}");

        // with the buffers starting at a guard page: y[-1] stops the process, and the
        // off-by-one past the end lands in the canary
        let (ok, err) = run_child_in("write_before_start", "start");
        assert!(!ok, "the process must stop:\n{err}");
        assert!(err.contains("kernel `st_bad_write_range` touched argument #0 (a buffer of 248 bytes) 4 bytes before its start"), "{err}");
        let (_, err) = run_child_in("write_past_end", "start");
        assert!(err.contains("kernel `st_bad_write_range` wrote past the end of argument #0 (248 bytes)"), "{err}");

        let (_, err) = run_child("write_input");
        assert!(err.contains("kernel `st_bad_write_input` wrote to argument #0, which the host passed read-only"), "{err}");
    }

    #[test]
    fn divergent_barriers_stop_the_process() {
        let (ok, err) = run_child("divergent_barrier");
        assert!(!ok, "the process must stop:\n{err}");
        assert!(err.contains("divergent __syncthreads in block (0,0,0): thread ("), "{err}");
        assert!(err.contains("selftest.cu:"), "the message names the call sites: {err}");
    }

    extern "C" {
        fn emu_set_schedule(reverse: c_int) -> c_int;
    }

    #[test]
    fn reverse_schedule_exposes_a_missing_barrier() {
        let g = Emu;
        let n = 96;
        let x = filled(n);
        let want: Vec<f32> = (0..n).map(|t| t.saturating_sub(1) as f32 + 0.5).collect();
        let run = |reverse: bool| {
            // SAFETY: sets an atomic flag. Other tests may launch meanwhile: correct
            // kernels give the same results under either schedule.
            let old = unsafe { emu_set_schedule(reverse as c_int) };
            let mut y = g.alloc(n, DType::F32).unwrap();
            let args = (g.ptr(&x, 0), g.ptr_mut(&mut y, 0));
            k::st_bad_missing_barrier.launch(&g, one_block(n as u32, 4 * n as u32), args).unwrap();
            // SAFETY: as above.
            unsafe { emu_set_schedule(old) };
            y.f32("test").unwrap().to_vec()
        };
        assert_eq!(run(false), want, "in thread order the race goes unseen");
        let reversed = run(true);
        assert!(reversed[1..].iter().all(|v| v.is_nan()), "reversed, each thread reads its neighbour's slot before it is written (NaN poison): {reversed:?}");
    }
}
