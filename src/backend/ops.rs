//! The primitive op vocabulary shared by every backend. Each element-wise variant
//! carries its scalar definition (`apply`), the one Rust copy of the math, which every
//! CPU path calls, and its kernel name (used by the CUDA backend). The kernels
//! (kernels/unary.cu, binary.cu, reduce.cu) write the same expressions again in CUDA
//! C++: that second copy can drift, and tests/cuda_parity.rs is what ties it to this one.

use crate::{bail, Layout, Result};

/// Element-wise maps `f32 -> f32`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    Recip,
    Exp,
    Log,
    Sqrt,
    Sqr,
    Abs,
    /// sign(x) in {-1, 0, 1}: the derivative of abs.
    Sign,
    Relu,
    Sigmoid,
    Tanh,
    LeakyRelu(f32),
    /// 1 where x > 0 else slope: the derivative of leaky_relu.
    LeakyStep(f32),
    Powf(f32),
    Clamp(f32, f32),
    /// 1 where lo < x < hi else 0: the derivative of clamp.
    InRange(f32, f32),
    /// x * mul + add
    Affine(f32, f32),
}

impl UnaryOp {
    /// Every variant (parameters as the kernel tests use them): tests that cover each
    /// op go through this list, so a new variant is tested once it is listed here.
    pub const ALL: [UnaryOp; 17] = {
        use UnaryOp::*;
        [
            Neg,
            Recip,
            Exp,
            Log,
            Sqrt,
            Sqr,
            Abs,
            Sign,
            Relu,
            Sigmoid,
            Tanh,
            LeakyRelu(0.1),
            LeakyStep(0.1),
            Powf(1.7),
            Clamp(-0.5, 0.7),
            InRange(-0.5, 0.7),
            Affine(1.3, -0.2),
        ]
    };

    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Sqr => x * x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sign => {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    s * x
                }
            }
            UnaryOp::LeakyStep(s) => {
                if x > 0.0 {
                    1.0
                } else {
                    s
                }
            }
            UnaryOp::Powf(e) => x.powf(e),
            UnaryOp::Clamp(lo, hi) => x.max(lo).min(hi),
            UnaryOp::InRange(lo, hi) => {
                if x > lo && x < hi {
                    1.0
                } else {
                    0.0
                }
            }
            UnaryOp::Affine(m, a) => x * m + a,
        }
    }
}

/// Element-wise `(f32, f32) -> f32` over two operands already broadcast to one shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// 1 where lhs == rhs else 0 (routes the gradient of max and min).
    Eq,
    /// 1 where lhs > rhs else 0.
    Gt,
    /// lhs where rhs > 0 else 0: relu's gradient (output gradient, input) in one pass,
    /// where `grad * step(x)` took two and a mask.
    WherePositive,
}

impl BinaryOp {
    /// Every variant, for the tests that cover each op.
    pub const ALL: [BinaryOp; 9] = {
        use BinaryOp::*;
        [Add, Sub, Mul, Div, Max, Min, Eq, Gt, WherePositive]
    };

    #[inline(always)]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::Eq => (a == b) as u8 as f32,
            BinaryOp::Gt => (a > b) as u8 as f32,
            BinaryOp::WherePositive => {
                if b > 0.0 {
                    a
                } else {
                    0.0
                }
            }
        }
    }
    /// The op's name in errors and in the autograd graph: its kernel's name
    /// (`badd_f32` in kernels/binary.cu) without the dtype.
    pub fn label(self) -> &'static str {
        match self {
            BinaryOp::Add => "badd",
            BinaryOp::Sub => "bsub",
            BinaryOp::Mul => "bmul",
            BinaryOp::Div => "bdiv",
            BinaryOp::Max => "bmax",
            BinaryOp::Min => "bmin",
            BinaryOp::Eq => "beq",
            BinaryOp::Gt => "bgt",
            BinaryOp::WherePositive => "bwhere_positive",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    /// Every variant, for the tests that cover each op.
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min];

    pub fn identity(self) -> f32 {
        match self {
            ReduceOp::Sum => 0.0,
            ReduceOp::Max => f32::NEG_INFINITY,
            ReduceOp::Min => f32::INFINITY,
        }
    }
    #[inline(always)]
    pub fn combine(self, a: f32, b: f32) -> f32 {
        match self {
            ReduceOp::Sum => a + b,
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }
}

/// Geometry of a 2-D convolution; the same struct describes the transposed convolution
/// (whose forward is this convolution's input gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    pub batch: usize,
    pub c_in: usize,
    pub h_in: usize,
    pub w_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Conv2dParams {
    /// The one geometry check of the convolution family (forward, both gradients and so
    /// the transposed convolution), run by `Storage` before any backend sees the params,
    /// so every device refuses the same inputs with the same message. `operands` pairs
    /// each input's layout with the method giving its shape (`Self::input_shape` etc.),
    /// called only once the geometry is known to be valid (it divides by the stride).
    pub fn check(&self, op: &str, operands: &[Operand<Self>]) -> Result<()> {
        let (kh, kw) = (self.kh, self.kw);
        if self.groups == 0 || !self.c_in.is_multiple_of(self.groups) || !self.c_out.is_multiple_of(self.groups) {
            bail!("{op}: groups = {} must divide c_in = {} and c_out = {}", self.groups, self.c_in, self.c_out);
        }
        if kh == 0 || kw == 0 || self.stride.0 == 0 || self.stride.1 == 0 || self.dilation.0 == 0 || self.dilation.1 == 0 {
            bail!("{op}: kernel {kh}x{kw}, stride {:?} and dilation {:?} must be positive", self.stride, self.dilation);
        }
        let padded = (self.h_in + 2 * self.padding.0, self.w_in + 2 * self.padding.1);
        if padded.0 < self.dilation.0 * (kh - 1) + 1 || padded.1 < self.dilation.1 * (kw - 1) + 1 {
            bail!("{op}: kernel {kh}x{kw} (dilation {:?}) is larger than the padded input {}x{}", self.dilation, padded.0, padded.1);
        }
        check_operands(op, self, operands)
    }
    pub fn h_out(&self) -> usize {
        (self.h_in + 2 * self.padding.0 - self.dilation.0 * (self.kh - 1) - 1) / self.stride.0 + 1
    }
    pub fn w_out(&self) -> usize {
        (self.w_in + 2 * self.padding.1 - self.dilation.1 * (self.kw - 1) - 1) / self.stride.1 + 1
    }
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.c_in, self.h_in, self.w_in]
    }
    /// A dense 3x3 convolution (one group, no dilation) with padding 1 and this stride
    /// in both axes, over non-empty operands: what the CPU's direct and Winograd 3x3
    /// kernels take, each within its own further bounds.
    pub fn is_dense_3x3(&self, stride: usize) -> bool {
        (self.kh, self.kw, self.stride, self.padding, self.dilation, self.groups) == (3, 3, (stride, stride), (1, 1), (1, 1), 1)
            && self.batch * self.c_in * self.c_out * self.h_in * self.w_in > 0
    }
    /// `b64 16x32x32 -> 32 3x3 s2`, plus padding, dilation and groups where they differ
    /// from the common case (padding k/2, dilation 1, one group): a profile's key.
    pub fn describe(&self) -> String {
        let mut s = format!("b{} {}x{}x{} -> {} {}x{} s{}", self.batch, self.c_in, self.h_in, self.w_in, self.c_out, self.kh, self.kw, self.stride.0);
        if self.stride.0 != self.stride.1 {
            s += &format!("x{}", self.stride.1);
        }
        if self.padding != (self.kh / 2, self.kw / 2) {
            s += &format!(" p{:?}", self.padding);
        }
        if self.dilation != (1, 1) {
            s += &format!(" d{:?}", self.dilation);
        }
        if self.groups != 1 {
            s += &format!(" g{}", self.groups);
        }
        s
    }
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in / self.groups, self.kh, self.kw]
    }
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.c_out, self.h_out(), self.w_out()]
    }
    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> usize {
        self.batch * self.c_out * self.h_out() * self.w_out() * (self.c_in / self.groups) * self.kh * self.kw
    }
}

/// Geometry of a 2-D pooling window over an NCHW tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2dParams {
    pub batch: usize,
    pub channels: usize,
    pub h_in: usize,
    pub w_in: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl Pool2dParams {
    /// The one geometry check of the pooling family (max, average and its gradient), run
    /// by `Storage` before any backend sees the params. `operands` as for
    /// `Conv2dParams::check`.
    pub fn check(&self, op: &str, operands: &[Operand<Self>]) -> Result<()> {
        if self.kh == 0 || self.kw == 0 || self.stride.0 == 0 || self.stride.1 == 0 {
            bail!("{op}: kernel {}x{} and stride {:?} must be positive", self.kh, self.kw, self.stride);
        }
        let padded = (self.h_in + 2 * self.padding.0, self.w_in + 2 * self.padding.1);
        if padded.0 < self.kh || padded.1 < self.kw {
            bail!("{op}: kernel {}x{} is larger than the padded input {}x{}", self.kh, self.kw, padded.0, padded.1);
        }
        if self.padding.0 * 2 > self.kh || self.padding.1 * 2 > self.kw {
            // Otherwise a window could lie entirely in the padding and have no maximum
            // (PyTorch refuses it for average pooling too).
            bail!("{op}: padding {:?} must be at most half the kernel {}x{}", self.padding, self.kh, self.kw);
        }
        check_operands(op, self, operands)
    }
    pub fn h_out(&self) -> usize {
        (self.h_in + 2 * self.padding.0 - self.kh) / self.stride.0 + 1
    }
    pub fn w_out(&self) -> usize {
        (self.w_in + 2 * self.padding.1 - self.kw) / self.stride.1 + 1
    }
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.h_in, self.w_in]
    }
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.h_out(), self.w_out()]
    }
}

/// An operand of an op with params `P`: its name, its layout, and the method of `P`
/// that gives its shape (`Conv2dParams::weight_shape`, ...).
pub type Operand<'a, P> = (&'a str, &'a Layout, fn(&P) -> [usize; 4]);

/// Each operand's shape must be the one the op's params give it.
fn check_operands<P>(op: &str, p: &P, operands: &[Operand<P>]) -> Result<()> {
    for (what, l, shape) in operands {
        let shape = shape(p);
        if l.shape() != shape {
            bail!("{op}: {what} has shape {:?}, the params need {shape:?}", l.shape());
        }
    }
    Ok(())
}

/// Hyper-parameters of one fused optimiser update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpdateRule {
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
        nesterov: bool,
    },
    /// `step` counts from 1; weight decay is PyTorch Adam's (L2, added to the gradient).
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u32,
    },
}
