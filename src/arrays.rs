//! Conversions between `Tensor` and `ndarray` arrays, both ways and always copying, so
//! that a library user hands data in and takes results out without touching storage.
//! Any array layout is accepted (transposed, sliced, negative strides: elements are
//! read in logical order), and any tensor (any device, any view) comes out as a
//! standard-layout array of its shape.

use crate::backend::CpuStorage;
use crate::{bail, Device, Result, Tensor, WithDType};
use ndarray::{ArrayBase, ArrayD, Data, Dimension, IxDyn};

impl Tensor {
    /// A tensor on `device` holding a copy of `array`, of its shape and element type.
    pub fn from_ndarray<T: WithDType, S: Data<Elem = T>, D: Dimension>(array: &ArrayBase<S, D>, device: Device) -> Result<Tensor> {
        // `iter` walks the logical (row-major) order whatever the strides
        Tensor::from_vec(array.iter().copied().collect(), array.shape(), device)
    }

    /// A copy of this tensor as an array of its shape. `T` must be the tensor's dtype
    /// (`to_dtype` converts first if needed): nothing is converted silently.
    pub fn to_ndarray<T: WithDType>(&self) -> Result<ArrayD<T>> {
        if self.dtype() != T::DTYPE {
            bail!("to_ndarray: the tensor is {:?}, the array asks for {:?} (convert with to_dtype)", self.dtype(), T::DTYPE);
        }
        let t = self.contiguous()?;
        let cpu = t.storage().to_cpu()?;
        let range = t.layout().contiguous_range().expect("contiguous() gives a contiguous view");
        let data: Vec<T> = match &cpu {
            CpuStorage::F32(v) => bytemuck::cast_slice(&v[range]).to_vec(),
            CpuStorage::F16(v) => bytemuck::cast_slice(&v[range]).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(&v[range]).to_vec(),
            CpuStorage::U32(v) => bytemuck::cast_slice(&v[range]).to_vec(),
        };
        Ok(ArrayD::from_shape_vec(IxDyn(self.dims()), data).expect("a contiguous tensor's elements fill its shape"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2, Array3, Axis};

    #[test]
    fn round_trips_keep_shape_and_values() {
        let a = Array3::from_shape_fn((2, 3, 4), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
        let t = Tensor::from_ndarray(&a, Device::Cpu).unwrap();
        assert_eq!(t.dims(), [2, 3, 4]);
        assert_eq!(t.to_ndarray::<f32>().unwrap(), a.into_dyn());
        let idx = Array2::from_shape_fn((2, 2), |(i, j)| (i * 2 + j) as u32);
        assert_eq!(Tensor::from_ndarray(&idx, Device::Cpu).unwrap().to_ndarray::<u32>().unwrap(), idx.into_dyn());
    }

    #[test]
    fn any_array_layout_goes_in() {
        let a = Array3::from_shape_fn((3, 4, 5), |(i, j, k)| (i * 100 + j * 10 + k) as f32);
        // transposed, sliced with a step, and reversed (negative stride) views
        let views = [a.t().to_owned(), a.slice(s![.., 1..;2, ..]).to_owned(), a.slice(s![..;-1, .., 2..]).to_owned()];
        let raw = [a.t().into_dyn(), a.slice(s![.., 1..;2, ..]).into_dyn(), a.slice(s![..;-1, .., 2..]).into_dyn()];
        for (owned, view) in views.iter().zip(&raw) {
            let t = Tensor::from_ndarray(view, Device::Cpu).unwrap();
            assert_eq!(t.to_ndarray::<f32>().unwrap(), owned.clone().into_dyn());
        }
    }

    #[test]
    fn any_tensor_layout_comes_out() {
        let a = Array2::from_shape_fn((3, 4), |(i, j)| (i * 10 + j) as f32);
        let t = Tensor::from_ndarray(&a, Device::Cpu).unwrap();
        assert_eq!(t.t().unwrap().to_ndarray::<f32>().unwrap(), a.t().to_owned().into_dyn());
        assert_eq!(t.narrow(1, 1, 2).unwrap().to_ndarray::<f32>().unwrap(), a.slice(s![.., 1..3]).to_owned().into_dyn());
        let b = t.unsqueeze(0).unwrap().broadcast_as(&[2, 3, 4]).unwrap();
        assert_eq!(b.to_ndarray::<f32>().unwrap(), a.insert_axis(Axis(0)).broadcast((2, 3, 4)).unwrap().to_owned().into_dyn());
        // on the emulator too: the copy comes back from the device
        let e = t.to_device(Device::CudaEmu).unwrap().t().unwrap();
        assert_eq!(e.to_ndarray::<f32>().unwrap(), t.t().unwrap().to_ndarray::<f32>().unwrap());
    }

    #[test]
    fn the_dtype_must_match() {
        let t = Tensor::from_ndarray(&Array2::<f32>::zeros((2, 2)), Device::Cpu).unwrap();
        let err = t.to_ndarray::<u32>().unwrap_err().to_string();
        assert!(err.contains("to_dtype"), "{err}");
    }
}
