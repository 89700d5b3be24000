//! The configured data set: a real one opened from `data.dataset`, or the synthetic one
//! generated into the work folder (once; later calls open what is there).

use super::config::Config;
use crate::data::synthetic::{self, SyntheticSpec};
use crate::data::Dataset;
use crate::Result;
use std::path::{Path, PathBuf};

/// Where the synthetic data set of `cfg` lives.
pub fn synthetic_dir(cfg: &Config) -> PathBuf {
    let d = &cfg.data;
    cfg.workdir.join("data").join(format!("synthetic-birds-{}c-{}px-seed{}", d.num_classes, d.image_size, cfg.seed))
}

/// Opens the configured data set, generating the synthetic one first if needed.
pub fn open(cfg: &Config) -> Result<Dataset> {
    let d = &cfg.data;
    if d.dataset != "synthetic" {
        return crate::data::open(Path::new(&d.dataset));
    }
    let spec = SyntheticSpec {
        num_classes: d.num_classes,
        train_per_class: d.train_per_class,
        test_per_class: d.test_per_class,
        image_size: d.image_size as u32,
        seed: cfg.seed,
        image_stream: 1,
    };
    synthetic::ensure(&spec, &synthetic_dir(cfg))
}
