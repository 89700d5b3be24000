//! What README.md promises about reproducibility on the CPU: the same seed and the same
//! thread count give bit-identical weights and metrics, run after run, in separate
//! processes. (A different thread count splits sums differently, so its results may
//! differ in the last bits and then diverge; that is not asserted either way.)

mod common;

use std::path::Path;
use std::process::Command;

/// The tiny demo, two iterations of two student steps, on its own seed (later `--set`s
/// win).
const SETS: [&str; 5] = ["distill.s_steps=2", "distill.iterations_per_epoch=2", "distill.epochs=2", "distill.checkpoint_every=2", "seed=11"];

/// One whole job (data, teacher, distillation) in its own workdir with `threads`
/// threads; returns the student's weights and the metrics without wall-clock times.
fn run(work: &Path, threads: usize) -> (Vec<u8>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distill"));
    cmd.args(["distill", "--workdir", work.to_str().unwrap(), "--run", "run", "--device", "cpu"]).env("RAYON_NUM_THREADS", threads.to_string());
    for &s in common::TINY_SETS.iter().chain(&SETS) {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics: String = std::fs::read_to_string(work.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut r: serde_json::Value = serde_json::from_str(l).unwrap();
            r.as_object_mut().unwrap().remove("seconds");
            r.to_string() + "\n"
        })
        .collect();
    (std::fs::read(work.join("run/student.safetensors")).unwrap(), metrics)
}

#[test]
fn the_same_seed_and_thread_count_give_bit_identical_runs() {
    let tmp = std::env::temp_dir().join(format!("dfkd-determinism-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for threads in [1, 2] {
        let a = run(&tmp.join(format!("{threads}a")), threads);
        let b = run(&tmp.join(format!("{threads}b")), threads);
        assert!(a.0 == b.0, "{threads} thread(s): the students differ");
        assert_eq!(a.1, b.1, "{threads} thread(s): the metrics differ");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
