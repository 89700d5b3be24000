//! Softmax and log-softmax along any dim (computed along the last, fused and stable).

use super::from_op_saving_output;
use crate::{Result, Tensor};

impl Tensor {
    fn softmax_impl(&self, dim: usize, log: bool) -> Result<Tensor> {
        let last = self.rank() - 1;
        if dim != last {
            return self.transpose(dim, last)?.softmax_impl(last, log)?.transpose(dim, last);
        }
        let x = self.contiguous()?;
        let s = x.storage().softmax_last(x.layout(), log)?;
        let name = if log { "log_softmax" } else { "softmax" };
        Ok(from_op_saving_output(s, self.dims(), name, &[&x], move |y| {
            move |g: &Tensor, _: &[bool]| {
                let gx = if log {
                    // d/dx log_softmax: g - softmax * sum(g)
                    g.sub(&y.exp()?.mul(&g.sum(&[last], true)?)?)?
                } else {
                    // d/dx softmax: y * (g - sum(g * y))
                    y.mul(&g.sub(&g.mul(&y)?.sum(&[last], true)?)?)?
                };
                Ok(vec![Some(gx)])
            }
        }))
    }

    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        self.softmax_impl(dim, false)
    }
    pub fn log_softmax(&self, dim: usize) -> Result<Tensor> {
        self.softmax_impl(dim, true)
    }
}
