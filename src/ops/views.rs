//! Ops that only change the layout (reshape, permute, broadcast, narrow), and the copies
//! that make or combine buffers (contiguous, cat).

use super::{from_op, view_op};
use crate::backend::Storage;
use crate::{bail, Error, Layout, Result, Tensor};

impl Tensor {
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(Error::ShapeMismatch { op: "reshape", lhs: self.dims().to_vec(), rhs: shape.to_vec() });
        }
        let src = if self.is_contiguous() { self.clone() } else { self.contiguous()? };
        let layout = Layout::new(shape.to_vec(), crate::layout::contiguous_strides(shape), src.layout().offset());
        let dims = self.dims().to_vec();
        Ok(view_op(&src, layout, "reshape", move |g, _| Ok(vec![Some(g.reshape(&dims)?)])))
    }

    /// Merges dims `from..` into one.
    pub fn flatten_from(&self, from: usize) -> Result<Tensor> {
        let mut shape = self.dims()[..from].to_vec();
        shape.push(self.dims()[from..].iter().product());
        self.reshape(&shape)
    }

    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        let mut shape = self.dims().to_vec();
        if dim > shape.len() {
            bail!("unsqueeze: dim {dim} out of range for shape {shape:?}");
        }
        shape.insert(dim, 1);
        self.reshape(&shape)
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let layout = self.layout().permute(dims)?;
        let mut inverse = vec![0; dims.len()];
        dims.iter().enumerate().for_each(|(i, &d)| inverse[d] = i);
        Ok(view_op(self, layout, "permute", move |g, _| Ok(vec![Some(g.permute(&inverse)?)])))
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        if a >= dims.len() || b >= dims.len() {
            bail!("transpose: dims ({a}, {b}) out of range for shape {:?}", self.dims());
        }
        dims.swap(a, b);
        self.permute(&dims)
    }

    /// Transpose of the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        let r = self.rank();
        if r < 2 {
            bail!("t: needs at least 2 dims, got shape {:?}", self.dims());
        }
        self.transpose(r - 2, r - 1)
    }

    /// A stride-0 view repeating this tensor along broadcast dims (numpy rules).
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as(shape)?;
        let dims = self.dims().to_vec();
        Ok(view_op(self, layout, "broadcast", move |g, _| Ok(vec![Some(g.sum_to(&dims)?)])))
    }

    /// Sums a broadcast gradient back down to `shape` (the inverse of `broadcast_as`).
    pub fn sum_to(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let extra = self.rank() - shape.len();
        let dims: Vec<usize> = (0..self.rank()).filter(|&d| d < extra || (shape[d - extra] == 1 && self.dims()[d] != 1)).collect();
        self.sum(&dims, true)?.reshape(shape)
    }

    /// `len` entries of dim `dim` starting at `start`, as a view.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let layout = self.layout().narrow(dim, start, len)?;
        let dims = self.dims().to_vec();
        Ok(view_op(self, layout, "narrow", move |g, _| {
            let full = Layout::contiguous(&dims);
            let mut s = Storage::zeros(full.elem_count(), g.dtype(), g.device())?;
            g.storage().copy_into(g.layout(), &mut s, &full.narrow(dim, start, len)?)?;
            Ok(vec![Some(Tensor::from_storage(s, &dims))])
        }))
    }

    /// Splits dim `dim` into pieces of the given sizes (views).
    pub fn split(&self, dim: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let t = self.narrow(dim, start, n);
                start += n;
                t
            })
            .collect()
    }

    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let s = self.storage().copy_strided(self.layout())?;
        Ok(from_op(s, self.dims(), "contiguous", &[self], |g, _| Ok(vec![Some(g.clone())])))
    }

    /// Concatenates along `dim`; all other dims must agree.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        let Some(first) = tensors.first() else { bail!("cat: no tensors") };
        let mut shape = first.dims().to_vec();
        if dim >= shape.len() {
            bail!("cat: dim {dim} out of range for shape {shape:?}");
        }
        shape[dim] = 0;
        for t in tensors {
            let same = t.rank() == first.rank() && (0..t.rank()).all(|d| d == dim || t.dims()[d] == first.dims()[d]);
            if !same {
                return Err(Error::ShapeMismatch { op: "cat", lhs: first.dims().to_vec(), rhs: t.dims().to_vec() });
            }
            shape[dim] += t.dims()[dim];
        }
        let out_layout = Layout::contiguous(&shape);
        let mut storage = Storage::zeros(out_layout.elem_count(), first.dtype(), first.device())?;
        let (mut sizes, mut start) = (vec![], 0);
        for t in tensors {
            let n = t.dims()[dim];
            t.storage().copy_into(t.layout(), &mut storage, &out_layout.narrow(dim, start, n)?)?;
            sizes.push(n);
            start += n;
        }
        Ok(from_op(storage, &shape, "cat", tensors, move |g, _| Ok(g.split(dim, &sizes)?.into_iter().map(Some).collect())))
    }

    /// Stacks equal-shaped tensors along a new leading dim.
    pub fn stack(tensors: &[&Tensor]) -> Result<Tensor> {
        let parts: Vec<Tensor> = tensors.iter().map(|t| t.unsqueeze(0)).collect::<Result<_>>()?;
        Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)
    }
}
