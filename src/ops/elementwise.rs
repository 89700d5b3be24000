//! Element-wise ops: unary maps and broadcasting binary arithmetic.

use super::{from_op, from_op_saving_output};
use crate::backend::{BinaryOp, UnaryOp};
use crate::{broadcast_shape, Result, Tensor};

/// How a unary op's gradient is formed from (x, y, grad).
type UnaryGrad = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

impl Tensor {
    fn unary(&self, op: UnaryOp, name: &'static str, grad: UnaryGrad) -> Result<Tensor> {
        let s = self.storage().unary(self.layout(), op)?;
        let x = self.clone();
        Ok(from_op_saving_output(s, self.dims(), name, &[self], move |y| move |g, _| Ok(vec![Some(grad(&x, &y, g)?)])))
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg, "neg", |_, _, g| g.neg())
    }
    pub fn recip(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Recip, "recip", |_, y, g| g.mul(&y.sqr()?)?.neg())
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp, "exp", |_, y, g| g.mul(y))
    }
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log, "log", |x, _, g| g.div(x))
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt, "sqrt", |_, y, g| g.div(&y.affine(2.0, 0.0)?))
    }
    pub fn sqr(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqr, "sqr", |x, _, g| g.mul(&x.affine(2.0, 0.0)?))
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs, "abs", |x, _, g| g.mul(&x.map(UnaryOp::Sign)?))
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu, "relu", |x, _, g| g.binary(x, BinaryOp::WherePositive))
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid, "sigmoid", |_, y, g| g.mul(&y.mul(&y.affine(-1.0, 1.0)?)?))
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh, "tanh", |_, y, g| g.mul(&y.sqr()?.affine(-1.0, 1.0)?))
    }

    pub fn leaky_relu(&self, slope: f32) -> Result<Tensor> {
        let s = self.storage().unary(self.layout(), UnaryOp::LeakyRelu(slope))?;
        let x = self.clone();
        Ok(from_op(s, self.dims(), "leaky_relu", &[self], move |g, _| Ok(vec![Some(g.mul(&x.map(UnaryOp::LeakyStep(slope))?)?)])))
    }
    pub fn powf(&self, e: f32) -> Result<Tensor> {
        let s = self.storage().unary(self.layout(), UnaryOp::Powf(e))?;
        let x = self.clone();
        Ok(from_op(s, self.dims(), "powf", &[self], move |g, _| Ok(vec![Some(g.mul(&x.powf(e - 1.0)?.affine(e, 0.0)?)?)])))
    }
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        let s = self.storage().unary(self.layout(), UnaryOp::Clamp(lo, hi))?;
        let x = self.clone();
        Ok(from_op(s, self.dims(), "clamp", &[self], move |g, _| Ok(vec![Some(g.mul(&x.map(UnaryOp::InRange(lo, hi))?)?)])))
    }
    /// `self * mul + add`.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        let s = self.storage().unary(self.layout(), UnaryOp::Affine(mul, add))?;
        Ok(from_op(s, self.dims(), "affine", &[self], move |g, _| Ok(vec![Some(g.affine(mul, 0.0)?)])))
    }
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        self.affine(s, 0.0)
    }
    pub fn add_scalar(&self, a: f32) -> Result<Tensor> {
        self.affine(1.0, a)
    }

    /// A unary map with no gradient (masks and signs used by backward rules).
    pub fn map(&self, op: UnaryOp) -> Result<Tensor> {
        Ok(Tensor::from_storage(self.storage().unary(self.layout(), op)?, self.dims()))
    }

    fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let shape = broadcast_shape(op.label(), self.dims(), rhs.dims())?;
        let (la, lb) = (self.layout().broadcast_as(&shape)?, rhs.layout().broadcast_as(&shape)?);
        let s = if std::sync::Arc::ptr_eq(self.storage_arc(), rhs.storage_arc()) {
            let st = self.storage();
            st.binary(&la, &st, &lb, op)?
        } else {
            self.storage().binary(&la, &rhs.storage(), &lb, op)?
        };
        let (a, b) = (self.clone(), rhs.clone());
        Ok(from_op(s, &shape, op.label(), &[self, rhs], move |g, need| {
            let (da, db) = (a.dims(), b.dims());
            let grads = match op {
                BinaryOp::Add => (g.clone(), g.clone()),
                BinaryOp::Sub => (g.clone(), g.neg()?),
                BinaryOp::Mul => (if need[0] { g.mul(&b)? } else { g.clone() }, if need[1] { g.mul(&a)? } else { g.clone() }),
                BinaryOp::Div => {
                    let ga = g.div(&b)?;
                    let gb = if need[1] { ga.mul(&a)?.div(&b)?.neg()? } else { ga.clone() };
                    (ga, gb)
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // the gradient goes to the operand that was picked; ties go to lhs
                    let lost = if op == BinaryOp::Max { b.cmp(&a, BinaryOp::Gt)? } else { a.cmp(&b, BinaryOp::Gt)? };
                    let ga = g.mul(&lost.affine(-1.0, 1.0)?)?;
                    (ga.clone(), g.sub(&ga)?)
                }
                BinaryOp::Eq | BinaryOp::Gt => return Ok(vec![None, None]),
                // a mask by rhs's sign: linear in lhs, flat in rhs
                BinaryOp::WherePositive => return Ok(vec![Some(g.binary(&b, op)?.sum_to(da)?), None]),
            };
            Ok(vec![Some(grads.0.sum_to(da)?), Some(grads.1.sum_to(db)?)])
        }))
    }

    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Max)
    }
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Min)
    }
    /// 0/1 comparison (`Eq` or `Gt`), with no gradient.
    pub fn cmp(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let t = crate::autograd::no_grad(|| self.binary(rhs, op))?;
        Ok(t.detach())
    }
}
