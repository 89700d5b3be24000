//! The data layer: the three fine-grained data sets in their official layouts, an
//! embedded synthetic one, torchvision-compatible transforms, and a prefetching loader.
//! It knows nothing of tensors: batches are plain `Vec<f32>` in NCHW order, which the
//! engine wraps, so this module can be tested and reused on its own.

pub mod aircraft;
pub mod cars;
pub mod cub;
pub mod loader;
mod matv5;
mod raster;
pub mod synthetic;
pub mod transforms;

pub use loader::{Batch, Loader, LoaderConfig, Warnings};

use crate::{bail, Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub name: String,
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
    /// Pixels cut from each image's bottom before any transform: 20 for Aircraft,
    /// whose photos carry a copyright banner that would otherwise be a class cue.
    pub bottom_crop: u32,
}

impl Dataset {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Whether training uses RandomResizedCrop. Aircraft uses Resize + RandomCrop
    /// instead (docs/METHOD.md), because its variants differ in overall proportions that a
    /// random aspect-ratio change would destroy. So does the synthetic set: at 32 px a
    /// crop of 8% of the area is 9x9 pixels, too few to hold the parts that tell
    /// classes apart.
    pub fn random_resized(&self) -> bool {
        self.name != aircraft::NAME && self.name != synthetic::NAME
    }
}

/// Opens a data set, telling its layout from its marker files.
pub fn open(root: &Path) -> Result<Dataset> {
    if !root.is_dir() {
        bail!("data set root {} is not a directory", root.display());
    }
    if cub::detect(root) {
        let mut ds = cub::open(root)?;
        if synthetic::is_synthetic(root) {
            ds.name = synthetic::NAME.into(); // same layout, but reports must not say CUB
        }
        return Ok(ds);
    }
    if aircraft::detect(root) {
        return aircraft::open(root);
    }
    if cars::detect(root) {
        return cars::open(root);
    }
    bail!(
        "{}: no known data set layout; looked for {} (CUB-200-2011), {} (FGVC-Aircraft) and {} (Stanford Cars)",
        root.display(),
        cub::MARKERS.join(" + "),
        aircraft::MARKER,
        cars::MARKERS.join(" or ")
    )
}

/// Decodes any supported image file to 8-bit RGB (grey and CMYK JPEGs included, as
/// PIL's `convert("RGB")` would). The format is sniffed, not taken from the extension.
/// A truncated JPEG is an error, as in PIL: the decoder would fill the missing part
/// with invented pixels.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format().map_err(|e| Error::io(path, e))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_complete(&bytes) {
        bail!("{}: the JPEG is truncated (no end-of-image marker after its last scan)", path.display());
    }
    match reader.decode() {
        Ok(img) => Ok(img.to_rgb8()),
        Err(e) => bail!("{}: cannot decode image: {e}", path.display()),
    }
}

/// Whether a JPEG's last scan is followed by the end-of-image marker (FF D9). An EXIF
/// thumbnail has its own end marker, but it comes before the main image's scans; data
/// after the marker (some cameras append it) is allowed, as PIL allows it.
fn jpeg_complete(b: &[u8]) -> bool {
    let marker_at = |m: u8| b.windows(2).rposition(|w| w == [0xff, m]);
    match (marker_at(0xda), marker_at(0xd9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// Reads a text file as (1-based line number, trimmed line) pairs, skipping blank lines.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text.lines().enumerate().map(|(i, l)| (i + 1, l.trim().to_string())).filter(|(_, l)| !l.is_empty()).collect())
}

/// An error for `line` of `path`, in the "file line N: what" form users grep for.
fn line_error(path: &Path, line: usize, what: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{} line {line}: {what}", path.display()))
}

/// Fails on the first listed image that is not on disk, so a half-extracted archive
/// is reported at open time rather than as skipped samples hours into training.
fn check_exist(samples: &[Sample]) -> Result<()> {
    for s in samples {
        if !s.path.is_file() {
            bail!("listed image {} does not exist", s.path.display());
        }
    }
    Ok(())
}
