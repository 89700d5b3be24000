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

use common::dp::{generator_grads, largest, models, share, student_grads, to_host, worst, Named};
use common::{randn, tiny};
use dfkd::checkpoint::load_tensors;
use dfkd::commands::job::{self, RunOptions};
use dfkd::models::build;
use dfkd::parallel::run_ranks;
use dfkd::pipeline::checkpoint_dir::CheckpointDir;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::{Device, Tensor};
use std::path::PathBuf;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfkd-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs `grads` on one process with the whole batch and on 2 and 4 ranks with shares.
fn check_equivalence(cfg: &Config, batch: &Tensor, grads: fn(&Config, &Tensor) -> Named, what: &str) {
    // each rank shifts and mirrors its share with its own draws, so the images match
    // one process's only unaugmented; what is compared here is the reductions
    let mut cfg = cfg.clone();
    cfg.distill.augment_shift = 0;
    let cfg = &cfg;
    let single = grads(cfg, batch);
    assert!(single.iter().any(|(_, g)| g.iter().any(|v| *v != 0.0)), "{what}: the reference gradients are not all zero");
    for world in [2, 4] {
        let mut c = cfg.clone();
        c.parallel.ranks = world;
        // 10 KB buckets: many, each started during the backward pass
        c.parallel.bucket_mb = 0.01;
        let ranks = run_ranks(world, |rank| Ok(grads(&c, &share(batch, rank, world)))).unwrap();
        for (rank, got) in ranks.iter().enumerate() {
            assert_eq!(got, &ranks[0], "{what}: rank {rank} of {world} applies other gradients than rank 0");
        }
        // one bucket, started once the backward pass is over: the same bits
        c.parallel.bucket_mb = 25.0;
        let one_bucket = run_ranks(world, |rank| Ok(grads(&c, &share(batch, rank, world)))).unwrap();
        assert_eq!(one_bucket[0], ranks[0], "{what}, {world} ranks: the bucket size changed the gradients");
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
    cfg.distill.method = "dafl".parse().unwrap();
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
    cfg.parallel.bucket_mb = 0.01;
    ranks_stay_identical(&cfg);
    // with each rank's own BatchNorm statistics, rank 0's running ones are kept
    cfg.parallel.sync_batch_norm = false;
    ranks_stay_identical(&cfg);
}

#[test]
fn the_stateful_methods_keep_their_ranks_identical() {
    // MAD's moving average, CMI's head and memory bank (of the global batch's keys),
    // ZSKD's student trained on sharded impressions, the real-data ceiling's on shares
    // of the real batches
    for method in ["mad", "cmi", "zskd", "real-kd"] {
        let mut cfg = tiny(&workdir(&format!("stateful-{method}")));
        cfg.parallel.ranks = 2;
        cfg.distill.method = method.parse().unwrap();
        // the data set is made before the ranks start, as the job does
        dfkd::pipeline::data_set::open(&cfg).unwrap();
        ranks_stay_identical(&cfg);
        let _ = std::fs::remove_dir_all(&cfg.workdir);
    }
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
    assert!(states[0].len() > 40, "{} names {} tensors", cfg.distill.method, states[0].len());
    for ((name, a), (_, b)) in states[0].iter().zip(&states[1]) {
        assert_eq!(a, b, "{}: {name} differs between the ranks after 4 iterations (sync_batch_norm = {})", cfg.distill.method, cfg.parallel.sync_batch_norm);
    }
}

#[test]
fn a_data_parallel_job_writes_its_outputs_once() {
    let w = workdir("job");
    let mut cfg = tiny(&w);
    cfg.parallel.ranks = 2;
    // DeepInversion pools: every rank takes part in the checkpoints rank 0 writes
    for (method, state) in [("dfkd-fgvc", "checkpoint/generator.safetensors"), ("deepinversion", "checkpoint/pool.safetensors")] {
        cfg.distill.method = method.parse().unwrap();
        let run_dir = w.join(method);
        let s = job::run_job(&cfg, Device::Cpu, &RunOptions { run_dir: run_dir.clone(), resume: false, overwrite: false }).unwrap();
        assert!((0.0..=100.0).contains(&s.student_top1));
        let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        assert_eq!(log.lines().filter(|l| l.contains("\"distill\"")).count(), 4, "{method}: one record per iteration, from rank 0 only");
        for f in ["student.safetensors", "checkpoint/state.json", state, "images/iter000004.png"] {
            assert!(run_dir.join(f).exists(), "{method}: {f} missing");
        }
    }
    let pool = load_tensors(w.join("deepinversion/checkpoint/pool.safetensors")).unwrap();
    assert_eq!(pool.len(), 4, "one inverted batch an iteration");
    assert!(pool.iter().all(|(_, t)| t.dims() == [8, 3, 16, 16]), "the pool is saved as global batches");
    std::fs::remove_dir_all(&w).unwrap();
}

/// What a rank hands back: its losses of each iteration, its weights, and its rows of
/// each pooled batch (shape and values).
struct RankRun {
    losses: Vec<String>,
    state: Named,
    pool: Vec<(Vec<usize>, Vec<f32>)>,
}

fn host_pool(d: &Distiller) -> Vec<(Vec<usize>, Vec<f32>)> {
    d.pool_shard().iter().map(|t| (t.dims().to_vec(), t.to_vec_f32().unwrap())).collect()
}

/// `world` ranks of `cfg` (the student initialised from `student_seed`), each resuming
/// from `ckpt` when `resume`, running `iterations` and then, when `save`, taking part in
/// a checkpoint (rank 0 writes it).
fn on_ranks(cfg: &Config, ckpt: &CheckpointDir, world: usize, student_seed: u64, resume: bool, iterations: usize, save: bool) -> Vec<RankRun> {
    let mut c = cfg.clone();
    c.parallel.ranks = world;
    run_ranks(world, |_| {
        let t = build("resnet8", 10, true, &mut Rng::new(5))?;
        let s = build("resnet8", 10, true, &mut Rng::new(student_seed))?;
        let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu)?;
        if resume {
            d.resume(ckpt)?;
        }
        let losses: Vec<String> = (0..iterations).map(|_| d.iterate().map(|l| format!("{l:?}"))).collect::<dfkd::Result<_>>()?;
        if save {
            d.save_checkpoint(ckpt)?;
        }
        Ok(RankRun { losses, state: to_host(d.named_state()), pool: host_pool(&d) })
    })
    .unwrap()
}

#[test]
fn a_resumed_data_parallel_run_continues_exactly_and_may_change_its_rank_count() {
    let w = workdir("resume");
    let cfg = tiny(&w);
    let ckpt = CheckpointDir::new(&w.join("run"));
    let whole = on_ranks(&cfg, &ckpt, 2, 6, false, 4, false);
    on_ranks(&cfg, &ckpt, 2, 6, false, 2, true);
    // a different initialisation: everything must come from the checkpoint
    let resumed = on_ranks(&cfg, &ckpt, 2, 99, true, 2, false);
    assert_eq!(resumed[0].losses, whole[0].losses[2..], "the losses after the checkpoint");
    assert_eq!(resumed[1].state, whole[0].state, "the weights after 4 iterations");
    // N may change on resume: the noise of each rank is tied to its rank and the iteration
    let four = on_ranks(&cfg, &ckpt, 4, 99, true, 1, false);
    assert_eq!(four.len(), 4);
    std::fs::remove_dir_all(&w).unwrap();
}

/// Runs `iterations` of `cfg` on 2 ranks, each reporting after every iteration which
/// slots of its pool changed, and at the end its weights and rows of the pool.
fn pooled_ranks(cfg: &Config, iterations: usize) -> Vec<(Vec<Vec<usize>>, RankRun)> {
    let mut c = cfg.clone();
    c.parallel.ranks = 2;
    run_ranks(2, |_| {
        let (t, s) = models();
        let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu)?;
        let mut changed = vec![];
        let mut before = host_pool(&d);
        for _ in 0..iterations {
            d.iterate()?;
            let now = host_pool(&d);
            changed.push((0..now.len()).filter(|&i| before.get(i) != Some(&now[i])).collect());
            before = now;
        }
        Ok((changed, RankRun { losses: vec![], state: to_host(d.named_state()), pool: before }))
    })
    .unwrap()
}

/// A pooled run on 2 ranks: the weights stay identical, each rank keeps its own rows
/// of every pooled batch (the 4 of 8 images it synthesised), and the ranks replace the
/// same pooled batch at the same time, so that slot i of every rank is one global batch.
fn pooled_ranks_agree(cfg: &Config, iterations: usize, capacity: usize) {
    let what = &cfg.distill.method;
    let ranks = pooled_ranks(cfg, iterations);
    let (changed, last) = (&ranks[0].0, &ranks[0].1);
    // the student's tensors (about 40); with the generator and MHAD/SFCL, many more
    assert!(last.state.len() > 30, "{what}: {} tensors", last.state.len());
    for ((name, a), (_, b)) in last.state.iter().zip(&ranks[1].1.state) {
        assert_eq!(a, b, "{what}: {name} differs between the ranks after {iterations} iterations");
    }
    assert_eq!(changed, &ranks[1].0, "{what}: the ranks replaced different pooled batches");
    let replaced: Vec<usize> = changed[capacity..]
        .iter()
        .map(|c| {
            assert_eq!(c.len(), 1, "{what}: one batch a step");
            c[0]
        })
        .collect();
    assert!(replaced.len() >= 4 && replaced.iter().any(|&i| i != replaced[0]), "{what}: replacements exercised: {replaced:?}");
    assert_eq!(last.pool.len(), capacity);
    for (slot, ((dims, a), (_, b))) in last.pool.iter().zip(&ranks[1].1.pool).enumerate() {
        assert_eq!(dims, &[4, 3, 16, 16], "{what}: a rank's rows of a pooled batch of 8");
        assert_ne!(a, b, "{what}: slot {slot}: each rank pools the images it synthesised");
    }
}

#[test]
fn pooled_ranks_stay_identical_and_replace_the_same_batches() {
    let mut cfg = tiny(&workdir("unused"));
    cfg.distill.pool_batches = 3;
    pooled_ranks_agree(&cfg, 10, 3);
}

#[test]
fn deepinversion_ranks_stay_identical_and_replace_the_same_batches() {
    let mut cfg = tiny(&workdir("unused"));
    cfg.distill.method = "deepinversion".parse().unwrap();
    cfg.distill.pool_batches = 2;
    pooled_ranks_agree(&cfg, 7, 2);
}

#[test]
fn a_pooled_checkpoint_holds_global_batches_and_resumes_on_any_rank_count() {
    let w = workdir("resume-pool");
    let mut cfg = tiny(&w);
    cfg.distill.pool_batches = 2; // full at the checkpoint: the resumed iterations replace
    let ckpt = CheckpointDir::new(&w.join("run"));
    let whole = on_ranks(&cfg, &ckpt, 2, 6, false, 4, false);
    let saved = on_ranks(&cfg, &ckpt, 2, 6, false, 2, true);

    // the file holds global batches: the ranks' rows, in rank order
    let mut file = load_tensors(w.join("run/checkpoint/pool.safetensors")).unwrap();
    file.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(file.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["0", "1"]);
    let global: Vec<Vec<f32>> = file.iter().map(|(_, t)| t.to_vec_f32().unwrap()).collect();
    for (i, (_, t)) in file.iter().enumerate() {
        assert_eq!(t.dims(), [8, 3, 16, 16], "pooled batch {i}: a global batch");
        assert_eq!(global[i], [saved[0].pool[i].1.clone(), saved[1].pool[i].1.clone()].concat(), "pooled batch {i}: rank 0's rows, then rank 1's");
    }

    // 2 ranks again: exactly the uninterrupted run (a different initialisation: all
    // must come from the checkpoint)
    let resumed = on_ranks(&cfg, &ckpt, 2, 99, true, 2, false);
    assert_eq!(resumed[0].losses, whole[0].losses[2..], "the losses after the checkpoint");
    for r in 0..2 {
        assert_eq!(resumed[r].state, whole[r].state, "rank {r}'s weights after 4 iterations");
        assert_eq!(resumed[r].pool, whole[r].pool, "rank {r}'s pool after 4 iterations");
    }

    // 1 rank or 4: each takes its rows of every global batch, and runs on
    for world in [1, 4] {
        let rows = 8 / world;
        for (r, run) in on_ranks(&cfg, &ckpt, world, 99, true, 0, false).iter().enumerate() {
            for (i, (dims, x)) in run.pool.iter().enumerate() {
                assert_eq!(dims, &[rows, 3, 16, 16]);
                let per_row = x.len() / rows;
                assert_eq!(x[..], global[i][r * rows * per_row..(r + 1) * rows * per_row], "{world} ranks: rank {r}'s rows of pooled batch {i}");
            }
        }
        let runs = on_ranks(&cfg, &ckpt, world, 99, true, 2, false);
        assert!(runs.iter().all(|r| r.state == runs[0].state && r.pool.len() == 2), "{world} ranks after resuming");
        assert!(runs[0].losses.iter().all(|l| !l.contains("NaN") && !l.contains("inf")), "{world} ranks: {:?}", runs[0].losses);
        assert_ne!(runs[0].state, whole[0].state, "{world} ranks draw other noise than 2");
    }
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
    // a started all-reduce on NCCL's own stream, with kernels queued meanwhile on the
    // device's stream, and one dropped unwaited
    let started = g.start_all_reduce_sum(&on_gpu);
    let meanwhile = on_gpu.scale(2.0).unwrap().add(&on_gpu).unwrap();
    drop(g.start_all_reduce_sum(&meanwhile));
    let sum = started.wait().unwrap_or_else(|e| panic!("NCCL started all-reduce: {e}"));
    assert_eq!(sum.to_vec_f32().unwrap(), x.to_vec_f32().unwrap(), "a started all-reduce on one rank returns its input");
    let want: Vec<f32> = x.to_vec_f32().unwrap().iter().map(|v| v * 2.0 + v).collect();
    assert_eq!(meanwhile.to_vec_f32().unwrap(), want);
}

#[test]
fn ranks_started_with_different_configs_are_refused_naming_the_rank() {
    // what a multi-process job checks at start (tests/mpi.rs runs it across processes)
    let same = run_ranks(3, |_| dfkd::parallel::check_same(dfkd::parallel::current().unwrap().as_ref(), "configs", b"seed = 1", Device::Cpu));
    assert!(same.is_ok(), "{:?}", same.err());
    let err = run_ranks(3, |rank| {
        let cfg: &[u8] = if rank == 2 { b"seed = 2" } else { b"seed = 1" };
        dfkd::parallel::check_same(dfkd::parallel::current().unwrap().as_ref(), "configs", cfg, Device::Cpu)
    })
    .expect_err("rank 2 differs")
    .to_string();
    assert!(err.starts_with("rank 2's configs differ from rank 0's"), "{err}");
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
    .expect_err("a failed rank fails the run")
    .to_string();
    assert_eq!(err, "rank 1 lost its GPU");
}

/// What three iterations of a one-process pooled run give: each loss of each
/// iteration, then the squared size of the student's whole update (the third
/// iteration's student steps draw from a pool in which a batch was replaced).
fn pooled_fingerprint(method: &str) -> Vec<f32> {
    let mut cfg = tiny(&workdir("unused"));
    cfg.distill.method = method.parse().unwrap();
    cfg.distill.pool_batches = 2;
    cfg.distill.augment_shift = 0; // as when the numbers were pinned
    let (t, s) = models();
    let mut d = Distiller::new(&cfg, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    let before = to_host(d.named_state());
    let mut out = vec![];
    for _ in 0..3 {
        let (g, s) = d.iterate().unwrap();
        out.extend(g.iter().chain(&s).map(|p| p.1));
    }
    let moved: f64 = before
        .iter()
        .zip(to_host(d.named_state()))
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (*x as f64 - y as f64).powi(2)).collect::<Vec<_>>())
        .sum();
    out.push(moved as f32);
    out
}

/// Pools are shared across ranks without changing one process's run: the numbers are
/// what main computed before (commit dd55fbf, on an AVX2 CPU). The tolerance, 1e-2
/// relative, lies between rounding and logic: the CPU's kernels move these numbers
/// (the AVX2 direct 3x3 convolutions by up to 5e-5; the AVX-512 kernels of a Zen 4 CPU
/// by up to 1.3e-3 on a loss and 4.8e-3 on the update's size, which sums three
/// iterations' drift), while drawing a pooled image's row before its batch (the same
/// images, another order) moves the student-step losses and the update's size by
/// 2.8-18%.
#[test]
fn one_process_pooled_runs_are_unchanged() {
    let want: [(&str, &[f32]); 2] = [
        (
            "dfkd-fgvc",
            &[
                66.11742,
                0.10216025,
                2.2756748,
                0.10333829,
                0.13537471,
                3.569577,
                65.87516,
                0.094910815,
                2.274797,
                0.09476352,
                0.13618171,
                2.4501677,
                64.85203,
                0.08654008,
                2.2770472,
                0.08366348,
                0.13488635,
                2.0591128,
                4095.2905,
            ],
        ),
        (
            "deepinversion",
            &[
                65.444626,
                2.4623694,
                0.01073098,
                0.09089278,
                65.25956,
                2.3020196,
                0.010944549,
                0.08169904,
                65.43257,
                2.0829563,
                0.010873445,
                0.072747566,
                32.187923,
            ],
        ),
    ];
    for (method, want) in want {
        let got = pooled_fingerprint(method);
        eprintln!("{method}: {got:?}");
        common::assert_close(&got, want, 0.0, 1e-2, &format!("{method}, one process, pool of 2: losses and the update's size"));
    }
}
