//! `--seeds` and `summarize` through the `distill` binary, as a user runs them: a sweep
//! writes one run folder per seed and a summary, a second sweep over the same folder is
//! refused unless resumed (finished seeds are then kept), and `summarize` compares
//! sweeps on their common seeds.

mod common;

use common::TINY_SETS;
use std::path::Path;
use std::process::{Command, Output};

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn sweep_args<'a>(work: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--workdir", work, "--device", "cpu", "--run", "sweep"];
    args.extend_from_slice(extra);
    for s in TINY_SETS {
        args.extend(["--set", s]);
    }
    args
}

#[test]
fn a_sweep_runs_each_seed_is_refused_twice_resumes_and_summarises() {
    let tmp = std::env::temp_dir().join(format!("dfkd-sweep-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let work = tmp.to_str().unwrap();
    let out = distill(&sweep_args(work, &["--seeds", "0-1"]));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("| 0 |") && stdout.contains("| 1 |") && stdout.contains("mean ± 95% CI"), "{stdout}");
    let sweep = Path::new(work).join("sweep");
    for f in ["seed-0/student.safetensors", "seed-1/student.safetensors", "summary.json", "summary.md"] {
        assert!(sweep.join(f).exists(), "{f} missing");
    }
    // the same sweep again would replace finished runs: refused, naming the flags
    let again = distill(&sweep_args(work, &["--seeds", "0-1"]));
    assert!(!again.status.success() && text(&again).contains("--resume"), "{}", text(&again));
    // resumed with one more seed: the finished ones are kept
    let before = std::fs::read(sweep.join("seed-0/metrics.jsonl")).unwrap();
    let more = distill(&sweep_args(work, &["--seeds", "0-2", "--resume"]));
    assert!(more.status.success(), "{}", text(&more));
    assert!(text(&more).contains("seed 0 finished earlier"), "{}", text(&more));
    assert_eq!(std::fs::read(sweep.join("seed-0/metrics.jsonl")).unwrap(), before);
    // a sweep compared with itself: every paired difference is zero, written as JSON too
    let s = sweep.to_str().unwrap();
    let json = tmp.join("cmp.json");
    let cmp = distill(&["summarize", s, s, "--json", json.to_str().unwrap()]);
    assert!(cmp.status.success(), "{}", text(&cmp));
    let md = String::from_utf8_lossy(&cmp.stdout);
    assert!(md.contains("| sweep | 3 | 0.0 ± 0.0") && md.contains("0 / 0 |"), "{md}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["paired_from_first"][0]["seeds"], serde_json::json!([0, 1, 2]));
    // a folder that holds no sweep is an error that says what was expected
    let none = distill(&["summarize", work]);
    assert!(!none.status.success() && text(&none).contains("no finished seed-<k> run folder"), "{}", text(&none));
    std::fs::remove_dir_all(&tmp).unwrap();
}
