//! The distillation methods. Each is one file that says what its synthesis phase and
//! its student step compute (`DistillMethod`) and what it needs (`Recipe`: a generator
//! or pixels; modules, an image pool, state of its own); the loop (`pipeline::distill`)
//! calls the trait and never asks which method it runs. `methods!` below lists them
//! once: the config's and the command line's names, their help, and the type.
//!
//! A new method is a file here and one line in the list (a method kept outside the
//! list runs through `Distiller::with_method`; tests/method_hooks.rs is one, with the
//! hooks below that the listed methods leave at their defaults). Its hooks, by need:
//! - a generator trained adversarially: `Recipe::SYNTHESIS = Synthesis::Generator`,
//!   `generator_loss` (the loop samples noise, steps Adam, pools the batch);
//! - images optimised directly (no generator): `Synthesis::Pixels`, `synthesize`
//!   (and `Loop::remember` to pool them), `samples`;
//! - modules trained with the student (or with the generator): `student_side`
//!   (`generator_side`), which the loop's optimiser steps, the ranks keep equal and the
//!   checkpoint holds with the optimiser's state;
//! - modules of its own that no loop optimiser trains (an EMA copy of the generator,
//!   a memory bank kept as buffers): `own_modules`, kept equal and checkpointed; a
//!   per-step update in `after_generator_step`; anything else in `save` / `restore`;
//! - the student's batches: `student_batch` (the pool when `pool_capacity` > 0, else
//!   fresh generator output).
//!
//! Every forward of the teacher and student records each BatchNorm layer's input and
//! running statistics (`Features::bn_inputs`, `bn_running`), which BN-statistics terms
//! (`losses::bn_loss`) read.

use super::augment::Augment;
use super::config::Config;
use super::generator::Generator;
use super::loop_state::{Loop, Losses, SynthBatch};
use crate::models::{Classifier, Features};
use crate::nn::{Module, Slot};
use crate::rng::Rng;
use crate::{bail, Device, Gradients, Result, Tensor};
use std::path::Path;

macro_rules! methods {
    ($( #[doc = $about:literal] $variant:ident = $name:literal $(| $alias:literal)* => $module:ident::$ty:ident, )+) => {
        $( mod $module; )+

        /// A distillation method, as `distill.method` and `--method` name it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Method { $( #[doc = $about] $variant, )+ }

        impl Method {
            /// Every method, in the order help and errors list them.
            pub const ALL: &'static [Method] = &[$(Method::$variant),+];
            /// The canonical name: what configs hold, and the default run folder.
            pub fn name(self) -> &'static str { match self { $(Method::$variant => $name,)+ } }
            /// Other names it answers to.
            pub fn aliases(self) -> &'static [&'static str] { match self { $(Method::$variant => &[$($alias),*],)+ } }
            /// One line on what it is.
            pub fn about(self) -> &'static str { match self { $(Method::$variant => $about.trim(),)+ } }
            /// What it synthesises with.
            pub fn synthesis(self) -> Synthesis { match self { $(Method::$variant => <$module::$ty as Recipe>::SYNTHESIS,)+ } }
            pub(crate) fn build(self, setup: &mut Setup) -> Result<Box<dyn DistillMethod>> {
                match self { $(Method::$variant => Ok(Box::new(<$module::$ty as Recipe>::new(setup)?)),)+ }
            }
        }
    };
}

methods! {
    /// the paper: L_BN - L_KD for the generator; KD, MHAD and SFCL for the student
    DfkdFgvc = "dfkd-fgvc" | "dfkd_fgvc" | "ours" => dfkd_fgvc::DfkdFgvc,
    /// one-hot CE, activation and class-balance terms for the generator
    Dafl = "dafl" => dafl::Dafl,
    /// the generator maximises, the student minimises, the L1 distance of logits
    Dfad = "dfad" => dfad::Dfad,
    /// adversarial KL, and attention transfer between stages for the student
    Zskt = "zskt" => zskt::Zskt,
    /// BN term, CE on sampled targets and the adversarial term
    Dfq = "dfq" => dfq::Dfq,
    /// optimises pixels: BN term, CE, image priors and the Jensen-Shannon competition
    DeepInversion = "deepinversion" | "adi" => deep_inversion::DeepInversion,
    /// optimises pixels toward soft targets from a Dirichlet over the teacher's class similarity
    Zskd = "zskd" => zskd::Zskd,
    /// DFQ's adversarial game plus a moving-average generator whose images keep the student from forgetting
    Mad = "mad" => mad::Mad,
    /// DFQ's terms plus contrastive instance discrimination against a memory bank; the student distils on a pool
    Cmi = "cmi" => cmi::Cmi,
    /// not data-free, the ceiling: KD from the teacher on the real training images, the same steps
    RealKd = "real-kd" | "real_kd" | "real" => real_kd::RealKd,
}

pub use cmi::CmiConfig;
pub use mad::MadConfig;
pub use zskd::ZskdConfig;

impl Method {
    /// The names and aliases, for errors: `dfkd-fgvc (or dfkd_fgvc, ours), dafl, ...`.
    pub fn choices() -> String {
        let one = |m: &Method| match m.aliases() {
            [] => m.name().to_string(),
            a => format!("{} (or {})", m.name(), a.join(", ")),
        };
        Method::ALL.iter().map(one).collect::<Vec<_>>().join(", ")
    }
}

impl std::str::FromStr for Method {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Method> {
        let s = s.to_ascii_lowercase();
        match Method::ALL.iter().find(|m| m.name() == s || m.aliases().contains(&s.as_str())) {
            Some(&m) => Ok(m),
            None => bail!("unknown method `{s}`: expected one of {}", Method::choices()),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Method, D::Error> {
        let s = String::deserialize(d)?;
        // worded as `Config::validate` words a bad value
        s.parse().map_err(|_| serde::de::Error::custom(format!("distill.method = {s:?} is not allowed: expected one of {}", Method::choices())))
    }
}

impl clap::ValueEnum for Method {
    fn value_variants<'a>() -> &'a [Method] {
        Method::ALL
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).aliases(self.aliases().iter().copied()).help(self.about()))
    }
}

/// The pool of the methods that distil on kept synthesised batches (DeepInversion, ZSKD,
/// CMI): this many batches unless `distill.pool_batches` says otherwise.
pub(crate) fn kept_pool_batches(cfg: &Config) -> usize {
    match cfg.distill.pool_batches {
        0 => 32,
        n => n,
    }
}

/// How a method makes its images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synthesis {
    /// A generator, which the loop builds (before anything else draws from the random
    /// stream), trains with Adam on `DistillMethod::generator_loss` and checkpoints.
    Generator,
    /// Images optimised directly in `DistillMethod::synthesize`; no generator is built.
    Pixels,
}

/// What a method is built from: the config, the frozen teacher, the student, and a
/// forward of both on a small probe batch (how MHAD decides to pair their features).
pub struct Setup<'a> {
    pub cfg: &'a Config,
    pub teacher: &'a dyn Classifier,
    pub student: &'a dyn Classifier,
    /// The generator the loop built (`Synthesis::Generator`), on the device.
    pub generator: Option<&'a Generator>,
    pub probe_teacher: Features,
    pub probe_student: Features,
    /// The distillation's construction stream: modules drawn from it in a fixed order
    /// make every rank build the same ones.
    pub rng: &'a mut Rng,
    pub device: Device,
}

/// How a method is built; `methods!` calls it.
pub(crate) trait Recipe: DistillMethod + Sized + 'static {
    const SYNTHESIS: Synthesis;
    /// Builds its modules on the CPU (the loop moves those it is given to the device:
    /// `student_side`, `generator_side`, `own_modules`).
    fn new(setup: &mut Setup) -> Result<Self>;
}

/// What one method computes in each phase of an iteration. The loop owns the teacher,
/// the student and its optimiser, the generator and its optimiser, the image pool, the
/// random streams and the rank group (`Loop`); a method adds its losses and whatever it
/// needs besides.
pub trait DistillMethod {
    /// Modules the student's optimiser trains with the student (MHAD, SFCL's head):
    /// `aux.*` in the checkpoint and in `Distiller::named_state`.
    fn student_side(&self) -> &dyn Module {
        &NoModules
    }

    /// Modules the generator's optimiser trains with the generator (a projection head
    /// the synthesis loss needs): `generator_side.*`.
    fn generator_side(&self) -> &dyn Module {
        &NoModules
    }

    /// Modules of the method's own that no loop optimiser trains (an EMA copy of the
    /// generator, a memory bank held as buffers): `{name}.*`, broadcast from rank 0
    /// at the start, saved as `{name}.safetensors` in the checkpoint and loaded back.
    fn own_modules(&self) -> Vec<(&'static str, &dyn Module)> {
        vec![]
    }

    /// Writes any other state of the method's own into the checkpoint folder (rank 0).
    fn save(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Reads back what `save` wrote.
    fn restore(&mut self, _dir: &Path, _lp: &Loop) -> Result<()> {
        Ok(())
    }

    /// Batches the image pool keeps (0: no pool, the student trains on fresh images).
    fn pool_capacity(&self, cfg: &Config) -> usize {
        cfg.distill.pool_batches
    }

    /// How the networks see synthetic images: cropped, shifted and mirrored at random
    /// (`distill.augment_scale`, `distill.augment_shift`), or as they are.
    fn augment(&self, cfg: &Config) -> Augment {
        Augment::from_config(&cfg.distill)
    }

    /// The synthesis phase of an iteration, returning the mean of each loss over its
    /// steps: by default `distill.g_steps` generator steps on `generator_loss`.
    fn synthesize(&mut self, lp: &mut Loop) -> Result<Losses> {
        lp.generator_steps(self)
    }

    /// The generator's loss on one synthesised batch, with its parts (`g_*`).
    fn generator_loss(&mut self, _lp: &mut Loop, _b: &SynthBatch) -> Result<(Tensor, Losses)> {
        bail!("this method optimises pixels: it has no generator loss")
    }

    /// Called after each generator step with the gradients it applied.
    fn after_generator_step(&mut self, _lp: &Loop, _grads: &Gradients) -> Result<()> {
        Ok(())
    }

    /// This rank's share of the student's next batch: drawn from the pool when there
    /// is one, fresh generator output otherwise.
    fn student_batch(&mut self, lp: &mut Loop) -> Result<Tensor> {
        match self.pool_capacity(lp.cfg) {
            0 => lp.fresh_student_batch(),
            _ => lp.pooled_images(),
        }
    }

    /// The student's loss (and that of `student_side`'s modules) from the teacher's and
    /// the student's features on one batch, with its parts (`s_*`; `s_kd` first).
    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)>;

    /// Images for the run's grids (this rank's share), `None` while there are none.
    fn samples(&mut self, lp: &mut Loop) -> Result<Option<Tensor>> {
        lp.fresh_images(false).map(|(x, _)| Some(x))
    }
}

/// The modules of a method that has none.
pub struct NoModules;

impl Module for NoModules {
    fn visit(&self, _prefix: &str, _f: &mut dyn FnMut(&str, Slot<'_>)) {}
}
