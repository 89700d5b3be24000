//! MobileNetV2 as torchvision builds it (width 1.0): `features.0` (3x3 conv-BN-ReLU6),
//! `features.1..17` inverted residual blocks, `features.18` (1x1 conv to 1280), then
//! dropout 0.2 and `classifier.1`.
//!
//! Stages (for feature distillation) are the outputs of the last block at each
//! resolution: features.3 (24 ch), .6 (32), .13 (96) and .18 (1280).
//! The small-image variant (as in the CIFAR ports of kuangliu/pytorch-cifar) sets the
//! stride of features.0 and features.2 to 1: overall stride 8 instead of 32.

use super::{Classifier, Features};
use crate::nn::{join, BatchNorm2d, Conv2d, Ctx, Dropout, Linear, Module, Slot};
use crate::rng::Rng;
use crate::{ConvOpts, Device, Result, Tensor};

/// (expansion t, output channels c, blocks n, first stride s), torchvision's table.
const SETTINGS: [(usize, usize, usize, usize); 7] = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];
const LAST_CHANNELS: usize = 1280;
/// Indices in `features` whose outputs are the stages.
const STAGE_ENDS: [usize; 4] = [3, 6, 13, 18];

/// Conv-BN with optional ReLU6 (torchvision's `Conv2dNormActivation`, or a bare
/// projection conv + BN). Its tensors are named `{prefix}.0` and `{prefix}.1` when it
/// is a `Conv2dNormActivation`.
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm2d,
    relu6: bool,
}

impl ConvBn {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize, groups: usize, relu6: bool, rng: &mut Rng) -> Result<ConvBn> {
        let opts = ConvOpts::default().stride(stride).padding((k - 1) / 2).groups(groups);
        Ok(ConvBn { conv: Conv2d::kaiming(c_in, c_out, k, opts, rng)?, bn: BatchNorm2d::new(c_out)?, relu6 })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let y = self.bn.forward(&self.conv.forward(x)?, ctx)?;
        if self.relu6 {
            y.clamp(0.0, 6.0)
        } else {
            Ok(y)
        }
    }
}

/// Expand (1x1, skipped when t = 1), depthwise 3x3, project (1x1, linear); residual
/// when the shape is kept.
struct InvertedResidual {
    layers: Vec<ConvBn>,
    residual: bool,
}

impl InvertedResidual {
    fn new(c_in: usize, c_out: usize, stride: usize, t: usize, rng: &mut Rng) -> Result<InvertedResidual> {
        let hidden = c_in * t;
        let mut layers = vec![];
        if t != 1 {
            layers.push(ConvBn::new(c_in, hidden, 1, 1, 1, true, rng)?);
        }
        layers.push(ConvBn::new(hidden, hidden, 3, stride, hidden, true, rng)?);
        layers.push(ConvBn::new(hidden, c_out, 1, 1, 1, false, rng)?);
        Ok(InvertedResidual { layers, residual: stride == 1 && c_in == c_out })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut y = x.clone();
        for layer in &self.layers {
            y = layer.forward(&y, ctx)?;
        }
        if self.residual {
            x.add(&y)
        } else {
            Ok(y)
        }
    }
}

impl Module for InvertedResidual {
    /// torchvision's `conv` Sequential: the Conv2dNormActivations are `conv.i.0/1`; the
    /// projection is flattened into it as `conv.{k}` (conv) and `conv.{k+1}` (BN).
    fn visit(&self, p: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        let (proj, acts) = self.layers.split_last().unwrap();
        for (i, layer) in acts.iter().enumerate() {
            layer.conv.visit(&join(p, &format!("conv.{i}.0")), f);
            layer.bn.visit(&join(p, &format!("conv.{i}.1")), f);
        }
        proj.conv.visit(&join(p, &format!("conv.{}", acts.len())), f);
        proj.bn.visit(&join(p, &format!("conv.{}", acts.len() + 1)), f);
    }
}

pub struct MobileNetV2 {
    first: ConvBn,
    blocks: Vec<InvertedResidual>,
    last: ConvBn,
    dropout: Dropout,
    classifier: Linear,
}

impl MobileNetV2 {
    pub fn new(num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<MobileNetV2> {
        let first = ConvBn::new(3, 32, 3, if small_stem { 1 } else { 2 }, 1, true, rng)?;
        let mut blocks = vec![];
        let mut c_in = 32;
        for (row, &(t, c, n, s)) in SETTINGS.iter().enumerate() {
            let s = if small_stem && row == 1 { 1 } else { s };
            for i in 0..n {
                blocks.push(InvertedResidual::new(c_in, c, if i == 0 { s } else { 1 }, t, rng)?);
                c_in = c;
            }
        }
        let last = ConvBn::new(c_in, LAST_CHANNELS, 1, 1, 1, true, rng)?;
        let dropout = Dropout::new(0.2, rng);
        // torchvision: Linear weight ~ N(0, 0.01), bias 0
        let weight = Tensor::randn(&[num_classes, LAST_CHANNELS], 0.0, 0.01, rng, Device::Cpu)?;
        let classifier = Linear::from_tensors(weight, Some(Tensor::zeros(&[num_classes], Device::Cpu)?))?;
        Ok(MobileNetV2 { first, blocks, last, dropout, classifier })
    }
}

impl Module for MobileNetV2 {
    fn visit(&self, p: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.first.conv.visit(&join(p, "features.0.0"), f);
        self.first.bn.visit(&join(p, "features.0.1"), f);
        for (i, block) in self.blocks.iter().enumerate() {
            block.visit(&join(p, &format!("features.{}", i + 1)), f);
        }
        let n = self.blocks.len() + 1;
        self.last.conv.visit(&join(p, &format!("features.{n}.0")), f);
        self.last.bn.visit(&join(p, &format!("features.{n}.1")), f);
        self.classifier.visit(&join(p, "classifier.1"), f);
    }
}

impl Classifier for MobileNetV2 {
    fn arch(&self) -> &'static str {
        "mobilenet_v2"
    }
    fn num_classes(&self) -> usize {
        self.classifier.weight.dims()[0]
    }
    fn stage_channels(&self) -> Vec<usize> {
        vec![24, 32, 96, LAST_CHANNELS]
    }
    fn feature_dim(&self) -> usize {
        LAST_CHANNELS
    }

    fn forward_ctx(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Features> {
        let mut x = self.first.forward(x, ctx)?;
        let mut stages = Vec::with_capacity(STAGE_ENDS.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, ctx)?;
            if STAGE_ENDS.contains(&(i + 1)) {
                stages.push(x.clone());
            }
        }
        x = self.last.forward(&x, ctx)?;
        stages.push(x.clone());
        let penultimate = x.adaptive_avg_pool2d(1)?.flatten_from(1)?;
        let logits = self.classifier.forward(&self.dropout.forward(&penultimate, ctx)?)?;
        Ok(Features::new(logits, stages, penultimate, ctx))
    }
}
