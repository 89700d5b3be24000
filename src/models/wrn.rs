//! Wide ResNet WRN-depth-k as in the DFAD/CMI repositories (pre-activation blocks):
//! `conv1, block{1,2,3}.layer.i.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc`.
//! Stages are the outputs of block1..block3 (before the final BN-ReLU).

use super::resnet::stem_conv;
use super::{Classifier, Features};
use crate::nn::{join, BatchNorm2d, Conv2d, Ctx, Linear, Module, Slot};
use crate::rng::Rng;
use crate::{bail, ConvOpts, Device, Result, Tensor};

/// BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut. When the channel count changes,
/// the first BN-ReLU is applied to the input before both the conv and the 1x1
/// shortcut conv (the reference code overwrites `x`); otherwise the identity is the
/// raw input.
struct Block {
    bn1: BatchNorm2d,
    conv1: Conv2d,
    bn2: BatchNorm2d,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Block {
    fn new(c_in: usize, c_out: usize, stride: usize, rng: &mut Rng) -> Result<Block> {
        let conv3 = ConvOpts::default().padding(1);
        let shortcut = if c_in != c_out { Some(Conv2d::kaiming(c_in, c_out, 1, ConvOpts::default().stride(stride), rng)?) } else { None };
        Ok(Block {
            bn1: BatchNorm2d::new(c_in)?,
            conv1: Conv2d::kaiming(c_in, c_out, 3, conv3.stride(stride), rng)?,
            bn2: BatchNorm2d::new(c_out)?,
            conv2: Conv2d::kaiming(c_out, c_out, 3, conv3, rng)?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let act = self.bn1.forward(x, ctx)?.relu()?;
        let out = self.bn2.forward(&self.conv1.forward(&act)?, ctx)?.relu()?;
        let out = self.conv2.forward(&out)?;
        match &self.shortcut {
            Some(conv) => conv.forward(&act)?.add(&out),
            None => x.add(&out),
        }
    }
}

impl Module for Block {
    fn visit(&self, p: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.bn1.visit(&join(p, "bn1"), f);
        self.conv1.visit(&join(p, "conv1"), f);
        self.bn2.visit(&join(p, "bn2"), f);
        self.conv2.visit(&join(p, "conv2"), f);
        if let Some(conv) = &self.shortcut {
            conv.visit(&join(p, "convShortcut"), f);
        }
    }
}

pub struct WideResNet {
    arch: &'static str,
    small_stem: bool,
    conv1: Conv2d,
    /// `blocks[s][i]` is `block{s+1}.layer.{i}`.
    blocks: Vec<Vec<Block>>,
    bn1: BatchNorm2d,
    fc: Linear,
    widths: [usize; 3],
}

impl WideResNet {
    /// WRN-`depth`-`widen`: (depth - 4) / 6 blocks in each of 3 stages of
    /// 16k, 32k, 64k channels after a 16-channel stem.
    pub fn new(arch: &'static str, depth: usize, widen: usize, num_classes: usize, small_stem: bool, rng: &mut Rng) -> Result<WideResNet> {
        if depth < 10 || !(depth - 4).is_multiple_of(6) {
            bail!("{arch}: WRN depth must be 6n + 4, got {depth}");
        }
        let n = (depth - 4) / 6;
        let widths = [16 * widen, 32 * widen, 64 * widen];
        let conv1 = stem_conv(16, small_stem, rng)?;
        let mut c_in = 16;
        let mut blocks = vec![];
        for (s, &width) in widths.iter().enumerate() {
            let mut stage = vec![];
            for i in 0..n {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                stage.push(Block::new(c_in, width, stride, rng)?);
                c_in = width;
            }
            blocks.push(stage);
        }
        let bn1 = BatchNorm2d::new(c_in)?;
        // the reference initialises fc's bias to zero and keeps the default weight
        let fc = Linear::new(c_in, num_classes, true, rng)?;
        fc.bias.as_ref().unwrap().assign(&Tensor::zeros(&[num_classes], Device::Cpu)?)?;
        Ok(WideResNet { arch, small_stem, conv1, blocks, bn1, fc, widths })
    }
}

impl Module for WideResNet {
    fn visit(&self, p: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.conv1.visit(&join(p, "conv1"), f);
        for (s, stage) in self.blocks.iter().enumerate() {
            for (i, block) in stage.iter().enumerate() {
                block.visit(&join(p, &format!("block{}.layer.{i}", s + 1)), f);
            }
        }
        self.bn1.visit(&join(p, "bn1"), f);
        self.fc.visit(&join(p, "fc"), f);
    }
}

impl Classifier for WideResNet {
    fn arch(&self) -> &'static str {
        self.arch
    }
    fn num_classes(&self) -> usize {
        self.fc.weight.dims()[0]
    }
    fn stage_channels(&self) -> Vec<usize> {
        self.widths.to_vec()
    }
    fn feature_dim(&self) -> usize {
        self.widths[2]
    }

    fn forward_ctx(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Features> {
        let mut x = self.conv1.forward(x)?;
        if !self.small_stem {
            x = x.max_pool2d(3, 2, 1)?;
        }
        let mut stages = Vec::with_capacity(3);
        for stage in &self.blocks {
            for block in stage {
                x = block.forward(&x, ctx)?;
            }
            stages.push(x.clone());
        }
        let x = self.bn1.forward(&x, ctx)?.relu()?;
        let penultimate = x.adaptive_avg_pool2d(1)?.flatten_from(1)?;
        let logits = self.fc.forward(&penultimate)?;
        Ok(Features::new(logits, stages, penultimate, ctx))
    }
}
