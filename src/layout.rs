//! Shape, strides and offset of a view into a storage buffer. Views (reshape of a
//! contiguous tensor, permute, transpose, broadcast, narrow) only change the layout.

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    /// Strides in elements. A stride of 0 is a broadcast dimension.
    strides: Vec<usize>,
    offset: usize,
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc *= shape[i];
    }
    strides
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }
    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.len(), strides.len());
        Layout { shape, strides, offset }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for i in (0..self.shape.len()).rev() {
            if self.shape[i] != 1 && self.strides[i] != acc {
                return false;
            }
            acc *= self.shape[i];
        }
        true
    }

    /// The contiguous range of the storage this layout covers, when it is contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous().then(|| self.offset..self.offset + self.elem_count())
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Layout> {
        let mut seen = vec![false; self.rank()];
        if dims.len() != self.rank() || dims.iter().any(|&d| d >= self.rank() || std::mem::replace(&mut seen[d], true)) {
            return Err(Error::Msg(format!("permute: {dims:?} is not a permutation of {} dims", self.rank())));
        }
        Ok(Layout { shape: dims.iter().map(|&d| self.shape[d]).collect(), strides: dims.iter().map(|&d| self.strides[d]).collect(), offset: self.offset })
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::Msg(format!("narrow: dim {dim} range {start}..{} out of shape {:?}", start + len, self.shape)));
        }
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Ok(l)
    }

    /// Broadcasts to `shape` (numpy rules, aligned on the right) with zero strides.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Layout> {
        if shape.len() < self.rank() {
            return Err(Error::ShapeMismatch { op: "broadcast", lhs: self.shape.clone(), rhs: shape.to_vec() });
        }
        let extra = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for (i, &s) in shape.iter().enumerate() {
            if i < extra {
                continue;
            }
            let own = self.shape[i - extra];
            if own == s {
                strides[i] = self.strides[i - extra];
            } else if own == 1 {
                strides[i] = 0;
            } else {
                return Err(Error::ShapeMismatch { op: "broadcast", lhs: self.shape.clone(), rhs: shape.to_vec() });
            }
        }
        Ok(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// Storage offsets of every element in row-major order, visited in runs along the
    /// last dimension: `f(start_offset, stride, run_len)`. Hot loops use this instead of
    /// per-element index arithmetic.
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        if self.elem_count() == 0 {
            return;
        }
        if let Some(r) = self.contiguous_range() {
            return f(r.start, 1, r.len());
        }
        let rank = self.rank();
        let (inner, inner_stride) = (self.shape[rank - 1], self.strides[rank - 1]);
        let outer = &self.shape[..rank - 1];
        let mut idx = vec![0usize; outer.len()];
        let mut off = self.offset;
        loop {
            f(off, inner_stride, inner);
            // odometer increment over the outer dims
            let mut d = outer.len();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                off += self.strides[d];
                if idx[d] < outer[d] {
                    break;
                }
                off -= self.strides[d] * outer[d];
                idx[d] = 0;
            }
        }
    }

    /// Storage offset of the element at row-major position `index`.
    pub fn offset_of_flat(&self, mut index: usize) -> usize {
        let mut off = self.offset;
        for d in (0..self.rank()).rev() {
            off += (index % self.shape[d]) * self.strides[d];
            index /= self.shape[d];
        }
        off
    }

    /// Offset of the first element of outer row `row`, where rows run over all dims but
    /// the last. Used to split strided work across threads.
    pub fn row_offset(&self, mut row: usize) -> usize {
        let rank = self.rank();
        let mut off = self.offset;
        for d in (0..rank.saturating_sub(1)).rev() {
            off += (row % self.shape[d]) * self.strides[d];
            row /= self.shape[d];
        }
        off
    }
}

/// The numpy broadcast of two shapes.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::ShapeMismatch { op, lhs: a.to_vec(), rhs: b.to_vec() }),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn runs_of_a_transposed_view() {
        let l = Layout::contiguous(&[2, 3]).permute(&[1, 0]).unwrap();
        let mut offs = vec![];
        l.for_each_run(|s, st, n| (0..n).for_each(|i| offs.push(s + i * st)));
        assert_eq!(offs, vec![0, 3, 1, 4, 2, 5]);
        assert_eq!((0..3).map(|r| l.row_offset(r)).collect::<Vec<_>>(), vec![0, 1, 2]);
    }
    #[test]
    fn broadcasting() {
        assert_eq!(broadcast_shape("t", &[4, 1, 3], &[5, 1]).unwrap(), vec![4, 5, 3]);
        assert!(broadcast_shape("t", &[2, 3], &[4, 3]).is_err());
        let l = Layout::contiguous(&[3]).broadcast_as(&[2, 3]).unwrap();
        assert_eq!(l.strides(), &[0, 1]);
    }
}
