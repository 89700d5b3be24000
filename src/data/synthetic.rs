//! The embedded default data set: synthetic, and fine-grained in the way CUB is. Every
//! class is the same "bird" (body, head, wing, tail, legs, on a branch); classes differ
//! only in small parts — bill length and colour, wing bar, eye ring, crown, breast
//! pattern, tail tip — each class a distinct combination of those discrete attributes.
//! Everything else varies per image and is shared by all classes: body colour, pose
//! (rotation ±25°, mirror), scale (0.6-1.0), position, background (gradient + blobs,
//! some in the part colours, so that colour statistics are not a shortcut), lighting
//! and noise. Written in the CUB-200-2011 layout, so it goes through the same loader.

use super::raster::{hsv, Affine, Canvas, Rgb, Shape};
use super::{cub, load_rgb, transforms, Dataset};
use crate::rng::Rng;
use crate::{bail, Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const NAME: &str = "synthetic-birds";
/// Bump when the drawing changes, so stale copies on disk get regenerated.
const GENERATOR_VERSION: u32 = 1;
const MARKER: &str = "synthetic.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    /// 10..=200.
    pub num_classes: usize,
    pub train_per_class: usize,
    pub test_per_class: usize,
    pub image_size: u32,
    pub seed: u64,
    /// Which stream of `seed` draws the images (the classes are always the same for one
    /// seed): 1, the data set's own; another, more images of the same classes, none of
    /// them the data set's (the teacher's extra training images,
    /// `teacher.extra_train_per_class`).
    #[serde(default = "own_images")]
    pub image_stream: u64,
}

fn own_images() -> u64 {
    1
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec { num_classes: 10, train_per_class: 100, test_per_class: 50, image_size: 32, seed: 0, image_stream: 1 }
    }
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Marker {
    generator: u32,
    spec: SyntheticSpec,
}

// ---- class attributes ----

/// Number of values of each part attribute: bill (value % 3 its colour, >= 3 long),
/// wing bar, eye ring, crown, breast, tail tip (0 = absent/plain). 1728 classes possible.
const RADIX: [u8; 6] = [6, 4, 3, 4, 3, 2];
const RED: Rgb = [0.80, 0.10, 0.10];
const YELLOW: Rgb = [0.95, 0.80, 0.12];
const WHITE: Rgb = [0.95, 0.95, 0.92];
const BLACK: Rgb = [0.08, 0.08, 0.08];
const BLUE: Rgb = [0.15, 0.30, 0.85];
const PALETTE: [Rgb; 5] = [RED, YELLOW, WHITE, BLACK, BLUE];
const BILL: [(Rgb, &str); 3] = [(YELLOW, "yellow"), (BLACK, "black"), (RED, "red")];
const BAR: [(Rgb, &str); 3] = [(WHITE, "White"), (YELLOW, "Yellow"), (RED, "Red")];
const RING: [(Rgb, &str); 2] = [(WHITE, "White"), (RED, "Red")];
const CROWN: [(Rgb, &str); 3] = [(RED, "Red"), (BLUE, "Blue"), (BLACK, "Black")];

type Parts = [u8; 6];

/// Picks `n` distinct attribute combinations, greedily keeping classes at least 3 (then
/// 2, then 1) attributes apart, so that small sets are learnable and large ones (up to
/// 200, like CUB) contain pairs that differ in a single part.
fn choose_classes(n: usize, rng: &mut Rng) -> Vec<Parts> {
    let total: usize = RADIX.iter().map(|&r| r as usize).product();
    let mut all: Vec<Parts> = (0..total)
        .map(|mut k| {
            RADIX.map(|r| {
                let d = (k % r as usize) as u8;
                k /= r as usize;
                d
            })
        })
        .collect();
    rng.shuffle(&mut all);
    let mut chosen: Vec<Parts> = Vec::with_capacity(n);
    for min_dist in [3, 2, 1] {
        for p in &all {
            if chosen.len() == n {
                return chosen;
            }
            let far = chosen.iter().all(|c| c.iter().zip(p).filter(|(a, b)| a != b).count() >= min_dist);
            if far {
                chosen.push(*p);
            }
        }
    }
    chosen
}

fn class_name(p: &Parts) -> String {
    let (len, colour) = (if p[0] >= 3 { "Long" } else { "Short" }, BILL[p[0] as usize % 3].1);
    let mut words = vec![format!("{len}_{colour}_bill")];
    if p[1] > 0 {
        words.push(format!("{}_bar", BAR[p[1] as usize - 1].1))
    }
    if p[2] > 0 {
        words.push(format!("{}_eyering", RING[p[2] as usize - 1].1))
    }
    if p[3] > 0 {
        words.push(format!("{}_crown", CROWN[p[3] as usize - 1].1))
    }
    if p[4] > 0 {
        words.push(["Spotted_breast", "Yellow_breast"][p[4] as usize - 1].to_string())
    }
    if p[5] > 0 {
        words.push("White_tail".to_string())
    }
    words.join("_")
}

// ---- drawing ----

fn scale(c: Rgb, k: f32) -> Rgb {
    c.map(|v| (v * k).min(1.0))
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
}

/// A part colour with a little per-image variation, as plumage has.
fn jitter(c: Rgb, rng: &mut Rng) -> Rgb {
    let k = rng.range(0.85, 1.1);
    c.map(|v| (v * k + rng.range(-0.04, 0.04)).clamp(0.0, 1.0))
}

/// Background: a two-colour gradient in a random direction, then translucent blobs.
fn draw_background(cv: &mut Canvas, rng: &mut Rng) {
    let natural = |rng: &mut Rng| hsv(rng.uniform(), rng.range(0.1, 0.6), rng.range(0.3, 0.95));
    let (c0, c1) = (natural(rng), natural(rng));
    let dir = rng.range(0.0, std::f32::consts::TAU);
    let (w, h) = (cv.w as f32, cv.h as f32);
    let (dx, dy) = (dir.cos() / w, dir.sin() / h);
    cv.shade(|x, y| mix(c0, c1, ((x - w / 2.0) * dx + (y - h / 2.0) * dy + 0.5).clamp(0.0, 1.0)));
    let id = Affine::pose((0.0, 0.0), cv.w as f32, 0.0, false, (0.0, 0.0));
    for _ in 0..2 + rng.below(5) {
        let colour = if rng.uniform() < 0.35 { PALETTE[rng.below(PALETTE.len())] } else { natural(rng) };
        let (a, b) = (rng.range(0.05, 0.3), rng.range(0.05, 0.3));
        let c = (rng.uniform(), rng.uniform());
        cv.fill(&Shape::Ellipse { c, a, b, angle: rng.range(0.0, 3.2) }, &id, colour, rng.range(0.3, 0.8));
    }
}

/// Draws the bird in its own frame: body length ~1, facing +x, y down, the bill tip
/// at most x = 1.06 and the tail end at x = -0.85.
fn draw_bird(cv: &mut Canvas, parts: &Parts, rng: &mut Rng) {
    let size = cv.w as f32;
    let s = rng.range(0.6, 1.0);
    let margin = (0.5 - 0.5 * s) * 0.9 * size;
    let t = (size / 2.0 + rng.range(-margin, margin), size / 2.0 + rng.range(-margin, margin));
    let angle = rng.range(-25f32, 25.0).to_radians();
    let xf = Affine::pose((0.1, 0.0), s * 0.48 * size, angle, rng.uniform() < 0.5, t);

    // Body colour is nuisance: earthy hues or greys, any brightness, for every class.
    let body = hsv(rng.range(0.03, 0.15), rng.range(0.05, 0.5), rng.range(0.3, 0.75));
    let (wing, belly) = (scale(body, 0.7), mix(body, WHITE, rng.range(0.25, 0.5)));
    let e = |c: (f32, f32), a: f32, b: f32, angle: f32| Shape::Ellipse { c, a, b, angle };
    let poly = |p: &[(f32, f32)]| Shape::Polygon(p.to_vec());
    let mut fill = |shape: Shape, colour: Rgb| cv.fill(&shape, &xf, colour, 1.0);

    let branch = mix([0.35, 0.24, 0.15], body, 0.1);
    fill(poly(&[(-3.0, 0.44), (3.0, 0.44), (3.0, 0.52), (-3.0, 0.52)]), branch);
    for x in [0.05, -0.1] {
        fill(poly(&[(x, 0.2), (x + 0.04, 0.2), (x + 0.01, 0.46), (x - 0.03, 0.46)]), [0.2, 0.17, 0.15]);
    }
    fill(poly(&[(-0.4, -0.08), (-0.4, 0.06), (-0.85, 0.14), (-0.88, -0.08)]), wing);
    if parts[5] > 0 {
        fill(poly(&[(-0.74, -0.08), (-0.73, 0.12), (-0.85, 0.14), (-0.88, -0.08)]), jitter(WHITE, rng));
    }
    fill(e((0.0, 0.0), 0.5, 0.3, -0.1), body);
    fill(e((0.08, 0.12), 0.36, 0.15, -0.1), belly);
    match parts[4] {
        1 => {
            let spot = jitter(scale(body, 0.35), rng);
            for c in [(0.2, 0.06), (0.3, 0.14), (0.36, 0.02), (0.12, 0.17), (0.24, -0.03)] {
                fill(Shape::circle(c, 0.05), spot);
            }
        }
        2 => fill(e((0.3, 0.07), 0.17, 0.13, 0.0), jitter(YELLOW, rng)),
        _ => {}
    }
    fill(e((-0.08, -0.05), 0.36, 0.16, -0.12), wing);
    if parts[1] > 0 {
        fill(e((-0.08, -0.02), 0.26, 0.045, -0.12), jitter(BAR[parts[1] as usize - 1].0, rng));
    }
    let head = (0.5, -0.25);
    fill(Shape::circle(head, 0.22), body);
    if parts[3] > 0 {
        fill(Shape::Cap { c: head, r: 0.225, cut: -0.07 }, jitter(CROWN[parts[3] as usize - 1].0, rng));
    }
    if parts[2] > 0 {
        fill(Shape::circle((0.57, -0.28), 0.1), jitter(RING[parts[2] as usize - 1].0, rng));
    }
    fill(Shape::circle((0.57, -0.28), 0.045), BLACK);
    let len = if parts[0] >= 3 { 0.38 } else { 0.17 };
    let bill = jitter(BILL[parts[0] as usize % 3].0, rng);
    fill(poly(&[(0.66, -0.31), (0.66, -0.18), (0.68 + len, -0.24)]), bill);
}

/// Renders one image: supersampled, then lit (brightness, a directional gradient, a
/// colour cast) and given sensor noise at the output resolution.
fn render(parts: &Parts, size: u32, rng: &mut Rng) -> image::RgbImage {
    let ss = if size <= 64 { 4 } else { 2 };
    let mut cv = Canvas::new(size as usize * ss, size as usize * ss);
    draw_background(&mut cv, rng);
    draw_bird(&mut cv, parts, rng);
    let gain = rng.range(0.75, 1.2);
    let (lx, ly) = (rng.range(-0.2, 0.2), rng.range(-0.2, 0.2));
    let cast = [0; 3].map(|_| rng.range(0.94, 1.06));
    let sigma = rng.range(0.005, 0.03);
    let mut noise = rng.fork(7);
    cv.downsample(ss, |x, y, p| {
        let light = gain * (1.0 + lx * (x - 0.5) + ly * (y - 0.5));
        [0, 1, 2].map(|c| p[c] * light * cast[c] + sigma * noise.normal())
    })
}

// ---- writing the data set ----

/// Writes the data set to `out_dir` in the CUB-200-2011 layout, unless a complete one
/// with the same spec is already there. Built in a temporary sibling directory and
/// renamed into place, so `out_dir` is either absent, stale-but-complete, or complete.
pub fn generate(spec: &SyntheticSpec, out_dir: &Path) -> Result<()> {
    if !(10..=200).contains(&spec.num_classes) || spec.train_per_class == 0 || spec.image_size < 8 {
        bail!("synthetic spec {spec:?}: need 10..=200 classes, >= 1 training image per class, images >= 8 px");
    }
    let marker = Marker { generator: GENERATOR_VERSION, spec: spec.clone() };
    match read_marker(out_dir) {
        Some(m) if m == marker => return Ok(()),
        Some(_) => {}
        None if out_dir.exists() && std::fs::read_dir(out_dir).map_err(|e| Error::io(out_dir, e))?.next().is_some() => {
            bail!("{} exists and is not a synthetic data set (no {MARKER}); not overwriting it", out_dir.display())
        }
        None => {}
    }
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = unique_sibling(out_dir, "tmp");
    let written = write_all(spec, &marker, &tmp);
    let placed = written.and_then(|()| replace_dir(&tmp, out_dir, &marker));
    let _ = std::fs::remove_dir_all(&tmp); // gone after a successful rename
    placed
}

/// Generates if needed, then opens the data set.
pub fn ensure(spec: &SyntheticSpec, out_dir: &Path) -> Result<Dataset> {
    generate(spec, out_dir)?;
    super::open(out_dir)
}

/// Whether `dir` holds a data set written by `generate`.
pub fn is_synthetic(dir: &Path) -> bool {
    read_marker(dir).is_some()
}

fn read_marker(dir: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(dir.join(MARKER)).ok()?).ok()
}

fn unique_sibling(dir: &Path, tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = dir.file_name().map_or("synthetic".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

/// Moves `tmp` to `out_dir`, first moving any stale copy aside. If another process
/// won the race with an identical data set, its copy is kept and ours discarded.
fn replace_dir(tmp: &Path, out_dir: &Path, marker: &Marker) -> Result<()> {
    if out_dir.exists() {
        let stale = unique_sibling(out_dir, "stale");
        std::fs::rename(out_dir, &stale).map_err(|e| Error::io(out_dir, e))?;
        let _ = std::fs::remove_dir_all(&stale);
    }
    match std::fs::rename(tmp, out_dir) {
        Ok(()) => Ok(()),
        Err(_) if read_marker(out_dir).as_ref() == Some(marker) => Ok(()),
        Err(e) => Err(Error::io(out_dir, e)),
    }
}

fn write_all(spec: &SyntheticSpec, marker: &Marker, dir: &Path) -> Result<()> {
    let root = Rng::new(spec.seed);
    let classes = choose_classes(spec.num_classes, &mut root.fork(0));
    let names: Vec<String> = classes.iter().enumerate().map(|(i, p)| format!("{:03}.{}", i + 1, class_name(p))).collect();
    let per_class = spec.train_per_class + spec.test_per_class;
    let entries: Vec<cub::Entry> = (0..spec.num_classes * per_class)
        .map(|k| {
            let (c, i) = (k / per_class, k % per_class);
            cub::Entry { rel: Path::new(&names[c]).join(format!("{:03}_{:05}.png", c + 1, i)), label: c, train: i < spec.train_per_class }
        })
        .collect();
    for n in &names {
        let d = dir.join("images").join(n);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let images = root.fork(spec.image_stream);
    entries.par_iter().enumerate().try_for_each(|(k, e)| {
        let img = render(&classes[e.label], spec.image_size, &mut images.fork(k as u64));
        let path = dir.join("images").join(&e.rel);
        img.save(&path).map_err(|err| Error::Msg(format!("{}: cannot write image: {err}", path.display())))
    })?;
    cub::write_layout(dir, &names, &entries)?;
    // The marker goes last: its presence means the directory is complete.
    let path = dir.join(MARKER);
    std::fs::write(&path, serde_json::to_string_pretty(marker).unwrap()).map_err(|e| Error::io(&path, e))
}

/// A contact sheet of the first `per_class` training images of each class, one row
/// per class, each image shown at 64x64 (short side resized, centre-cropped).
pub fn preview_grid(ds: &Dataset, per_class: usize, out: &Path) -> Result<()> {
    const CELL: u32 = 64;
    const GAP: u32 = 2;
    let rows = ds.num_classes() as u32;
    let mut sheet = image::RgbImage::from_pixel(per_class as u32 * (CELL + GAP) + GAP, rows * (CELL + GAP) + GAP, image::Rgb([255; 3]));
    for (c, _) in ds.classes.iter().enumerate() {
        for (j, s) in ds.train.iter().filter(|s| s.label == c).take(per_class).enumerate() {
            let img = transforms::resize_short(&load_rgb(&s.path)?, CELL);
            let (l, t) = ((img.width() - CELL) / 2, (img.height() - CELL) / 2);
            let cell = transforms::crop(&img, l, t, CELL, CELL);
            image::imageops::replace(&mut sheet, &cell, (GAP + j as u32 * (CELL + GAP)) as i64, (GAP + c as u32 * (CELL + GAP)) as i64);
        }
    }
    sheet.save(out).map_err(|e| Error::Msg(format!("{}: cannot write preview: {e}", out.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_distinct_and_small_sets_well_separated() {
        let ten = choose_classes(10, &mut Rng::new(1));
        for (i, a) in ten.iter().enumerate() {
            for b in &ten[i + 1..] {
                assert!(a.iter().zip(b).filter(|(x, y)| x != y).count() >= 3);
            }
        }
        let mut all = choose_classes(200, &mut Rng::new(1));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 200);
    }

    #[test]
    fn rendering_is_deterministic() {
        let p = [3, 1, 2, 1, 1, 1];
        assert_eq!(render(&p, 32, &mut Rng::new(5)), render(&p, 32, &mut Rng::new(5)));
        assert_ne!(render(&p, 32, &mut Rng::new(5)), render(&p, 32, &mut Rng::new(6)));
    }
}
