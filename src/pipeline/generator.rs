//! The generator G: z -> image, DCGAN-like with spectral-normalised transposed convs
//! and a spatial attention module (SAM) after each block (docs/METHOD.md).

use super::attention::SpatialAttentionModule;
use super::config::GeneratorConfig;
use crate::nn::{join, BatchNorm2d, Conv2d, ConvTranspose2d, Ctx, Linear, Module, Slot, SpectralNorm};
use crate::rng::Rng;
use crate::{bail, ConvOpts, Device, Result, Tensor};

/// A block's transposed conv, spectral-normalised or not (a config switch).
enum Deconv {
    Plain(ConvTranspose2d),
    Normalized(SpectralNorm<ConvTranspose2d>),
}

struct Block {
    deconv: Deconv,
    /// DCGAN's BatchNorm after the upsampled transposed conv (`generator.block_bn`).
    bn: Option<BatchNorm2d>,
    sam: Option<SpatialAttentionModule>,
}

pub struct Generator {
    fc: Linear,
    bn0: BatchNorm2d,
    blocks: Vec<Block>,
    head: Conv2d,
    pub z_dim: usize,
    /// Classes of a conditional generator (their one-hot follows z), 0 when unconditional.
    classes: usize,
    c0: usize,
    s0: usize,
}

/// A batch of generator input: `z` (with the targets' one-hot when conditional).
pub struct Noise {
    pub z: Tensor,
    /// The class each sample is meant to show (conditional generators only).
    pub targets: Option<Vec<u32>>,
}

/// How many times the blocks double the first feature map: s = s0 * 2^4.
const BLOCKS: usize = 4;

impl Generator {
    /// `fused_attention`: SAM runs the fused spatial attention op (else the composition).
    /// `num_classes` matters only to a conditional generator (`cfg.conditional`).
    pub fn new(cfg: &GeneratorConfig, image_size: usize, num_classes: usize, fused_attention: bool, rng: &mut Rng) -> Result<Generator> {
        if cfg.channels.len() != BLOCKS + 1 {
            bail!("generator.channels must list {} widths (first map and each block), got {:?}", BLOCKS + 1, cfg.channels);
        }
        if !image_size.is_multiple_of(1 << BLOCKS) {
            bail!("generator: image size {image_size} must be a multiple of {}", 1 << BLOCKS);
        }
        let (c0, s0) = (cfg.channels[0], image_size >> BLOCKS);
        let mut blocks = vec![];
        for b in 0..BLOCKS {
            let (ci, co) = (cfg.channels[b], cfg.channels[b + 1]);
            let conv = ConvTranspose2d::new(ci, co, 3, ConvOpts::default().padding(1), 0, true, rng)?;
            let deconv = if cfg.spectral_norm { Deconv::Normalized(SpectralNorm::new(conv, rng)?) } else { Deconv::Plain(conv) };
            let sam = if cfg.sam {
                Some(SpatialAttentionModule::new(co, cfg.sam_reduction, cfg.sam_lambda, cfg.sam_softmax_scaled, fused_attention, rng)?)
            } else {
                None
            };
            let bn = if cfg.block_bn { Some(BatchNorm2d::new(co)?) } else { None };
            blocks.push(Block { deconv, bn, sam });
        }
        let classes = if cfg.conditional { num_classes } else { 0 };
        Ok(Generator {
            fc: Linear::new(cfg.z_dim + classes, c0 * s0 * s0, true, rng)?,
            bn0: BatchNorm2d::new(c0)?,
            blocks,
            head: Conv2d::new(cfg.channels[BLOCKS], 3, 3, ConvOpts::default().padding(1), true, rng)?,
            z_dim: cfg.z_dim,
            classes,
            c0,
            s0,
        })
    }

    /// The generator's input for a batch: standard normal noise, followed for a
    /// conditional generator by the (scaled) one-hot of each sample's target class. Targets go
    /// round the classes from a random one, so a batch covers them evenly.
    pub fn sample_z(&self, n: usize, rng: &mut Rng, device: Device) -> Result<Noise> {
        let z = Tensor::randn(&[n, self.z_dim], 0.0, 1.0, rng, device)?;
        if self.classes == 0 {
            return Ok(Noise { z, targets: None });
        }
        let first = rng.below(self.classes);
        let targets: Vec<u32> = (0..n).map(|i| ((first + i) % self.classes) as u32).collect();
        // the class code has the noise's norm (|z| ~ sqrt(z_dim)): a bare one-hot among
        // 256 unit-variance inputs is too faint for the generator to pick up in the
        // few hundred steps of a run
        let scale = (self.z_dim as f32).sqrt();
        let mut onehot = vec![0f32; n * self.classes];
        targets.iter().enumerate().for_each(|(i, &c)| onehot[i * self.classes + c as usize] = scale);
        let onehot = Tensor::from_vec(onehot, &[n, self.classes], device)?;
        Ok(Noise { z: Tensor::cat(&[&z, &onehot], 1)?, targets: Some(targets) })
    }

    /// Images in the classifiers' input space (ImageNet-normalised): the tanh output is
    /// read as pixels in [-1, 1], so synthesized images are valid pictures.
    pub fn forward(&self, z: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let n = z.dims()[0];
        let mut x = self.fc.forward(z)?.reshape(&[n, self.c0, self.s0, self.s0])?;
        x = self.bn0.forward(&x, ctx)?;
        for b in &self.blocks {
            x = match &b.deconv {
                Deconv::Plain(c) => c.forward(&x)?,
                Deconv::Normalized(c) => c.forward(&x, ctx)?,
            };
            x = x.upsample_nearest2d(2)?;
            if let Some(bn) = &b.bn {
                x = bn.forward(&x, ctx)?;
            }
            x = x.leaky_relu(0.2)?;
            if let Some(sam) = &b.sam {
                x = sam.forward(&x, ctx)?;
            }
        }
        let pixels = self.head.forward(&x)?.tanh()?.affine(0.5, 0.5)?;
        normalize_imagenet(&pixels)
    }
}

/// `(x - mean) / std` per channel with ImageNet statistics.
pub fn normalize_imagenet(pixels: &Tensor) -> Result<Tensor> {
    use super::report::{MEAN, STD};
    let dev = pixels.device();
    let mean = Tensor::from_slice(&MEAN, &[1, 3, 1, 1], dev)?;
    let inv_std = Tensor::from_vec(STD.iter().map(|s| 1.0 / s).collect::<Vec<f32>>(), &[1, 3, 1, 1], dev)?;
    pixels.sub(&mean)?.mul(&inv_std)
}

impl Module for Generator {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.fc.visit(&join(prefix, "fc"), f);
        self.bn0.visit(&join(prefix, "bn0"), f);
        for (i, b) in self.blocks.iter().enumerate() {
            let p = join(prefix, &format!("blocks.{i}"));
            match &b.deconv {
                Deconv::Plain(c) => c.visit(&join(&p, "deconv"), f),
                Deconv::Normalized(c) => c.visit(&join(&p, "deconv"), f),
            }
            if let Some(bn) = &b.bn {
                bn.visit(&join(&p, "bn"), f);
            }
            if let Some(s) = &b.sam {
                s.visit(&join(&p, "sam"), f);
            }
        }
        self.head.visit(&join(prefix, "head"), f);
    }
}
