//! Stanford Cars (196 classes) from its devkit: `cars_meta.mat` (cell `class_names`),
//! `cars_train_annos.mat` and `cars_test_annos_withlabels.mat` (struct array
//! `annotations` with fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname),
//! images in `cars_train/` and `cars_test/`. The .mat files are accepted at the root or
//! under `devkit/`, since the labelled test file was distributed separately and ends up
//! in either place. Images are used whole (the paper does not crop to the boxes).

use super::matv5::{self, Value};
use super::{check_exist, Dataset, Sample};
use crate::{bail, Result};
use std::path::{Path, PathBuf};

pub const NAME: &str = "stanford-cars";
pub const MARKERS: [&str; 2] = ["cars_meta.mat", "devkit/cars_meta.mat"];

pub fn detect(root: &Path) -> bool {
    find(root, "cars_meta.mat").is_some()
}

fn find(root: &Path, file: &str) -> Option<PathBuf> {
    [root.join(file), root.join("devkit").join(file)].into_iter().find(|p| p.is_file())
}

fn find_or_fail(root: &Path, file: &str) -> Result<PathBuf> {
    match find(root, file) {
        Some(p) => Ok(p),
        None => bail!("{}: found neither {file} nor devkit/{file}", root.display()),
    }
}

/// The variable `name` of a .mat file, or an error naming the file and variable.
fn variable(path: &Path, name: &str) -> Result<Value> {
    match matv5::read(path)?.into_iter().find(|(n, _)| n == name) {
        Some((_, v)) => Ok(v),
        None => bail!("{}: no variable `{name}`", path.display()),
    }
}

pub fn open(root: &Path) -> Result<Dataset> {
    let meta = find_or_fail(root, "cars_meta.mat")?;
    let Value::Cell(names) = variable(&meta, "class_names")? else {
        bail!("{}: `class_names` is not a cell array", meta.display());
    };
    let mut classes = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        match n.as_str() {
            Some(s) => classes.push(s.to_string()),
            None => bail!("{}: class_names{{{}}} is not a string", meta.display(), i + 1),
        }
    }
    let train = annotations(&find_or_fail(root, "cars_train_annos.mat")?, &root.join("cars_train"), classes.len())?;
    let test = annotations(&find_or_fail(root, "cars_test_annos_withlabels.mat")?, &root.join("cars_test"), classes.len())?;
    check_exist(&train)?;
    check_exist(&test)?;
    Ok(Dataset { name: NAME.into(), root: root.to_path_buf(), classes, train, test, bottom_crop: 0 })
}

fn annotations(path: &Path, dir: &Path, num_classes: usize) -> Result<Vec<Sample>> {
    let annos = variable(path, "annotations")?;
    let Value::Struct { elems, .. } = &annos else {
        bail!("{}: `annotations` is not a struct array", path.display());
    };
    let mut out = Vec::with_capacity(elems.len());
    for i in 0..elems.len() {
        // MATLAB indexing in messages, to match what a user sees in MATLAB or scipy.
        let at = || format!("{}: annotations({})", path.display(), i + 1);
        let Some(fname) = annos.field(i, "fname").and_then(Value::as_str) else {
            bail!("{}.fname is missing or not a string", at());
        };
        let Some(class) = annos.field(i, "class").and_then(Value::as_scalar) else {
            bail!("{}.class is missing or not a scalar", at());
        };
        if class < 1.0 || class > num_classes as f64 || class.fract() != 0.0 {
            bail!("{}.class {class} out of range 1..={num_classes}", at());
        }
        out.push(Sample { path: dir.join(fname), label: class as usize - 1 });
    }
    Ok(out)
}
