//! Just enough 2-D rasterisation for the synthetic birds: filled ellipses, caps and
//! polygons in a shape's own coordinates, placed by an affine map, painted with alpha
//! onto a float canvas that is drawn supersampled and box-filtered down (antialiasing).

use image::RgbImage;

pub type Rgb = [f32; 3];

/// `p -> (m0 x + m1 y + m2, m3 x + m4 y + m5)`.
#[derive(Clone, Copy, Debug)]
pub struct Affine([f32; 6]);

impl Affine {
    /// Maps local q to `t + scale * R(angle) * diag(flip ? -1 : 1, 1) * (q - origin)`.
    pub fn pose(origin: (f32, f32), scale: f32, angle: f32, flip: bool, t: (f32, f32)) -> Affine {
        let (s, c) = angle.sin_cos();
        let f = if flip { -1.0 } else { 1.0 };
        let (a, b, cc, d) = (scale * c * f, -scale * s, scale * s * f, scale * c);
        Affine([a, b, t.0 - a * origin.0 - b * origin.1, cc, d, t.1 - cc * origin.0 - d * origin.1])
    }

    pub fn apply(&self, (x, y): (f32, f32)) -> (f32, f32) {
        let m = &self.0;
        (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5])
    }

    pub fn inverse(&self) -> Affine {
        let m = &self.0;
        let det = m[0] * m[4] - m[1] * m[3];
        let (a, b, c, d) = (m[4] / det, -m[1] / det, -m[3] / det, m[0] / det);
        Affine([a, b, -(a * m[2] + b * m[5]), c, d, -(c * m[2] + d * m[5])])
    }
}

#[derive(Clone, Debug)]
pub enum Shape {
    /// Centre, semi-axes, rotation (radians).
    Ellipse { c: (f32, f32), a: f32, b: f32, angle: f32 },
    /// The part of a circle above `c.1 + cut` (y grows downwards): a crown.
    Cap { c: (f32, f32), r: f32, cut: f32 },
    /// Any simple polygon (even-odd rule).
    Polygon(Vec<(f32, f32)>),
}

impl Shape {
    pub fn circle(c: (f32, f32), r: f32) -> Shape {
        Shape::Ellipse { c, a: r, b: r, angle: 0.0 }
    }

    fn contains(&self, (x, y): (f32, f32)) -> bool {
        match self {
            Shape::Ellipse { c, a, b, angle } => {
                let (s, co) = angle.sin_cos();
                let (dx, dy) = (x - c.0, y - c.1);
                let (u, v) = (co * dx + s * dy, -s * dx + co * dy);
                (u / a).powi(2) + (v / b).powi(2) <= 1.0
            }
            Shape::Cap { c, r, cut } => (x - c.0).powi(2) + (y - c.1).powi(2) <= r * r && y <= c.1 + cut,
            Shape::Polygon(pts) => {
                let mut inside = false;
                for (i, &(x0, y0)) in pts.iter().enumerate() {
                    let (x1, y1) = pts[(i + 1) % pts.len()];
                    if (y0 > y) != (y1 > y) && x < x0 + (y - y0) * (x1 - x0) / (y1 - y0) {
                        inside = !inside;
                    }
                }
                inside
            }
        }
    }

    /// Local axis-aligned bounds (min, max).
    fn bounds(&self) -> ((f32, f32), (f32, f32)) {
        match self {
            Shape::Ellipse { c, a, b, .. } => {
                let r = a.max(*b);
                ((c.0 - r, c.1 - r), (c.0 + r, c.1 + r))
            }
            Shape::Cap { c, r, .. } => ((c.0 - r, c.1 - r), (c.0 + r, c.1 + r)),
            Shape::Polygon(pts) => {
                pts.iter().fold(((f32::MAX, f32::MAX), (f32::MIN, f32::MIN)), |(lo, hi), &(x, y)| ((lo.0.min(x), lo.1.min(y)), (hi.0.max(x), hi.1.max(y))))
            }
        }
    }
}

pub struct Canvas {
    pub w: usize,
    pub h: usize,
    px: Vec<Rgb>,
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![[0.0; 3]; w * h] }
    }

    /// Sets every pixel from its centre's position.
    pub fn shade(&mut self, f: impl Fn(f32, f32) -> Rgb) {
        for (i, p) in self.px.iter_mut().enumerate() {
            *p = f((i % self.w) as f32 + 0.5, (i / self.w) as f32 + 0.5);
        }
    }

    /// Paints `shape`, placed by `to_canvas`, with `colour` at opacity `alpha`.
    pub fn fill(&mut self, shape: &Shape, to_canvas: &Affine, colour: Rgb, alpha: f32) {
        let ((x0, y0), (x1, y1)) = shape.bounds();
        let corners = [(x0, y0), (x1, y0), (x0, y1), (x1, y1)].map(|p| to_canvas.apply(p));
        let clampx = |v: f32| (v.max(0.0) as usize).min(self.w);
        let clampy = |v: f32| (v.max(0.0) as usize).min(self.h);
        let lo = (clampx(corners.iter().map(|p| p.0).fold(f32::MAX, f32::min).floor()), clampy(corners.iter().map(|p| p.1).fold(f32::MAX, f32::min).floor()));
        let hi = (
            clampx(corners.iter().map(|p| p.0).fold(f32::MIN, f32::max).ceil() + 1.0),
            clampy(corners.iter().map(|p| p.1).fold(f32::MIN, f32::max).ceil() + 1.0),
        );
        let to_local = to_canvas.inverse();
        for y in lo.1..hi.1 {
            for x in lo.0..hi.0 {
                if shape.contains(to_local.apply((x as f32 + 0.5, y as f32 + 0.5))) {
                    let p = &mut self.px[y * self.w + x];
                    for c in 0..3 {
                        p[c] += alpha * (colour[c] - p[c]);
                    }
                }
            }
        }
    }

    /// Box-filters `factor`x`factor` blocks into one output pixel and applies `post`
    /// (lighting, noise) to each output pixel, given its position in [0, 1)^2.
    pub fn downsample(&self, factor: usize, mut post: impl FnMut(f32, f32, Rgb) -> Rgb) -> RgbImage {
        let (w, h) = (self.w / factor, self.h / factor);
        let norm = 1.0 / (factor * factor) as f32;
        RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let mut acc = [0f32; 3];
            for dy in 0..factor {
                for dx in 0..factor {
                    let p = self.px[(y as usize * factor + dy) * self.w + x as usize * factor + dx];
                    (0..3).for_each(|c| acc[c] += p[c] * norm);
                }
            }
            let out = post((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32, acc);
            image::Rgb(out.map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8))
        })
    }
}

/// HSV (h in turns, s, v in [0, 1]) to RGB in [0, 1].
pub fn hsv(h: f32, s: f32, v: f32) -> Rgb {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let f = |n: f32| {
        let k = (n + h6) % 6.0;
        v - v * s * (k.min(4.0 - k).clamp(0.0, 1.0))
    };
    [f(5.0), f(3.0), f(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_cover_what_they_should() {
        let id = Affine::pose((0.0, 0.0), 1.0, 0.0, false, (0.0, 0.0));
        let mut c = Canvas::new(20, 20);
        c.fill(&Shape::circle((10.0, 10.0), 5.0), &id, [1.0; 3], 1.0);
        let img = c.downsample(1, |_, _, p| p);
        assert_eq!(img.get_pixel(10, 10).0, [255; 3]);
        assert_eq!(img.get_pixel(2, 2).0, [0; 3]);
        let a = Affine::pose((1.0, 2.0), 3.0, 0.7, true, (5.0, -1.0));
        let q = a.inverse().apply(a.apply((0.3, -0.4)));
        assert!((q.0 - 0.3).abs() < 1e-5 && (q.1 + 0.4).abs() < 1e-5);
        assert_eq!(hsv(0.0, 1.0, 1.0), [1.0, 0.0, 0.0]);
    }
}
