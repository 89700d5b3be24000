//! Pooling, unpooling and nearest-neighbour upsampling over NCHW tensors.

use super::from_op;
use crate::backend::Pool2dParams;
use crate::{bail, Result, Tensor};

/// Square-window params over `x`; the geometry is checked once, by
/// `Pool2dParams::check` on the way into `Storage`.
fn pool_params(x: [usize; 4], k: usize, stride: usize, padding: usize) -> Pool2dParams {
    let [batch, channels, h_in, w_in] = x;
    Pool2dParams { batch, channels, h_in, w_in, kh: k, kw: k, stride: (stride, stride), padding: (padding, padding) }
}

impl Tensor {
    /// Max pooling; also returns, per output, the flat index of the max in its input
    /// plane (u32), for `max_unpool2d`.
    pub fn max_pool2d_with_indices(&self, k: usize, stride: usize, padding: usize) -> Result<(Tensor, Tensor)> {
        let p = pool_params(self.dims4("max_pool2d")?, k, stride, padding);
        let x = self.contiguous()?;
        let (s, idx) = x.storage().max_pool2d(x.layout(), &p)?;
        let idx = Tensor::from_storage(idx, &p.output_shape());
        let ix = idx.clone();
        let y = from_op(s, &p.output_shape(), "max_pool2d", &[&x], move |g, _| {
            let g = g.contiguous()?;
            let s = g.storage().scatter_add_planes(g.layout(), &ix.storage(), ix.layout(), p.h_in * p.w_in)?;
            Ok(vec![Some(Tensor::from_storage(s, &p.input_shape()))])
        });
        Ok((y, idx))
    }

    pub fn max_pool2d(&self, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
        Ok(self.max_pool2d_with_indices(k, stride, padding)?.0)
    }

    /// Places each value at its index in a zero `[n, c, h, w]` output (PyTorch's
    /// `max_unpool2d` with `output_size`).
    pub fn max_unpool2d(&self, indices: &Tensor, out_hw: (usize, usize)) -> Result<Tensor> {
        let [n, c, ..] = self.dims4("max_unpool2d")?;
        if indices.dims() != self.dims() {
            bail!("max_unpool2d: indices {:?} must match input {:?}", indices.dims(), self.dims());
        }
        let x = self.contiguous()?;
        let s = x.storage().scatter_add_planes(x.layout(), &indices.storage(), indices.layout(), out_hw.0 * out_hw.1)?;
        let ix = indices.clone();
        Ok(from_op(s, &[n, c, out_hw.0, out_hw.1], "max_unpool2d", &[&x], move |g, _| {
            let g = g.contiguous()?;
            let s = g.storage().gather_planes(g.layout(), &ix.storage(), ix.layout())?;
            Ok(vec![Some(Tensor::from_storage(s, ix.dims()))])
        }))
    }

    /// `out[p, j] = self[p, indices[p, j]]` within each (sample, channel) plane: any
    /// per-plane remapping of pixels (shifts, flips). Indices are u32 `[n, c, ho, wo]`,
    /// each below `h * w`; the gradient scatters back (and adds where pixels repeat).
    pub fn gather_planes(&self, indices: &Tensor) -> Result<Tensor> {
        let [n, c, h, w] = self.dims4("gather_planes")?;
        let [ni, ci, ..] = indices.dims4("gather_planes indices")?;
        if (ni, ci) != (n, c) {
            bail!("gather_planes: indices {:?} must have the planes of input {:?}", indices.dims(), self.dims());
        }
        let x = self.contiguous()?;
        let s = x.storage().gather_planes(x.layout(), &indices.storage(), indices.layout())?;
        let ix = indices.clone();
        Ok(from_op(s, indices.dims(), "gather_planes", &[&x], move |g, _| {
            let g = g.contiguous()?;
            let s = g.storage().scatter_add_planes(g.layout(), &ix.storage(), ix.layout(), h * w)?;
            Ok(vec![Some(Tensor::from_storage(s, &[n, c, h, w]))])
        }))
    }

    /// Average pooling (zero padding counts in the divisor, as PyTorch's default).
    pub fn avg_pool2d(&self, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
        let p = pool_params(self.dims4("avg_pool2d")?, k, stride, padding);
        let x = self.contiguous()?;
        let s = x.storage().avg_pool2d(x.layout(), &p)?;
        Ok(from_op(s, &p.output_shape(), "avg_pool2d", &[&x], move |g, _| {
            let g = g.contiguous()?;
            let s = g.storage().avg_pool2d_backward(g.layout(), &p)?;
            Ok(vec![Some(Tensor::from_storage(s, &p.input_shape()))])
        }))
    }

    /// Adaptive average pooling to `out` x `out`, for sizes that divide the input
    /// (global pooling when `out` is 1).
    pub fn adaptive_avg_pool2d(&self, out: usize) -> Result<Tensor> {
        let [_, _, h, w] = self.dims4("adaptive_avg_pool2d")?;
        if out == 1 {
            return self.mean(&[2, 3], true);
        }
        if h % out != 0 || w % out != 0 || h != w {
            bail!("adaptive_avg_pool2d: output {out} must divide the square input {h}x{w}");
        }
        self.avg_pool2d(h / out, h / out, 0)
    }

    /// Nearest-neighbour upsampling by an integer factor.
    pub fn upsample_nearest2d(&self, scale: usize) -> Result<Tensor> {
        let [n, c, h, w] = self.dims4("upsample_nearest2d")?;
        let x = self.contiguous()?;
        let s = x.storage().upsample_nearest2d(x.layout(), (scale, scale))?;
        Ok(from_op(s, &[n, c, h * scale, w * scale], "upsample_nearest2d", &[&x], move |g, _| {
            let g = g.contiguous()?;
            let s = g.storage().upsample_nearest2d_backward(g.layout(), (scale, scale))?;
            Ok(vec![Some(Tensor::from_storage(s, &[n, c, h, w]))])
        }))
    }
}
