//! scripts/gpu-run's deadline and its incremental summary, with fake step programs (shell
//! scripts standing in for the bundle's binaries): a step cut by the deadline, a signal
//! mid-step and a device that does not open each leave every earlier result in
//! summary.txt, and `--quick` runs its list. The real steps run in the rehearsal on the
//! emulator (scripts/test) and on a GPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-run");
/// Every binary gpu-run calls for the emulator's steps.
const PROGRAMS: &[&str] = &["distill", "cuda_parity", "attention_fused", "attention_parity", "cuda_train_step", "pipeline", "data_parallel", "bench_attention"];

/// One test at a time: a test writing its fake programs while another's gpu-run forks
/// can hand a child the still-open file, and executing it then fails ("text file busy").
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh folder with `bin/` holding a fake of each program: each prints its name and
/// arguments and exits 0, except those given in `special` (name, shell body).
fn fake_bundle(name: &str, special: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dfkd-gpu-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for p in PROGRAMS {
        let body = special.iter().find(|(n, _)| n == p).map(|(_, b)| b.to_string()).unwrap_or_else(|| format!("echo \"{p} $*\""));
        let path = dir.join("bin").join(p);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn gpu_run(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(SCRIPT).args(args).env("DFKD_GPU_BIN", dir.join("bin")).env("OUT", dir.join("out")).env("DFKD_GPU_DEVICE", "cuda-emu").env_remove("STEPS");
    c
}

fn summary(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("out/summary.txt")).unwrap_or_default()
}

/// The summary's result for `step` ("PASS", "CUT", ...), if it has a line for it.
fn result<'a>(summary: &'a str, step: &str) -> Option<&'a str> {
    summary.lines().find_map(|l| l.strip_prefix(step).filter(|r| r.starts_with(' ')).map(|r| r.split_whitespace().next().unwrap_or("")))
}

fn run(c: &mut Command) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = c.output().expect("bash runs scripts/gpu-run");
    (out, t0.elapsed())
}

#[test]
fn a_step_cut_by_the_deadline_leaves_every_earlier_result_in_the_summary() {
    let _serial = serial();
    let dir = fake_bundle("deadline", &[("cuda_parity", "echo started; sleep 60")]);
    // 16 s: the doctor passes at once, test-parity gets the 11 s left (less the 5 s
    // reserve) and is cut; nothing else has the 10 s a step needs to start
    let (out, took) = run(&mut gpu_run(&dir, &["--budget", "16"]));
    let s = summary(&dir);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cut step fails the run; summary:\n{s}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(30), "the run took {took:?}, past its 16 s budget (summary:\n{s})");
    assert_eq!(result(&s, "doctor"), Some("PASS"), "summary:\n{s}");
    assert_eq!(result(&s, "test-parity"), Some("CUT"), "summary:\n{s}");
    assert_eq!(result(&s, "test-attention-fused"), Some("SKIPPED"), "summary:\n{s}");
    assert!(std::fs::read_to_string(dir.join("out/test-parity.log")).unwrap().contains("started"), "the cut step's log is kept");
    assert!(s.lines().last().unwrap().starts_with("gpu-run FAILED"), "summary:\n{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_signal_mid_step_is_recorded_after_the_earlier_results() {
    let _serial = serial();
    let dir = fake_bundle("signal", &[("cuda_parity", "sleep 60")]);
    let mut child = gpu_run(&dir, &["--budget", "100"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(dir.join("out/summary.txt")).unwrap_or_default().contains("doctor ") {
        assert!(t0.elapsed() < Duration::from_secs(20), "the doctor step did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: a signal to the child we spawned, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let s = summary(&dir);
    assert_eq!(status.code(), Some(1), "summary:\n{s}");
    assert!(t0.elapsed() < Duration::from_secs(20), "the signal did not stop the run at once");
    assert_eq!(result(&s, "doctor"), Some("PASS"), "summary:\n{s}");
    assert_eq!(result(&s, "test-parity"), Some("STOPPED"), "summary:\n{s}");
    assert!(s.contains("stopped by a signal"), "summary:\n{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_that_does_not_open_stops_the_run_after_the_doctor() {
    let _serial = serial();
    let dir = fake_bundle("unusable", &[("distill", "echo 'doctor: cuda-emu cannot be used: no driver'; exit 1")]);
    let (out, _) = run(&mut gpu_run(&dir, &[]));
    let s = summary(&dir);
    assert_eq!(out.status.code(), Some(1), "summary:\n{s}");
    assert_eq!(result(&s, "doctor"), Some("FAIL"), "summary:\n{s}");
    assert!(s.contains("cannot be used: no driver"), "the doctor's reason is in the summary:\n{s}");
    assert_eq!(result(&s, "test-parity"), None, "no device step after an unusable device:\n{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quick_runs_its_list_and_a_doctor_missing_parts_does_not_stop_it() {
    let _serial = serial();
    let dir = fake_bundle("quick", &[("distill", "echo 'doctor: cuda-emu works, but missing: libnccl.so.2'; exit 3")]);
    let (out, _) = run(&mut gpu_run(&dir, &["--quick"]));
    let s = summary(&dir);
    assert_eq!(out.status.code(), Some(1), "a doctor finding parts missing fails the run:\n{s}");
    assert!(s.lines().next().unwrap().contains("budget 300s (--quick)"), "summary:\n{s}");
    assert_eq!(result(&s, "doctor"), Some("FAIL"), "summary:\n{s}");
    for step in ["test-parity", "test-attention-fused", "test-train-step", "test-nccl"] {
        assert_eq!(result(&s, step), Some("PASS"), "{step}; summary:\n{s}");
    }
    for step in ["test-attention", "test-pipeline", "bench-attention"] {
        assert_eq!(result(&s, step), None, "{step} is not in --quick; summary:\n{s}");
    }
    assert_eq!(result(&s, "memcheck"), Some("SKIPPED"), "summary:\n{s}");
    let nccl = std::fs::read_to_string(dir.join("out/test-nccl.log")).unwrap();
    assert!(nccl.contains("data_parallel nccl --test-threads=1"), "the step's command line reached the program: {nccl}");
    std::fs::remove_dir_all(&dir).unwrap();
}
