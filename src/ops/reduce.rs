//! Reductions over axes: sum, mean, max, min, variance.

use super::from_op;
use crate::backend::{BinaryOp, ReduceOp};
use crate::{bail, Result, Tensor};

impl Tensor {
    fn reduce_op(&self, op: ReduceOp, dims: &[usize], keepdim: bool) -> Result<(Tensor, Vec<usize>)> {
        let mut kept = self.dims().to_vec();
        for &d in dims {
            if d >= self.rank() {
                bail!("reduce: axis {d} out of range for shape {:?}", self.dims());
            }
            kept[d] = 1;
        }
        let s = self.storage().reduce(self.layout(), op, dims)?;
        let out_shape: Vec<usize> = if keepdim { kept.clone() } else { (0..self.rank()).filter(|d| !dims.contains(d)).map(|d| self.dims()[d]).collect() };
        let x = self.clone();
        let (kept_c, rdims) = (kept.clone(), dims.to_vec());
        let name = match op {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        };
        let t = from_op(s, &out_shape, name, &[self], move |g, _| {
            let g = g.reshape(&kept_c)?;
            match op {
                ReduceOp::Sum => Ok(vec![Some(g.broadcast_as(x.dims())?.contiguous()?)]),
                ReduceOp::Max | ReduceOp::Min => {
                    // like PyTorch's amax: the gradient is shared evenly among ties
                    let y = x.reduce_op(op, &rdims, true)?.0;
                    let mask = x.cmp(&y, BinaryOp::Eq)?;
                    let count = mask.sum(&rdims, true)?;
                    Ok(vec![Some(mask.mul(&g.div(&count)?)?)])
                }
            }
        });
        Ok((t, kept))
    }

    /// Sum over `dims`; with `keepdim` they stay with size 1.
    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        Ok(self.reduce_op(ReduceOp::Sum, dims, keepdim)?.0)
    }
    pub fn max(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        Ok(self.reduce_op(ReduceOp::Max, dims, keepdim)?.0)
    }
    pub fn min(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        Ok(self.reduce_op(ReduceOp::Min, dims, keepdim)?.0)
    }
    pub fn sum_all(&self) -> Result<Tensor> {
        self.sum(&(0..self.rank()).collect::<Vec<_>>(), false)
    }
    pub fn mean_all(&self) -> Result<Tensor> {
        self.sum_all()?.scale(1.0 / self.elem_count().max(1) as f32)
    }
    pub fn max_all(&self) -> Result<Tensor> {
        self.max(&(0..self.rank()).collect::<Vec<_>>(), false)
    }

    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Result<Tensor> {
        let n: usize = dims.iter().map(|&d| self.dims()[d]).product();
        self.sum(dims, keepdim)?.scale(1.0 / n.max(1) as f32)
    }

    /// Variance over `dims`: biased (divides by n) or unbiased (n - 1).
    pub fn var(&self, dims: &[usize], keepdim: bool, unbiased: bool) -> Result<Tensor> {
        let n: usize = dims.iter().map(|&d| self.dims()[d]).product();
        let centered = self.sub(&self.mean(dims, true)?)?;
        let denom = if unbiased { n.saturating_sub(1).max(1) } else { n.max(1) };
        centered.sqr()?.sum(dims, keepdim)?.scale(1.0 / denom as f32)
    }

    /// Index of the maximum along the last dim (no gradient), e.g. predicted classes.
    pub fn argmax_last(&self) -> Result<Vec<usize>> {
        let d = *self.dims().last().unwrap_or(&1);
        let v = self.to_vec_f32()?;
        Ok(v.chunks(d.max(1)).map(|r| r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0).collect())
    }
}
