//! Random shifts and flips of synthesised images, differentiable so that the generator
//! learns through them (`distill.augment`).
//!
//! Decision (the paper is silent): CMI and Fast-DFKD augment the synthetic batch before
//! the teacher and the student see it. A generator trained through random translations
//! cannot rely on pixel-exact adversarial patterns, and the student sees each image in
//! several positions, as it would with real data.

use crate::rng::Rng;
use crate::{Result, Tensor};

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
}
