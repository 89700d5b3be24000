//! ResNets with BasicBlocks: torchvision's ResNet-18/34 and the CIFAR-style ResNet-8/20
//! of the distillation literature (3 stages of 16-32-64 channels, 1x1 conv + BN
//! shortcuts where the shape changes). Both share torchvision's names: `conv1, bn1,
//! layerN.i.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}, fc`.

use super::{Classifier, Features};
use crate::nn::{join, BatchNorm2d, Conv2d, Ctx, Linear, Module, Slot};
use crate::rng::Rng;
use crate::{ConvOpts, Result, Tensor};

/// The first conv of ResNet and WRN: 3x3 stride 1 for small images, else torchvision's
/// 7x7 stride 2 (followed by a max pool in the model's forward).
pub(super) fn stem_conv(c_out: usize, small_stem: bool, rng: &mut Rng) -> Result<Conv2d> {
    if small_stem {
        Conv2d::kaiming(3, c_out, 3, ConvOpts::default().padding(1), rng)
    } else {
        Conv2d::kaiming(3, c_out, 7, ConvOpts::default().stride(2).padding(3), rng)
    }
}

/// conv3x3-BN-ReLU-conv3x3-BN, plus the input (through a 1x1 conv + BN where the
/// shape changes), then ReLU.
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, rng: &mut Rng) -> Result<BasicBlock> {
        let conv3 = ConvOpts::default().padding(1);
        let downsample = if stride != 1 || c_in != c_out {
            Some((Conv2d::kaiming(c_in, c_out, 1, ConvOpts::default().stride(stride), rng)?, BatchNorm2d::new(c_out)?))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: Conv2d::kaiming(c_in, c_out, 3, conv3.stride(stride), rng)?,
            bn1: BatchNorm2d::new(c_out)?,
            conv2: Conv2d::kaiming(c_out, c_out, 3, conv3, rng)?,
            bn2: BatchNorm2d::new(c_out)?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let out = self.bn1.forward(&self.conv1.forward(x)?, ctx)?.relu()?;
        let out = self.bn2.forward(&self.conv2.forward(&out)?, ctx)?;
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, ctx)?,
            None => x.clone(),
        };
        out.add(&identity)?.relu()
    }
}

impl Module for BasicBlock {
    fn visit(&self, p: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.conv1.visit(&join(p, "conv1"), f);
        self.bn1.visit(&join(p, "bn1"), f);
        self.conv2.visit(&join(p, "conv2"), f);
        self.bn2.visit(&join(p, "bn2"), f);
        if let Some((conv, bn)) = &self.downsample {
            conv.visit(&join(p, "downsample.0"), f);
            bn.visit(&join(p, "downsample.1"), f);
        }
    }
}

pub struct ResNet {
    arch: &'static str,
    small_stem: bool,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    /// `layers[s][i]` is `layer{s+1}.{i}`.
    layers: Vec<Vec<BasicBlock>>,
    fc: Linear,
    widths: Vec<usize>,
}

impl ResNet {
    /// A BasicBlock ResNet: a stem of `stem_width` channels, then stage `s` with
    /// `depths[s]` blocks of `widths[s]` channels (stride 2 at the start of every stage
    /// but the first), global average pooling and a linear classifier.
    pub fn new(
        arch: &'static str,
        stem_width: usize,
        widths: &[usize],
        depths: &[usize],
        num_classes: usize,
        small_stem: bool,
        rng: &mut Rng,
    ) -> Result<ResNet> {
        let conv1 = stem_conv(stem_width, small_stem, rng)?;
        let bn1 = BatchNorm2d::new(stem_width)?;
        let mut c_in = stem_width;
        let mut layers = vec![];
        for (s, (&width, &depth)) in widths.iter().zip(depths).enumerate() {
            let mut blocks = vec![];
            for i in 0..depth {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(c_in, width, stride, rng)?);
                c_in = width;
            }
            layers.push(blocks);
        }
        // torchvision keeps nn.Linear's default initialisation for fc.
        let fc = Linear::new(c_in, num_classes, true, rng)?;
        Ok(ResNet { arch, small_stem, conv1, bn1, layers, fc, widths: widths.to_vec() })
    }

    pub fn resnet18(num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<ResNet> {
        ResNet::new("resnet18", 64, &[64, 128, 256, 512], &[2, 2, 2, 2], num_classes, small_stem, rng)
    }
    pub fn resnet34(num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<ResNet> {
        ResNet::new("resnet34", 64, &[64, 128, 256, 512], &[3, 4, 6, 3], num_classes, small_stem, rng)
    }
    pub fn resnet8(num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<ResNet> {
        ResNet::new("resnet8", 16, &[16, 32, 64], &[1, 1, 1], num_classes, small_stem, rng)
    }
    pub fn resnet20(num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<ResNet> {
        ResNet::new("resnet20", 16, &[16, 32, 64], &[3, 3, 3], num_classes, small_stem, rng)
    }
}

impl Module for ResNet {
    fn visit(&self, p: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.conv1.visit(&join(p, "conv1"), f);
        self.bn1.visit(&join(p, "bn1"), f);
        for (s, blocks) in self.layers.iter().enumerate() {
            for (i, block) in blocks.iter().enumerate() {
                block.visit(&join(p, &format!("layer{}.{i}", s + 1)), f);
            }
        }
        self.fc.visit(&join(p, "fc"), f);
    }
}

impl Classifier for ResNet {
    fn arch(&self) -> &'static str {
        self.arch
    }
    fn num_classes(&self) -> usize {
        self.fc.weight.dims()[0]
    }
    fn stage_channels(&self) -> Vec<usize> {
        self.widths.clone()
    }
    fn feature_dim(&self) -> usize {
        *self.widths.last().unwrap()
    }

    fn forward_ctx(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Features> {
        let mut x = self.bn1.forward(&self.conv1.forward(x)?, ctx)?.relu()?;
        if !self.small_stem {
            x = x.max_pool2d(3, 2, 1)?;
        }
        let mut stages = Vec::with_capacity(self.layers.len());
        for blocks in &self.layers {
            for block in blocks {
                x = block.forward(&x, ctx)?;
            }
            stages.push(x.clone());
        }
        let penultimate = x.adaptive_avg_pool2d(1)?.flatten_from(1)?;
        let logits = self.fc.forward(&penultimate)?;
        Ok(Features::new(logits, stages, penultimate, ctx))
    }
}
