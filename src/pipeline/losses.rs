//! The distillation objectives of DFKD-FGVC and of the baselines (docs/METHOD.md).

use super::attention::{contrastive_loss, HighOrderAttention};
use crate::models::Features;
use crate::nn::{join, BatchNorm2d, Conv2d, Ctx, Linear, Module, Slot};
use crate::rng::Rng;
use crate::{bail, ConvOpts, Device, Result, Tensor};

/// Losses of one step, by name, for the metrics log.
pub type Losses = Vec<(&'static str, f32)>;

/// DeepInversion's BN-statistics loss: sum over the teacher's BN layers of
/// `||mu(x) - running_mean||_2 + ||var(x) - running_var||_2` on the synthetic batch.
pub fn bn_loss(t: &Features) -> Result<Tensor> {
    if t.bn_inputs.is_empty() {
        bail!("bn_loss: the teacher's forward recorded no BatchNorm inputs");
    }
    // the statistics of the global batch on a rank of a data-parallel group
    let stats = match crate::parallel::current() {
        Some(group) => crate::parallel::global_channel_stats_many(&t.bn_inputs, &group)?,
        None => t.bn_inputs.iter().map(|x| x.channel_stats()).collect::<Result<_>>()?,
    };
    let mut total: Option<Tensor> = None;
    for ((mean, var), (rm, rv)) in stats.iter().zip(&t.bn_running) {
        let l = mean.sub(rm)?.sqr()?.sum_all()?.sqrt()?.add(&var.sub(rv)?.sqr()?.sum_all()?.sqrt()?)?;
        total = Some(match total {
            Some(a) => a.add(&l)?,
            None => l,
        });
    }
    Ok(total.unwrap())
}

/// The paper's generator loss, alpha * L_BN - L_KD at temperature `tau` (DFQ's
/// before its CE term), with its parts `g_bn` and `g_kd`: the frozen teacher's features
/// `t` and student's `s` on the synthetic batch.
pub fn bn_minus_kd(t: &Features, s: &Features, alpha: f32, tau: f32) -> Result<(Tensor, Losses)> {
    let kd = s.logits.kd_loss(&t.logits, tau)?;
    let bn = bn_loss(t)?;
    let parts = vec![("g_bn", bn.to_scalar()?), ("g_kd", kd.to_scalar()?)];
    Ok((bn.scale(alpha)?.sub(&kd)?, parts))
}

/// DAFL's generator loss: one-hot CE on the teacher's own predictions, minus the mean
/// absolute penultimate activation (weight 0.1), plus 5 x the negative entropy of the
/// batch-mean prediction (class balance).
pub fn dafl_generator_loss(t: &Features) -> Result<Tensor> {
    let labels: Vec<u32> = t.logits.argmax_last()?.into_iter().map(|c| c as u32).collect();
    let ce = t.logits.cross_entropy(&labels, 0.0)?;
    let activation = t.penultimate.abs()?.mean_all()?.neg()?;
    ce.add(&activation.scale(0.1)?)?.add(&batch_neg_entropy(&t.logits)?.scale(5.0)?)
}

/// DAFL's information-entropy term: the negative entropy of the batch-mean prediction,
/// lowest (-log K) when the batch covers every class evenly.
pub fn batch_neg_entropy(logits: &Tensor) -> Result<Tensor> {
    let p = logits.softmax(1)?;
    let p_mean = match crate::parallel::current() {
        Some(group) => crate::parallel::global_batch_mean(&p, &group)?,
        None => p.mean(&[0], false)?,
    };
    p_mean.mul(&p_mean.clamp(1e-8, 1.0)?.log()?)?.sum_all()
}

/// Zagoruyko's attention map of a stage: the channel-mean of squares, flattened and
/// L2-normalised per sample.
fn attention_map(f: &Tensor) -> Result<Tensor> {
    let n = f.dims()[0];
    f.sqr()?.mean(&[1], false)?.reshape(&[n, f.elem_count() / n / f.dims()[1]])?.l2_normalize(1, 1e-12)
}

/// ZSKT's attention-transfer term between matching stages.
pub fn attention_transfer(t: &Features, s: &Features) -> Result<Tensor> {
    let mut total = Tensor::scalar(0.0, t.logits.device())?;
    for (ft, fs) in t.stages.iter().zip(&s.stages) {
        if ft.dims()[2..] != fs.dims()[2..] {
            bail!("zskt: stage sizes {:?} and {:?} differ; attention transfer needs matching stages", ft.dims(), fs.dims());
        }
        total = total.add(&attention_map(ft)?.sub(&attention_map(fs)?)?.sqr()?.mean_all()?)?;
    }
    Ok(total)
}

/// Total variation of an image batch (DeepInversion's prior), mean absolute difference.
pub fn total_variation(x: &Tensor) -> Result<Tensor> {
    let [_, _, h, w] = x.dims4("total_variation")?;
    let dh = x.narrow(2, 1, h - 1)?.sub(&x.narrow(2, 0, h - 1)?)?.abs()?.mean_all()?;
    let dw = x.narrow(3, 1, w - 1)?.sub(&x.narrow(3, 0, w - 1)?)?.abs()?.mean_all()?;
    dh.add(&dw)
}

/// Jensen-Shannon divergence between the teacher's and student's predictions,
/// DeepInversion's "competition" term (the image step maximises it).
pub fn js_divergence(t_logits: &Tensor, s_logits: &Tensor) -> Result<Tensor> {
    let (pt, ps) = (t_logits.softmax(1)?, s_logits.softmax(1)?);
    let m = pt.add(&ps)?.scale(0.5)?.clamp(1e-8, 1.0)?;
    let kl = |p: &Tensor| -> Result<Tensor> { p.mul(&p.clamp(1e-8, 1.0)?.log()?.sub(&m.log()?)?)?.sum(&[1], false)?.mean_all() };
    kl(&pt)?.add(&kl(&ps)?)?.scale(0.5)
}

/// Where MHAD compares the two networks.
enum MhadSite {
    /// Every stage: a 1x1-conv adapter from student to teacher channels.
    Stages(Vec<Conv2d>),
    /// Stages do not match (e.g. WRN or MobileNetV2 students): the penultimate features
    /// only, through a 2-hidden-layer MLP (as the paper does).
    Penultimate(Linear, Linear),
}

/// Mixed high-order attention distillation: adapters plus one MHA module per site,
/// shared by both sides and trained with the student.
pub struct Mhad {
    site: MhadSite,
    mha: Vec<HighOrderAttention>,
    normalize: bool,
    /// The normalised distance as one op (`Tensor::normalized_distance`), or the
    /// composition `normalized_distance`.
    fused: bool,
}

impl Mhad {
    /// `t` and `s` are a forward of each network on the same small batch: they decide
    /// whether stages match.
    pub fn new(t: &Features, s: &Features, order: usize, identity_init: bool, normalize: bool, fused: bool, rng: &mut Rng) -> Result<Mhad> {
        let stages_match = t.stages.len() == s.stages.len() && t.stages.iter().zip(&s.stages).all(|(a, b)| a.dims()[2..] == b.dims()[2..]);
        if stages_match {
            let mut adapters = vec![];
            let mut mha = vec![];
            for (ft, fs) in t.stages.iter().zip(&s.stages) {
                let (ct, cs) = (ft.dims()[1], fs.dims()[1]);
                let a = Conv2d::new(cs, ct, 1, ConvOpts::default(), false, rng)?;
                if identity_init && ct == cs {
                    let mut eye = vec![0f32; ct * cs];
                    (0..ct).for_each(|i| eye[i * cs + i] = 1.0);
                    a.weight.assign(&Tensor::from_vec(eye, &[ct, cs, 1, 1], Device::Cpu)?)?;
                }
                adapters.push(a);
                mha.push(HighOrderAttention::new(ct, order, fused, rng)?);
            }
            Ok(Mhad { site: MhadSite::Stages(adapters), mha, normalize, fused })
        } else {
            let (dt, ds) = (t.penultimate.dims()[1], s.penultimate.dims()[1]);
            let mlp = (Linear::new(ds, dt, true, rng)?, Linear::new(dt, dt, true, rng)?);
            Ok(Mhad { site: MhadSite::Penultimate(mlp.0, mlp.1), mha: vec![HighOrderAttention::new(dt, order, fused, rng)?], normalize, fused })
        }
    }

    /// `sum over sites of MSE(MHA(F_t), MHA(adapter(F_s)))`, summed over positions and
    /// averaged over N*C, on maps L2-normalised per sample when `normalize`.
    pub fn loss(&self, t: &Features, s: &Features) -> Result<Tensor> {
        let pairs: Vec<(Tensor, Tensor)> = match &self.site {
            MhadSite::Stages(adapters) => {
                t.stages.iter().zip(&s.stages).zip(adapters).map(|((ft, fs), a)| Ok((ft.detach(), a.forward(fs)?))).collect::<Result<_>>()?
            }
            MhadSite::Penultimate(l1, l2) => {
                let as4 = |x: &Tensor| x.reshape(&[x.dims()[0], x.dims()[1], 1, 1]);
                vec![(as4(&t.penultimate.detach())?, as4(&l2.forward(&l1.forward(&s.penultimate)?.relu()?)?)?)]
            }
        };
        let mut total: Option<Tensor> = None;
        for ((ft, fs), mha) in pairs.iter().zip(&self.mha) {
            let (at, as_) = (mha.forward(ft)?, mha.forward(fs)?);
            let [n, c, ..] = at.dims4("mhad")?;
            let sq_dist = match (self.normalize, self.fused) {
                (true, true) => at.normalized_distance(&as_, NORM_EPS)?.sum_all()?,
                (true, false) => normalized_distance(&at, &as_)?.sum_all()?,
                (false, _) => at.sub(&as_)?.sqr()?.sum_all()?,
            };
            let l = sq_dist.scale(1.0 / (n * c) as f32)?;
            total = Some(match total {
                Some(a) => a.add(&l)?,
                None => l,
            });
        }
        Ok(total.unwrap())
    }
}

/// The floor of the per-sample norms (PyTorch's `F.normalize` default).
const NORM_EPS: f32 = 1e-12;

/// Per sample, the squared distance of `a` and `b` L2-normalised over all their values,
/// `[n]`: the composition `Tensor::normalized_distance` fuses and is checked against.
pub fn normalized_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let unit = |x: &Tensor| x.flatten_from(1)?.l2_normalize(1, NORM_EPS);
    unit(a)?.sub(&unit(b)?)?.sqr()?.sum(&[1], false)
}

impl Module for Mhad {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        match &self.site {
            MhadSite::Stages(adapters) => {
                for (i, a) in adapters.iter().enumerate() {
                    a.visit(&join(prefix, &format!("adapters.{i}")), f);
                }
            }
            MhadSite::Penultimate(l1, l2) => {
                l1.visit(&join(prefix, "mlp.0"), f);
                l2.visit(&join(prefix, "mlp.2"), f);
            }
        }
        for (i, m) in self.mha.iter().enumerate() {
            m.visit(&join(prefix, &format!("mha.{i}")), f);
        }
    }
}

/// SFCL's projection head: `Linear(d, hidden) -> [BN] -> ReLU -> Linear(hidden, out)`,
/// shared by both sides (the teacher side gets its own first layer only when widths
/// differ). The teacher's *features* are detached, but the head learns from both sides
/// (docs/METHOD.md): the loss then pushes the teacher anchors apart as well as the student
/// projections towards them. Detaching the teacher's *projection* instead
/// (`distill.sfcl_detach_projection`, the superseded behaviour) leaves nothing to keep
/// the anchors apart: the head maps every sample to nearly one direction (mean pairwise
/// cosine 0.995 measured) and L_SFCL stays near log(2N - 1).
///
/// Decision (`distill.proj_bn`): a BatchNorm after the first layer, as in SimCLR's head:
/// penultimate features are post-ReLU averages, all positive and alike across samples,
/// and centring them helps the head spread them. Each side's batch is normalised with
/// its own statistics.
pub struct ProjectionHead {
    teacher_in: Option<Linear>,
    fc1: Linear,
    bn: Option<BatchNorm2d>,
    fc2: Linear,
    pub tau: f32,
    /// The fused NT-Xent, or the composition `contrastive_loss`.
    pub fused: bool,
    /// Stop the gradient at the teacher's projection (the superseded, collapsing SFCL).
    detach_projection: bool,
    /// In a data-parallel run, contrast against the whole global batch (`parallel.global_negatives`).
    global_negatives: bool,
}

impl ProjectionHead {
    pub fn new(d_teacher: usize, d_student: usize, hidden: usize, out: usize, bn: bool, tau: f32, fused: bool, rng: &mut Rng) -> Result<Self> {
        let teacher_in = if d_teacher != d_student { Some(Linear::new(d_teacher, hidden, true, rng)?) } else { None };
        let bn = if bn { Some(BatchNorm2d::new(hidden)?) } else { None };
        Ok(ProjectionHead {
            teacher_in,
            fc1: Linear::new(d_student, hidden, true, rng)?,
            bn,
            fc2: Linear::new(hidden, out, true, rng)?,
            tau,
            fused,
            detach_projection: false,
            global_negatives: true,
        })
    }

    /// `true` brings back the superseded SFCL that stops the gradient at the teacher's
    /// projection, for comparison (`distill.sfcl_detach_projection`).
    pub fn detach_projection(mut self, on: bool) -> Self {
        self.detach_projection = on;
        self
    }

    /// Whether a data-parallel rank contrasts against every rank's samples (true) or
    /// only its own share (`parallel.global_negatives`).
    pub fn global_negatives(mut self, on: bool) -> Self {
        self.global_negatives = on;
        self
    }

    /// `fc2(relu(bn(h)))` for a side's hidden activations `h` [N, hidden].
    fn project(&self, h: &Tensor) -> Result<Tensor> {
        let h = match &self.bn {
            Some(bn) => {
                let [n, c] = h.dims2("projection head")?;
                bn.forward(&h.reshape(&[n, c, 1, 1])?, &mut Ctx::new(true))?.reshape(&[n, c])?
            }
            None => h.clone(),
        };
        self.fc2.forward(&h.relu()?)
    }

    /// The teacher side's projections `[N, out]`, from its detached features.
    pub fn project_teacher(&self, t: &Features) -> Result<Tensor> {
        let t_hidden = match &self.teacher_in {
            Some(l) => l.forward(&t.penultimate.detach())?,
            None => self.fc1.forward(&t.penultimate.detach())?,
        };
        self.project(&t_hidden)
    }

    pub fn loss(&self, t: &Features, s: &Features) -> Result<Tensor> {
        let zt = self.project_teacher(t)?;
        let zt = if self.detach_projection { zt.detach() } else { zt };
        let zs = self.project(&self.fc1.forward(&s.penultimate)?)?;
        // every rank then computes the loss of the whole global batch (it is small)
        let (zt, zs) = match crate::parallel::current() {
            Some(g) if self.global_negatives => (crate::parallel::all_gather(&zt, &g)?, crate::parallel::all_gather(&zs, &g)?),
            _ => (zt, zs),
        };
        if self.fused {
            return zt.nt_xent_fused(&zs, self.tau);
        }
        contrastive_loss(&zt, &zs, self.tau)
    }
}

impl Module for ProjectionHead {
    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        if let Some(l) = &self.teacher_in {
            l.visit(&join(prefix, "teacher_in"), f);
        }
        self.fc1.visit(&join(prefix, "fc1"), f);
        if let Some(bn) = &self.bn {
            bn.visit(&join(prefix, "bn"), f);
        }
        self.fc2.visit(&join(prefix, "fc2"), f);
    }
}
