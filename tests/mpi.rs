//! Data parallelism across processes, on real MPI (`mpirun -n 2` and `-n 4` on this
//! machine): the multi-process steps equal one process's (the tolerance and helpers
//! of tests/data_parallel.rs), ranks stay identical, a checkpoint written by N
//! processes resumes on M, a failing or killed rank stops the job within seconds with
//! its message, mismatched configs are refused, and NCCL's bootstrap carries rank 0's
//! id to every process.
//!
//! Each case launches this test binary under `mpirun`, running only
//! `mpi_rank_entry` with `DFKD_MPI_TASK` set: that is one rank's side, which writes
//! what it computed for the launching test to check. The job-level cases launch the
//! `distill` binary with `--mpi`.
//!
//! Without the `mpi` feature, or without `mpirun`, the cases say they are skipped and
//! why; with `DFKD_REQUIRE_MPI=1` (CI) a skip is a failure.

mod common;

use common::dp::{generator_grads, largest, student_grads, worst, Named};
use common::{randn, tiny};
use dfkd::pipeline::config::Config;
use dfkd::Tensor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfkd-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `mpirun`, when this build can use it; else `None` after saying why the case is
/// skipped (a failure under `DFKD_REQUIRE_MPI=1`).
fn mpirun() -> Option<PathBuf> {
    let why = if !cfg!(feature = "mpi") {
        "built without the `mpi` feature (cargo test --release --features mpi --test mpi)".to_string()
    } else {
        match std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("mpirun")).find(|f| f.is_file())) {
            Some(f) => return Some(f),
            None => "no mpirun on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)".to_string(),
        }
    };
    if std::env::var("DFKD_REQUIRE_MPI").is_ok_and(|v| v == "1") {
        panic!("DFKD_REQUIRE_MPI=1 but the MPI tests cannot run: {why}");
    }
    // straight to the process's stderr, past the test harness's capture: a skip shows
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{}: skipped: {why}\n", std::thread::current().name().unwrap_or("mpi")).as_bytes());
    None
}

/// `mpirun -n <n>` as these tests run it: as root in CI's container, more ranks than
/// cores (each rank yielding the core while it waits, one compute thread each), on
/// shared memory.
fn launcher(mpirun: &Path, n: usize) -> Command {
    let mut cmd = Command::new(mpirun);
    // --timeout: a hang fails the case (mpirun aborts the job) instead of stalling CI
    cmd.args(["-n", &n.to_string(), "--oversubscribe", "--bind-to", "none", "--timeout", "300"]);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd.env("OMPI_MCA_mpi_yield_when_idle", "1").env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    cmd.env("RAYON_NUM_THREADS", "1");
    cmd
}

/// Runs `task` on `n` ranks of this binary; each writes `rank<r>.json` into `out`.
fn run_task(mpirun: &Path, n: usize, task: &str, out: &Path) -> Vec<Vec<(String, Vec<u32>)>> {
    let mut cmd = launcher(mpirun, n);
    cmd.arg(std::env::current_exe().unwrap()).args(["--exact", "mpi_rank_entry", "--nocapture", "--test-threads", "1"]);
    cmd.env("DFKD_MPI_TASK", task).env("DFKD_MPI_OUT", out);
    let t0 = Instant::now();
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "mpirun -n {n} {task}: {}\n{}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("mpirun -n {n} {task}: {:.1}s", t0.elapsed().as_secs_f32());
    (0..n)
        .map(|r| {
            let text = std::fs::read_to_string(out.join(format!("rank{r}.json"))).unwrap_or_else(|e| panic!("{task}: rank {r} wrote no results: {e}"));
            serde_json::from_str(&text).unwrap()
        })
        .collect()
}

fn as_f32(named: &[(String, Vec<u32>)]) -> Named {
    named.iter().map(|(n, v)| (n.clone(), v.iter().map(|b| f32::from_bits(*b)).collect())).collect()
}

fn bits(named: Named) -> Vec<(String, Vec<u32>)> {
    named.into_iter().map(|(n, v)| (n, v.into_iter().map(f32::to_bits).collect())).collect()
}

/// What one result holds: `(case, named tensors)`.
fn case(results: &[(String, Vec<u32>)], prefix: &str) -> Vec<(String, Vec<u32>)> {
    results.iter().filter_map(|(n, v)| n.strip_prefix(prefix).map(|n| (n.to_string(), v.clone()))).collect()
}

type Grads = fn(&Config, &Tensor) -> Named;

/// The equivalence cases of tests/data_parallel.rs: student step, generator step with
/// and without the BN term, DAFL's generator step.
fn grad_cases() -> Vec<(&'static str, Config, Tensor, Grads)> {
    let mut cfg = tiny(Path::new("unused"));
    // each rank shifts and mirrors its share with its own draws (as there)
    cfg.distill.augment_shift = 0;
    let mut no_bn = cfg.clone();
    no_bn.distill.alpha = 0.0;
    let mut dafl = cfg.clone();
    dafl.distill.method = "dafl".parse().unwrap();
    let z = randn(&[8, cfg.generator.z_dim], 12);
    vec![
        ("student step (KD + MHAD + SFCL)", cfg.clone(), randn(&[8, 3, 16, 16], 11), student_grads as Grads),
        ("generator step (L_BN - KD)", cfg, z.clone(), generator_grads as Grads),
        ("generator step (KD only)", no_bn, z.clone(), generator_grads as Grads),
        ("generator step (DAFL)", dafl, z, generator_grads as Grads),
    ]
}

/// The config of the iteration and resume cases: a pool, so that the checkpoint holds
/// global batches each rank takes its rows of.
fn pooled() -> Config {
    let mut cfg = tiny(Path::new("unused"));
    cfg.distill.pool_batches = 2;
    cfg.parallel.bucket_mb = 0.01;
    cfg
}

/// One rank's side of the cases below, under `mpirun` (nothing to do otherwise).
#[test]
fn mpi_rank_entry() {
    let Ok(task) = std::env::var("DFKD_MPI_TASK") else { return };
    #[cfg(feature = "mpi")]
    rank::run(&task, Path::new(&std::env::var("DFKD_MPI_OUT").unwrap()));
    #[cfg(not(feature = "mpi"))]
    panic!("task {task}: built without the mpi feature");
}

#[cfg(feature = "mpi")]
mod rank {
    use super::*;
    use common::dp::{share, to_host};
    use dfkd::models::build;
    use dfkd::parallel::mpi::{abort_job, bootstrap_id};
    use dfkd::parallel::{Collective, MpiGroup};
    use dfkd::pipeline::checkpoint_dir::CheckpointDir;
    use dfkd::pipeline::distill::Distiller;
    use dfkd::rng::Rng;
    use dfkd::Device;
    use std::sync::Arc;

    fn distiller_state(d: &Distiller) -> Named {
        let mut out = to_host(d.named_state());
        for (i, t) in d.pool_shard().iter().enumerate() {
            out.push((format!("pool.{i}"), t.to_vec_f32().unwrap()));
        }
        out
    }

    /// `iterations` of `pooled()` on this process's rank, from a fresh start or from
    /// `ckpt`, saving a checkpoint at the end when `save`.
    fn iterate(resume: Option<&CheckpointDir>, iterations: usize, save: Option<&CheckpointDir>) -> dfkd::Result<Named> {
        let mut cfg = pooled();
        cfg.parallel.ranks = dfkd::parallel::current().map_or(1, |g| g.world());
        let t = build("resnet8", 10, true, &mut Rng::new(5))?;
        // another initialisation when resuming: everything must come from the checkpoint
        let s = build("resnet8", 10, true, &mut Rng::new(if resume.is_some() { 99 } else { 6 }))?;
        let mut d = Distiller::new(&cfg, t.as_ref(), s.as_ref(), Device::Cpu)?;
        if let Some(ckpt) = resume {
            d.resume(ckpt)?;
        }
        let mut losses = vec![];
        for _ in 0..iterations {
            let (g, s) = d.iterate()?;
            losses.extend(g.iter().chain(&s).map(|p| p.1));
        }
        if let Some(ckpt) = save {
            d.save_checkpoint(ckpt)?;
        }
        let mut out = distiller_state(&d);
        out.push(("losses".into(), losses));
        Ok(out)
    }

    pub fn run(task: &str, out: &Path) {
        let mpi = Arc::new(MpiGroup::init().unwrap());
        let (rank, world) = (mpi.rank(), mpi.world());
        let ckpt = CheckpointDir::new(&out.join("..").join("run"));
        let group: Arc<dyn Collective> = mpi.clone();
        let results = dfkd::parallel::run_process(
            group,
            |why| abort_job(rank, why),
            |rank| -> dfkd::Result<Named> {
                Ok(match task {
                    "grads" => {
                        let mut all = vec![];
                        for (what, cfg, input, grads) in grad_cases() {
                            for bucket_mb in [0.01, 25.0] {
                                let mut c = cfg.clone();
                                c.parallel.ranks = world;
                                c.parallel.bucket_mb = bucket_mb;
                                let g = grads(&c, &share(&input, rank, world));
                                all.extend(g.into_iter().map(|(n, v)| (format!("{what}/{bucket_mb}/{n}"), v)));
                            }
                        }
                        all
                    }
                    "iterate" => iterate(None, 4, None)?,
                    "save" => iterate(None, 2, Some(&ckpt))?,
                    "resume" => iterate(Some(&ckpt), 2, None)?,
                    "bootstrap" => {
                        let made: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
                        let id = bootstrap_id(&mpi, 128, || Ok(made.clone()))?;
                        let p = mpi.place();
                        vec![("id".into(), id.iter().map(|&b| b as f32).collect()), ("place".into(), vec![p.local_rank as f32, p.local_world as f32])]
                    }
                    "nccl" => {
                        // on a machine without a GPU (or NCCL) rank 0 fails making the id or
                        // opening cuda:0, and the job ends with its message
                        dfkd::parallel::NcclGroup::from_mpi(&mpi, mpi.place().local_rank)?;
                        vec![]
                    }
                    other => panic!("unknown task {other}"),
                })
            },
        )
        .unwrap();
        std::fs::write(out.join(format!("rank{rank}.json")), serde_json::to_string(&bits(results)).unwrap()).unwrap();
        drop(mpi);
    }
}

#[test]
fn steps_on_processes_equal_one_process_on_the_whole_batch() {
    let Some(mpirun) = mpirun() else { return };
    let cases = grad_cases();
    let singles: Vec<Named> = cases.iter().map(|(_, cfg, input, grads)| grads(cfg, input)).collect();
    for world in [2, 4] {
        let out = workdir(&format!("grads-{world}"));
        let ranks = run_task(&mpirun, world, "grads", &out);
        for ((what, ..), single) in cases.iter().zip(&singles) {
            let small = case(&ranks[0], &format!("{what}/0.01/"));
            assert!(!small.is_empty(), "{what}: no gradients from rank 0");
            for (r, got) in ranks.iter().enumerate() {
                assert_eq!(case(got, &format!("{what}/0.01/")), small, "{what}: rank {r} of {world} processes applies other gradients than rank 0");
            }
            assert_eq!(case(&ranks[0], &format!("{what}/25/")), small, "{what}, {world} processes: the bucket size changed the gradients");
            let (w, at) = worst(&as_f32(&small), single);
            eprintln!("{what}, {world} processes: worst {w:.2}x the tolerance at {at}; largest gradient {:.3}", largest(single));
            assert!(w <= 1.0, "{what}, {world} processes: {at} ({w:.1}x the tolerance)");
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn processes_stay_identical_and_a_checkpoint_of_n_resumes_on_m() {
    let Some(mpirun) = mpirun() else { return };
    let w = workdir("resume");
    let out = |name: &str| {
        let d = w.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let whole = run_task(&mpirun, 2, "iterate", &out("iterate"));
    let weights = |r: &[(String, Vec<u32>)]| r.iter().filter(|(n, _)| !n.starts_with("pool.")).cloned().collect::<Vec<_>>();
    assert!(weights(&whole[0]).len() > 40, "{} tensors", weights(&whole[0]).len());
    assert_eq!(weights(&whole[0]), weights(&whole[1]), "the 2 processes' weights and losses differ after 4 iterations");
    assert_ne!(case_pool(&whole[0]), case_pool(&whole[1]), "each process pools the images it synthesised");
    // the same 2 ranks as threads of one process: the same sums, the same bits
    let threads = dfkd::parallel::run_ranks(2, |_| Ok(thread_iterate(4))).unwrap();
    assert_eq!(weights(&bits(threads[0].clone())), weights(&whole[0]), "2 processes and 2 threads differ after 4 iterations");

    run_task(&mpirun, 2, "save", &out("save"));
    assert!(w.join("run/checkpoint/state.json").exists(), "rank 0 wrote the checkpoint");
    // 2 -> 2: the uninterrupted run, exactly
    let resumed = run_task(&mpirun, 2, "resume", &out("resume-2"));
    for r in 0..2 {
        let (got, want) = (weights(&resumed[r]), weights(&whole[r]));
        let losses = |v: &[(String, Vec<u32>)]| as_f32(&case(v, "losses")).remove(0).1;
        assert_eq!(losses(&resumed[r]), losses(&whole[r])[losses(&whole[r]).len() / 2..], "rank {r}: the losses after the checkpoint");
        assert_eq!(
            got.iter().filter(|(n, _)| n != "losses").collect::<Vec<_>>(),
            want.iter().filter(|(n, _)| n != "losses").collect::<Vec<_>>(),
            "rank {r}: the weights after 4 iterations"
        );
        assert_eq!(case_pool(&resumed[r]), case_pool(&whole[r]), "rank {r}'s pool after 4 iterations");
    }
    // 2 -> 4: every process takes its rows of each pooled batch, and the processes
    // agree with 4 threads resuming from the same checkpoint
    let four = run_task(&mpirun, 4, "resume", &out("resume-4"));
    for (r, got) in four.iter().enumerate() {
        assert_eq!(weights(got), weights(&four[0]), "rank {r} of 4 after resuming");
        for (i, (_, x)) in case_pool(got).iter().enumerate() {
            assert_eq!(x.len(), 2 * 3 * 16 * 16, "rank {r}'s rows of pooled batch {i}: 2 of 8 images");
        }
    }
    let ckpt = dfkd::pipeline::checkpoint_dir::CheckpointDir::new(&w.join("run"));
    let threads = dfkd::parallel::run_ranks(4, |_| Ok(thread_resume(&ckpt))).unwrap();
    // 4 ranks sum in another order on MPI than on threads: the student (SGD) and the
    // losses agree to rounding (the generator's Adam steps turn the rounding noise of
    // gradients that are mathematically zero, a bias ahead of a BatchNorm, into steps
    // of full size, so its weights are not compared)
    let pick = |named: Named| -> Named { named.into_iter().filter(|(n, _)| n.starts_with("student.") || n == "losses").collect() };
    let (got, want) = (pick(as_f32(&weights(&four[0]))), pick(threads[0].clone()));
    assert!(got.len() > 30, "{} student tensors", got.len());
    let (w4, at) = worst(&got, &want);
    eprintln!("2 -> 4 processes against 4 threads: the student and losses within {w4:.2}x the gradient tolerance (worst at {at})");
    assert!(w4 <= 1.0, "2 -> 4 processes against 4 threads: {at}");
    std::fs::remove_dir_all(&w).unwrap();
}

fn case_pool(r: &[(String, Vec<u32>)]) -> Vec<(String, Vec<u32>)> {
    r.iter().filter(|(n, _)| n.starts_with("pool.")).cloned().collect()
}

/// `pooled()` on a thread rank (as the process ranks run it), from scratch.
fn thread_iterate(iterations: usize) -> Named {
    let mut cfg = pooled();
    cfg.parallel.ranks = dfkd::parallel::current().unwrap().world();
    let (t, s) = common::dp::models();
    let mut d = dfkd::pipeline::distill::Distiller::new(&cfg, t.as_ref(), s.as_ref(), dfkd::Device::Cpu).unwrap();
    let mut losses = vec![];
    for _ in 0..iterations {
        let (g, s) = d.iterate().unwrap();
        losses.extend(g.iter().chain(&s).map(|p| p.1));
    }
    let mut out = common::dp::to_host(d.named_state());
    out.push(("losses".into(), losses));
    out
}

/// `pooled()` on a thread rank resumed from `ckpt`, 2 iterations.
fn thread_resume(ckpt: &dfkd::pipeline::checkpoint_dir::CheckpointDir) -> Named {
    let mut cfg = pooled();
    cfg.parallel.ranks = dfkd::parallel::current().unwrap().world();
    let t = dfkd::models::build("resnet8", 10, true, &mut dfkd::rng::Rng::new(5)).unwrap();
    let s = dfkd::models::build("resnet8", 10, true, &mut dfkd::rng::Rng::new(99)).unwrap();
    let mut d = dfkd::pipeline::distill::Distiller::new(&cfg, t.as_ref(), s.as_ref(), dfkd::Device::Cpu).unwrap();
    d.resume(ckpt).unwrap();
    let mut losses = vec![];
    for _ in 0..2 {
        let (g, s) = d.iterate().unwrap();
        losses.extend(g.iter().chain(&s).map(|p| p.1));
    }
    let mut out = common::dp::to_host(d.named_state());
    out.push(("losses".into(), losses));
    out
}

#[test]
fn nccl_is_bootstrapped_with_rank_0s_id_on_every_process() {
    let Some(mpirun) = mpirun() else { return };
    let out = workdir("bootstrap");
    let ranks = run_task(&mpirun, 4, "bootstrap", &out);
    let want: Vec<f32> = (0..128u32).map(|i| ((i * 7 + 3) as u8) as f32).collect();
    for (r, got) in ranks.iter().enumerate() {
        let got = as_f32(got);
        assert_eq!(got[0].1, want, "rank {r} received another id than rank 0 made");
        // one machine: the local rank (the GPU a rank takes) is the rank
        assert_eq!(got[1].1, vec![r as f32, 4.0], "rank {r}'s place on its machine");
    }
    // up to the NCCL call: with no GPU here, rank 0 fails there and the job ends with its message
    let mut cmd = launcher(&mpirun, 2);
    cmd.arg(std::env::current_exe().unwrap()).args(["--exact", "mpi_rank_entry", "--nocapture", "--test-threads", "1"]);
    cmd.env("DFKD_MPI_TASK", "nccl").env("DFKD_MPI_OUT", &out);
    let (o, took) = timed(cmd);
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        eprintln!("note: NCCL initialised across the 2 processes (a GPU and NCCL are present)");
    } else {
        // rank 0 without NCCL or a GPU; rank 1 where only cuda:0 exists
        let line = err.lines().find(|l| l.starts_with("dfkd: rank ") && l.contains(" failed: "));
        let line = line.unwrap_or_else(|| panic!("the failing NCCL bootstrap names its rank:\n{err}"));
        assert!(took < 60.0, "the job took {took:.1}s to stop");
        eprintln!("NCCL bootstrap without a GPU: the job stopped in {took:.1}s: {line}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

fn timed(mut cmd: Command) -> (Output, f32) {
    let t0 = Instant::now();
    let o = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap();
    (o, t0.elapsed().as_secs_f32())
}

/// The `distill --mpi` job of `tiny()` in `work`, as `mpirun -n <n>` launches it.
fn distill_job(mpirun: &Path, n: usize, config: &Path, work: &Path, extra: &[&str]) -> Command {
    let mut cmd = launcher(mpirun, n);
    cmd.arg(env!("CARGO_BIN_EXE_distill")).args(["distill", "--mpi", "--config"]).arg(config).arg("--workdir").arg(work).args(["--run", "run"]).args(extra);
    cmd
}

fn write_config(work: &Path, name: &str, cfg: &Config) -> PathBuf {
    let path = work.join(name);
    std::fs::write(&path, cfg.to_toml()).unwrap();
    path
}

#[test]
fn a_job_of_processes_writes_once_and_refuses_mismatched_configs() {
    let Some(mpirun) = mpirun() else { return };
    let w = workdir("job");
    let cfg = tiny(&w);
    let config = write_config(&w, "tiny.toml", &cfg);
    let (o, took) = timed(distill_job(&mpirun, 2, &config, &w, &[]));
    assert!(o.status.success(), "mpirun -n 2 distill --mpi: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    eprintln!("the 2-process job took {took:.1}s");
    let run = w.join("run");
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"distill\"")).count(), 4, "one record per iteration, from rank 0 only");
    assert_eq!(log.lines().filter(|l| l.contains("\"final\"")).count(), 1, "one final record");
    for f in ["student.safetensors", "checkpoint/state.json", "checkpoint/generator.safetensors", "images/iter000004.png"] {
        assert!(run.join(f).exists(), "{f} missing");
    }

    // rank 1 started with another seed: refused at start, naming it
    let mut other = cfg.clone();
    other.seed += 1;
    let other = write_config(&w, "other.toml", &other);
    let mut cmd = launcher(&mpirun, 1);
    cmd.arg(env!("CARGO_BIN_EXE_distill")).args(["distill", "--mpi", "--config"]).arg(&config).arg("--workdir").arg(&w).args(["--run", "mismatch"]);
    cmd.args([":", "-n", "1"])
        .arg(env!("CARGO_BIN_EXE_distill"))
        .args(["distill", "--mpi", "--config"])
        .arg(&other)
        .arg("--workdir")
        .arg(&w)
        .args(["--run", "mismatch"]);
    let (o, took) = timed(cmd);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mismatched configs must be refused:\n{err}");
    assert!(err.contains("rank 1's config and run options differ from rank 0's"), "the refusal names the rank:\n{err}");
    assert!(!w.join("mismatch").exists(), "refused before anything is written");
    eprintln!("mismatched configs refused in {took:.1}s");
    std::fs::remove_dir_all(&w).unwrap();
}

/// The iteration of the run's checkpoint in `work`, once one is complete.
fn checkpoint_iteration(work: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(work.join("run/checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["iteration"].as_u64()
}

/// Child processes of `pid` (the ranks `mpirun` started).
fn children(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // the fields after the command's closing parenthesis: state, ppid, ...
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_failing_or_killed_rank_stops_the_job_which_resumes_from_its_last_checkpoint_on_other_counts() {
    let Some(mpirun) = mpirun() else { return };
    let w = workdir("faults");
    let mut cfg = tiny(&w);
    cfg.distill.epochs = 10; // 20 iterations: long enough to kill it mid-run
    cfg.distill.eval_every = 0;
    let config = write_config(&w, "tiny.toml", &cfg);

    // an error on rank 1 after its 3rd iteration: the job ends at once, with its message
    let mut cmd = distill_job(&mpirun, 2, &config, &w, &[]);
    cmd.env("DFKD_FAILPOINT", "rank1-iteration:3");
    let (o, took) = timed(cmd);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a failing rank fails the job:\n{err}");
    assert!(err.contains("dfkd: rank 1 failed: failpoint: rank 1 fails after iteration 3"), "the job ends with rank 1's message:\n{err}");
    assert!(took < 60.0, "the job took {took:.1}s to stop");
    eprintln!("a failing rank stopped the job in {took:.1}s");
    assert_eq!(checkpoint_iteration(&w), Some(2), "the last checkpoint (iteration 2) stays");

    // resumed on 2, then kill -9 of rank 1 once a later checkpoint is written
    let mut cmd = distill_job(&mpirun, 2, &config, &w, &["--resume"]);
    let mut job = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while checkpoint_iteration(&w).is_none_or(|it| it < 6) {
        assert!(t0.elapsed() < Duration::from_secs(300), "the resumed job reached no checkpoint after iteration 2");
        assert!(job.try_wait().unwrap().is_none(), "the resumed job ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ranks = children(job.id());
    assert_eq!(ranks.len(), 2, "mpirun's children: {ranks:?}");
    let victim = *ranks.iter().max().unwrap();
    let killed = Instant::now();
    // SAFETY: a signal to a process of this test's own job
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0, "kill -9 {victim}");
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "the job still runs 60 s after a rank was killed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed().as_secs_f32();
    let mut err = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "a killed rank fails the job:\n{err}");
    assert!(err.contains("signal 9") || err.contains("Killed"), "mpirun names the killed rank:\n{err}");
    eprintln!("kill -9 of a rank stopped the job in {took:.1}s: {}", err.lines().find(|l| l.contains("signal 9") || l.contains("Killed")).unwrap_or(""));

    // the last checkpoint is good: 4 processes resume from it and finish the run
    let at = checkpoint_iteration(&w).expect("a checkpoint");
    assert!(at >= 6, "the checkpoint at {at}");
    let (o, took) = timed(distill_job(&mpirun, 4, &config, &w, &["--resume"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "4 processes resume the checkpoint of 2:\n{err}");
    assert!(err.contains(&format!("resumed from iteration {at}")), "{err}");
    let log = std::fs::read_to_string(w.join("run/metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"distill\"")).count(), 20, "every iteration's record once, after the resumes");
    assert!(w.join("run/student.safetensors").exists());
    eprintln!("4 processes resumed and finished in {took:.1}s: {}", err.lines().find(|l| l.contains("resumed from")).unwrap());
    std::fs::remove_dir_all(&w).unwrap();
}
