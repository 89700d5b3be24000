//! FGVC-Aircraft 2013b at the variant level (100 classes): `data/variants.txt` lists the
//! class names in order; `data/images_variant_{trainval,test}.txt` hold
//! "<image id> <variant name, may contain spaces>"; images are `data/images/<id>.jpg`.
//! Training uses `trainval` (train + val), as the paper and most FGVC work do.

use super::{check_exist, line_error, read_lines, Dataset, Sample};
use crate::Result;
use std::collections::HashMap;
use std::path::Path;

pub const NAME: &str = "fgvc-aircraft";
pub const MARKER: &str = "data/variants.txt";
/// Height of the copyright banner at the bottom of every photo.
pub const BANNER_PX: u32 = 20;

pub fn detect(root: &Path) -> bool {
    root.join(MARKER).is_file()
}

pub fn open(root: &Path) -> Result<Dataset> {
    let data = root.join("data");
    let classes: Vec<String> = read_lines(&data.join("variants.txt"))?.into_iter().map(|(_, l)| l).collect();
    let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let split = |name: &str| -> Result<Vec<Sample>> {
        let path = data.join(format!("images_variant_{name}.txt"));
        let mut out = Vec::new();
        for (line, text) in read_lines(&path)? {
            let Some((id, variant)) = text.split_once(' ') else {
                return Err(line_error(&path, line, format!("expected `<image id> <variant>`, got `{text}`")));
            };
            let Some(&label) = index.get(variant.trim()) else {
                return Err(line_error(&path, line, format!("variant `{variant}` is not in variants.txt")));
            };
            out.push(Sample { path: data.join("images").join(format!("{id}.jpg")), label });
        }
        Ok(out)
    };
    let (train, test) = (split("trainval")?, split("test")?);
    check_exist(&train)?;
    check_exist(&test)?;
    Ok(Dataset { name: NAME.into(), root: root.to_path_buf(), classes, train, test, bottom_crop: BANNER_PX })
}
