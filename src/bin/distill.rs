//! `distill`: data-free knowledge distillation for fine-grained visual categorization.
//! With no arguments it runs the embedded CPU demo end to end.

use clap::{Args, Parser, Subcommand};
use dfkd::commands::{bench, doctor, job, predict, sweep};
use dfkd::pipeline::config::Config;
use dfkd::pipeline::methods::Method;
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
    /// The run's options, written here or after `distill` alike (with no subcommand:
    /// the demo run's).
    #[command(flatten)]
    before: DistillArgs,
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

#[derive(Args, Default, Clone, Debug, PartialEq)]
struct DistillArgs {
    /// The distillation method (`distill.method`).
    #[arg(long, value_enum, ignore_case = true)]
    method: Option<Method>,
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

impl DistillArgs {
    /// The run's options as written before the subcommand (`before`) and after
    /// `distill` (`after`, none without a subcommand): each means the same in either
    /// place; given in both, or before another subcommand, it is refused.
    fn resolve(before: &DistillArgs, command: Option<&Command>) -> std::result::Result<DistillArgs, clap::Error> {
        let refuse = |msg: String| <Cli as clap::CommandFactory>::command().error(clap::error::ErrorKind::ArgumentConflict, msg);
        let after = match command {
            None => return Ok(before.clone()),
            Some(Command::Distill(after)) => after,
            Some(_) => match before.given().first() {
                Some(flag) => return Err(refuse(format!("{flag} applies to distillation runs only: give it after `distill` (or with no subcommand)"))),
                None => return Ok(DistillArgs::default()),
            },
        };
        if let Some(flag) = before.given().into_iter().find(|f| after.given().contains(f)) {
            return Err(refuse(format!("{flag} is given both before and after `distill`")));
        }
        let merged = DistillArgs {
            method: before.method.or(after.method),
            gpus: before.gpus.or(after.gpus),
            run: before.run.clone().or(after.run.clone()),
            resume: before.resume || after.resume,
            overwrite: before.overwrite || after.overwrite,
            seeds: before.seeds.clone().or(after.seeds.clone()),
        };
        if merged.resume && merged.overwrite {
            return Err(refuse("--resume and --overwrite exclude each other: continue the run, or replace it".into()));
        }
        Ok(merged)
    }

    /// The flags written.
    fn given(&self) -> Vec<&'static str> {
        let flags = [
            ("--method", self.method.is_some()),
            ("--gpus", self.gpus.is_some()),
            ("--run", self.run.is_some()),
            ("--resume", self.resume),
            ("--overwrite", self.overwrite),
            ("--seeds", self.seeds.is_some()),
        ];
        flags.into_iter().filter(|f| f.1).map(|f| f.0).collect()
    }
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
    if let Some(m) = args.method {
        cfg.distill.method = m;
    }
    if let Some(n) = args.gpus {
        cfg.parallel.ranks = n;
        cfg.validate()?;
    }
    let run_dir = match &args.run {
        Some(run) => cfg.workdir.join(run),
        // the bare demo never replaces an earlier run: runs/demo, then demo-2, ...
        None if default_run == "demo" => dfkd::pipeline::run_dir::first_free(&cfg.workdir, "demo"),
        None => cfg.workdir.join(default_run.replace("{method}", cfg.distill.method.name())),
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
    let args = DistillArgs::resolve(&cli.before, cli.command.as_ref()).unwrap_or_else(|e| e.exit());
    let result = run(cli, &args);
    if dfkd::profile::enabled() {
        eprintln!("\nwhere the time went (DFKD_PROFILE):\n{}", dfkd::profile::report().table(Some(start.elapsed()), 30));
    }
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli, args: &DistillArgs) -> Result<()> {
    let mut cfg = resolve(&cli.common)?;
    // only commands that compute open the device (`show-config --device cuda` works
    // without a GPU); make-data runs on the CPU whatever the config says
    let device = match cli.command {
        Some(Command::ShowConfig | Command::MakeData | Command::Summarize(_) | Command::Doctor { .. }) => Device::Cpu,
        _ => open_device(&cfg)?,
    };
    match cli.command {
        None => distill(&mut cfg, device, args, "demo"),
        Some(Command::Distill(_)) => distill(&mut cfg, device, args, "{method}"),
        Some(Command::MakeData) => job::prepare_data(&cfg).map(|_| ()),
        Some(Command::TrainTeacher) => {
            let ds = job::prepare_data(&cfg)?;
            cfg.validate_dataset(&ds)?;
            let run_dir = cfg.workdir.join("teacher");
            std::fs::create_dir_all(&run_dir).map_err(|e| dfkd::Error::io(&run_dir, e))?;
            let mut log = dfkd::pipeline::report::MetricsLog::open(&run_dir.join("metrics.jsonl"))?;
            let t0 = std::time::Instant::now();
            let (teacher, path) = job::prepare_teacher(&cfg, &ds, device, &mut log)?;
            let seconds = t0.elapsed().as_secs_f32();
            let ev = dfkd::pipeline::eval::evaluate(&[teacher.as_ref()], &ds, cfg.data.image_size, 128, device)?;
            println!(
                "teacher {} at {}: test top-1 {:.2}%, top-5 {:.2}% ({seconds:.1}s)",
                cfg.teacher.arch,
                path.display(),
                ev.models[0].top1,
                ev.models[0].top5
            );
            // a teacher averaged over its training (`teacher.ema_decay`, `teacher.swa_epochs`): its last weights too
            let last = job::last_weights_path(&path);
            if (cfg.teacher.ema_decay > 0.0 || cfg.teacher.swa_epochs > 0) && last.exists() {
                let model = predict::load_classifier(&cfg.teacher.arch, ds.num_classes(), cfg.teacher.small_stem, &last)?;
                model.to_device(device)?;
                let ev = dfkd::pipeline::eval::evaluate(&[model.as_ref()], &ds, cfg.data.image_size, 128, device)?;
                println!("its last weights (not averaged) at {}: test top-1 {:.2}%, top-5 {:.2}%", last.display(), ev.models[0].top1, ev.models[0].top5);
            }
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
                arch: a.arch,
                num_classes: a.num_classes,
                weights: a.weights,
                image_size: a.image_size,
                small_stem: a.small_stem,
                json: a.json,
                images: a.images,
                device,
            };
            let failed = predict::run(&args)?;
            if failed > 0 {
                std::process::exit(2);
            }
            Ok(())
        }
        Some(Command::Bench(a)) => {
            let args = bench::BenchArgs {
                arch: a.arch.clone(),
                batch: a.batch,
                image_size: a.image_size,
                num_classes: a.num_classes,
                small_stem: a.small_stem,
                steps: a.steps,
                warmup: a.warmup,
                device,
            };
            let r = bench::run(&args)?;
            let ms: Vec<String> = r.step_ms.iter().map(|t| format!("{t:.1}")).collect();
            println!(
                "{} batch {} {}px {} classes on {device}: {:.1} images/s (median step {:.1} ms; steps: {} ms)",
                a.arch,
                a.batch,
                a.image_size,
                a.num_classes,
                r.images_per_sec,
                a.batch as f64 * 1e3 / r.images_per_sec,
                ms.join(", ")
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    /// Every run option, as a user writes it.
    const OPTIONS: [&[&str]; 6] = [&["--method", "dafl"], &["--gpus", "2"], &["--run", "x"], &["--resume"], &["--overwrite"], &["--seeds", "0-2"]];

    fn resolved(args: &[&str]) -> std::result::Result<DistillArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("distill").chain(args.iter().copied()))?;
        DistillArgs::resolve(&cli.before, cli.command.as_ref())
    }

    #[test]
    fn each_run_option_means_the_same_before_and_after_distill() {
        for opt in OPTIONS {
            let after = resolved(&[&["distill"], opt].concat()).unwrap();
            assert_eq!(after.given(), [opt[0]], "{opt:?} after `distill`");
            assert_eq!(resolved(&[opt, &["distill"]].concat()).unwrap(), after, "{opt:?} before `distill`");
            assert_eq!(resolved(opt).unwrap(), after, "{opt:?} with no subcommand (the demo run)");
            let twice = resolved(&[opt, &["distill"], opt].concat()).unwrap_err();
            assert_eq!(twice.kind(), ErrorKind::ArgumentConflict, "{opt:?} twice: {twice}");
            for other in [&["show-config"][..], &["make-data"], &["eval", "--arch", "resnet8", "--weights", "w"]] {
                let refused = resolved(&[opt, other].concat()).unwrap_err();
                assert!(refused.kind() == ErrorKind::ArgumentConflict && refused.to_string().contains(opt[0]), "{opt:?} before {other:?}: {refused}");
            }
        }
        // exclusive wherever each is written
        for args in [&["--resume", "distill", "--overwrite"][..], &["--overwrite", "distill", "--resume"]] {
            assert_eq!(resolved(args).unwrap_err().kind(), ErrorKind::ArgumentConflict, "{args:?}");
        }
    }

    #[test]
    fn methods_are_named_from_the_one_list() {
        for m in Method::ALL {
            for name in std::iter::once(m.name()).chain(m.aliases().iter().copied()) {
                assert_eq!(resolved(&["distill", "--method", &name.to_uppercase()]).unwrap().method, Some(*m), "{name}");
            }
        }
        let unknown = resolved(&["distill", "--method", "nope"]).unwrap_err().to_string();
        assert!(Method::ALL.iter().all(|m| unknown.contains(m.name())), "{unknown}");
    }
}
