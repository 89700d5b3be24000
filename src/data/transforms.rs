//! The torchvision pipelines of the paper, on `image::RgbImage`, producing CHW f32
//! normalised with the ImageNet mean/std. Resizing reproduces PIL's bilinear
//! `ImagingResample` bit for bit (PIL is what torchvision resizes with when it gets
//! PIL images), because the teacher is checked against PyTorch within 1e-3 on logits
//! and a different resampler moves pixels by several levels.

use crate::rng::Rng;
use image::RgbImage;

pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How training images are augmented before the random horizontal flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Augment {
    /// Eval: Resize(size*256/224) + CenterCrop(size), no flip.
    None,
    /// RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)).
    RandomResizedCrop,
    /// Resize(size*256/224) + RandomCrop(size) (Aircraft).
    RandomCrop,
}

/// `bottom_crop` pixels cut from the bottom first (Aircraft's banner), then `augment`.
#[derive(Clone, Copy, Debug)]
pub struct Pipeline {
    pub size: u32,
    pub bottom_crop: u32,
    pub augment: Augment,
}

impl Pipeline {
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> Vec<f32> {
        let cropped;
        let img = if self.bottom_crop > 0 {
            cropped = crop_bottom(img, self.bottom_crop);
            &cropped
        } else {
            img
        };
        match self.augment {
            Augment::None => eval_transform(img, self.size),
            Augment::RandomResizedCrop => train_transform(img, self.size, rng, true),
            Augment::RandomCrop => train_transform(img, self.size, rng, false),
        }
    }
}

/// Removes `px` rows from the bottom, keeping at least one row.
pub fn crop_bottom(img: &RgbImage, px: u32) -> RgbImage {
    let h = img.height().saturating_sub(px).max(1);
    crop(img, 0, 0, img.width(), h)
}

/// torchvision eval: Resize(int(size*256/224)) on the shorter side, CenterCrop(size).
pub fn eval_transform(img: &RgbImage, size: u32) -> Vec<f32> {
    let r = resize_short(img, size * 256 / 224);
    let (top, left) = (center_offset(r.height(), size), center_offset(r.width(), size));
    to_normalized_chw(&crop(&r, left, top, size, size), false)
}

/// torchvision train: RandomResizedCrop(size) (or Resize + RandomCrop when
/// `random_resized` is false), then RandomHorizontalFlip(0.5).
pub fn train_transform(img: &RgbImage, size: u32, rng: &mut Rng, random_resized: bool) -> Vec<f32> {
    let out = if random_resized {
        let (top, left, h, w) = random_resized_params(img.width(), img.height(), rng);
        resize(&crop(img, left, top, w, h), size, size)
    } else {
        let r = resize_short(img, size * 256 / 224);
        let top = rng.below((r.height().saturating_sub(size) + 1) as usize) as u32;
        let left = rng.below((r.width().saturating_sub(size) + 1) as usize) as u32;
        crop(&r, left, top, size, size)
    };
    to_normalized_chw(&out, rng.uniform() < 0.5)
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio
/// (3/4, 4/3): ten tries at a random area and log-uniform aspect ratio, then a
/// centre crop clamped to the ratio range. Returns (top, left, height, width).
fn random_resized_params(width: u32, height: u32, rng: &mut Rng) -> (u32, u32, u32, u32) {
    let (wf, hf) = (width as f64, height as f64);
    let area = wf * hf;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.range(0.08, 1.0) as f64;
        let ratio = rng.range(lo as f32, hi as f32) as f64;
        let ratio = ratio.exp();
        let w = (target * ratio).sqrt().round_ties_even() as u32;
        let h = (target / ratio).sqrt().round_ties_even() as u32;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.below((height - h + 1) as usize) as u32;
            let left = rng.below((width - w + 1) as usize) as u32;
            return (top, left, h, w);
        }
    }
    let in_ratio = wf / hf;
    let (w, h) = if in_ratio < 3.0 / 4.0 {
        (width, (wf / (3.0 / 4.0)).round_ties_even() as u32)
    } else if in_ratio > 4.0 / 3.0 {
        ((hf * 4.0 / 3.0).round_ties_even() as u32, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// CenterCrop's offset: torchvision uses `int(round((len - size) / 2.0))`, and
/// Python's round() sends halves to the even neighbour.
fn center_offset(len: u32, size: u32) -> u32 {
    (len.saturating_sub(size) as f64 / 2.0).round_ties_even() as u32
}

/// Resize(short) with an int size: the shorter side becomes `short`, the longer
/// `int(short * long / short_old)` (truncated, as torchvision computes it).
pub fn resize_short(img: &RgbImage, short: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let long = |l: u32, s: u32| (short as f64 * l as f64 / s as f64) as u32;
    let (nw, nh) = if w <= h { (short, long(h, w)) } else { (long(w, h), short) };
    resize(img, nw, nh)
}

/// Copies the `w`x`h` window at (left, top); the window must lie inside the image.
pub fn crop(img: &RgbImage, left: u32, top: u32, w: u32, h: u32) -> RgbImage {
    image::imageops::crop_imm(img, left, top, w, h).to_image()
}

/// HWC u8 -> CHW f32, `(x/255 - mean) / std` in f32 as torchvision's ToTensor +
/// Normalize compute it, optionally mirrored left-right.
pub fn to_normalized_chw(img: &RgbImage, flip: bool) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        let x = if flip { w - 1 - x as usize } else { x as usize };
        for c in 0..3 {
            out[(c * h + y as usize) * w + x] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

// ---- PIL's bilinear ImagingResample (Pillow src/libImaging/Resample.c) ----

/// Fixed-point precision of PIL's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, and fixed-point weights of the inputs used.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the triangle filter. When
/// downscaling, the filter's support widens by the scale factor, so every input pixel
/// contributes (antialiasing); weights are normalised to sum to 1, then fixed-point.
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0, scaled
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the clamp makes that equal to a floor.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let k = &mut k[..xmax];
        for (x, w) in k.iter_mut().enumerate() {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            *w = (1.0 - t.abs()).max(0.0);
        }
        let ww: f64 = k.iter().sum();
        for (out, &w) in weights[xx * ksize..].iter_mut().zip(k.iter()) {
            let v = if ww != 0.0 { w / ww } else { w };
            let half = if v < 0.0 { -0.5 } else { 0.5 };
            *out = (half + v * (1 << PRECISION_BITS) as f64) as i32;
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { bounds, weights, ksize }
}

/// PIL's clip8: the accumulator (which starts at one half) back to a rounded u8.
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One resampling pass along x (`horizontal`) or y, rounding to u8 as PIL does.
fn pass(img: &RgbImage, out_w: u32, out_h: u32, horizontal: bool) -> RgbImage {
    let c = if horizontal { coeffs(img.width() as usize, out_w as usize) } else { coeffs(img.height() as usize, out_h as usize) };
    let src = img.as_raw();
    let stride = img.width() as usize * 3;
    let mut out = RgbImage::new(out_w, out_h);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (i, other) = if horizontal { (x as usize, y as usize) } else { (y as usize, x as usize) };
        let (min, n) = c.bounds[i];
        let k = &c.weights[i * c.ksize..i * c.ksize + n];
        for ch in 0..3 {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (j, &w) in k.iter().enumerate() {
                let at = if horizontal { other * stride + (min + j) * 3 } else { (min + j) * stride + other * 3 };
                acc += src[at + ch] as i64 * w as i64;
            }
            p[ch] = clip8(acc);
        }
    }
    out
}

/// PIL `Image.resize((w, h), BILINEAR)`: two passes, each skipped when its dimension
/// does not change. Pillow 13 runs the vertical pass first when the height shrinks by
/// more than twice as many pixels as the width (older Pillow always went horizontal
/// first); the order moves results by up to one level, so we follow current Pillow.
pub fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (dw, dh) = (img.width() as i64 - w as i64, img.height() as i64 - h as i64);
    let vertical_first = dh > 0 && dh > dw * 2;
    let mut cur = img.clone();
    for horizontal in if vertical_first { [false, true] } else { [true, false] } {
        if horizontal && w != cur.width() {
            cur = pass(&cur, w, cur.height(), true);
        } else if !horizontal && h != cur.height() {
            cur = pass(&cur, cur.width(), h, false);
        }
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant_and_offsets_round_like_python() {
        let img = RgbImage::from_pixel(37, 53, image::Rgb([10, 128, 250]));
        let r = resize(&img, 20, 90);
        assert!(r.pixels().all(|p| p.0 == [10, 128, 250]));
        // round(4.5) == 4 and round(5.5) == 6 in Python.
        assert_eq!((center_offset(73, 64), center_offset(75, 64)), (4, 6));
        assert_eq!(resize_short(&img, 18).dimensions(), (18, 25));
    }

    #[test]
    fn random_resized_crops_stay_inside() {
        let mut rng = Rng::new(3);
        for (w, h) in [(37, 53), (500, 20), (1, 1)] {
            for _ in 0..200 {
                let (t, l, ch, cw) = random_resized_params(w, h, &mut rng);
                assert!(ch > 0 && cw > 0 && t + ch <= h && l + cw <= w);
            }
        }
    }
}
