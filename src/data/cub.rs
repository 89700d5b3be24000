//! CUB-200-2011 in its official layout (also the layout the synthetic set is written in):
//! `images.txt` "<id> <relpath>", `image_class_labels.txt` "<id> <class, 1-based>",
//! `train_test_split.txt` "<id> <1 train | 0 test>", `classes.txt` "<id> <name>",
//! and the images under `images/<relpath>`.

use super::{check_exist, line_error, read_lines, Dataset, Sample};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const NAME: &str = "cub-200-2011";
pub const MARKERS: [&str; 2] = ["images.txt", "train_test_split.txt"];

pub fn detect(root: &Path) -> bool {
    MARKERS.iter().all(|m| root.join(m).is_file())
}

pub fn open(root: &Path) -> Result<Dataset> {
    let classes = parse_classes(&root.join("classes.txt"))?;
    let images_txt = root.join("images.txt");
    let images = parse_pairs(&images_txt, "<id> <path>", |s| Some(s.to_string()))?;
    let labels_txt = root.join("image_class_labels.txt");
    let labels = parse_pairs(&labels_txt, "<id> <class>", |s| s.parse::<usize>().ok())?;
    let split_txt = root.join("train_test_split.txt");
    let split = parse_pairs(&split_txt, "<id> <0|1>", |s| match s {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    })?;

    let labels_by_id: HashMap<usize, (usize, usize)> = labels.iter().map(|&(l, id, c)| (id, (l, c))).collect();
    let split_by_id: HashMap<usize, bool> = split.iter().map(|&(_, id, t)| (id, t)).collect();
    // Ids in the side files that images.txt does not list are typos, not extras to drop.
    let known: HashSet<usize> = images.iter().map(|(_, id, _)| *id).collect();
    let stray_labels = labels.iter().map(|&(l, id, _)| (l, id));
    let stray_split = split.iter().map(|&(l, id, _)| (l, id));
    for (file, mut rows) in [(&labels_txt, stray_labels.collect::<Vec<_>>()), (&split_txt, stray_split.collect())] {
        if let Some((line, id)) = rows.drain(..).find(|(_, id)| !known.contains(id)) {
            return Err(line_error(file, line, format!("image id {id} is not in images.txt")));
        }
    }

    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (line, id, rel) in &images {
        let Some(&(lline, class)) = labels_by_id.get(id) else {
            return Err(line_error(&images_txt, *line, format!("image id {id} has no line in image_class_labels.txt")));
        };
        if class == 0 || class > classes.len() {
            let range = format!("1..={}", classes.len());
            return Err(line_error(&labels_txt, lline, format!("class {class} out of range {range}")));
        }
        let Some(&is_train) = split_by_id.get(id) else {
            return Err(line_error(&images_txt, *line, format!("image id {id} has no line in train_test_split.txt")));
        };
        let sample = Sample { path: root.join("images").join(rel), label: class - 1 };
        if is_train {
            train.push(sample)
        } else {
            test.push(sample)
        }
    }
    check_exist(&train)?;
    check_exist(&test)?;
    Ok(Dataset { name: NAME.into(), root: root.to_path_buf(), classes, train, test, bottom_crop: 0 })
}

/// classes.txt must number its classes 1, 2, ... in order: labels index into it.
fn parse_classes(path: &Path) -> Result<Vec<String>> {
    let rows = parse_pairs(path, "<class id> <name>", |s| Some(s.to_string()))?;
    let mut names = Vec::with_capacity(rows.len());
    for (line, id, name) in rows {
        if id != names.len() + 1 {
            return Err(line_error(path, line, format!("expected class id {}, got {id}", names.len() + 1)));
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(Error::Msg(format!("{}: no classes listed", path.display())));
    }
    Ok(names)
}

/// Parses "<id> <value>" lines into (line number, id, value), rejecting duplicate ids.
fn parse_pairs<T>(path: &Path, form: &str, value: impl Fn(&str) -> Option<T>) -> Result<Vec<(usize, usize, T)>> {
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for (line, text) in read_lines(path)? {
        let parsed = text.split_once(char::is_whitespace).and_then(|(id, rest)| Some((id.parse::<usize>().ok()?, value(rest.trim())?)));
        let Some((id, v)) = parsed else {
            return Err(line_error(path, line, format!("expected `{form}`, got `{text}`")));
        };
        if let Some(first) = seen.insert(id, line) {
            return Err(line_error(path, line, format!("id {id} already given on line {first}")));
        }
        out.push((line, id, v));
    }
    Ok(out)
}

/// One image of a layout being written: its path under `images/`, 0-based label, split.
pub struct Entry {
    pub rel: PathBuf,
    pub label: usize,
    pub train: bool,
}

/// Writes the four index files of the layout (the images themselves are the caller's).
/// Ids are 1-based in entry order, as in the official release.
pub fn write_layout(root: &Path, classes: &[String], entries: &[Entry]) -> Result<()> {
    let (mut images, mut labels, mut split, mut names) = (String::new(), String::new(), String::new(), String::new());
    for (i, c) in classes.iter().enumerate() {
        writeln!(names, "{} {c}", i + 1).unwrap();
    }
    for (i, e) in entries.iter().enumerate() {
        let rel = e.rel.to_string_lossy().replace('\\', "/");
        writeln!(images, "{} {rel}", i + 1).unwrap();
        writeln!(labels, "{} {}", i + 1, e.label + 1).unwrap();
        writeln!(split, "{} {}", i + 1, e.train as u8).unwrap();
    }
    for (file, text) in [("classes.txt", names), ("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split)] {
        let p = root.join(file);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}
