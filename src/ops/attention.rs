//! The fused attention ops of DFKD-FGVC, each one backend call forward and one (plus a
//! GEMM for the contrastive loss) backward, with its own backward rule. Each equals a
//! composition of engine ops in `pipeline::attention`, which stays the reference: the
//! tests compare values and gradients, and `distill.fused_attention = false` runs the
//! compositions instead.

use super::from_op;
use crate::{bail, Layout, Result, Tensor};

/// The normalisation floor of the contrastive loss (PyTorch's `F.normalize` default).
const NORM_EPS: f32 = 1e-12;

impl Tensor {
    /// SAM's last line, fused: with `self` the attention logits `a` and `f` the
    /// features (both `[n, c, h, w]`), `f + lambda * s * softmax_hw(a) * f` where
    /// `s = h * w` when `scaled`, else 1. Equals `pipeline::attention::spatial_attention`.
    pub fn spatial_attention_fused(&self, f: &Tensor, lambda: f32, scaled: bool) -> Result<Tensor> {
        let [_, _, h, w] = f.dims4("spatial_attention")?;
        if self.dims() != f.dims() {
            bail!("spatial_attention: attention {:?} and features {:?} differ", self.dims(), f.dims());
        }
        let k = lambda * if scaled { (h * w) as f32 } else { 1.0 };
        let (a, f) = (self.contiguous()?, f.contiguous()?);
        let (y, stats) = a.storage().spatial_attention(a.layout(), &f.storage(), f.layout(), k)?;
        Ok(from_op(y, a.dims(), "spatial_attention", &[&a, &f], {
            let (a, f) = (a.clone(), f.clone());
            move |dy, _| {
                let dy = dy.contiguous()?;
                let (da, df) = a.storage().spatial_attention_backward(a.layout(), &f.storage(), f.layout(), &dy.storage(), dy.layout(), &stats, k)?;
                Ok(vec![Some(Tensor::from_storage(da, a.dims())), Some(Tensor::from_storage(df, a.dims()))])
            }
        }))
    }

    /// MHA's per-order products: `self` = z `[n, R(R+1)/2 * c, h, w]`, the stacked
    /// `W_{r,k}` outputs in order-major order (order r owns slices r(r-1)/2 ..
    /// r(r-1)/2 + r - 1); returns `relu(prod_k z[r][k])` for r = 1..R, `[n, R * c, h, w]`.
    pub fn hoa_products(&self, order: usize) -> Result<Tensor> {
        let z = self.contiguous()?;
        let h = z.storage().hoa_products(z.layout(), order)?;
        let g = crate::backend::attention::HighOrder::products("hoa_products", z.layout(), order)?;
        let shape = g.products_out_shape(z.dims());
        Ok(from_op(h, &shape, "hoa_products", &[&z], {
            let z = z.clone();
            move |dh, _| {
                let dh = dh.contiguous()?;
                let dz = z.storage().hoa_products_backward(z.layout(), &dh.storage(), dh.layout(), order)?;
                Ok(vec![Some(Tensor::from_storage(dz, z.dims()))])
            }
        }))
    }

    /// MHA's output: `self` = u `[n, R * c, h, w]` (the `V_r` projections stacked by
    /// order), `f` `[n, c, h, w]`: `f * (1/R) sum_r sigmoid(u[r])`.
    pub fn hoa_combine(&self, f: &Tensor, order: usize) -> Result<Tensor> {
        let (u, f) = (self.contiguous()?, f.contiguous()?);
        let y = u.storage().hoa_combine(u.layout(), &f.storage(), f.layout(), order)?;
        Ok(from_op(y, f.dims(), "hoa_combine", &[&u, &f], {
            let (u, f) = (u.clone(), f.clone());
            move |dy, _| {
                let dy = dy.contiguous()?;
                let (du, df) = u.storage().hoa_combine_backward(u.layout(), &f.storage(), f.layout(), &dy.storage(), dy.layout(), order)?;
                Ok(vec![Some(Tensor::from_storage(du, u.dims())), Some(Tensor::from_storage(df, f.dims()))])
            }
        }))
    }

    /// MHAD's distance, fused: `self` = a and `b`, `[n, ...]` each: per sample (row),
    /// `|| a / max(|a|, eps) - b / max(|b|, eps) ||^2`, `[n]`. Equals
    /// `pipeline::losses::normalized_distance` (two `l2_normalize`, a difference, its
    /// square and a sum) in one pass each way (kernels/normalized_distance.cu).
    pub fn normalized_distance(&self, b: &Tensor, eps: f32) -> Result<Tensor> {
        let (a, b) = (self.contiguous()?, b.contiguous()?);
        let (n, _) = crate::backend::attention::distance_rows("normalized_distance", a.layout(), b.layout())?;
        let (dist, stats) = a.storage().normalized_distance(a.layout(), &b.storage(), b.layout(), eps)?;
        Ok(from_op(dist, &[n], "normalized_distance", &[&a, &b], {
            let (a, b) = (a.clone(), b.clone());
            move |g, _| {
                let g = g.contiguous()?;
                let (da, db) = a.storage().normalized_distance_backward(a.layout(), &b.storage(), b.layout(), &stats, &g.storage(), g.layout(), eps)?;
                Ok(vec![Some(Tensor::from_storage(da, a.dims())), Some(Tensor::from_storage(db, b.dims()))])
            }
        }))
    }

    /// SFCL's NT-Xent, fused: `self` = teacher features t and `s` the student's, `[n, d]`
    /// each, unnormalised. Equals `pipeline::attention::contrastive_loss`. The
    /// similarity GEMM (and the one of the backward pass) runs through the backend's
    /// matmul (cuBLAS on a GPU); the rest is one kernel per step.
    pub fn nt_xent_fused(&self, s: &Tensor, tau: f32) -> Result<Tensor> {
        let (t, s) = (self.contiguous()?, s.contiguous()?);
        let (n, d) = crate::backend::attention::contrastive_rows("nt_xent", t.layout(), s.layout())?;
        let (z, norms) = t.storage().contrastive_normalize(t.layout(), &s.storage(), s.layout(), NORM_EPS)?;
        // sim = zhat[:n] zhatᵀ, as [1, n, d] x [1, d, 2n] views of zhat
        let anchors = Layout::new(vec![1, n, d], vec![0, d, 1], 0);
        let all_t = Layout::new(vec![1, d, 2 * n], vec![0, 1, d], 0);
        let sim = z.matmul(&anchors, &z, &all_t)?;
        let sim_l = Layout::contiguous(&[n, 2 * n]);
        let (loss, lse) = sim.contrastive_rows(&sim_l, tau)?;
        let dtype = t.dtype();
        let rows = from_op(loss, &[n], "nt_xent", &[&t, &s], move |g, _| {
            let g = g.contiguous()?;
            let sym = sim.contrastive_sym(&sim_l, &lse, &g.storage(), g.layout(), tau)?;
            // dzhat = S zhat: both factors of sim in one GEMM (kernels/contrastive.cu)
            let (sym_l, z_l) = (Layout::contiguous(&[1, 2 * n, 2 * n]), Layout::contiguous(&[1, 2 * n, d]));
            let dz = sym.matmul(&sym_l, &z, &z_l)?;
            let (dt, ds) = z.contrastive_normalize_backward(&Layout::contiguous(&[2 * n, d]), &norms, &dz, NORM_EPS, dtype)?;
            Ok(vec![Some(Tensor::from_storage(dt, &[n, d])), Some(Tensor::from_storage(ds, &[n, d]))])
        });
        rows.mean_all()
    }
}
