//! Convolution and transposed convolution (NCHW, PyTorch weight layouts).

use super::from_op;
use crate::backend::Conv2dParams;
use crate::{bail, Result, Tensor};

/// Stride, padding, dilation and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvOpts {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Default for ConvOpts {
    fn default() -> Self {
        ConvOpts { stride: (1, 1), padding: (0, 0), dilation: (1, 1), groups: 1 }
    }
}

impl ConvOpts {
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = (p, p);
        self
    }
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = (d, d);
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
}

/// The params of a convolution of `x` by a weight `w`. Only the channel counts are
/// checked here (they are the tensors' business); the geometry is checked once, by
/// `Conv2dParams::check` on the way into `Storage`.
fn conv_params(x: [usize; 4], w: [usize; 4], c_out: usize, c_in_w: usize, o: &ConvOpts) -> Result<Conv2dParams> {
    let [n, c, h, wi] = x;
    let p = Conv2dParams {
        batch: n,
        c_in: c,
        h_in: h,
        w_in: wi,
        c_out,
        kh: w[2],
        kw: w[3],
        stride: o.stride,
        padding: o.padding,
        dilation: o.dilation,
        groups: o.groups,
    };
    if o.groups == 0 || !c.is_multiple_of(o.groups) || !c_out.is_multiple_of(o.groups) || c / o.groups != c_in_w {
        bail!("conv2d: input channels {c}, weight {w:?} and groups {} do not fit", o.groups);
    }
    Ok(p)
}

impl Tensor {
    /// 2-D convolution; `weight` is `[c_out, c_in / groups, kh, kw]`, bias `[c_out]`.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, opts: ConvOpts) -> Result<Tensor> {
        let (xd, wd) = (self.dims4("conv2d")?, weight.dims4("conv2d weight")?);
        let p = conv_params(xd, wd, wd[0], wd[1], &opts)?;
        let (x, w) = (self.contiguous()?, weight.contiguous()?);
        let s = x.storage().conv2d(x.layout(), &w.storage(), w.layout(), &p)?;
        let (xs, ws) = (x.clone(), w.clone());
        let y = from_op(s, &p.output_shape(), "conv2d", &[&x, &w], move |g, need| {
            let g = g.contiguous()?;
            let gx = if need[0] {
                Some(Tensor::from_storage(g.storage().conv2d_backward_input(g.layout(), &ws.storage(), ws.layout(), &p)?, &p.input_shape()))
            } else {
                None
            };
            let gw = if need[1] {
                Some(Tensor::from_storage(xs.storage().conv2d_backward_weight(xs.layout(), &g.storage(), g.layout(), &p)?, &p.weight_shape()))
            } else {
                None
            };
            Ok(vec![gx, gw])
        });
        match bias {
            Some(b) => y.add(&b.reshape(&[1, wd[0], 1, 1])?),
            None => Ok(y),
        }
    }

    /// Transposed convolution (PyTorch's `conv_transpose2d`); `weight` is
    /// `[c_in, c_out / groups, kh, kw]`. Its forward is conv2d's input gradient.
    pub fn conv_transpose2d(&self, weight: &Tensor, bias: Option<&Tensor>, opts: ConvOpts, output_padding: (usize, usize)) -> Result<Tensor> {
        let ([n, c_in, h, wi], wd) = (self.dims4("conv_transpose2d")?, weight.dims4("conv_transpose2d weight")?);
        if wd[0] != c_in {
            bail!("conv_transpose2d: input has {c_in} channels, weight {wd:?} expects {}", wd[0]);
        }
        let c_out = wd[1] * opts.groups;
        let h_out = (h - 1) * opts.stride.0 + opts.dilation.0 * (wd[2] - 1) + output_padding.0 + 1;
        let w_out = (wi - 1) * opts.stride.1 + opts.dilation.1 * (wd[3] - 1) + output_padding.1 + 1;
        let (h_out, w_out) = match (h_out.checked_sub(2 * opts.padding.0), w_out.checked_sub(2 * opts.padding.1)) {
            (Some(a), Some(b)) if a > 0 && b > 0 => (a, b),
            _ => bail!("conv_transpose2d: padding {:?} leaves no output for input {h}x{wi}", opts.padding),
        };
        // the equivalent convolution maps our output [n, c_out, h_out, w_out] to our input
        // (h_out + 2p - d(k-1) - 1) / s + 1 = h + op / s: the convolution gives back our
        // input's size exactly when the output padding is below the stride
        if output_padding.0 >= opts.stride.0 || output_padding.1 >= opts.stride.1 {
            bail!("conv_transpose2d: output padding {output_padding:?} must be smaller than the stride {:?}", opts.stride);
        }
        let p = conv_params([n, c_out, h_out, w_out], wd, c_in, wd[1], &opts)?;
        let (x, w) = (self.contiguous()?, weight.contiguous()?);
        let s = x.storage().conv2d_backward_input(x.layout(), &w.storage(), w.layout(), &p)?;
        let (xs, ws) = (x.clone(), w.clone());
        let y = from_op(s, &p.input_shape(), "conv_transpose2d", &[&x, &w], move |g, need| {
            let g = g.contiguous()?;
            let gx =
                if need[0] { Some(Tensor::from_storage(g.storage().conv2d(g.layout(), &ws.storage(), ws.layout(), &p)?, &p.output_shape())) } else { None };
            let gw = if need[1] {
                Some(Tensor::from_storage(g.storage().conv2d_backward_weight(g.layout(), &xs.storage(), xs.layout(), &p)?, &p.weight_shape()))
            } else {
                None
            };
            Ok(vec![gx, gw])
        });
        match bias {
            Some(b) => y.add(&b.reshape(&[1, c_out, 1, 1])?),
            None => Ok(y),
        }
    }
}
