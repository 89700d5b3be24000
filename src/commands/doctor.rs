//! `distill doctor`: what a run on a CUDA device would use, checked, in one report to
//! read or paste into an issue: the kernels embedded in this build (per kernel file,
//! how many kernels and the code of its nvcc fatbin), which libcuda, libcublas, libnvrtc
//! and libnccl files were loaded from where (and their versions), the card (SMs,
//! memory, where each kernel module's code came from), and a small computation on the
//! device (element-wise kernels and a GEMM) checked against the CPU.
//!
//! On `cuda-emu` the same report, for the emulator: the libraries are shown but not
//! needed, and the computation runs the kernels on the CPU.

use crate::backend::cuda;
use crate::{Device, Result, Tensor};

pub struct DoctorArgs {
    /// `cuda:N`, `cuda` or `cuda-emu`, as given (not parsed through `Device`, whose
    /// parse refuses `cuda` without a driver: the report says why instead).
    pub device: String,
    /// A kernel file without an nvcc fatbin makes the build unfit (gpu-bundle's check).
    pub require_fatbins: bool,
}

/// What the report found.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Everything a run on the device uses is there and works.
    Ready,
    /// The device works, but these are missing (e.g. NCCL, which only `--gpus N` needs).
    Missing(Vec<String>),
    /// The device cannot be used, and why.
    Unusable(String),
}

/// Prints the report for `args.device` on stdout and returns the verdict.
pub fn run(args: &DoctorArgs) -> Verdict {
    let device = match args.device.as_str() {
        "cuda-emu" => Device::CudaEmu,
        "cuda" => Device::Cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Verdict::Unusable(format!("doctor checks a CUDA device: expected cuda:N, cuda or cuda-emu, got `{s}`")),
        },
    };
    let on_gpu = matches!(device, Device::Cuda(_));
    let mut missing = vec![];
    let row = |what: &str, value: &str| if what.is_empty() { println!("    {value}") } else { println!("  {what:<32} {value}") };

    println!("build: {}", env!("CARGO_PKG_VERSION"));
    let report = cuda::fatbin_report();
    let without: Vec<&str> = report.iter().filter(|(_, _, f)| f.is_none()).map(|(n, _, _)| *n).collect();
    for (name, kernels, fatbin) in &report {
        let code = match fatbin {
            Some(targets) => format!("fatbin {}", targets.join(" ")),
            None => "no fatbin: NVRTC compiles it at run time".into(),
        };
        row(&format!("kernels/{name}.cu"), &format!("{kernels} kernels, {code}"));
    }
    row("fatbins", &format!("{} of {} kernel files", report.len() - without.len(), report.len()));
    if !without.is_empty() {
        let what = format!("nvcc fatbins of kernels/{{{}}}.cu (built without nvcc, or nvcc failed on them: see build.rs's warnings)", without.join(","));
        if args.require_fatbins {
            return Verdict::Unusable(what);
        }
        missing.push(what);
    }

    println!("libraries:");
    for line in cuda::loaded_libraries() {
        row("", &line);
    }
    match cuda::nccl::nccl_describe() {
        Ok(d) => row("", &format!("libnccl {d}")),
        Err(e) => {
            row("", &format!("libnccl: {e}"));
            if on_gpu {
                missing.push("libnccl.so.2 (only data parallelism, --gpus N, needs it)".into());
            }
        }
    }
    for var in ["CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE", "LD_LIBRARY_PATH", "DFKD_PYTHON_SITE"] {
        if let Some(v) = std::env::var_os(var) {
            row(var, &v.to_string_lossy());
        }
    }

    println!("device: {}", args.device);
    match device {
        Device::Cuda(n) => {
            if !cuda::cuda_driver_present() {
                return Verdict::Unusable("no CUDA driver found (libcuda.so.1): install the NVIDIA driver, 580 or newer".into());
            }
            match cuda::cuda_properties(n) {
                Ok(rows) => rows.iter().for_each(|(w, v)| row(w, v)),
                Err(e) => return Verdict::Unusable(e.to_string()),
            }
            if !cuda::nvrtc_present() {
                missing.push("libnvrtc.so.13 (needed only on cards the fatbins do not cover)".into());
            }
        }
        _ => {
            let (failures, ms) = cuda::emulator_selftest();
            row("emulator self-test", &format!("{failures} failed checks; a 64x256-thread launch in {ms:.2} ms"));
            if failures > 0 {
                return Verdict::Unusable(format!("the kernel emulator failed {failures} of its own checks (printed above)"));
            }
        }
    }

    println!("check:");
    match check_computation(device) {
        Ok(lines) => lines.iter().for_each(|l| row("", l)),
        Err(e) => return Verdict::Unusable(format!("a computation on {device} failed: {e}")),
    }
    if missing.is_empty() {
        Verdict::Ready
    } else {
        Verdict::Missing(missing)
    }
}

/// Element-wise kernels and a GEMM on `device`, against the CPU: what passed, or why not.
fn check_computation(device: Device) -> Result<Vec<String>> {
    let n = 1000;
    let x = Tensor::from_vec((0..n).map(|i| i as f32 * 0.01 - 3.0).collect::<Vec<f32>>(), &[n], Device::Cpu)?;
    let on = x.to_device(device)?;
    let got = on.mul(&on)?.add(&on)?.to_vec_f32()?;
    let want = x.mul(&x)?.add(&x)?.to_vec_f32()?;
    if let Some(i) = (0..n).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        crate::bail!("x * x + x: element {i} is {} on {device}, {} on the CPU", got[i], want[i]);
    }
    let (m, k, p) = (64, 48, 32);
    let a = Tensor::from_vec((0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6).collect::<Vec<f32>>(), &[m, k], Device::Cpu)?;
    let b = Tensor::from_vec((0..k * p).map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5).collect::<Vec<f32>>(), &[k, p], Device::Cpu)?;
    let got = a.to_device(device)?.matmul(&b.to_device(device)?)?.to_vec_f32()?;
    let want = a.matmul(&b)?.to_vec_f32()?;
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max);
    // FP32 accumulation of 48 products in another order: a few ulps; TF32 would be ~1e-3
    if worst > 1e-5 {
        crate::bail!("a {m}x{k} by {k}x{p} GEMM differs from the CPU's by {worst:.1e} (relative): more than FP32 rounding (TF32?)");
    }
    Ok(vec![
        format!("element-wise kernels (x * x + x, {n} values): bit-equal to the CPU"),
        format!("GEMM {m}x{k} by {k}x{p}: within {worst:.1e} of the CPU (relative)"),
    ])
}

/// Runs `run` and exits the process as gpu-run expects: 0 ready, 3 usable with parts
/// missing (listed), 1 unusable (why); the last line says which.
pub fn main(args: &DoctorArgs) -> ! {
    match run(args) {
        Verdict::Ready => {
            println!("doctor: {} is ready", args.device);
            std::process::exit(0)
        }
        Verdict::Missing(what) => {
            println!("doctor: {} works, but missing: {}", args.device, what.join("; "));
            std::process::exit(3)
        }
        Verdict::Unusable(why) => {
            println!("doctor: {} cannot be used: {why}", args.device);
            std::process::exit(1)
        }
    }
}
