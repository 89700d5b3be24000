//! Matrix products: batched `matmul` with broadcasting over the batch dims, and `linear`.

use super::from_op;
use crate::{bail, broadcast_shape, Layout, Result, Tensor};

impl Tensor {
    /// `[..., m, k] x [..., k, n] -> [..., m, n]`, batch dims broadcast.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (ra, rb) = (self.rank(), rhs.rank());
        if ra < 2 || rb < 2 || self.dims()[ra - 1] != rhs.dims()[rb - 2] {
            return Err(crate::Error::ShapeMismatch { op: "matmul", lhs: self.dims().to_vec(), rhs: rhs.dims().to_vec() });
        }
        let (m, k, n) = (self.dims()[ra - 2], self.dims()[ra - 1], rhs.dims()[rb - 1]);
        let batch = broadcast_shape("matmul", &self.dims()[..ra - 2], &rhs.dims()[..rb - 2])?;
        let bsize: usize = batch.iter().product();
        let as3 = |t: &Tensor, r: usize, c: usize| -> Result<Layout> {
            let full: Vec<usize> = batch.iter().copied().chain([r, c]).collect();
            let l = t.layout().broadcast_as(&full)?;
            // one batch dim: fine when the batch dims collapse into a single stride
            let bd = batch.len();
            let st = l.strides();
            let collapsible = (0..bd.saturating_sub(1)).all(|d| st[d] == st[d + 1] * batch[d + 1]);
            if !collapsible {
                bail!("matmul: batch dims not collapsible");
            }
            let bstride = if bd == 0 { 0 } else { st[bd - 1] };
            Ok(Layout::new(vec![bsize, r, c], vec![bstride, st[bd], st[bd + 1]], l.offset()))
        };
        let (a, b) = match (as3(self, m, k), as3(rhs, k, n)) {
            (Ok(_), Ok(_)) => (self.clone(), rhs.clone()),
            _ => (self.contiguous()?, rhs.contiguous()?),
        };
        let (la, lb) = (as3(&a, m, k)?, as3(&b, k, n)?);
        let s = a.storage().matmul(&la, &b.storage(), &lb)?;
        let shape: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
        let (x, y) = (self.clone(), rhs.clone());
        Ok(from_op(s, &shape, "matmul", &[self, rhs], move |g, need| {
            let ga = if need[0] { Some(g.matmul(&y.t()?)?.sum_to(x.dims())?) } else { None };
            let gb = if need[1] { Some(x.t()?.matmul(g)?.sum_to(y.dims())?) } else { None };
            Ok(vec![ga, gb])
        }))
    }

    /// `x W^T + b` with PyTorch's `nn.Linear` weight layout `[out, in]`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = self.matmul(&weight.t()?)?;
        match bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
}
