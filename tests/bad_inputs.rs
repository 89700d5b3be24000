//! What a new or careless user can hand dfkd, each built in a temporary folder: a run
//! folder that is a data set, a finished run started again without `--resume`, a
//! refused resume, an unreadable or changed training split, an empty test split, a
//! truncated JPEG, weights holding NaN, bad config values on the command line. Each
//! must end in an error that says what is wrong, and change nothing it should not.

mod common;

use common::tiny;
use dfkd::checkpoint::{load_model, save_model};
use dfkd::commands::job::{self, RunOptions};
use dfkd::commands::predict;
use dfkd::data::synthetic::{self, SyntheticSpec};
use dfkd::data::{load_rgb, Loader, LoaderConfig};
use dfkd::models::build;
use dfkd::pipeline::report::MetricsLog;
use dfkd::rng::Rng;
use dfkd::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("dfkd-bad-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` with its contents, to compare before and after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The tiny synthetic set as a data set folder of its own (CUB layout).
fn data_set(dir: &Path) -> PathBuf {
    let spec = SyntheticSpec { num_classes: 10, train_per_class: 8, test_per_class: 4, image_size: 16, seed: 0, image_stream: 1 };
    let root = dir.join("CUB_200_2011");
    synthetic::ensure(&spec, &root).unwrap();
    root
}

fn opts(run_dir: &Path, resume: bool, overwrite: bool) -> RunOptions {
    RunOptions { run_dir: run_dir.to_path_buf(), resume, overwrite }
}

fn err<T>(r: dfkd::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_run_folder_dfkd_did_not_make_is_never_touched() {
    let tmp = TempDir::new("foreign");
    let root = data_set(&tmp.0);
    let mut cfg = tiny(&tmp.0.join("work"));
    cfg.data.dataset = root.display().to_string();
    let before = snapshot(&tmp.0);
    // the case: the data set as run folder, and a bad image size
    cfg.data.image_size = 30;
    let e = err(job::run_job(&cfg, Device::Cpu, &opts(&root, false, false)));
    assert!(e.contains("data.image_size = 30") && e.contains("multiple of 16"), "{e}");
    cfg.data.image_size = 16;
    for (resume, overwrite) in [(false, false), (false, true), (true, false)] {
        let e = err(job::run_job(&cfg, Device::Cpu, &opts(&root, resume, overwrite)));
        assert!(e.contains("not made by dfkd"), "{e}");
    }
    assert!(snapshot(&tmp.0) == before, "a refused run changed files");
}

#[test]
fn a_run_is_never_replaced_or_rewritten_without_being_told() {
    let tmp = TempDir::new("rerun");
    let cfg = tiny(&tmp.0);
    let run = tmp.0.join("run");
    job::run_job(&cfg, Device::Cpu, &opts(&run, false, false)).unwrap();
    let records = |r: &Path| -> Vec<String> {
        MetricsLog::read_all(&r.join("metrics.jsonl")).unwrap().iter().filter(|r| r["phase"] == "distill").map(|r| r.to_string()).collect()
    };
    let first = records(&run);
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&tmp.0);

    // forgetting --resume
    let e = err(job::run_job(&cfg, Device::Cpu, &opts(&run, false, false)));
    assert!(e.contains("already holds a run") && e.contains("--resume") && e.contains("--overwrite"), "{e}");
    assert!(snapshot(&tmp.0) == before, "a refused fresh run changed files");

    // a resume the checkpoint refuses leaves config.toml (and all else) as it was
    let mut other = cfg.clone();
    other.student.arch = "resnet20".into();
    err(job::run_job(&other, Device::Cpu, &opts(&run, true, false)));
    assert!(snapshot(&tmp.0) == before, "a refused resume changed files");

    // a resume after a crash that cut a record: the cut line goes, nothing is logged twice
    std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(b"{\"phase\": \"distill\", \"iter")
        })
        .unwrap();
    job::run_job(&cfg, Device::Cpu, &opts(&run, true, false)).unwrap();
    assert_eq!(records(&run), first);
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(text.matches("\"final\"").count(), 1, "{text}");

    // --overwrite replaces the run's outputs, and only those
    job::run_job(&cfg, Device::Cpu, &opts(&run, false, true)).unwrap();
    assert_eq!(records(&run), first, "the same seed gives the same run");
    assert_eq!(std::fs::read_to_string(run.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn an_unreadable_or_changed_training_split_is_never_served_from_the_teacher_cache() {
    let tmp = TempDir::new("teacher");
    let root = data_set(&tmp.0);
    let mut cfg = tiny(&tmp.0.join("work"));
    cfg.data.dataset = root.display().to_string();
    let ds = job::prepare_data(&cfg).unwrap();
    let originals: Vec<Vec<u8>> = ds.train.iter().map(|s| std::fs::read(&s.path).unwrap()).collect();
    for s in &ds.train {
        std::fs::write(&s.path, b"not an image").unwrap();
    }
    let mut log = MetricsLog::open(&tmp.0.join("metrics.jsonl")).unwrap();
    let e = err(job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log));
    assert!(e.contains("none of the 80 training images could be read"), "{e}");
    let cached = || std::fs::read_dir(tmp.0.join("work/teachers")).map_or(0, |d| d.count());
    assert_eq!(cached(), 0, "an untrained teacher was cached");

    // repaired: trained and cached; then one image changes: trained again
    for (s, bytes) in ds.train.iter().zip(&originals) {
        std::fs::write(&s.path, bytes).unwrap();
    }
    let (_, first) = job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log).unwrap();
    std::fs::copy(&ds.train[1].path, &ds.train[0].path).unwrap();
    let (_, second) = job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log).unwrap();
    assert_ne!(first, second, "the teacher cache must not outlive a change of the training images");
    assert_eq!(cached(), 2);
}

#[test]
fn data_sets_that_disagree_with_the_config_are_refused_before_any_training() {
    let tmp = TempDir::new("split");
    let root = data_set(&tmp.0);
    let mut cfg = tiny(&tmp.0.join("work"));
    cfg.data.dataset = root.display().to_string();
    cfg.data.num_classes = 200;
    let e = err(job::run_job(&cfg, Device::Cpu, &opts(&tmp.0.join("run"), false, false)));
    assert!(e.contains("data.num_classes = 200") && e.contains("10, the class count"), "{e}");

    cfg.data.num_classes = 10;
    let split = root.join("train_test_split.txt");
    let all_train: String = std::fs::read_to_string(&split).unwrap().lines().map(|l| format!("{} 1\n", l.split(' ').next().unwrap())).collect();
    std::fs::write(&split, all_train).unwrap();
    let e = err(job::run_job(&cfg, Device::Cpu, &opts(&tmp.0.join("run"), false, false)));
    assert!(e.contains("the test split is empty"), "{e}");
    assert!(!tmp.0.join("work/teachers").exists(), "a teacher was trained before the checks");
}

/// A textured JPEG: flat colours would leave the scan short and the cut inside headers.
fn jpeg(path: &Path) {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([((x * 37) ^ (y * 11)) as u8, (x * y) as u8, (y * 53 + x) as u8]));
    img.save(path).unwrap();
}

#[test]
fn truncated_jpegs_are_refused_in_evaluation_and_prediction_and_skipped_in_training() {
    let tmp = TempDir::new("jpeg");
    let root = data_set(&tmp.0);
    let ds = dfkd::data::open(&root).unwrap();
    let whole = tmp.0.join("whole.jpg");
    jpeg(&whole);
    let bytes = std::fs::read(&whole).unwrap();
    let cut = tmp.0.join("cut.jpg");
    for percent in [75, 80, 90] {
        std::fs::write(&cut, &bytes[..bytes.len() * percent / 100]).unwrap();
        let e = err(load_rgb(&cut));
        assert!(e.contains("cut.jpg") && e.contains("truncated"), "{percent}%: {e}");
    }
    // what follows the end-of-image marker does not matter (as in PIL)
    let trailer = tmp.0.join("trailer.jpg");
    std::fs::write(&trailer, [&bytes[..], b"appended by a camera"].concat()).unwrap();
    load_rgb(&trailer).unwrap();

    let mut samples = ds.test.clone();
    samples[3].path = cut.clone();
    let eval = Loader::new(&samples, LoaderConfig::eval(&ds, 8, 16));
    let e = eval.epoch(0).find_map(|b| b.err()).expect("evaluation must refuse a truncated JPEG").to_string();
    assert!(e.contains("truncated"), "{e}");
    let train = Loader::new(&samples, LoaderConfig { drop_last: false, ..LoaderConfig::train(&ds, 8, 16, 0) });
    let n: usize = train.epoch(0).map(|b| b.unwrap().n).sum();
    assert_eq!((n, train.warnings().count), (samples.len() - 1, 1));

    let weights = tmp.0.join("m.safetensors");
    save_model(build("resnet8", 10, true, &mut Rng::new(0)).unwrap().as_ref(), &weights).unwrap();
    let args = predict::PredictArgs {
        arch: "resnet8".into(),
        num_classes: 10,
        weights,
        image_size: 16,
        small_stem: true,
        json: true,
        images: vec![whole, cut],
        device: Device::Cpu,
    };
    assert_eq!(predict::run(&args).unwrap(), 1, "the truncated image must count as failed");
}

#[test]
fn weights_holding_nan_or_inf_are_refused_naming_the_tensor() {
    let tmp = TempDir::new("nan");
    for bad in [f32::NAN, f32::INFINITY] {
        let model = build("resnet8", 10, true, &mut Rng::new(0)).unwrap();
        let (_, fc) = model.named_parameters().into_iter().find(|(n, _)| n == "fc.weight").unwrap();
        let mut v = fc.to_vec_f32().unwrap();
        v[7] = bad;
        fc.assign(&dfkd::Tensor::from_vec(v, fc.dims(), Device::Cpu).unwrap()).unwrap();
        let path = tmp.0.join("bad.safetensors");
        save_model(model.as_ref(), &path).unwrap();
        let fresh = build("resnet8", 10, true, &mut Rng::new(1)).unwrap();
        let e = err(load_model(fresh.as_ref(), &path));
        assert!(e.contains("`fc.weight`") && e.contains(&format!("{bad}")) && e.contains("element 7"), "{e}");
    }
}

fn distill_bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill")).args(args).output().unwrap()
}

#[test]
fn bad_values_on_the_command_line_are_errors_not_panics_and_make_nothing() {
    let tmp = TempDir::new("cli");
    let work = tmp.0.join("work");
    let w = work.to_str().unwrap();
    for (args, want) in [
        (vec!["--workdir", w, "--device", "cpu", "--set", "teacher.batch_size=0"], "teacher.batch_size = 0"),
        (vec!["--workdir", w, "--device", "cpu", "--set", "distill.checkpoint_every=0"], "distill.checkpoint_every = 0"),
        (vec!["--workdir", w, "--device", "cpu", "--set", "data.image_size=0"], "data.image_size = 0"),
        (vec!["--workdir", w, "--device", "cpu", "--set", "generator.z_dim=0"], "generator.z_dim = 0"),
        (vec!["--workdir", w, "distill", "--set", "distill.tau_kd=0"], "distill.tau_kd = 0.0"),
        (vec!["--workdir", w, "distill", "--set", "student.arch=resnet9"], "student.arch = \"resnet9\""),
        (vec!["--workdir", w, "distill", "--set", "data.workers=2"], "unknown key `workers`"),
        (vec!["predict", "--arch", "resnet8", "--num-classes", "10", "--weights", "w.safetensors", "--image-size", "0", "x.png"], "--image-size 0"),
    ] {
        let out = distill_bin(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    assert!(!work.exists(), "a refused command made files");

    // show-config opens no device and prints numbers as written
    let out = distill_bin(&["--workdir", w, "show-config", "--device", "cuda:3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("device = \"cuda:3\"") && stdout.contains("lr = 0.1\n"), "{stdout}");
    // --device auto says why it uses the CPU (here: predict opens the device, then
    // refuses its argument)
    let out = distill_bin(&["--device", "auto", "predict", "--arch", "resnet8", "--num-classes", "10", "--weights", "w", "--image-size", "0", "x.png"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match dfkd::backend::cuda::probe(0) {
        Ok(Some(_)) => {}
        Ok(None) => assert!(stderr.contains("--device auto: no CUDA driver found (libcuda.so); using the CPU"), "{stderr}"),
        Err(_) => assert!(stderr.contains("--device auto: ") && stderr.contains("using the CPU"), "{stderr}"),
    }
    let out = distill_bin(&["distill", "--resume", "--overwrite"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"), "{out:?}");
}

#[test]
fn a_second_process_on_a_held_run_folder_fails_at_once_naming_the_holder() {
    let tmp = TempDir::new("lock");
    let held = dfkd::pipeline::run_dir::RunDir::claim(&tmp.0.join("run"), dfkd::pipeline::run_dir::Mode::Fresh).unwrap();
    let before = snapshot(&tmp.0);
    let out = distill_bin(&["distill", "--workdir", tmp.0.to_str().unwrap(), "--run", "run", "--device", "cpu", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("in use by process {}", std::process::id())), "{stderr}");
    assert!(snapshot(&tmp.0) == before, "the refused process changed files");
    drop(held);
}

/// The bare demo command run twice: the second run goes to a fresh folder and the
/// first one stays as it was.
#[test]
fn the_bare_demo_command_twice_keeps_both_runs() {
    let tmp = TempDir::new("demo");
    let w = tmp.0.to_str().unwrap();
    let mut args = vec!["--workdir", w, "--device", "cpu"];
    for s in common::TINY_SETS {
        args.extend(["--set", s]);
    }
    let out = distill_bin(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = snapshot(&tmp.0.join("demo"));
    let out = distill_bin(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo-2"));
    assert!(tmp.0.join("demo-2/student.safetensors").exists());
    assert!(snapshot(&tmp.0.join("demo")) == first, "the second demo run changed the first");
}
