//! The classifiers used as teachers and students, with torchvision's (or the DFAD/CMI
//! repositories') parameter names so their checkpoints load unchanged.

mod mobilenet;
mod resnet;
mod wrn;

pub use mobilenet::MobileNetV2;
pub use resnet::ResNet;
pub use wrn::WideResNet;

use crate::nn::{Ctx, Module};
use crate::rng::Rng;
use crate::{bail, Result, Tensor};

/// Every architecture `build` knows.
pub const ARCHS: [&str; 7] = ["resnet18", "resnet34", "mobilenet_v2", "wrn40_2", "wrn16_2", "resnet8", "resnet20"];

/// What one forward pass exposes to the distillation losses.
pub struct Features {
    /// `[n, num_classes]`.
    pub logits: Tensor,
    /// The output of each stage (ResNet: layer1..layer4; see each model for its stages).
    pub stages: Vec<Tensor>,
    /// Pooled features before the classifier, `[n, feature_dim]`.
    pub penultimate: Tensor,
    /// The input of every BatchNorm layer, in forward order (empty unless recorded).
    pub bn_inputs: Vec<Tensor>,
    /// `(running_mean, running_var)` of the BatchNorm layer that consumed `bn_inputs[i]`.
    pub bn_running: Vec<(Tensor, Tensor)>,
}

impl Features {
    /// Assembles the result of a forward pass, taking the BN record out of `ctx`.
    pub fn new(logits: Tensor, stages: Vec<Tensor>, penultimate: Tensor, ctx: &mut Ctx) -> Features {
        let (bn_inputs, bn_running) = ctx.take_bn_records();
        Features { logits, stages, penultimate, bn_inputs, bn_running }
    }
}

/// A teacher or student network.
pub trait Classifier: Module + Send + Sync {
    /// The name `build` knows it by.
    fn arch(&self) -> &'static str;
    fn num_classes(&self) -> usize;
    /// Channels of each entry of `Features::stages`.
    fn stage_channels(&self) -> Vec<usize>;
    /// Width of `Features::penultimate`.
    fn feature_dim(&self) -> usize;

    /// Runs the network on `x` `[n, 3, h, w]` in `ctx`'s mode; BatchNorm inputs are
    /// recorded if `ctx` records them.
    fn forward_ctx(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Features>;

    /// Forward with BatchNorm inputs recorded: what distillation needs.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Features> {
        self.forward_ctx(x, &mut Ctx::recording(train))
    }

    /// Logits only, nothing recorded: for evaluation.
    fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_ctx(x, &mut Ctx::new(train))?.logits)
    }
}

/// Builds an architecture by name with freshly initialised weights (on the CPU).
/// `small_stem` picks the stem for 32-64 px images (3x3 stride-1 conv, no max pool;
/// MobileNetV2: stride 1 in features.0 and features.2) instead of the ImageNet one
/// (7x7 stride-2 conv and 3x3 stride-2 max pool; MobileNetV2: torchvision's strides).
/// The state_dict names are the same either way.
pub fn build(arch: &str, num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<Box<dyn Classifier>> {
    if num_classes == 0 {
        bail!("build {arch}: num_classes must be at least 1");
    }
    Ok(match arch {
        "resnet18" => Box::new(ResNet::resnet18(num_classes, small_stem, rng)?),
        "resnet34" => Box::new(ResNet::resnet34(num_classes, small_stem, rng)?),
        "resnet8" => Box::new(ResNet::resnet8(num_classes, small_stem, rng)?),
        "resnet20" => Box::new(ResNet::resnet20(num_classes, small_stem, rng)?),
        "mobilenet_v2" => Box::new(MobileNetV2::new(num_classes, small_stem, rng)?),
        "wrn40_2" => Box::new(WideResNet::new("wrn40_2", 40, 2, num_classes, small_stem, rng)?),
        "wrn16_2" => Box::new(WideResNet::new("wrn16_2", 16, 2, num_classes, small_stem, rng)?),
        _ => bail!("unknown architecture `{arch}`: expected one of {}", ARCHS.join(", ")),
    })
}
