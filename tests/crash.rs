//! A short distillation killed again and again, at chosen points (inside a metrics
//! record, after a checkpoint's files but before its state, between a checkpoint's two
//! renames) and at random moments (kill -9), each time continued with `--resume` (or
//! `--overwrite` when it died before its first checkpoint), must end with the weights
//! and metrics of an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The tiny demo, four iterations of two student steps with an evaluation each epoch,
/// a two-epoch teacher, its own seed (later `--set`s win).
const SETS: [&str; 8] = [
    "teacher.epochs=2",
    "distill.s_steps=2",
    "distill.iterations_per_epoch=2",
    "distill.epochs=4",
    "distill.checkpoint_every=2",
    "distill.eval_every=1",
    "student.arch=resnet8",
    "seed=3",
];

fn start(work: &Path, flag: Option<&str>, failpoint: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distill"));
    cmd.args(["distill", "--workdir", work.to_str().unwrap(), "--run", "run", "--device", "cpu"]);
    for &s in common::TINY_SETS.iter().chain(&SETS) {
        cmd.args(["--set", s]);
    }
    cmd.args(flag);
    if let Some(f) = failpoint {
        cmd.env("DFKD_FAILPOINT", f);
    }
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// The distill records and the final one (without its wall-clock time), as text.
fn records(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("malformed line `{l}`: {e}")))
        .filter(|r| r["phase"] == "distill" || r["phase"] == "final")
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("seconds");
            r.to_string()
        })
        .collect()
}

/// A small deterministic generator for the kill times.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn a_run_killed_at_any_point_and_resumed_ends_as_an_uninterrupted_one() {
    let tmp = std::env::temp_dir().join(format!("dfkd-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (reference, crashed) = (tmp.join("reference"), tmp.join("crashed"));

    let t0 = Instant::now();
    let out = start(&reference, None, None).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = t0.elapsed();

    let run: PathBuf = crashed.join("run");
    let flag = || {
        let has_checkpoint = ["checkpoint", "checkpoint.old"].iter().any(|d| run.join(d).join("state.json").exists());
        if has_checkpoint {
            Some("--resume")
        } else if run.exists() {
            Some("--overwrite")
        } else {
            None
        }
    };
    // chosen points: the second checkpoint's files written but not its state; the
    // record of a later iteration half written; a checkpoint between its two renames
    for point in ["checkpoint-write:2", "metrics-write:3", "checkpoint-rename:2"] {
        let out = start(&crashed, flag(), Some(point)).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("aborting"), "{point} was not reached: {stderr}");
    }
    // random moments, within the time an uninterrupted run takes
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..4 {
        let mut child = start(&crashed, flag(), None);
        std::thread::sleep(Duration::from_millis(next(&mut seed) % whole.as_millis().max(1) as u64));
        let _ = child.kill(); // SIGKILL; the run may also have finished already
        child.wait().unwrap();
    }
    let out = start(&crashed, flag(), None).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    assert_eq!(records(&run), records(&reference.join("run")), "metrics differ from the uninterrupted run's");
    let weights = |r: &Path| std::fs::read(r.join("student.safetensors")).unwrap();
    assert!(weights(&run) == weights(&reference.join("run")), "the student differs from the uninterrupted run's");
    std::fs::remove_dir_all(&tmp).unwrap();
}
