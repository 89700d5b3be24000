//! The three attention computations DFKD-FGVC is built on, as compositions of engine
//! ops (the reference that autograd differentiates; fused kernels are checked against
//! these): spatial attention (SAM's last line), mixed high-order attention (MHA) and
//! the contrastive similarity loss (SFCL's NT-Xent). The modules run the fused ops
//! (`crate::fused`) unless built with `fused = false`
//! (`distill.fused_attention`), which runs these compositions for comparison.

use crate::nn::{BatchNorm2d, Conv2d, ConvTranspose2d, Ctx, Module, Slot};
use crate::rng::Rng;
use crate::{bail, ConvOpts, Result, Tensor};

/// `F' = lambda * (w * F) + F`, where `w` is the softmax of `a_s` over the H*W positions
/// of each (sample, channel), scaled by H*W when `scaled` (so the map has mean 1).
pub fn spatial_attention(a_s: &Tensor, f: &Tensor, lambda: f32, scaled: bool) -> Result<Tensor> {
    let [n, c, h, w] = f.dims4("spatial_attention")?;
    if a_s.dims() != f.dims() {
        bail!("spatial_attention: attention {:?} and features {:?} differ", a_s.dims(), f.dims());
    }
    let scale = if scaled { (h * w) as f32 } else { 1.0 };
    let weights = a_s.reshape(&[n, c, h * w])?.softmax(2)?.reshape(&[n, c, h, w])?;
    weights.mul(f)?.scale(lambda * scale)?.add(f)
}

/// SAM: an encoder-decoder over the block output that produces the attention logits
/// `A_s`, then `spatial_attention` (docs/METHOD.md, "Generator G with spatial attention").
pub struct SpatialAttentionModule {
    reduce: Conv2d,
    enc1: Conv2d,
    bn1: BatchNorm2d,
    enc2: Conv2d,
    bn2: BatchNorm2d,
    dec1: ConvTranspose2d,
    bn3: BatchNorm2d,
    dec2: ConvTranspose2d,
    bn4: BatchNorm2d,
    expand: Conv2d,
    pub lambda: f32,
    pub scaled: bool,
    /// The fused op, or the composition `spatial_attention`.
    pub fused: bool,
}

impl SpatialAttentionModule {
    pub fn new(c: usize, r: usize, lambda: f32, scaled: bool, fused: bool, rng: &mut Rng) -> Result<Self> {
        let cr = (c / r).max(1);
        let pad1 = ConvOpts::default().padding(1);
        Ok(SpatialAttentionModule {
            reduce: Conv2d::new(c, cr, 1, ConvOpts::default(), true, rng)?,
            enc1: Conv2d::new(cr, 2 * cr, 3, pad1, false, rng)?,
            bn1: BatchNorm2d::new(2 * cr)?,
            enc2: Conv2d::new(2 * cr, 4 * cr, 3, pad1, false, rng)?,
            bn2: BatchNorm2d::new(4 * cr)?,
            dec1: ConvTranspose2d::new(4 * cr, 2 * cr, 3, pad1, 0, false, rng)?,
            bn3: BatchNorm2d::new(2 * cr)?,
            dec2: ConvTranspose2d::new(2 * cr, cr, 3, pad1, 0, false, rng)?,
            bn4: BatchNorm2d::new(cr)?,
            expand: Conv2d::new(cr, c, 1, ConvOpts::default(), true, rng)?,
            lambda,
            scaled,
            fused,
        })
    }

    pub fn forward(&self, f: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let [_, _, h, w] = f.dims4("SAM")?;
        if h % 2 != 0 || w % 2 != 0 {
            bail!("SAM: the 2x2 max pool needs even feature maps, got {h}x{w}");
        }
        let a_d = self.reduce.forward(f)?;
        let p = self.bn1.forward(&self.enc1.forward(&a_d)?, ctx)?.relu()?;
        let (p, idx) = p.max_pool2d_with_indices(2, 2, 0)?;
        let q = self.bn2.forward(&self.enc2.forward(&p)?, ctx)?.relu()?;
        let u = self.bn3.forward(&self.dec1.forward(&q)?, ctx)?.relu()?.max_unpool2d(&idx, (h, w))?;
        let a = self.bn4.forward(&self.dec2.forward(&u)?, ctx)?.relu()?;
        let a_s = self.expand.forward(&a)?;
        if self.fused {
            return a_s.spatial_attention_fused(f, self.lambda, self.scaled);
        }
        spatial_attention(&a_s, f, self.lambda, self.scaled)
    }
}

impl Module for SpatialAttentionModule {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        let j = |n: &str| crate::nn::join(prefix, n);
        self.reduce.visit(&j("reduce"), f);
        self.enc1.visit(&j("enc1"), f);
        self.bn1.visit(&j("bn1"), f);
        self.enc2.visit(&j("enc2"), f);
        self.bn2.visit(&j("bn2"), f);
        self.dec1.visit(&j("dec1"), f);
        self.bn3.visit(&j("bn3"), f);
        self.dec2.visit(&j("dec2"), f);
        self.bn4.visit(&j("bn4"), f);
        self.expand.visit(&j("expand"), f);
    }
}

/// The part of MHA after the 1x1 convolutions, given `z[r][k] = W_{r,k} * F` and the
/// projections `V_r`: `A = (1/R) sum_r sigmoid(V_r * relu(prod_k z[r][k]))`, `A (*) F`.
pub fn high_order_attention(f: &Tensor, z: &[Vec<Tensor>], v: &[Conv2d]) -> Result<Tensor> {
    let order = z.len();
    let mut sum: Option<Tensor> = None;
    for (r, zr) in z.iter().enumerate() {
        let mut prod = zr[0].clone();
        for zk in &zr[1..] {
            prod = prod.mul(zk)?;
        }
        let a = v[r].forward(&prod.relu()?)?.sigmoid()?;
        sum = Some(match sum {
            Some(s) => s.add(&a)?,
            None => a,
        });
    }
    let Some(sum) = sum else { bail!("high_order_attention: order must be at least 1") };
    sum.scale(1.0 / order as f32)?.mul(f)
}

/// Mixed high-order attention of order R on C channels (MHN, Chen et al. 2019).
pub struct HighOrderAttention {
    /// All `W_{r,k}` (C -> C/4, no bias) stacked into one 1x1 conv: one GEMM instead of
    /// R(R+1)/2 small ones.
    w: Conv2d,
    v: Vec<Conv2d>,
    order: usize,
    hidden: usize,
    /// The fused kernels around one grouped V GEMM, or the composition.
    pub fused: bool,
}

impl HighOrderAttention {
    pub fn new(c: usize, order: usize, fused: bool, rng: &mut Rng) -> Result<Self> {
        let hidden = (c / 4).max(1);
        let n_w = order * (order + 1) / 2;
        let w = Conv2d::new(c, n_w * hidden, 1, ConvOpts::default(), false, rng)?;
        let v = (0..order).map(|_| Conv2d::new(hidden, c, 1, ConvOpts::default(), true, rng)).collect::<Result<_>>()?;
        Ok(HighOrderAttention { w, v, order, hidden, fused })
    }

    pub fn forward(&self, f: &Tensor) -> Result<Tensor> {
        let all = self.w.forward(f)?;
        if self.fused {
            // products + ReLU of every order in one pass; the V_r as one grouped 1x1
            // conv (a GEMM per order, cuBLAS on a GPU); sigmoid, mean and the multiply
            // by F in one pass (kernels/high_order_attention.cu says why this split)
            let h = all.hoa_products(self.order)?;
            let w = Tensor::cat(&self.v.iter().map(|v| &v.weight).collect::<Vec<_>>(), 0)?;
            let b = self.v.iter().map(|v| v.bias.as_ref()).collect::<Option<Vec<_>>>().map(|b| Tensor::cat(&b, 0)).transpose()?;
            let u = h.conv2d(&w, b.as_ref(), ConvOpts::default().groups(self.order))?;
            return u.hoa_combine(f, self.order);
        }
        let mut parts = all.split(1, &vec![self.hidden; self.order * (self.order + 1) / 2])?.into_iter();
        let z: Vec<Vec<Tensor>> = (1..=self.order).map(|r| (0..r).map(|_| parts.next().unwrap()).collect()).collect();
        high_order_attention(f, &z, &self.v)
    }
}

impl Module for HighOrderAttention {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.w.visit(&crate::nn::join(prefix, "w"), f);
        for (i, v) in self.v.iter().enumerate() {
            v.visit(&crate::nn::join(prefix, &format!("v.{i}")), f);
        }
    }
}

/// NT-Xent with teacher features as anchors: for anchor `t_i`, the positive is `s_i`
/// and the negatives are the other 2N-2 vectors of `[t; s]`; inputs are L2-normalised
/// here. `L = -(1/N) sum_i log(exp(sim(t_i, s_i)/tau) / sum_{k != i} exp(sim(t_i, z_k)/tau))`.
pub fn contrastive_loss(t: &Tensor, s: &Tensor, tau: f32) -> Result<Tensor> {
    let [n, d] = t.dims2("contrastive_loss")?;
    if s.dims() != [n, d] {
        bail!("contrastive_loss: teacher {:?} and student {:?} features differ", t.dims(), s.dims());
    }
    let t = t.l2_normalize(1, 1e-12)?;
    let z = Tensor::cat(&[&t, &s.l2_normalize(1, 1e-12)?], 0)?;
    let sim = t.matmul(&z.t()?)?.scale(1.0 / tau)?; // [n, 2n]
                                                    // mask the anchor's similarity with itself out of the softmax
    let mut mask = vec![0f32; n * 2 * n];
    let mut pick = vec![0f32; n * 2 * n];
    for i in 0..n {
        mask[i * 2 * n + i] = -1e9;
        pick[i * 2 * n + n + i] = 1.0;
    }
    let mask = Tensor::from_vec(mask, &[n, 2 * n], t.device())?;
    let pick = Tensor::from_vec(pick, &[n, 2 * n], t.device())?;
    sim.add(&mask)?.log_softmax(1)?.mul(&pick)?.sum_all()?.scale(-1.0 / n as f32)
}
