//! End to end on a tiny synthetic set: the job writes what it promises, the same seed
//! gives the same numbers, a resumed run equals an uninterrupted one, and a NaN stops
//! the run with a message naming the loss. The job and every method also run on the
//! CUDA devices (the kernel emulator always, a GPU when one opens).

mod common;

use common::tiny;

use dfkd::commands::job::{self, RunOptions};
use dfkd::models::build;
use dfkd::pipeline::checkpoint_dir::CheckpointDir;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::pipeline::methods::Method;
use dfkd::rng::Rng;
use dfkd::Device;
use std::path::PathBuf;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfkd-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn distill_records(run: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("\"distill\"")).map(String::from).collect()
}

#[test]
fn the_job_writes_its_outputs_and_is_deterministic() {
    let w = workdir("job");
    let cfg = tiny(&w);
    let runs: Vec<PathBuf> = ["a", "b"].iter().map(|r| w.join(r)).collect();
    for run in &runs {
        let s = job::run_job(&cfg, Device::Cpu, &RunOptions { run_dir: run.clone(), resume: false, overwrite: false }).unwrap();
        assert!((0.0..=100.0).contains(&s.student_top1) && (0.0..=100.0).contains(&s.teacher_top1));
        assert_eq!(s.eval.models[1].per_class.len(), 10);
        for f in [
            "config.toml",
            "metrics.jsonl",
            "losses_student.png",
            "losses_generator.png",
            "accuracy.png",
            "student.safetensors",
            "checkpoint/state.json",
            "checkpoint/generator.safetensors",
            "images/iter000004.png",
        ] {
            assert!(run.join(f).exists(), "{f} missing");
        }
    }
    let (a, b) = (distill_records(&runs[0]), distill_records(&runs[1]));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "the same seed must give the same numbers");
    std::fs::remove_dir_all(&w).unwrap();
}

#[test]
fn a_resumed_run_continues_exactly() {
    let w = workdir("resume");
    resumes_exactly(&w, tiny(&w));
}

#[test]
fn a_resumed_run_with_an_image_pool_continues_exactly() {
    let w = workdir("resume-pool");
    let mut cfg = tiny(&w);
    cfg.distill.pool_batches = 3; // full after 3 generator steps: replacement is exercised too
    resumes_exactly(&w, cfg);
}

fn resumes_exactly(w: &PathBuf, cfg: Config) {
    let ds = job::prepare_data(&cfg).unwrap();
    let teacher = build("resnet8", 10, true, &mut Rng::new(5)).unwrap();
    let student = || build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
    let _ = ds;

    // uninterrupted: 4 iterations
    let s1 = student();
    let mut d1 = Distiller::new(&cfg, teacher.as_ref(), s1.as_ref(), Device::Cpu).unwrap();
    let mut losses1 = vec![];
    for _ in 0..4 {
        losses1.push(d1.iterate().unwrap());
    }

    // interrupted after 2, resumed in fresh objects (new process in real life)
    let ckpt = CheckpointDir::new(&w.join("run"));
    let s2 = student();
    let mut d2 = Distiller::new(&cfg, teacher.as_ref(), s2.as_ref(), Device::Cpu).unwrap();
    for _ in 0..2 {
        d2.iterate().unwrap();
    }
    d2.save_checkpoint(&ckpt).unwrap();
    drop(d2);
    let s3 = build("resnet8", 10, true, &mut Rng::new(99)).unwrap(); // different init: all must come from the checkpoint
    let mut d3 = Distiller::new(&cfg, teacher.as_ref(), s3.as_ref(), Device::Cpu).unwrap();
    d3.resume(&ckpt).unwrap();
    assert_eq!(d3.iteration(), 2);
    let mut losses3 = vec![];
    for _ in 0..2 {
        losses3.push(d3.iterate().unwrap());
    }
    assert_eq!(format!("{:?}", &losses1[2..]), format!("{losses3:?}"));
    for ((n, a), (_, b)) in s1.named_parameters().iter().zip(s3.named_parameters()) {
        assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap(), "{n} differs after resume");
    }
    std::fs::remove_dir_all(w).unwrap();
}

#[test]
fn a_nan_stops_the_run_naming_the_loss() {
    let w = workdir("nan");
    let cfg = tiny(&w);
    let teacher = build("resnet8", 10, true, &mut Rng::new(5)).unwrap();
    let student = build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
    let (name, fc) = teacher.named_parameters().into_iter().find(|(n, _)| n == "fc.weight").unwrap();
    fc.assign(&fc.affine(0.0, f32::NAN).unwrap()).unwrap();
    let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu).unwrap();
    let err = d.iterate().err().unwrap_or_else(|| panic!("a NaN {name} must stop the run")).to_string();
    assert!(err.contains("loss `") && err.contains("NaN"), "{err}");
}

/// Each method's iteration on every device: the student is moved there and every
/// reported loss is finite.
#[test]
fn every_method_runs_one_iteration() {
    common::for_each_device(|dev| {
        let w = workdir(&format!("methods-{dev}"));
        let mut cfg = tiny(&w);
        if dev != Device::Cpu {
            // one student step keeps the emulator's share of the test short
            cfg.distill.s_steps = 1;
        }
        let teacher = build("resnet8", 10, true, &mut Rng::new(5)).unwrap();
        for &method in Method::ALL {
            cfg.distill.method = method;
            let student = build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
            let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), dev).unwrap();
            assert!(student.parameters().iter().all(|p| p.device() == dev), "{dev} {method}: the student was not moved");
            let (g, s) = d.iterate().unwrap_or_else(|e| panic!("{dev} {method}: {e}"));
            assert!(!g.is_empty() && !s.is_empty(), "{dev} {method} reported no losses");
            assert!(g.iter().chain(&s).all(|(_, v)| v.is_finite()), "{dev} {method}: {g:?} {s:?}");
        }
    });
}

#[test]
fn the_generator_class_terms_run_and_report_their_losses() {
    let w = workdir("class-terms");
    let mut cfg = tiny(&w);
    let teacher = build("resnet8", 10, true, &mut Rng::new(5)).unwrap();
    cfg.generator.conditional = true;
    (cfg.distill.gen_target_ce, cfg.distill.gen_onehot, cfg.distill.gen_balance, cfg.distill.gen_student_eval) = (4.0, 1.0, 5.0, true);
    // DFKD-FGVC takes the extra terms; a baseline keeps its published loss
    for (method, names) in [("dfkd-fgvc", vec!["g_target_ce", "g_onehot", "g_balance"]), ("dfq", vec!["g_ce"])] {
        cfg.distill.method = method.parse().unwrap();
        let student = build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
        let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu).unwrap();
        let (g, _) = d.iterate().unwrap_or_else(|e| panic!("{method}: {e}"));
        for name in names {
            let v = g.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{method}: no {name} in {g:?}")).1;
            assert!(v.is_finite(), "{method}: {name} = {v}");
        }
        if method == "dfq" {
            assert!(!g.iter().any(|(n, _)| *n == "g_target_ce" || *n == "g_balance"), "dfq got the extra terms: {g:?}");
        }
    }
    cfg.distill.method = "dfkd-fgvc".parse().unwrap();
    // asking an unconditional generator for classes is refused before any work
    cfg.generator.conditional = false;
    let student = build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
    let err = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("generator.conditional"), "{err}");
}

#[test]
fn a_seed_sweep_runs_each_seed_summarises_and_resumes() {
    use dfkd::commands::sweep::run_sweep;
    use dfkd::pipeline::sweep::{read_sweep, seed_dir};
    let w = workdir("sweep");
    let mut cfg = tiny(&w);
    cfg.distill.epochs = 1;
    let dir = w.join("sweep");
    let summary = run_sweep(&cfg, Device::Cpu, &dir, &[3, 5], false, false).unwrap();
    assert_eq!(summary.seeds.iter().map(|r| r.seed).collect::<Vec<_>>(), vec![3, 5]);
    assert!(dir.join("summary.json").exists() && dir.join("summary.md").exists());
    // the seeds share the data set and the teacher, and distil differently
    assert!(std::fs::read_dir(w.join("teachers")).unwrap().count() == 1);
    let (a, b) = (distill_records(&seed_dir(&dir, 3)), distill_records(&seed_dir(&dir, 5)));
    assert_ne!(a, b, "two seeds gave the same run");
    assert_eq!(summary.seeds[0].teacher_top1, summary.seeds[1].teacher_top1);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(json["student_top1"]["n"], 2);
    // resuming keeps the finished seeds untouched and runs the new one
    let before = std::fs::read(seed_dir(&dir, 3).join("metrics.jsonl")).unwrap();
    let summary = run_sweep(&cfg, Device::Cpu, &dir, &[3, 5, 6], true, false).unwrap();
    assert_eq!(std::fs::read(seed_dir(&dir, 3).join("metrics.jsonl")).unwrap(), before);
    assert_eq!(summary.seeds.len(), 3);
    assert_eq!(read_sweep(&dir).unwrap(), summary.seeds);
    std::fs::remove_dir_all(&w).unwrap();
}

/// The whole job on each CUDA device: the data loader's batches, the teacher's
/// training, the generator, student and auxiliary modules, evaluation and checkpoints
/// all run there (a tensor left on the CPU would fail with a device mismatch).
#[test]
fn the_job_runs_on_cuda_devices() {
    for dev in common::cuda_devices() {
        let w = workdir(&format!("job-{dev}"));
        let mut cfg = tiny(&w);
        cfg.distill.s_steps = 1;
        cfg.distill.epochs = 1;
        cfg.distill.checkpoint_every = 1;
        let run = w.join("run");
        let s = job::run_job(&cfg, dev, &RunOptions { run_dir: run.clone(), resume: false, overwrite: false }).unwrap_or_else(|e| panic!("{dev}: {e}"));
        assert!((0.0..=100.0).contains(&s.student_top1) && (0.0..=100.0).contains(&s.teacher_top1), "{dev}");
        for f in ["metrics.jsonl", "student.safetensors", "checkpoint/state.json", "checkpoint/generator.safetensors", "images/iter000002.png"] {
            assert!(run.join(f).exists(), "{dev}: {f} missing");
        }
        let records = distill_records(&run);
        assert_eq!(records.len(), 2, "{dev}");
        assert!(!records.iter().any(|r| r.contains("NaN") || r.contains("null")), "{dev}: {records:?}");
        std::fs::remove_dir_all(&w).unwrap();
    }
}

/// A checkpoint written on a CUDA device resumes there: models, optimiser state and
/// DeepInversion's image pool all come back onto the device.
#[test]
fn a_run_resumes_on_cuda_devices() {
    for dev in common::cuda_devices() {
        let w = workdir(&format!("resume-{dev}"));
        let mut cfg = tiny(&w);
        let teacher = build("resnet8", 10, true, &mut Rng::new(5)).unwrap();
        for method in ["dfkd-fgvc", "deepinversion"] {
            cfg.distill.method = method.parse().unwrap();
            // DeepInversion's student steps draw from the pool: enough draws to reach
            // the batch that came from the checkpoint
            cfg.distill.s_steps = if method == "deepinversion" { 6 } else { 1 };
            let ckpt = CheckpointDir::new(&w.join(method));
            let student = build("resnet8", 10, true, &mut Rng::new(6)).unwrap();
            let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), dev).unwrap();
            d.iterate().unwrap_or_else(|e| panic!("{dev} {method}: {e}"));
            d.save_checkpoint(&ckpt).unwrap();
            drop(d);
            let student = build("resnet8", 10, true, &mut Rng::new(7)).unwrap();
            let mut d = Distiller::new(&cfg, teacher.as_ref(), student.as_ref(), dev).unwrap();
            d.resume(&ckpt).unwrap_or_else(|e| panic!("{dev} {method}: resume: {e}"));
            let (g, s) = d.iterate().unwrap_or_else(|e| panic!("{dev} {method} after resume: {e}"));
            assert_eq!(d.iteration(), 2);
            assert!(g.iter().chain(&s).all(|(_, v)| v.is_finite()), "{dev} {method}: {g:?} {s:?}");
            assert!(student.parameters().iter().all(|p| p.device() == dev));
        }
        std::fs::remove_dir_all(&w).unwrap();
    }
}

/// `teacher.ema_decay`: the cached (and returned) teacher is the average, which differs
/// from the last weights; those are kept beside it and equal, bit for bit, the teacher
/// trained without an average (the average never touches the training).
#[test]
fn an_averaged_teacher_is_the_saved_one_and_trains_as_the_plain_one() {
    use dfkd::nn::Module;
    let w = workdir("ema");
    let mut cfg = tiny(&w);
    cfg.teacher.epochs = 2;
    cfg.teacher.ema_decay = 0.0;
    let ds = job::prepare_data(&cfg).unwrap();
    let mut log = dfkd::pipeline::report::MetricsLog::open(&w.join("metrics.jsonl")).unwrap();
    let values = |m: &dyn Module| -> Vec<Vec<f32>> { m.named_tensors().iter().map(|(_, t, _)| t.to_vec_f32().unwrap()).collect() };
    let (plain, plain_path) = job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log).unwrap();
    assert!(!job::last_weights_path(&plain_path).exists());
    cfg.teacher.ema_decay = 0.9;
    let (averaged, path) = job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log).unwrap();
    assert_ne!(path, plain_path, "the decay is part of the teacher's cache key");
    let load = |p: &std::path::Path| dfkd::commands::predict::load_classifier("resnet8", 10, true, p).unwrap();
    assert_eq!(values(load(&path).as_ref()), values(averaged.as_ref()), "the saved teacher is the one returned");
    assert_eq!(values(load(&job::last_weights_path(&path)).as_ref()), values(plain.as_ref()), "the last weights are the plain run's");
    let (a, p) = (values(averaged.as_ref()), values(plain.as_ref()));
    assert_eq!(a.len(), p.len());
    assert!(a.iter().zip(&p).all(|(x, y)| x != y), "every parameter and buffer is averaged");
    // served from the cache: the average again
    let (cached, _) = job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log).unwrap();
    assert_eq!(values(cached.as_ref()), a);
    std::fs::remove_dir_all(&w).unwrap();
}

/// `teacher.swa_epochs`: the teacher is the equal average of its last epochs' weights
/// (the last weights kept beside it), and its BatchNorm statistics are the mean over
/// one pass of the training data of the batch statistics the averaged weights produce,
/// recomputed here independently from the saved teacher.
#[test]
fn a_weight_averaged_teacher_has_its_batch_norm_statistics_recomputed() {
    use dfkd::data::{Loader, LoaderConfig};
    use dfkd::nn::Module;
    let w = workdir("swa");
    let mut cfg = tiny(&w);
    cfg.teacher.epochs = 3;
    cfg.teacher.swa_epochs = 2;
    cfg.teacher.swa_lr = 0.02;
    let ds = job::prepare_data(&cfg).unwrap();
    let mut log = dfkd::pipeline::report::MetricsLog::open(&w.join("metrics.jsonl")).unwrap();
    let (averaged, path) = job::prepare_teacher(&cfg, &ds, Device::Cpu, &mut log).unwrap();
    let load = |p: &std::path::Path| dfkd::commands::predict::load_classifier("resnet8", 10, true, p).unwrap();
    let tensor = |m: &dyn Module, name: &str| m.named_tensors().into_iter().find(|(n, _, _)| n == name).unwrap().1.to_vec_f32().unwrap();
    let last = load(&job::last_weights_path(&path));
    assert_ne!(tensor(averaged.as_ref(), "conv1.weight"), tensor(last.as_ref(), "conv1.weight"), "the teacher is the average");
    // the statistics: one pass in training mode over the loader's next epoch
    let fresh = load(&path);
    let loader = Loader::new(&ds.train, LoaderConfig::train(&ds, cfg.teacher.batch_size, cfg.data.image_size as u32, cfg.teacher.seed.unwrap_or(cfg.seed)));
    let (mut mean, mut var, mut batches) = (vec![0f64; 16], vec![0f64; 16], 0);
    for b in loader.epoch(cfg.teacher.epochs as u64) {
        let b = b.unwrap();
        let x = dfkd::Tensor::from_vec(b.images, &[b.n, 3, b.size, b.size], Device::Cpu).unwrap();
        let input = &fresh.forward(&x, true).unwrap().bn_inputs[0];
        let (m, v) = (input.mean(&[0, 2, 3], false).unwrap().to_vec_f32().unwrap(), input.var(&[0, 2, 3], false, true).unwrap().to_vec_f32().unwrap());
        mean.iter_mut().zip(&m).for_each(|(a, b)| *a += *b as f64);
        var.iter_mut().zip(&v).for_each(|(a, b)| *a += *b as f64);
        batches += 1;
    }
    assert!(batches >= 2, "the recomputation averages several batches, got {batches}");
    for (name, want) in [("bn1.running_mean", mean), ("bn1.running_var", var)] {
        let got = tensor(averaged.as_ref(), name);
        assert_eq!(got.len(), 16);
        for (g, w) in got.iter().zip(&want) {
            let w = w / batches as f64;
            assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name}: {got:?} vs {want:?}");
        }
    }
    std::fs::remove_dir_all(&w).unwrap();
}

/// `teacher.extra_train_per_class`: the teacher's training split grows by that many
/// new images a class (none of them the data set's), the data set and its test split
/// stay as they are, and the teacher's cache key follows the images it trained on.
#[test]
fn extra_training_images_grow_the_teachers_training_split_only() {
    let w = workdir("extra");
    let mut cfg = tiny(&w);
    let ds = job::prepare_data(&cfg).unwrap();
    assert_eq!(job::teacher_training_set(&cfg, &ds).unwrap().train.len(), ds.train.len());
    cfg.teacher.extra_train_per_class = 3;
    let all = job::teacher_training_set(&cfg, &ds).unwrap();
    assert_eq!(all.train.len(), ds.train.len() + 10 * 3);
    assert_eq!(all.train[..ds.train.len()], ds.train[..]);
    assert_eq!(all.test, ds.test);
    assert_eq!(all.classes, ds.classes);
    let bytes = |s: &dfkd::data::Sample| std::fs::read(&s.path).unwrap();
    let own: Vec<Vec<u8>> = ds.train.iter().chain(&ds.test).map(bytes).collect();
    for s in &all.train[ds.train.len()..] {
        assert!(!own.contains(&bytes(s)), "{} repeats an image of the data set", s.path.display());
    }
    // each class gets its 3 extra images
    for c in 0..10 {
        assert_eq!(all.train[ds.train.len()..].iter().filter(|s| s.label == c).count(), 3);
    }
    // the data set itself is unchanged when opened again
    let again = job::prepare_data(&cfg).unwrap();
    assert_eq!((again.train.len(), again.test), (ds.train.len(), ds.test.clone()));
    cfg.data.dataset = w.join("data").display().to_string();
    assert!(cfg.validate().unwrap_err().to_string().contains("teacher.extra_train_per_class"));
    std::fs::remove_dir_all(&w).unwrap();
}
