//! The run configuration: every term, default and decision of docs/METHOD.md, as a TOML
//! file whose values the command line can override (`--set distill.beta=5`).

use super::methods::{CmiConfig, MadConfig, Method, ZskdConfig};
use crate::{bail, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where runs, data and caches go.
    pub workdir: PathBuf,
    /// "cpu", "cuda", "cuda:N", "auto".
    pub device: String,
    /// Seed of the synthetic data set, the teacher and (with `distill.seed`) the
    /// distillation.
    pub seed: u64,
    pub data: DataConfig,
    pub teacher: TeacherConfig,
    pub student: StudentConfig,
    pub generator: GeneratorConfig,
    pub distill: DistillConfig,
    pub parallel: ParallelConfig,
}

/// Data parallelism (`distill --gpus N`): see `crate::parallel`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Ranks, each with its share of `distill.batch_size` (which they must divide):
    /// one per GPU (`cuda:0..N-1`), or threads on the CPU. 1 takes no collective at all.
    pub ranks: usize,
    /// The contrastive loss's negatives are the whole global batch's (docs/METHOD.md: "the
    /// other 2N-2 vectors" of a batch of 64), so a run means the same at any rank count;
    /// false: each rank's own share only (less communication, a different loss).
    pub global_negatives: bool,
    /// BatchNorm in training mode (generator, student, projection head) normalises with
    /// the global batch's statistics, so a step equals one process's on the whole batch;
    /// false: each rank's own share (DDP's default), which saves a collective call per
    /// BN layer and pass (docs/PERF.md: the latency that decides multi-GPU scaling) but
    /// makes the run depend on the number of ranks. The BN-statistics loss always uses
    /// the global batch.
    pub sync_batch_norm: bool,
    /// Gradients are averaged in buckets of about this many MB (DDP's `bucket_cap_mb`),
    /// each started as soon as the backward pass has finished its gradients, while the
    /// pass goes on (docs/DATA_PARALLEL.md). Smaller buckets start sooner and overlap
    /// more, but cost more calls.
    pub bucket_mb: f32,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig { ranks: 1, global_negatives: true, sync_batch_norm: true, bucket_mb: 25.0 }
    }
}

impl ParallelConfig {
    /// `bucket_mb` in f32 elements (at least one).
    pub fn bucket_elems(&self) -> usize {
        ((self.bucket_mb as f64 * 1024.0 * 1024.0 / 4.0) as usize).max(1)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A data set folder (CUB-200-2011, FGVC-Aircraft or Stanford Cars layout), or
    /// "synthetic" for the embedded generated set (written in the CUB layout).
    pub dataset: String,
    /// Synthetic set: classes, image size, images per class.
    pub num_classes: usize,
    pub image_size: usize,
    pub train_per_class: usize,
    pub test_per_class: usize,
    // No augmentation or worker-count keys: the data set picks its training crop
    // (`Dataset::random_resized`: Aircraft and the synthetic set use resize + random
    // crop, docs/METHOD.md) and the loader decodes on every core (rayon).
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    pub arch: String,
    /// 3x3 stem without max pool, for 32-64 px images.
    pub small_stem: bool,
    /// A PyTorch state_dict as safetensors; when set, no teacher is trained.
    pub weights: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub label_smoothing: f32,
    /// Epochs of linear learning-rate warm-up before the cosine schedule.
    pub warmup_epochs: usize,
    /// Seed of the teacher's initialisation and batch order; unset: the run's `seed`
    /// (which also draws the synthetic data set), so teachers can be redrawn on one data set.
    pub seed: Option<u64>,
    /// Decay of an exponential moving average of the weights and BatchNorm statistics,
    /// updated after every step (with TensorFlow's warm-up `min(decay, (1+k)/(10+k))`),
    /// which then *is* the teacher: evaluated, cached and distilled from. 0: off, the
    /// last weights are the teacher. With it on, the last weights are also kept beside
    /// the cached teacher (`<key>.last.safetensors`), for comparison.
    pub ema_decay: f32,
    /// Synthetic set only: this many more training images of each class for the
    /// teacher, drawn apart from the data set's (`job::teacher_training_set`); the
    /// data set itself, its test split included, is unchanged. 0: the data set's own.
    pub extra_train_per_class: usize,
    /// Stochastic weight averaging (Izmailov et al. 2018, PyTorch's `swa_utils`): the
    /// last `swa_epochs` epochs train at the constant rate `swa_lr` (the cosine anneals
    /// from `lr` to it over the epochs before), the weights are averaged with equal
    /// weight at the end of each of them, and the average, with BatchNorm statistics
    /// recomputed over one pass of the training data, is the teacher. 0: off.
    pub swa_epochs: usize,
    pub swa_lr: f32,
    /// torchvision's `zero_init_residual`: the last BatchNorm scale of every residual
    /// block starts at 0, so each block starts as the identity (ResNets only).
    pub zero_init_residual: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    pub arch: String,
    pub small_stem: bool,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Decision: z has 256 dims.
    pub z_dim: usize,
    /// Channels of the first feature map and of each of the 4 blocks (paper: 512,256,128,64,64).
    pub channels: Vec<usize>,
    /// Spatial attention module after each block.
    pub sam: bool,
    /// Decision: SAM reduction r = 8.
    pub sam_reduction: usize,
    /// lambda of F' = lambda * attention * F + F (paper's best: 0.05).
    pub sam_lambda: f32,
    /// Decision: the SAM softmax runs over H*W and is scaled by H*W (mean 1).
    pub sam_softmax_scaled: bool,
    pub spectral_norm: bool,
    /// Decision: a BatchNorm after each block's upsampled transposed conv, as in DCGAN
    /// (docs/METHOD.md says "DCGAN-like" and is silent on it). Without it the spectral-normed
    /// blocks shrink activations and the images start as flat grey fields.
    pub block_bn: bool,
    /// Class-conditional generator (as in conditional GANs): a scaled one-hot target
    /// class is concatenated to z, so `distill.gen_target_ce` (and DFQ's CE) can ask the
    /// teacher to see that class. Off in the paper's generator.
    pub conditional: bool,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// The paper's method or a baseline (`Method::ALL`; `distill --help` lists them).
    pub method: Method,
    /// Seed of the distillation alone (student and generator initialisation, noise,
    /// sampled targets): runs that differ only here share the data set and the teacher,
    /// which the top-level `seed` decides. `--seeds 0,1,2` sweeps it.
    pub seed: u64,
    /// Mixed high-order attention distillation.
    pub mhad: bool,
    /// Semantic feature contrast learning.
    pub sfcl: bool,
    /// Generator: alpha * L_BN - L_KD.
    pub alpha: f32,
    /// Student: L_KD + beta * L_MHAD + gamma * L_SFCL.
    pub beta: f32,
    pub gamma: f32,
    /// Decision: the student's KD temperature (scaled by tau^2).
    pub tau_kd: f32,
    /// Decision: the generator's KD temperature.
    pub tau_gen: f32,
    /// Decision: SFCL temperature.
    pub tau_sfcl: f32,
    /// Order R of the high-order attention.
    pub mha_order: usize,
    /// Decision: the attended maps are L2-normalised per sample before the MSE.
    pub mhad_normalize: bool,
    /// Decision: adapters start as identity when channel counts match.
    pub adapter_identity_init: bool,
    /// SAM, MHA and SFCL run the fused ops (kernels/spatial_attention.cu,
    /// high_order_attention.cu, contrastive.cu, and their CPU twins); false runs the
    /// compositions of engine ops in pipeline/attention.rs, for comparison.
    pub fused_attention: bool,
    /// Decision: the projection head is hidden -> out (512 -> 128 in the paper setting).
    pub proj_hidden: usize,
    pub proj_dim: usize,
    /// Decision: a BatchNorm after the projection head's first layer (SimCLR's head).
    pub proj_bn: bool,
    /// The superseded SFCL: the teacher's *projection* is detached, so the shared head
    /// learns only from the student side, collapses to one direction, and L_SFCL stays
    /// near log(2N-1). False (docs/METHOD.md): only the teacher's features are detached.
    pub sfcl_detach_projection: bool,
    /// Extra DFKD-FGVC generator terms (0 = off, the paper; the baselines never take
    /// them): the weight of the teacher's cross-entropy on the sampled target classes (needs `generator.conditional`;
    /// DFQ, CMI and Fast-DFKD synthesise this way) ...
    pub gen_target_ce: f32,
    /// ... of DAFL's one-hot term (cross-entropy on the teacher's own argmax: confident
    /// images) ...
    pub gen_onehot: f32,
    /// ... and of DAFL's information-entropy term (the negative entropy of the batch-mean
    /// prediction: every class in every batch).
    pub gen_balance: f32,
    /// Decision: false (as written) runs the student with batch statistics in generator
    /// steps, which also moves its running statistics; true runs it in eval mode there.
    pub gen_student_eval: bool,
    /// Decision: 0 (the paper) trains the student on fresh generator output at every
    /// step. N > 0 keeps the batches the generator steps synthesise in a pool of N
    /// batches (random replacement once full) and draws each student batch from all of
    /// it, as CMI and Fast-DFKD do: the student stops forgetting earlier generator
    /// states, and student steps skip the generator's forward pass.
    pub pool_batches: usize,
    /// Decision: 0 (the paper) feeds synthetic images as they are; N > 0 shifts each one
    /// by up to N pixels and mirrors half of them before the teacher and the student see
    /// it, in generator and student steps alike (see `pipeline::augment`).
    pub augment_shift: usize,
    /// Decision: 1 (no crop). Below 1, each synthetic image is first cut to a random
    /// crop of this much of its area or more and resized back (torchvision's
    /// `RandomResizedCrop`), before the shift and the mirror.
    pub augment_scale: f32,
    /// t generator steps then k student steps per iteration.
    pub g_steps: usize,
    pub s_steps: usize,
    /// Decision: 50 iterations an epoch, as in DFAD.
    pub iterations_per_epoch: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Save checkpoints and image grids every this many iterations.
    pub checkpoint_every: usize,
    /// Evaluate on the test split every this many epochs (0: only at the end).
    pub eval_every: usize,
    /// The settings of the methods that have their own (each used only by its method).
    pub zskd: ZskdConfig,
    pub mad: MadConfig,
    pub cmi: CmiConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config::cpu_demo()
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Config::cpu_demo().data
    }
}
impl Default for TeacherConfig {
    fn default() -> Self {
        Config::cpu_demo().teacher
    }
}
impl Default for StudentConfig {
    fn default() -> Self {
        Config::cpu_demo().student
    }
}
impl Default for GeneratorConfig {
    fn default() -> Self {
        Config::cpu_demo().generator
    }
}
impl Default for DistillConfig {
    fn default() -> Self {
        Config::cpu_demo().distill
    }
}

impl Config {
    /// The embedded default: the synthetic birds at 32 px, resnet20 -> resnet8, sized to
    /// finish on a 2-core CPU in a few minutes.
    pub fn cpu_demo() -> Config {
        Config {
            workdir: PathBuf::from("runs"),
            device: "auto".into(),
            seed: 0,
            data: DataConfig { dataset: "synthetic".into(), num_classes: 10, image_size: 32, train_per_class: 100, test_per_class: 50 },
            teacher: TeacherConfig {
                arch: "resnet20".into(),
                small_stem: true,
                weights: None,
                // Decision: 45 epochs. Paired on 21 teachers (10 seeds at 1 and 2 threads,
                // one without SIMD kernels) against 30: +3.4 ± 1.7 points, higher on 17;
                // mean 96.1% (sd 2.3, lowest 88.8%) against 92.7% (sd 4.3, lowest 82.0%),
                // for 1.5x the teacher's time (docs/RESULTS.md, "The teacher is a draw").
                epochs: 45,
                batch_size: 64,
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 5e-4,
                label_smoothing: 0.0,
                // Decision: 3 epochs of warm-up. Without it the demo teacher's test
                // top-1 over 10 teacher seeds spread from 72.6% to 96.6% (sd 8.1); with
                // it from 86.6% to 97.4% (sd 3.8) (docs/RESULTS.md, "The teacher is a draw").
                warmup_epochs: 3,
                seed: None,
                // Decision: no weight average and no extra images. Paired on 12 teachers
                // the average scored 0.45 points below its own last weights; twice the
                // images for half the epochs (the same steps) drew a 71.2% teacher;
                // stochastic weight averaging and zero-initialised residual branches drew
                // weaker teachers on both seeds tried (docs/RESULTS.md, "The teacher is a draw").
                ema_decay: 0.0,
                extra_train_per_class: 0,
                swa_epochs: 0,
                swa_lr: 0.01,
                zero_init_residual: false,
            },
            student: StudentConfig { arch: "resnet8".into(), small_stem: true, lr: 0.01, momentum: 0.9, weight_decay: 5e-4 },
            generator: GeneratorConfig {
                z_dim: 256,
                channels: vec![128, 64, 32, 16, 16],
                sam: true,
                sam_reduction: 8,
                sam_lambda: 0.05,
                sam_softmax_scaled: true,
                spectral_norm: true,
                block_bn: true,
                conditional: false,
                lr: 1e-3,
                beta1: 0.5,
                beta2: 0.999,
            },
            distill: DistillConfig {
                method: Method::DfkdFgvc,
                seed: 0,
                mhad: true,
                sfcl: true,
                alpha: 0.3,
                beta: 10.0,
                gamma: 8.0,
                tau_kd: 4.0,
                tau_gen: 1.0,
                tau_sfcl: 0.1,
                mha_order: 3,
                mhad_normalize: true,
                adapter_identity_init: true,
                fused_attention: true,
                proj_hidden: 128,
                proj_dim: 64,
                proj_bn: true,
                sfcl_detach_projection: false,
                gen_target_ce: 0.0,
                gen_onehot: 0.0,
                gen_balance: 0.0,
                gen_student_eval: false,
                // The demo's budget (docs/METHOD.md: t = 20, 50 iterations an epoch, 200
                // epochs): a 2-core CPU affords ~48 iterations (~3.3 s each idle) in
                // the ~4 minutes the first run has after making the data and the
                // teacher. The student's accuracy still climbs there: 80 iterations beat
                // 40 on every seed tried (docs/RESULTS.md).
                pool_batches: 0,
                // Decision: the networks see synthetic images shifted by up to 4 px and
                // mirrored half the time (CMI's and DeepInversion's practice; the paper
                // is silent). Paired on 10 seeds with one 95.0% teacher: +16.9 ± 8.1 points
                // of student top-1, higher on all 10 (0.37 -> 0.55 of the teacher); 8 px is as
                // good, a pool is not (docs/RESULTS.md, "Levers for the student").
                augment_shift: 4,
                augment_scale: 1.0,
                g_steps: 5,
                s_steps: 15,
                iterations_per_epoch: 4,
                epochs: 12,
                batch_size: 64,
                checkpoint_every: 4,
                eval_every: 2,
                zskd: ZskdConfig::default(),
                mad: MadConfig::default(),
                cmi: CmiConfig::default(),
            },
            parallel: ParallelConfig::default(),
        }
    }

    /// The paper's full setting: ResNet-34 -> ResNet-18 at 224 px, for a GPU.
    pub fn paper(dataset: &str, num_classes: usize) -> Config {
        let mut c = Config::cpu_demo();
        c.device = "cuda".into();
        c.data.dataset = dataset.into();
        c.data.num_classes = num_classes;
        c.data.image_size = 224;
        c.teacher.arch = "resnet34".into();
        c.teacher.small_stem = false;
        c.teacher.epochs = 100;
        c.teacher.lr = 0.01;
        c.teacher.warmup_epochs = 0;
        c.student.arch = "resnet18".into();
        c.student.small_stem = false;
        c.generator.channels = vec![512, 256, 128, 64, 64];
        c.distill.g_steps = 20;
        c.distill.proj_hidden = 512;
        c.distill.proj_dim = 128;
        c.distill.iterations_per_epoch = 50;
        c.distill.epochs = 200;
        c.distill.checkpoint_every = 50;
        c.distill.eval_every = 10;
        // measured at the demo's 32 px only: the paper presets keep the paper's images
        c.distill.augment_shift = 0;
        c
    }

    /// A preset by name: `cpu-demo`, `paper-cub`, `paper-cars`, `paper-aircraft`.
    pub fn preset(name: &str) -> Result<Config> {
        Ok(match name {
            "cpu-demo" => Config::cpu_demo(),
            "paper-cub" => Config::paper("data/CUB_200_2011", 200),
            "paper-cars" => Config::paper("data/stanford_cars", 196),
            // resize + random crop rather than random-resized crop: `Dataset::random_resized`
            "paper-aircraft" => Config::paper("data/fgvc-aircraft-2013b", 100),
            other => bail!("unknown preset `{other}`: expected cpu-demo, paper-cub, paper-cars or paper-aircraft"),
        })
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    }

    /// A random stream of the distillation (`stream` names which): decided by the
    /// top-level seed and `distill.seed` together; `distill.seed = 0` gives the streams
    /// runs had before that key existed.
    pub fn distill_rng(&self, stream: u64) -> crate::rng::Rng {
        crate::rng::Rng::new(self.seed ^ self.distill.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).fork(stream)
    }

    /// The config as TOML, each number as written (`lr = 0.1`, not the f32's f64
    /// expansion `0.10000000149011612`).
    pub fn to_toml(&self) -> String {
        let mut doc = toml::Value::try_from(self).expect("config serialises");
        shortest_floats(&mut doc);
        toml::to_string_pretty(&doc).expect("config serialises")
    }

    /// Applies `section.key=value` overrides, parsing the value as TOML (strings may
    /// be bare).
    pub fn apply_overrides(&mut self, sets: &[String]) -> Result<()> {
        let mut doc: toml::Value = toml::Value::try_from(&*self).map_err(|e| Error::Msg(e.to_string()))?;
        for s in sets {
            let Some((key, value)) = s.split_once('=') else { bail!("--set `{s}`: expected key=value") };
            let parsed: toml::Value =
                toml::from_str(&format!("v = {value}")).map(|t: toml::Table| t["v"].clone()).unwrap_or_else(|_| toml::Value::String(value.to_string()));
            let mut node = &mut doc;
            let parts: Vec<&str> = key.trim().split('.').collect();
            for (i, p) in parts.iter().enumerate() {
                let table = node.as_table_mut().ok_or_else(|| Error::Msg(format!("--set `{key}`: `{p}` is not a section")))?;
                if i + 1 == parts.len() {
                    // optional keys (`teacher.weights`, `teacher.seed`) are absent while unset
                    let optional = matches!(*p, "weights" | "seed") && parts.len() == 2;
                    if !table.contains_key(*p) && !optional {
                        bail!("--set `{key}`: unknown key `{p}`");
                    }
                    table.insert(p.to_string(), parsed.clone());
                    break;
                }
                node = table.get_mut(*p).ok_or_else(|| Error::Msg(format!("--set `{key}`: unknown section `{p}`")))?;
            }
        }
        *self = doc.try_into().map_err(|e| Error::Msg(format!("--set: {e}")))?;
        Ok(())
    }
}

/// Every config float is an f32: print each as the shortest decimal that reads back
/// as the same f32.
fn shortest_floats(v: &mut toml::Value) {
    match v {
        toml::Value::Float(f) => *f = format!("{}", *f as f32).parse().expect("an f32 prints as a number"),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| shortest_floats(v)),
        toml::Value::Array(a) => a.iter_mut().for_each(shortest_floats),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn round_trip_and_overrides() {
        let c = Config::cpu_demo();
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(c, back);
        let mut c = Config::preset("paper-cub").unwrap();
        c.apply_overrides(&["distill.beta=5".into(), "student.arch=wrn40_2".into(), "distill.sfcl=false".into()]).unwrap();
        assert_eq!((c.distill.beta, c.student.arch.as_str(), c.distill.sfcl), (5.0, "wrn40_2", false));
        assert!(c.apply_overrides(&["distill.nope=1".into()]).unwrap_err().to_string().contains("nope"));
        // optional keys are absent while unset, and can still be set
        c.apply_overrides(&["teacher.seed=3".into(), "parallel.ranks=4".into()]).unwrap();
        assert_eq!((c.teacher.seed, c.parallel.ranks), (Some(3), 4));
        assert!(c.apply_overrides(&["distill.seed2=1".into()]).is_err());
        // numbers print as written, and read back equal
        let text = Config::cpu_demo().to_toml();
        assert!(text.contains("lr = 0.1\n") && text.contains("tau_sfcl = 0.1\n") && text.contains("weight_decay = 0.0005\n"), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), Config::cpu_demo());
    }
}
