//! Random crops, shifts and flips of synthesised images, differentiable so that the
//! generator learns through them (`distill.augment_shift`, `distill.augment_scale`).
//!
//! Decision (the paper is silent): CMI and Fast-DFKD augment the synthetic batch before
//! the teacher and the student see it. A generator trained through random translations
//! cannot rely on pixel-exact adversarial patterns, and the student sees each image in
//! several positions, as it would with real data.

use crate::pipeline::config::DistillConfig;
use crate::rng::Rng;
use crate::{Result, Tensor};

/// How synthetic images are augmented before the networks see them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// The largest shift in pixels, each direction; with any shift or crop the image is
    /// also mirrored half the time.
    pub shift: usize,
    /// The smallest area of a random resized crop, as a fraction of the image (1: no
    /// crop).
    pub min_scale: f32,
}

impl Augment {
    /// Images as they are.
    pub const NONE: Augment = Augment { shift: 0, min_scale: 1.0 };

    pub fn from_config(d: &DistillConfig) -> Augment {
        Augment { shift: d.augment_shift, min_scale: d.augment_scale }
    }

    pub fn is_identity(&self) -> bool {
        self.shift == 0 && self.min_scale >= 1.0
    }

    /// `x` augmented with fresh draws from `rng`: a crop when `min_scale` < 1, then the
    /// shift and the mirror; `x` itself when there is nothing to do.
    pub fn apply(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        match (self.is_identity(), self.min_scale < 1.0) {
            (true, _) => Ok(x.clone()),
            (false, false) => random_shift_flip(x, self.shift, rng),
            (false, true) => random_crop_shift_flip(x, self.min_scale, self.shift, rng),
        }
    }
}

/// Each image shifted by up to `max_shift` pixels in each direction (edges repeated)
/// and mirrored with probability 1/2, all channels alike.
pub fn random_shift_flip(x: &Tensor, max_shift: usize, rng: &mut Rng) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("random_shift_flip")?;
    let mut idx = Vec::with_capacity(n * c * h * w);
    let shift = |rng: &mut Rng| rng.below(2 * max_shift + 1) as isize - max_shift as isize;
    for _ in 0..n {
        let (dy, dx, flip) = (shift(rng), shift(rng), rng.below(2) == 1);
        let plane: Vec<u32> = (0..h * w)
            .map(|p| {
                let (y, xo) = ((p / w) as isize, (p % w) as isize);
                let xs = if flip { w as isize - 1 - xo } else { xo };
                let sy = (y + dy).clamp(0, h as isize - 1) as usize;
                let sx = (xs + dx).clamp(0, w as isize - 1) as usize;
                (sy * w + sx) as u32
            })
            .collect();
        for _ in 0..c {
            idx.extend_from_slice(&plane);
        }
    }
    x.gather_planes(&Tensor::from_vec(idx, &[n, c, h, w], x.device())?)
}

/// torchvision's `RandomResizedCrop` (area from `min_scale` to 1 of the image, aspect
/// ratio from 3/4 to 4/3 log-uniformly, bilinear, the crop kept inside the image), then
/// a shift by up to `max_shift` output pixels (edges repeated) and a mirror with
/// probability 1/2, each image drawn on its own, all channels alike. Bilinear
/// interpolation is four gathers weighted per pixel, so the gradient reaches `x`.
pub fn random_crop_shift_flip(x: &Tensor, min_scale: f32, max_shift: usize, rng: &mut Rng) -> Result<Tensor> {
    let [n, c, h, w] = x.dims4("random_crop_shift_flip")?;
    let (hw, plane) = (h * w, c * h * w);
    // corner k of each output pixel's source square: index and bilinear weight
    let mut idx = vec![vec![0u32; n * plane]; 4];
    let mut weight = vec![vec![0f32; n * hw]; 4];
    let shift = |rng: &mut Rng| rng.below(2 * max_shift + 1) as isize - max_shift as isize;
    for i in 0..n {
        let area = min_scale + (1.0 - min_scale) * rng.uniform();
        let ratio = ((4f32 / 3.0).ln() * (2.0 * rng.uniform() - 1.0)).exp();
        let cw = ((area * ratio).sqrt() * w as f32).clamp(1.0, w as f32);
        let ch = ((area / ratio).sqrt() * h as f32).clamp(1.0, h as f32);
        let (top, left) = ((h as f32 - ch) * rng.uniform(), (w as f32 - cw) * rng.uniform());
        let (dy, dx, flip) = (shift(rng), shift(rng), rng.below(2) == 1);
        for p in 0..hw {
            let (y, xo) = ((p / w) as isize, (p % w) as isize);
            let xs = if flip { w as isize - 1 - xo } else { xo };
            // the output pixel the shift moves here, then its place in the crop
            let oy = (y + dy).clamp(0, h as isize - 1) as f32;
            let ox = (xs + dx).clamp(0, w as isize - 1) as f32;
            // pixel centres: (o + 0.5) in the output is (o + 0.5) * crop / size in the crop
            let sy = (top + (oy + 0.5) * ch / h as f32 - 0.5).clamp(0.0, (h - 1) as f32);
            let sx = (left + (ox + 0.5) * cw / w as f32 - 0.5).clamp(0.0, (w - 1) as f32);
            let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
            let (fy, fx) = (sy - y0 as f32, sx - x0 as f32);
            let corners = [(y0, x0, (1.0 - fy) * (1.0 - fx)), (y0, x1, (1.0 - fy) * fx), (y1, x0, fy * (1.0 - fx)), (y1, x1, fy * fx)];
            for (k, &(cy, cx, wk)) in corners.iter().enumerate() {
                weight[k][i * hw + p] = wk;
                for ch_ in 0..c {
                    idx[k][i * plane + ch_ * hw + p] = (cy * w + cx) as u32;
                }
            }
        }
    }
    let mut out: Option<Tensor> = None;
    for (ik, wk) in idx.into_iter().zip(weight) {
        let term = x.gather_planes(&Tensor::from_vec(ik, &[n, c, h, w], x.device())?)?.mul(&Tensor::from_vec(wk, &[n, 1, h, w], x.device())?)?;
        out = Some(match out {
            None => term,
            Some(acc) => acc.add(&term)?,
        });
    }
    Ok(out.expect("four corners"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn shifts_and_flips_move_whole_images() {
        let (h, w) = (5, 6);
        let x = Tensor::from_vec((0..2 * h * w).map(|i| i as f32).collect(), &[1, 2, h, w], Device::Cpu).unwrap();
        let mut rng = Rng::new(3);
        for _ in 0..20 {
            let y = random_shift_flip(&x, 2, &mut rng).unwrap().to_vec_f32().unwrap();
            // both channels moved the same way: channel 1 is channel 0 plus h*w
            assert!(y[..h * w].iter().zip(&y[h * w..]).all(|(a, b)| b - a == (h * w) as f32));
            // each output row comes from one input row, in order or mirrored, with at most 2 px
            for r in 0..h {
                let row = &y[r * w..][..w];
                let src_row = (row[0] as usize) / w;
                assert!(src_row.abs_diff(r) <= 2);
                assert!(row.iter().all(|&v| v as usize / w == src_row));
            }
        }
        assert_eq!(random_shift_flip(&x, 0, &mut Rng::new(0)).unwrap().dims(), &[1, 2, h, w]);
    }

    #[test]
    fn crops_interpolate_within_the_image_and_keep_rows_in_order() {
        let (h, w) = (8, 8);
        // each pixel holds its column: a crop's row is a ramp, rising or (mirrored) falling
        let x = Tensor::from_vec((0..3 * h * w).map(|i| (i % w) as f32).collect(), &[3, 1, h, w], Device::Cpu).unwrap();
        let mut rng = Rng::new(5);
        let mut narrowest = f32::MAX;
        for _ in 0..20 {
            let y = random_crop_shift_flip(&x, 0.25, 0, &mut rng).unwrap().to_vec_f32().unwrap();
            for row in y.chunks(w) {
                assert!(row.iter().all(|v| (-1e-5..=(w - 1) as f32 + 1e-5).contains(v)), "{row:?}");
                let rising = row.windows(2).all(|p| p[1] >= p[0] - 1e-5);
                let falling = row.windows(2).all(|p| p[1] <= p[0] + 1e-5);
                assert!(rising || falling, "{row:?}");
                narrowest = narrowest.min((row[w - 1] - row[0]).abs());
            }
        }
        // some crops zoom in: their rows span fewer columns than the image
        assert!(narrowest < (w - 1) as f32 * 0.8, "{narrowest}");
        // bilinear weights sum to one: a flat image stays flat
        let flat = Tensor::from_vec(vec![0.7f32; 2 * 3 * h * w], &[2, 3, h, w], Device::Cpu).unwrap();
        let y = random_crop_shift_flip(&flat, 0.1, 2, &mut rng).unwrap().to_vec_f32().unwrap();
        assert!(y.iter().all(|v| (v - 0.7).abs() < 1e-6));
    }

    #[test]
    fn without_a_crop_the_draws_are_the_shifts_alone() {
        let x = Tensor::from_vec((0..2 * 3 * 36).map(|i| i as f32).collect(), &[2, 3, 6, 6], Device::Cpu).unwrap();
        let shift_only = Augment { shift: 2, min_scale: 1.0 }.apply(&x, &mut Rng::new(9)).unwrap();
        assert_eq!(shift_only.to_vec_f32().unwrap(), random_shift_flip(&x, 2, &mut Rng::new(9)).unwrap().to_vec_f32().unwrap());
        let mut rng = Rng::new(9);
        assert_eq!(Augment::NONE.apply(&x, &mut rng).unwrap().to_vec_f32().unwrap(), x.to_vec_f32().unwrap());
        assert_eq!(rng.state(), Rng::new(9).state(), "no augmentation draws nothing");
    }
}
