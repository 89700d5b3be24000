//! The end-to-end job and its phases: make (or open) the data set, train (or load, or
//! import) the teacher, distill a student data-free, evaluate both on the real test
//! split, and summarise.

use crate::checkpoint::{load_model, save_model};
use crate::data::synthetic::{self, SyntheticSpec};
use crate::data::Dataset;
use crate::models::{build, Classifier};
use crate::parallel::{Collective, NcclGroup, ThreadGroup};
use crate::pipeline::checkpoint_dir::CheckpointDir;
use crate::pipeline::config::Config;
use crate::pipeline::data_set;
use crate::pipeline::distill::{self, Distiller};
use crate::pipeline::eval::{evaluate, Evaluation};
use crate::pipeline::report::{plot_panels, print_table, MetricsLog, Panel};
use crate::pipeline::run_dir::{Mode, RunDir};
use crate::pipeline::teacher::train_classifier;
use crate::rng::Rng;
use crate::{bail, Device, Error, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Test images per evaluation batch.
const EVAL_BATCH: usize = 128;

/// Opens the configured data set, generating the synthetic one first if needed.
pub fn prepare_data(cfg: &Config) -> Result<Dataset> {
    let t0 = Instant::now();
    let ds = data_set::open(cfg)?;
    eprintln!(
        "{:>14} {} ({} classes, {} train / {} test images) in {:.1}s",
        "data",
        ds.root.display(),
        ds.num_classes(),
        ds.train.len(),
        ds.test.len(),
        t0.elapsed().as_secs_f32()
    );
    Ok(ds)
}

/// What the teacher trains on: `ds`, and with `teacher.extra_train_per_class` > 0 (the
/// synthetic set only) that many more images of each class, drawn from another stream
/// of the same seed (so none is a test image) and written beside the data set. Only
/// the training split grows: the test split, and what the student is judged on, stay.
pub fn teacher_training_set(cfg: &Config, ds: &Dataset) -> Result<Dataset> {
    let extra = cfg.teacher.extra_train_per_class;
    if extra == 0 {
        return Ok(ds.clone());
    }
    let d = &cfg.data;
    if d.dataset != "synthetic" {
        bail!("teacher.extra_train_per_class = {extra}: extra training images exist for the synthetic set only (data.dataset = {:?})", d.dataset);
    }
    let spec = SyntheticSpec {
        num_classes: d.num_classes,
        train_per_class: extra,
        test_per_class: 0,
        image_size: d.image_size as u32,
        seed: cfg.seed,
        image_stream: 2,
    };
    let dir = cfg.workdir.join("data").join(format!("synthetic-birds-{}c-{}px-seed{}-extra{extra}", d.num_classes, d.image_size, cfg.seed));
    let more = synthetic::ensure(&spec, &dir)?;
    if more.classes != ds.classes {
        bail!("{}: the extra training images' classes differ from the data set's at {}", dir.display(), ds.root.display());
    }
    let mut all = ds.clone();
    all.train.extend(more.train);
    Ok(all)
}

/// A stable fingerprint of what determines a trained teacher, for its cache file: the
/// config, and the training split as it is on disk (each image's path, label, size and
/// modification time), so that repairing, replacing or relabelling images trains anew.
fn teacher_key(cfg: &Config, ds: &Dataset) -> String {
    let mut text = format!("{}|{}|{}|{}|{}", ds.root.display(), cfg.data.image_size, cfg.seed, toml::to_string(&cfg.teacher).unwrap(), ds.train.len());
    for s in &ds.train {
        let meta = std::fs::metadata(&s.path).ok();
        let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let (size, nanos) = (meta.map_or(0, |m| m.len()), modified.map_or(0, |d| d.as_nanos()));
        text.push_str(&format!("|{}:{}:{size}:{nanos}", s.path.display(), s.label));
    }
    let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("{}-{hash:016x}", cfg.teacher.arch)
}

/// The teacher on `device`: imported weights, a cached earlier training, or trained now.
pub fn prepare_teacher(cfg: &Config, ds: &Dataset, device: Device, log: &mut MetricsLog) -> Result<(Box<dyn Classifier>, PathBuf)> {
    let t = &cfg.teacher;
    let seed = t.seed.unwrap_or(cfg.seed);
    let model = build(&t.arch, ds.num_classes(), t.small_stem, &mut Rng::new(seed).fork(1))?;
    // loading then writes straight into the device's buffers
    model.to_device(device)?;
    if let Some(w) = &t.weights {
        load_model(model.as_ref(), w)?;
        eprintln!("{:>14} imported {}", "teacher", w.display());
        return Ok((model, w.clone()));
    }
    let dir = cfg.workdir.join("teachers");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let train_set = teacher_training_set(cfg, ds)?;
    let path = dir.join(format!("{}.safetensors", teacher_key(cfg, &train_set)));
    if path.exists() {
        load_model(model.as_ref(), &path)?;
        eprintln!("{:>14} cached {}", "teacher", path.display());
        return Ok((model, path));
    }
    let trained = train_classifier(model.as_ref(), &train_set, t, cfg.data.image_size, seed, device, log, "teacher")?;
    if let Some(mut last) = trained.last {
        // the weights as they trained, beside the averaged teacher: for comparison only
        // (`distill eval --weights`); the model holds the average again afterwards
        last.swap()?;
        save_model(model.as_ref(), last_weights_path(&path))?;
        last.swap()?;
    }
    save_model(model.as_ref(), &path)?;
    Ok((model, path))
}

/// Where a teacher trained with `teacher.ema_decay` keeps its last (not averaged)
/// weights: `<key>.last.safetensors` beside `<key>.safetensors`.
pub fn last_weights_path(teacher: &Path) -> PathBuf {
    teacher.with_extension("last.safetensors")
}

/// Options of a distillation run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Continue the run in `run_dir` from its last checkpoint.
    pub resume: bool,
    /// Replace the run in `run_dir` (a folder dfkd made); without it or `resume`, an
    /// existing run is refused.
    pub overwrite: bool,
}

pub struct JobSummary {
    pub teacher_top1: f32,
    pub student_top1: f32,
    pub eval: Evaluation,
    pub seconds: f32,
    pub run_dir: PathBuf,
}

/// Claims the run folder (checked and locked; see `run_dir`). Nothing is removed yet.
fn open_run_dir(opts: &RunOptions) -> Result<RunDir> {
    let mode = match (opts.resume, opts.overwrite) {
        (true, true) => bail!("--resume and --overwrite exclude each other: continue the run, or replace it"),
        (true, false) => Mode::Resume,
        (false, true) => Mode::Overwrite,
        (false, false) => Mode::Fresh,
    };
    RunDir::claim(&opts.run_dir, mode)
}

/// Writes the resolved config into the run folder. A resumed run keeps the saved one
/// until its checkpoint has loaded under the new config (a refused resume changes
/// nothing), and says when they differ.
fn write_config(cfg: &Config, dir: &Path, resumed: bool) -> Result<()> {
    let cfg_path = dir.join("config.toml");
    if resumed && cfg_path.exists() {
        match Config::load(&cfg_path) {
            Ok(saved) if saved == *cfg => return Ok(()),
            Ok(_) => eprintln!("warning: resuming with a config that differs from {}; it now holds the new one", cfg_path.display()),
            Err(e) => eprintln!("warning: the saved config does not load ({e}); it is replaced by the one in use"),
        }
    }
    crate::pipeline::report::write_atomic(&cfg_path, cfg.to_toml().as_bytes())
}

/// The whole pipeline: data, teacher, data-free distillation, evaluation, summary.
/// The config is validated, and the run folder claimed, before anything is made or
/// removed; a fresh or replaced run's folder is cleared only once the data set has
/// opened and agrees with the config.
pub fn run_job(cfg: &Config, device: Device, opts: &RunOptions) -> Result<JobSummary> {
    let t0 = Instant::now();
    let mut p = prepare_job(cfg, device, opts)?;
    let ranks = cfg.parallel.ranks;
    if ranks == 1 {
        distill_rank(cfg, p.teacher.as_ref(), p.student.as_ref(), device, opts, Some((&mut p.log, &p.ds, &p.run)))?;
    } else {
        let devices = rank_devices(device, ranks)?;
        let group: Vec<Arc<dyn Collective>> = match device {
            Device::Cuda(first) => {
                let ordinals: Vec<usize> = (first..first + ranks).collect();
                NcclGroup::new(&ordinals)?.into_iter().map(|g| Arc::new(g) as Arc<dyn Collective>).collect()
            }
            _ => ThreadGroup::new(ranks).into_iter().map(|g| Arc::new(g) as Arc<dyn Collective>).collect(),
        };
        let Prepared { run, ds, log, teacher, teacher_path, student } = &mut p;
        let leader_log = std::sync::Mutex::new(Some(log));
        crate::parallel::run_group(group, |rank| {
            let log = if rank == 0 { leader_log.lock().unwrap().take() } else { None };
            if rank == 0 {
                // rank 0 trains the job's own student, which is evaluated and saved below
                return distill_rank(cfg, teacher.as_ref(), student.as_ref(), device, opts, log.map(|l| (l, &*ds, &*run)));
            }
            let dev = devices[rank];
            let t = build(&cfg.teacher.arch, ds.num_classes(), cfg.teacher.small_stem, &mut Rng::new(0))?;
            t.to_device(dev)?;
            load_model(t.as_ref(), &*teacher_path)?;
            let s = build(&cfg.student.arch, ds.num_classes(), cfg.student.small_stem, &mut cfg.distill_rng(2))?;
            s.to_device(dev)?;
            distill_rank(cfg, t.as_ref(), s.as_ref(), dev, opts, None)
        })?;
    }
    finish_job(cfg, device, opts, p, t0)
}

/// What the job has made before distilling: on rank 0 (or the only process).
struct Prepared {
    run: RunDir,
    ds: Dataset,
    log: MetricsLog,
    teacher: Box<dyn Classifier>,
    teacher_path: PathBuf,
    student: Box<dyn Classifier>,
}

/// The config validated, the run folder claimed (before anything is made or removed),
/// the data set, the teacher and the student to distil into.
fn prepare_job(cfg: &Config, device: Device, opts: &RunOptions) -> Result<Prepared> {
    cfg.validate()?;
    let run = open_run_dir(opts)?;
    if opts.resume && CheckpointDir::new(run.path()).existing().is_none() {
        // said now, not after the data set and the teacher have been prepared
        bail!("--resume: {} has no checkpoint (the run stopped before its first one); start it again with --overwrite", run.path().display());
    }
    let ds = prepare_data(cfg)?;
    cfg.validate_dataset(&ds)?;
    run.prepare()?;
    if !opts.resume {
        write_config(cfg, run.path(), false)?;
    }
    let mut log = MetricsLog::open(&opts.run_dir.join("metrics.jsonl"))?;
    let (teacher, teacher_path) = prepare_teacher(cfg, &ds, device, &mut log)?;
    let student = build(&cfg.student.arch, ds.num_classes(), cfg.student.small_stem, &mut cfg.distill_rng(2))?;
    student.to_device(device)?;
    Ok(Prepared { run, ds, log, teacher, teacher_path, student })
}

/// Evaluates the distilled student beside its teacher, logs and saves it, draws the
/// curves.
fn finish_job(cfg: &Config, device: Device, opts: &RunOptions, p: Prepared, t0: Instant) -> Result<JobSummary> {
    let Prepared { ds, mut log, teacher, student, .. } = p;
    let eval = evaluate(&[teacher.as_ref(), student.as_ref()], &ds, cfg.data.image_size, EVAL_BATCH, device)?;
    let summary = JobSummary {
        teacher_top1: eval.models[0].top1,
        student_top1: eval.models[1].top1,
        eval,
        seconds: t0.elapsed().as_secs_f32(),
        run_dir: opts.run_dir.clone(),
    };
    log.write(&json!({"phase": "final", "teacher_top1": summary.teacher_top1, "teacher_top5": summary.eval.models[0].top5,
        "student_top1": summary.student_top1, "student_top5": summary.eval.models[1].top5,
        "agreement": summary.eval.agreement, "student_per_class": summary.eval.models[1].per_class,
        "chance": 100.0 / ds.num_classes() as f32, "seconds": summary.seconds}))?;
    crate::checkpoint::save_model(student.as_ref(), opts.run_dir.join("student.safetensors"))?;
    draw_curves(&opts.run_dir)?;
    Ok(summary)
}

/// The job as this process's rank of a multi-process group (`mpirun ... distill
/// --mpi`), `group` entered (`parallel::run_process`): every rank checks that all were
/// started alike; rank 0 alone prepares the run (data set, teacher), writes, evaluates
/// and returns the summary. The other ranks need neither the data set nor the teacher
/// on their machine: the class count and the teacher's weights come from rank 0. They
/// read the checkpoint when resuming, so the run folder must be one every rank sees.
pub fn run_job_process(cfg: &Config, device: Device, opts: &RunOptions, group: Arc<dyn Collective>) -> Result<Option<JobSummary>> {
    let t0 = Instant::now();
    cfg.validate()?;
    if cfg.parallel.ranks != group.world() {
        bail!("parallel.ranks = {} but the job has {} processes: each process is one rank", cfg.parallel.ranks, group.world());
    }
    let agreed = format!("{}\nrun folder: {}\nresume: {}\noverwrite: {}\n", cfg.to_toml(), opts.run_dir.display(), opts.resume, opts.overwrite);
    crate::parallel::check_same(group.as_ref(), "config and run options", agreed.as_bytes(), device)?;
    // rank 0 alone, outside the group (the teacher's BatchNorm must not wait for the others)
    let mut prepared = if group.rank() == 0 { Some(crate::parallel::alone(|| prepare_job(cfg, device, opts))?) } else { None };
    // the others wait here while rank 0 makes the data set and trains the teacher
    let classes = prepared.as_ref().map_or(0, |p| p.ds.num_classes()) as f32;
    let classes = group.broadcast(&crate::Tensor::from_slice(&[classes], &[1], Device::Cpu)?.to_device(device)?, 0)?.to_vec_f32()?[0] as usize;
    match prepared.as_mut() {
        Some(p) => {
            crate::parallel::broadcast_module(p.teacher.as_ref(), &group)?;
            distill_rank(cfg, p.teacher.as_ref(), p.student.as_ref(), device, opts, Some((&mut p.log, &p.ds, &p.run)))?;
        }
        None => {
            let t = build(&cfg.teacher.arch, classes, cfg.teacher.small_stem, &mut Rng::new(0))?;
            t.to_device(device)?;
            crate::parallel::broadcast_module(t.as_ref(), &group)?;
            let s = build(&cfg.student.arch, classes, cfg.student.small_stem, &mut cfg.distill_rng(2))?;
            s.to_device(device)?;
            distill_rank(cfg, t.as_ref(), s.as_ref(), device, opts, None)?;
        }
    }
    prepared.map(|p| crate::parallel::alone(|| finish_job(cfg, device, opts, p, t0))).transpose()
}

/// One rank's distillation (the only one unless `parallel.ranks` > 1): rank 0, given
/// the log, also resumes the log and config, evaluates, and writes checkpoints.
#[allow(clippy::too_many_arguments)]
fn distill_rank(
    cfg: &Config,
    teacher: &dyn Classifier,
    student: &dyn Classifier,
    device: Device,
    opts: &RunOptions,
    leader: Option<(&mut MetricsLog, &Dataset, &RunDir)>,
) -> Result<()> {
    let mut distiller = Distiller::new(cfg, teacher, student, device)?;
    let (mut log, ds) = match leader {
        Some((log, ds, run)) => {
            if opts.resume {
                distiller.resume(&CheckpointDir::new(&opts.run_dir))?;
                eprintln!("resumed from iteration {}", distiller.iteration());
                // the iterations after the checkpoint run again: their first records go
                log.resume_after(distiller.iteration())?;
                write_config(cfg, run.path(), true)?;
            }
            (Some(log), Some(ds))
        }
        None => {
            if opts.resume {
                distiller.resume(&CheckpointDir::new(&opts.run_dir))?;
            }
            (None, None)
        }
    };
    // only rank 0, the one given the data set, evaluates (`distill::run` asks the one given the log)
    distill::run(&mut distiller, &opts.run_dir, false, log.take(), |s| match ds {
        Some(ds) => Ok(evaluate(&[s], ds, cfg.data.image_size, EVAL_BATCH, device)?.models[0].top1),
        None => bail!("only rank 0 evaluates"),
    })
}

/// The device of each data-parallel rank: one GPU each from `device`'s ordinal up, or
/// all on the CPU (or the emulator) as threads.
fn rank_devices(device: Device, ranks: usize) -> Result<Vec<Device>> {
    (0..ranks)
        .map(|r| match device {
            Device::Cuda(first) => Device::parse_user(&format!("cuda:{}", first + r))
                .map_err(|e| Error::Msg(format!("parallel.ranks = {ranks} needs GPUs cuda:{first}..cuda:{}: {e}", first + ranks - 1))),
            other => Ok(other),
        })
        .collect()
}

/// Loss and accuracy curves from the run's metrics, as PNG: one panel per loss (the BN
/// term is two orders of magnitude above the student's losses), and the student's
/// accuracy against the teacher's and chance (from the run's final record).
pub fn draw_curves(run_dir: &Path) -> Result<()> {
    let records = MetricsLog::read_all(&run_dir.join("metrics.jsonl"))?;
    let points = |phase: &str, x: &str, key: &str| -> Vec<(f32, f32)> {
        records.iter().filter(|r| r["phase"] == phase).filter_map(|r| Some((r[x].as_f64()? as f32, r[key].as_f64()? as f32))).collect()
    };
    let panels = |phase: &str, x: &str, keys: &[&str]| -> Vec<Panel> {
        keys.iter().map(|k| Panel::single(k, points(phase, x, k))).filter(|p| !p.series[0].1.is_empty()).collect()
    };
    // whatever the method logged: its student-step (`s_*`) and synthesis (`g_*`) terms
    let logged = |prefix: &str| -> Vec<String> {
        let mut keys: Vec<String> = vec![];
        for r in records.iter().filter(|r| r["phase"] == "distill") {
            for k in r.as_object().into_iter().flat_map(|o| o.keys()).filter(|k| k.starts_with(prefix)) {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        keys
    };
    let (s_keys, g_keys) = (logged("s_"), logged("g_"));
    let student = panels("distill", "iteration", &s_keys.iter().map(String::as_str).collect::<Vec<_>>());
    if !student.is_empty() {
        plot_panels("student losses", "iteration", &student, &run_dir.join("losses_student.png"))?;
    }
    let generator = panels("distill", "iteration", &g_keys.iter().map(String::as_str).collect::<Vec<_>>());
    if !generator.is_empty() {
        plot_panels("generator losses", "iteration", &generator, &run_dir.join("losses_generator.png"))?;
    }
    let acc = points("distill", "epoch", "student_top1");
    if !acc.is_empty() {
        let last = records.iter().rev().find(|r| r["phase"] == "final");
        let reference = |key: &str, name: &str| Some((name.to_string(), last?[key].as_f64()? as f32));
        let references = [reference("teacher_top1", "teacher"), reference("chance", "chance")].into_iter().flatten().collect();
        let panel = Panel { title: "student test top-1 (%)".into(), series: vec![("student".into(), acc)], references };
        plot_panels("student accuracy", "epoch", &[panel], &run_dir.join("accuracy.png"))?;
    }
    let teacher = panels("teacher", "epoch", &["loss", "train_top1"]);
    if !teacher.is_empty() {
        plot_panels("teacher training", "epoch", &teacher, &run_dir.join("teacher.png"))?;
    }
    Ok(())
}

pub fn print_summary(s: &JobSummary, num_classes: usize) {
    let chance = 100.0 / num_classes as f32;
    print_table(
        &["", "top-1 %", "top-5 %"],
        &[
            vec!["teacher".into(), format!("{:.2}", s.teacher_top1), format!("{:.2}", s.eval.models[0].top5)],
            vec!["student (data-free)".into(), format!("{:.2}", s.student_top1), format!("{:.2}", s.eval.models[1].top5)],
            vec!["chance".into(), format!("{chance:.2}"), format!("{:.2}", (500.0 / num_classes as f32).min(100.0))],
        ],
    );
    if let Some(a) = s.eval.agreement {
        println!("teacher-student agreement on the test split: {a:.2}%");
    }
    println!(
        "time: {:.1}s; outputs in {} (metrics.jsonl, config.toml, losses_*.png, accuracy.png, images/, checkpoint/, student.safetensors)",
        s.seconds,
        s.run_dir.display()
    );
}
