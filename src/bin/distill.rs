//! `distill`: data-free knowledge distillation for fine-grained visual categorization.
//! With no arguments it runs the embedded CPU demo end to end.

use clap::{Args, Parser, Subcommand};
use dfkd::commands::{bench, doctor, job, predict, sweep};
use dfkd::pipeline::config::Config;
use dfkd::{Device, Result};
use std::path::PathBuf;

#[global_allocator]
static ALLOC: dfkd::allocator::MiMalloc = dfkd::allocator::MiMalloc;

#[derive(Parser)]
#[command(name = "distill", version, about = "Data-free knowledge distillation for fine-grained visual categorization (DFKD-FGVC)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
    /// With no subcommand: the demo run, with these options.
    #[command(flatten)]
    demo: DistillArgs,
}

#[derive(Args, Clone)]
struct Common {
    /// A TOML config file (see `distill show-config`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Start from a preset: cpu-demo, paper-cub, paper-cars, paper-aircraft.
    #[arg(long, global = true)]
    preset: Option<String>,
    /// Override a config value, e.g. `--set distill.beta=5` (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// cpu, cuda, cuda:N, cuda-emu (the CUDA kernels emulated on the CPU: slow, for tests) or auto (cuda:0 when a GPU opens, else cpu).
    #[arg(long, global = true)]
    device: Option<String>,
    /// Folder for data, teachers and runs.
    #[arg(long, global = true)]
    workdir: Option<PathBuf>,
    #[arg(long, global = true)]
    seed: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Make (or check) the data set: the synthetic one is generated in the CUB layout.
    MakeData,
    /// Train the teacher on the data set (cached by configuration).
    TrainTeacher,
    /// The whole pipeline: data, teacher, data-free distillation, evaluation.
    Distill(DistillArgs),
    /// Evaluate a classifier checkpoint on the data set's test split.
    Eval(EvalArgs),
    /// Top-5 classes of images under a classifier (torchvision's eval transform).
    Predict(PredictArgs),
    /// Time training steps on random data.
    Bench(BenchArgs),
    /// Print the resolved configuration as TOML.
    ShowConfig,
    /// Check a CUDA device (--device, default cuda:0): driver, card, the libraries loaded
    /// and from where, the embedded kernels, a small computation against the CPU. Exits
    /// 0 when ready, 3 when usable with parts missing, 1 when unusable.
    Doctor {
        /// Fail when a kernel file has no nvcc fatbin (gpu-bundle's check).
        #[arg(long)]
        require_fatbins: bool,
    },
    /// Compare sweep folders (written by `--seeds`): mean and 95% interval of each, and
    /// the paired differences of each from the first on the seeds both ran.
    Summarize(SummarizeArgs),
}

#[derive(Args)]
struct SummarizeArgs {
    /// Sweep folders; the first is the reference for the paired differences.
    #[arg(required = true)]
    sweeps: Vec<PathBuf>,
    /// Also write the comparison as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Default, Clone)]
struct DistillArgs {
    /// dfkd-fgvc, dafl, dfad, zskt, dfq or deepinversion.
    #[arg(long)]
    method: Option<String>,
    /// Data-parallel ranks (`parallel.ranks`): one per GPU from the device's ordinal up,
    /// or threads on the CPU; each synthesises its share of distill.batch_size.
    #[arg(long, value_name = "N")]
    gpus: Option<usize>,
    /// Run folder name under <workdir>/ (default: the method's name).
    #[arg(long)]
    run: Option<String>,
    /// Continue the run from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace the run already in the run folder (a new run refuses to start over one).
    #[arg(long)]
    overwrite: bool,
    /// Run once per distillation seed (`0-4`, `0,1,2`), each in `<run>/seed-<k>`, sharing
    /// the data set and teacher, then write `<run>/summary.{json,md}` (mean, std, 95% CI).
    #[arg(long, value_name = "LIST")]
    seeds: Option<String>,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    arch: String,
    #[arg(long)]
    weights: PathBuf,
    #[arg(long)]
    small_stem: Option<bool>,
}

#[derive(Args)]
struct PredictArgs {
    #[arg(long)]
    arch: String,
    #[arg(long)]
    num_classes: usize,
    #[arg(long)]
    weights: PathBuf,
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Use the small 3x3 stem (models trained at 32-64 px).
    #[arg(long)]
    small_stem: bool,
    /// One JSON object per line: {"image", "logits", "top5"}.
    #[arg(long)]
    json: bool,
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "resnet18")]
    arch: String,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    #[arg(long, default_value_t = 200)]
    num_classes: usize,
    #[arg(long)]
    small_stem: bool,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

/// The config from the files, presets and flags, validated; the device is not opened
/// here (`open_device`), so that commands that compute nothing work on any machine.
fn resolve(c: &Common) -> Result<Config> {
    let mut cfg = match (&c.config, &c.preset) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(p)) => Config::preset(p)?,
        (None, None) => Config::cpu_demo(),
    };
    cfg.apply_overrides(&c.sets)?;
    if let Some(d) = &c.device {
        cfg.device = d.clone();
    }
    if let Some(w) = &c.workdir {
        cfg.workdir = w.clone();
    }
    if let Some(s) = c.seed {
        cfg.seed = s;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn open_device(cfg: &Config) -> Result<Device> {
    Device::parse_user(&cfg.device)
}

fn distill(cfg: &mut Config, device: Device, args: &DistillArgs, default_run: &str) -> Result<()> {
    if let Some(m) = &args.method {
        cfg.distill.method = m.clone();
    }
    if let Some(n) = args.gpus {
        cfg.parallel.ranks = n;
        cfg.validate()?;
    }
    let run_dir = match &args.run {
        Some(run) => cfg.workdir.join(run),
        // the bare demo never replaces an earlier run: runs/demo, then demo-2, ...
        None if default_run == "demo" => dfkd::pipeline::run_dir::first_free(&cfg.workdir, "demo"),
        None => cfg.workdir.join(default_run.replace("{method}", &cfg.distill.method)),
    };
    let ranks = match cfg.parallel.ranks {
        1 => String::new(),
        n => format!(", {n} data-parallel ranks"),
    };
    eprintln!("dfkd: {} -> {} on {} ({}), device {device}{ranks}", cfg.teacher.arch, cfg.student.arch, cfg.data.dataset, cfg.distill.method);
    if let Some(list) = &args.seeds {
        let seeds = dfkd::pipeline::sweep::parse_seeds(list)?;
        let summary = sweep::run_sweep(cfg, device, &run_dir, &seeds, args.resume, args.overwrite)?;
        print!("\n{}", summary.markdown());
        println!("\nwritten: {} and summary.md; each seed's outputs in seed-<k>/", run_dir.join("summary.json").display());
        return Ok(());
    }
    let opts = job::RunOptions { run_dir, resume: args.resume, overwrite: args.overwrite };
    let summary = job::run_job(cfg, device, &opts)?;
    job::print_summary(&summary, summary.eval.models[0].per_class.len());
    Ok(())
}

fn main() {
    dfkd::allocator::keep_freed_pages();
    let start = std::time::Instant::now();
    let cli = Cli::parse();
    let result = run(cli);
    if dfkd::profile::enabled() {
        eprintln!("\nwhere the time went (DFKD_PROFILE):\n{}", dfkd::profile::report().table(Some(start.elapsed()), 30));
    }
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut cfg = resolve(&cli.common)?;
    // only commands that compute open the device (`show-config --device cuda` works
    // without a GPU); make-data runs on the CPU whatever the config says
    let device = match cli.command {
        Some(Command::ShowConfig | Command::MakeData | Command::Summarize(_) | Command::Doctor { .. }) => Device::Cpu,
        _ => open_device(&cfg)?,
    };
    match cli.command {
        None => distill(&mut cfg, device, &cli.demo, "demo"),
        Some(Command::Distill(a)) => distill(&mut cfg, device, &a, "{method}"),
        Some(Command::MakeData) => job::prepare_data(&cfg).map(|_| ()),
        Some(Command::TrainTeacher) => {
            let ds = job::prepare_data(&cfg)?;
            cfg.validate_dataset(&ds)?;
            let run_dir = cfg.workdir.join("teacher");
            std::fs::create_dir_all(&run_dir).map_err(|e| dfkd::Error::io(&run_dir, e))?;
            let mut log = dfkd::pipeline::report::MetricsLog::open(&run_dir.join("metrics.jsonl"))?;
            let (teacher, path) = job::prepare_teacher(&cfg, &ds, device, &mut log)?;
            let ev = dfkd::pipeline::eval::evaluate(&[teacher.as_ref()], &ds, cfg.data.image_size, 128, device)?;
            println!("teacher {} at {}: test top-1 {:.2}%, top-5 {:.2}%", cfg.teacher.arch, path.display(), ev.models[0].top1, ev.models[0].top5);
            Ok(())
        }
        Some(Command::Eval(a)) => {
            let ds = job::prepare_data(&cfg)?;
            cfg.validate_dataset(&ds)?;
            let small = a.small_stem.unwrap_or(cfg.data.image_size <= 64);
            let model = predict::load_classifier(&a.arch, ds.num_classes(), small, &a.weights)?;
            model.to_device(device)?;
            let ev = dfkd::pipeline::eval::evaluate(&[model.as_ref()], &ds, cfg.data.image_size, 128, device)?;
            println!("{}", serde_json::to_string(&ev.models[0]).unwrap());
            Ok(())
        }
        Some(Command::Predict(a)) => {
            let args = predict::PredictArgs {
                arch: a.arch, num_classes: a.num_classes, weights: a.weights, image_size: a.image_size,
                small_stem: a.small_stem, json: a.json, images: a.images, device,
            };
            let failed = predict::run(&args)?;
            if failed > 0 {
                std::process::exit(2);
            }
            Ok(())
        }
        Some(Command::Bench(a)) => {
            let args = bench::BenchArgs {
                arch: a.arch.clone(), batch: a.batch, image_size: a.image_size, num_classes: a.num_classes,
                small_stem: a.small_stem, steps: a.steps, warmup: a.warmup, device,
            };
            let r = bench::run(&args)?;
            let ms: Vec<String> = r.step_ms.iter().map(|t| format!("{t:.1}")).collect();
            println!("{} batch {} {}px {} classes on {device}: {:.1} images/s (median step {:.1} ms; steps: {} ms)",
                a.arch, a.batch, a.image_size, a.num_classes, r.images_per_sec, a.batch as f64 * 1e3 / r.images_per_sec, ms.join(", "));
            Ok(())
        }
        Some(Command::Summarize(a)) => {
            let variants = a
                .sweeps
                .iter()
                .map(|d| {
                    let name = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| d.display().to_string());
                    dfkd::pipeline::sweep::Summary::new(&name, dfkd::pipeline::sweep::read_sweep(d)?)
                })
                .collect::<Result<Vec<_>>>()?;
            print!("{}", dfkd::pipeline::sweep::comparison_markdown(&variants));
            if let Some(path) = a.json {
                let text = serde_json::to_string_pretty(&dfkd::pipeline::sweep::comparison_json(&variants)).unwrap();
                std::fs::write(&path, text).map_err(|e| dfkd::Error::io(&path, e))?;
            }
            Ok(())
        }
        Some(Command::ShowConfig) => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Some(Command::Doctor { require_fatbins }) => {
            doctor::main(&doctor::DoctorArgs { device: cli.common.device.clone().unwrap_or_else(|| "cuda:0".into()), require_fatbins })
        }
    }
}
