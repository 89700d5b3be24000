//! Data parallelism on the in-process collective (`parallel::ThreadGroup`): one step
//! on N ranks, each given its share of a batch, applies the gradients one process
//! computes on the whole batch; ranks stay identical over many steps; a run with
//! ranks writes its outputs once and resumes exactly.
//!
//! Tolerance: each gradient agrees to 2e-3 relative plus an absolute 1e-5 of the
//! step's largest gradient (a bias ahead of a BatchNorm has a gradient that is
//! mathematically zero, so it is rounding noise of that scale on both sides). The ranks sum in a
//! different order than one process (per-rank partial sums, then across ranks; the
//! synchronised BatchNorm is composed of ops where one process uses the fused kernel),
//! so they agree to rounding, not bitwise; a missing synchronisation (local BN
//! statistics or local negatives) is off by far more, as the last case shows.

mod common;

use common::{randn, tiny};
use dfkd::commands::job::{self, RunOptions};
use dfkd::models::{build, Classifier};
use dfkd::parallel::run_ranks;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::{Device, Tensor};
use std::path::PathBuf;

type Named = Vec<(String, Vec<f32>)>;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfkd-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A teacher and a student, the same on every rank.
fn models() -> (Box<dyn Classifier>, Box<dyn Classifier>) {
    (build("resnet8", 10, true, &mut Rng::new(5)).unwrap(), build("resnet8", 10, true, &mut Rng::new(6)).unwrap())
}

fn to_host(named: Vec<(String, Tensor)>) -> Named {
    named.into_iter().map(|(n, t)| (n, t.to_vec_f32().unwrap())).collect()
}

/// This rank's rows of a batch split evenly over `world` ranks.
fn share(x: &Tensor, rank: usize, world: usize) -> Tensor {
    let n = x.dims()[0] / world;
    x.narrow(0, rank * n, n).unwrap().contiguous().unwrap()
}

fn student_grads(cfg: &Config, x: &Tensor) -> Named {
    let (t, s) = models();
    let mut d = Distiller::new(cfg, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    to_host(d.student_step_gradients(x).unwrap())
}

fn generator_grads(cfg: &Config, z: &Tensor) -> Named {
    let (t, s) = models();
    let mut d = Distiller::new(cfg, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    to_host(d.generator_step_gradients(z).unwrap())
}

fn largest(named: &Named) -> f32 { named.iter().flat_map(|(_, g)| g.iter()).fold(0f32, |m, v| m.max(v.abs())) }

/// The largest violation of the tolerance over every gradient, as a multiple of it
/// (<= 1 passes), and where.
fn worst(got: &Named, want: &Named) -> (f32, String) {
    let abs = 1e-5 * largest(want);
    assert_eq!(got.iter().map(|g| &g.0).collect::<Vec<_>>(), want.iter().map(|g| &g.0).collect::<Vec<_>>(), "the same parameters get gradients");
    let mut worst = (0.0f32, String::new());
    for ((name, g), (_, w)) in got.iter().zip(want) {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let r = (a - b).abs() / (abs + 2e-3 * b.abs());
            if !(r <= worst.0) {
                worst = (r, format!("{name}[{i}]: {a} vs {b}"));
            }
        }
    }
    worst
}

/// Runs `grads` on one process with the whole batch and on 2 and 4 ranks with shares.
fn check_equivalence(cfg: &Config, batch: &Tensor, grads: fn(&Config, &Tensor) -> Named, what: &str) {
    let single = grads(cfg, batch);
    assert!(single.iter().any(|(_, g)| g.iter().any(|v| *v != 0.0)), "{what}: the reference gradients are not all zero");
    for world in [2, 4] {
        let mut c = cfg.clone();
        c.parallel.ranks = world;
        let ranks = run_ranks(world, |rank| Ok(grads(&c, &share(batch, rank, world)))).unwrap();
        for (rank, got) in ranks.iter().enumerate() {
            assert_eq!(got, &ranks[0], "{what}: rank {rank} of {world} applies other gradients than rank 0");
        }
        let (w, at) = worst(&ranks[0], &single);
        eprintln!("{what}, {world} ranks: worst {w:.2}x the tolerance at {at}; largest gradient {:.3}", largest(&single));
        assert!(w <= 1.0, "{what}, {world} ranks: {at} ({w:.1}x the tolerance)");
    }
}

#[test]
fn a_student_step_on_ranks_equals_one_process_on_the_whole_batch() {
    let cfg = tiny(&workdir("unused"));
    let x = randn(&[8, 3, 16, 16], 11);
    // MHAD, SFCL with global negatives, and the student's BatchNorm in training mode
    check_equivalence(&cfg, &x, student_grads, "student step (KD + MHAD + SFCL)");
}

#[test]
fn a_generator_step_on_ranks_equals_one_process_with_and_without_the_bn_term() {
    let mut cfg = tiny(&workdir("unused"));
    let z = randn(&[8, cfg.generator.z_dim], 12);
    check_equivalence(&cfg, &z, generator_grads, "generator step (L_BN - KD)");
    cfg.distill.alpha = 0.0;
    check_equivalence(&cfg, &z, generator_grads, "generator step (KD only)");
    // DAFL's class-balance term is a batch statistic too
    cfg.distill.method = "dafl".into();
    check_equivalence(&cfg, &z, generator_grads, "generator step (DAFL)");
}

#[test]
fn local_negatives_are_a_different_loss() {
    // the switch is real: with each rank contrasting only its own share, the step is
    // not the one-process step (so the equivalence above is not vacuous)
    let mut cfg = tiny(&workdir("unused"));
    cfg.parallel.global_negatives = false;
    cfg.distill.mhad = false;
    let x = randn(&[8, 3, 16, 16], 11);
    let single = student_grads(&cfg, &x);
    cfg.parallel.ranks = 2;
    let ranks = run_ranks(2, |rank| Ok(student_grads(&cfg, &share(&x, rank, 2)))).unwrap();
    let (w, at) = worst(&ranks[0], &single);
    assert!(w > 10.0, "local negatives should change the SFCL gradients, largest difference {at}");
}

#[test]
fn ranks_stay_identical_over_many_iterations() {
    let mut cfg = tiny(&workdir("unused"));
    cfg.parallel.ranks = 2;
    ranks_stay_identical(&cfg);
    // with each rank's own BatchNorm statistics, rank 0's running ones are kept
    cfg.parallel.sync_batch_norm = false;
    ranks_stay_identical(&cfg);
}

fn ranks_stay_identical(cfg: &Config) {
    let states = run_ranks(2, |_| {
        let (t, s) = models();
        let mut d = Distiller::new(cfg, t.as_ref(), s.as_ref(), Device::Cpu)?;
        for _ in 0..4 {
            d.iterate()?;
        }
        Ok(to_host(d.named_state()))
    })
    .unwrap();
    assert!(states[0].len() > 50);
    for ((name, a), (_, b)) in states[0].iter().zip(&states[1]) {
        assert_eq!(a, b, "{name} differs between the ranks after 4 iterations (sync_batch_norm = {})", cfg.parallel.sync_batch_norm);
    }
}

#[test]
fn a_data_parallel_job_writes_its_outputs_once() {
    let w = workdir("job");
    let mut cfg = tiny(&w);
    cfg.parallel.ranks = 2;
    let run_dir = w.join("run");
    let s = job::run_job(&cfg, Device::Cpu, &RunOptions { run_dir: run_dir.clone(), resume: false, overwrite: false }).unwrap();
    assert!((0.0..=100.0).contains(&s.student_top1));
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"distill\"")).count(), 4, "one record per iteration, from rank 0 only");
    for f in ["student.safetensors", "checkpoint/state.json", "checkpoint/generator.safetensors", "images/iter000004.png"] {
        assert!(run_dir.join(f).exists(), "{f} missing");
    }
    std::fs::remove_dir_all(&w).unwrap();
}

#[test]
fn a_resumed_data_parallel_run_continues_exactly_and_may_change_its_rank_count() {
    let w = workdir("resume");
    let mut cfg = tiny(&w);
    cfg.parallel.ranks = 2;
    let ckpt = dfkd::pipeline::checkpoint_dir::CheckpointDir::new(&w.join("run"));
    // each rank: `before` iterations (then rank 0 checkpoints), or resume and run `after`
    let ranks = |world: usize, student_seed: u64, resume: bool, iterations: usize, save: bool| {
        let mut c = cfg.clone();
        c.parallel.ranks = world;
        run_ranks(world, |rank| {
            let t = build("resnet8", 10, true, &mut Rng::new(5))?;
            let s = build("resnet8", 10, true, &mut Rng::new(student_seed))?;
            let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu)?;
            if resume {
                d.resume(&ckpt)?;
            }
            let losses: Vec<String> = (0..iterations).map(|_| d.iterate().map(|l| format!("{l:?}"))).collect::<dfkd::Result<_>>()?;
            if save && rank == 0 {
                d.save_checkpoint(&ckpt)?;
            }
            Ok((losses, to_host(d.named_state())))
        })
        .unwrap()
    };
    let whole = ranks(2, 6, false, 4, false);
    ranks(2, 6, false, 2, true);
    // a different initialisation: everything must come from the checkpoint
    let resumed = ranks(2, 99, true, 2, false);
    assert_eq!(resumed[0].0, whole[0].0[2..], "the losses after the checkpoint");
    assert_eq!(resumed[1].1, whole[0].1, "the weights after 4 iterations");
    // N may change on resume: the noise of each rank is tied to its rank and the iteration
    let four = ranks(4, 99, true, 1, false);
    assert_eq!(four.len(), 4);
    std::fs::remove_dir_all(&w).unwrap();
}

/// NCCL through cudarc, when a GPU opens (skipped otherwise, with a note): one rank
/// checks the binding, the collectives returning their input (all-gather: once).
#[test]
fn nccl_binding_on_a_gpu() {
    let Some(ordinal) = common::cuda_devices().into_iter().find_map(|d| if let Device::Cuda(n) = d { Some(n) } else { None }) else {
        eprintln!("note: no GPU: the NCCL case is skipped");
        return;
    };
    if !dfkd::backend::cuda::nccl::nccl_present() {
        panic!("a GPU opened but libnccl.so.2 did not load: data parallelism on GPUs needs it");
    }
    let groups = dfkd::parallel::NcclGroup::new(&[ordinal]).unwrap();
    let g: &dyn dfkd::parallel::Collective = &groups[0];
    let x = randn(&[3, 5], 13);
    let on_gpu = x.to_device(Device::Cuda(ordinal)).unwrap();
    for (what, got) in [("all-reduce", g.all_reduce_sum(&on_gpu)), ("broadcast", g.broadcast(&on_gpu, 0)), ("all-gather", g.all_gather(&on_gpu))] {
        let got = got.unwrap_or_else(|e| panic!("NCCL {what}: {e}"));
        assert_eq!(got.dims(), x.dims(), "{what}");
        assert_eq!(got.to_vec_f32().unwrap(), x.to_vec_f32().unwrap(), "{what} on one rank returns its input");
    }
}

#[test]
fn a_rank_that_fails_mid_run_stops_the_others_with_its_message() {
    let mut cfg = tiny(&workdir("unused"));
    cfg.parallel.ranks = 2;
    let err = run_ranks(2, |rank| {
        let (t, s) = models();
        let mut d = Distiller::new(&cfg, t.as_ref(), s.as_ref(), Device::Cpu)?;
        d.iterate()?;
        if rank == 1 {
            return Err(dfkd::Error::Msg("rank 1 lost its GPU".into()));
        }
        // rank 0 goes on into collectives that rank 1 never joins
        for _ in 0..3 {
            d.iterate()?;
        }
        Ok(())
    })
    .err()
    .expect("a failed rank fails the run")
    .to_string();
    assert_eq!(err, "rank 1 lost its GPU");
}

/// What three iterations of a one-process pooled run give: each loss of each
/// iteration, then the squared size of the student's whole update (the third
/// iteration's student steps draw from a pool in which a batch was replaced).
fn pooled_fingerprint(method: &str) -> Vec<f32> {
    let mut cfg = tiny(&workdir("unused"));
    cfg.distill.method = method.into();
    cfg.distill.pool_batches = 2;
    let (t, s) = models();
    let mut d = Distiller::new(&cfg, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    let before = to_host(d.named_state());
    let mut out = vec![];
    for _ in 0..3 {
        let (g, s) = d.iterate().unwrap();
        out.extend(g.iter().chain(&s).map(|p| p.1));
    }
    let moved: f64 = before.iter().zip(to_host(d.named_state())).flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (*x as f64 - y as f64).powi(2)).collect::<Vec<_>>()).sum();
    out.push(moved as f32);
    out
}

/// Pools are shared across ranks without changing one process's run: the numbers are
/// what main computed before (commit dd55fbf, on the CPU). Any change to what one
/// process draws, keeps or replaces moves the losses by far more than the tolerance,
/// which only allows for another CPU's rounding.
#[test]
fn one_process_pooled_runs_are_unchanged() {
    let want: [(&str, &[f32]); 2] = [
        ("dfkd-fgvc", &[66.11742, 0.10216025, 2.2756748, 0.10333829, 0.13537471, 3.569577, 65.87516, 0.094910815, 2.274797, 0.09476352,
                        0.13618171, 2.4501677, 64.85203, 0.08654008, 2.2770472, 0.08366348, 0.13488635, 2.0591128, 4095.2905]),
        ("deepinversion", &[65.444626, 2.4623694, 0.01073098, 0.09089278, 65.25956, 2.3020196, 0.010944549, 0.08169904, 65.43257, 2.0829563,
                            0.010873445, 0.072747566, 32.187923]),
    ];
    for (method, want) in want {
        let got = pooled_fingerprint(method);
        eprintln!("{method}: {got:?}");
        common::assert_close(&got, want, 0.0, 1e-5, &format!("{method}, one process, pool of 2: losses and the update's size"));
    }
}
