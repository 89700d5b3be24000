//! The methods that keep state of their own between steps: MAD's moving-average
//! generator, CMI's memory bank and embedding head, ZSKD's impressions, the real-data
//! ceiling's place in the training images. Each one's
//! distinctive mechanism is shown to act, and a run interrupted by a checkpoint goes
//! on exactly as an uninterrupted one (the state is saved and restored whole).

mod common;

use common::tiny;
use dfkd::models::{build, Classifier};
use dfkd::pipeline::checkpoint_dir::CheckpointDir;
use dfkd::pipeline::config::Config;
use dfkd::pipeline::distill::Distiller;
use dfkd::rng::Rng;
use dfkd::Device;
use std::path::PathBuf;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfkd-methods-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn models() -> (Box<dyn Classifier>, Box<dyn Classifier>) {
    (build("resnet8", 10, true, &mut Rng::new(5)).unwrap(), build("resnet8", 10, true, &mut Rng::new(6)).unwrap())
}

type Named = Vec<(String, Vec<f32>)>;

fn state(d: &Distiller, prefix: &str) -> Named {
    d.named_state().into_iter().filter(|(n, _)| n.starts_with(prefix)).map(|(n, t)| (n, t.to_vec_f32().unwrap())).collect()
}

fn cfg(method: &str, w: &std::path::Path) -> Config {
    let mut c = tiny(w);
    c.distill.method = method.parse().unwrap();
    c
}

/// Each iteration's losses, and the whole state at the end, of `iters` iterations.
fn run(c: &Config, iters: usize) -> (Vec<Vec<(&'static str, f32)>>, Named) {
    let (t, s) = models();
    let mut d = Distiller::new(c, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    let losses = (0..iters).map(|_| d.iterate().map(|(g, s)| g.into_iter().chain(s).collect()).unwrap()).collect();
    (losses, state(&d, ""))
}

#[test]
fn mad_students_learn_from_the_moving_average() {
    let w = workdir("mad");
    let with = |momentum: f32, ema_share: f32| {
        let mut c = cfg("mad", &w);
        (c.distill.mad.momentum, c.distill.mad.ema_share) = (momentum, ema_share);
        c
    };
    // the average moves slower than the generator it follows, and differs from it
    let (t, s) = models();
    let c = with(0.9, 0.5);
    let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    let (live0, ema0) = (state(&d, "generator."), state(&d, "generator_ema."));
    assert_eq!(live0.iter().map(|x| &x.1).collect::<Vec<_>>(), ema0.iter().map(|x| &x.1).collect::<Vec<_>>(), "the average starts as the generator");
    d.iterate().unwrap();
    let (live1, ema1) = (state(&d, "generator."), state(&d, "generator_ema."));
    let moved = |a: &Named, b: &Named| {
        a.iter().zip(b).filter(|(x, _)| x.0.ends_with("weight")).map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs() as f64).sum::<f64>()).sum::<f64>()
    };
    let (live_moved, ema_moved) = (moved(&live0, &live1), moved(&ema0, &ema1));
    assert!(ema_moved > 0.0 && ema_moved < live_moved, "the average moved {ema_moved}, the generator {live_moved}");
    // the student's images come from the average: with momentum 0 the average is the
    // generator itself, so drawing every image from it is drawing them all from the
    // generator, to the bit; an average frozen at the start (momentum 1) gives another
    // student. (One iteration: later, the generator's spectral-norm vectors would differ,
    // advanced by the student batches' forward passes in one run and not in the other.)
    let student = |c: &Config| run(c, 1).1.into_iter().filter(|(n, _)| n.starts_with("student.")).collect::<Named>();
    let all_live = student(&with(0.0, 0.0));
    assert_eq!(student(&with(0.0, 1.0)), all_live, "the average at momentum 0 must be the generator");
    assert_ne!(student(&with(1.0, 1.0)), all_live, "the student did not learn from the average");
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn cmi_fills_its_bank_and_its_contrast_falls() {
    let w = workdir("cmi");
    let mut c = cfg("cmi", &w);
    c.distill.g_steps = 4;
    let (losses, _) = run(&c, 4);
    let get = |it: &Vec<(&str, f32)>, name: &str| it.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no {name} in {it:?}")).1;
    let bank: Vec<f32> = losses.iter().map(|it| get(it, "g_bank_size")).collect();
    let contrast: Vec<f32> = losses.iter().map(|it| get(it, "g_contrast")).collect();
    // 8 images a step, 4 steps an iteration: the mean bank size over each iteration's steps
    assert_eq!(bank, vec![12.0, 44.0, 76.0, 108.0], "{bank:?}");
    // against a growing bank (more negatives) the generator still makes its images
    // easier to tell apart
    assert!(contrast[3] < contrast[0], "g_contrast {contrast:?}");
    let _ = std::fs::remove_dir_all(&w);
}

/// The real-data ceiling's student learns from the training split's images, in the
/// order of a training loader shuffled by `distill.seed`: its first step's KD loss is
/// the one computed here by hand on that loader's first batch, which the synthetic
/// images' crop, shift and mirror (set here) leave alone.
#[test]
fn the_real_data_student_distils_on_the_training_images() {
    use dfkd::data::{Loader, LoaderConfig};
    let w = workdir("real-kd");
    let mut c = cfg("real-kd", &w);
    (c.distill.s_steps, c.distill.augment_shift, c.distill.augment_scale, c.distill.seed) = (1, 4, 0.5, 3);
    let (t, s) = models();
    let ds = dfkd::pipeline::data_set::open(&c).unwrap();
    let b = Loader::new(&ds.train, LoaderConfig::train(&ds, c.distill.batch_size, c.data.image_size as u32, 3)).epoch(0).next().unwrap().unwrap();
    let x = dfkd::Tensor::from_vec(b.images, &[b.n, 3, b.size, b.size], Device::Cpu).unwrap();
    let want = s.logits(&x, true).unwrap().kd_loss(&t.logits(&x, false).unwrap(), c.distill.tau_kd).unwrap().to_scalar().unwrap();
    let (t, s) = models();
    let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
    let (g, losses) = d.iterate().unwrap();
    assert!(g.is_empty(), "nothing is synthesised: {g:?}");
    assert_eq!(losses, vec![("s_kd", want)]);
    // the grids show the real images it trained on
    d.save_samples(&w.join("grid.png")).unwrap();
    assert!(w.join("grid.png").exists());
    let _ = std::fs::remove_dir_all(&w);
}

/// Two iterations straight, or one, a checkpoint, a fresh distiller resumed from it and
/// one more: the same losses and the same bits of every weight, buffer and pooled image.
#[test]
fn the_stateful_methods_resume_exactly() {
    for method in ["mad", "cmi", "zskd", "real-kd"] {
        let w = workdir(&format!("resume-{method}"));
        let mut c = cfg(method, &w);
        if method == "real-kd" {
            // 80 training images are 10 batches of 8: the second iteration crosses an epoch
            c.distill.s_steps = 6;
        }
        let (want_losses, want_state) = run(&c, 2);
        let ckpt = CheckpointDir::new(&w.join("run"));
        {
            let (t, s) = models();
            let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
            d.iterate().unwrap();
            d.save_checkpoint(&ckpt).unwrap();
        }
        let (t, s) = models();
        let mut d = Distiller::new(&c, t.as_ref(), s.as_ref(), Device::Cpu).unwrap();
        d.resume(&ckpt).unwrap_or_else(|e| panic!("{method}: {e}"));
        let (g, s2) = d.iterate().unwrap();
        let got: Vec<(&str, f32)> = g.into_iter().chain(s2).collect();
        assert_eq!(got, want_losses[1], "{method}: the resumed iteration's losses");
        assert!(state(&d, "") == want_state, "{method}: the resumed run's state differs");
        // MAD trains on fresh images, the ceiling on real ones; CMI and ZSKD on their pools, resumed whole
        assert_eq!(d.pool_shard().is_empty(), matches!(method, "mad" | "real-kd"), "{method}: pool of {}", d.pool_shard().len());
        let _ = std::fs::remove_dir_all(&w);
    }
}
