//! Batches of decoded, transformed images. A background thread builds batch k+1 (its
//! images decoded in parallel with rayon) while the consumer trains on batch k; a
//! rendezvous channel keeps it exactly one batch ahead, which bounds memory.
//! Determinism does not depend on thread timing: the epoch's order comes from
//! (seed, epoch) and each sample's augmentation from (seed, epoch, sample index).

use super::transforms::{Augment, Pipeline};
use super::{load_rgb, Dataset, Sample};
use crate::rng::Rng;
use crate::Result;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How many skipped files are printed and remembered by name; the rest are counted.
const NAMED_WARNINGS: usize = 5;

#[derive(Clone, Debug)]
pub struct Batch {
    /// `[n, 3, size, size]`, row-major.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub n: usize,
    pub size: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub pipeline: Pipeline,
    /// Shuffle each epoch (training) or keep the listed order (evaluation).
    pub shuffle: bool,
    /// Strict: an unreadable image is an error (evaluation must see every sample).
    /// Lenient: it is skipped and counted in `Loader::warnings`.
    pub strict: bool,
    /// Drop a last, smaller batch (keeps batch-norm statistics well defined).
    pub drop_last: bool,
    pub seed: u64,
}

impl LoaderConfig {
    /// The paper's training pipeline for `ds`: augmented, shuffled, lenient.
    pub fn train(ds: &Dataset, batch_size: usize, size: u32, seed: u64) -> Self {
        let augment = if ds.random_resized() { Augment::RandomResizedCrop } else { Augment::RandomCrop };
        let pipeline = Pipeline { size, bottom_crop: ds.bottom_crop, augment };
        LoaderConfig { batch_size, pipeline, shuffle: true, strict: false, drop_last: true, seed }
    }

    /// The evaluation pipeline: resize + centre crop, in order, strict, every sample.
    pub fn eval(ds: &Dataset, batch_size: usize, size: u32) -> Self {
        let pipeline = Pipeline { size, bottom_crop: ds.bottom_crop, augment: Augment::None };
        LoaderConfig { batch_size, pipeline, shuffle: false, strict: true, drop_last: false, seed: 0 }
    }
}

/// Images skipped in lenient mode: how many, and the first few with their errors.
#[derive(Clone, Debug, Default)]
pub struct Warnings {
    pub count: usize,
    pub first: Vec<String>,
}

pub struct Loader {
    samples: Arc<Vec<Sample>>,
    cfg: LoaderConfig,
    warnings: Arc<Mutex<Warnings>>,
}

impl Loader {
    pub fn new(samples: &[Sample], cfg: LoaderConfig) -> Self {
        assert!(cfg.batch_size > 0, "batch_size must be positive");
        Loader { samples: Arc::new(samples.to_vec()), cfg, warnings: Arc::default() }
    }

    /// Batches per epoch (before any lenient skipping).
    pub fn len(&self) -> usize {
        let (n, b) = (self.samples.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn warnings(&self) -> Warnings {
        self.warnings.lock().unwrap().clone()
    }

    /// Starts producing epoch `epoch`'s batches in the background.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.cfg.shuffle {
            Rng::new(self.cfg.seed).fork(epoch).fork(u64::MAX).shuffle(&mut order);
        }
        order.truncate(self.len() * self.cfg.batch_size);
        let (tx, rx) = sync_channel(0);
        let (samples, cfg, warnings) = (self.samples.clone(), self.cfg, self.warnings.clone());
        let worker = std::thread::spawn(move || {
            let base = Rng::new(cfg.seed).fork(epoch);
            for chunk in order.chunks(cfg.batch_size) {
                let batch = build(&samples, chunk, &cfg, &base, &warnings);
                let stop = batch.is_err();
                if matches!(&batch, Ok(b) if b.n == 0) {
                    continue; // every image of the batch was skipped (and counted)
                }
                if tx.send(batch).is_err() || stop {
                    return; // consumer gone, or the error was the last word
                }
            }
        });
        Epoch { rx, worker: Some(worker) }
    }
}

/// Decodes and transforms one batch in parallel; results are put in `chunk` order, so
/// the batch does not depend on which thread finished first.
fn build(samples: &[Sample], chunk: &[usize], cfg: &LoaderConfig, base: &Rng, warnings: &Mutex<Warnings>) -> Result<Batch> {
    let size = cfg.pipeline.size as usize;
    let items: Vec<(usize, Result<Vec<f32>>)> = chunk
        .par_iter()
        .map(|&i| {
            let mut rng = base.fork(i as u64);
            (i, load_rgb(&samples[i].path).map(|img| cfg.pipeline.apply(&img, &mut rng)))
        })
        .collect();
    // from the tensors' recycled buffers, where the batch's tensor returns it
    let images = crate::backend::cpu::buffers::with_capacity(chunk.len() * 3 * size * size);
    let mut batch = Batch { images, labels: Vec::new(), n: 0, size };
    for (i, item) in items {
        match item {
            Ok(x) => {
                batch.images.extend_from_slice(&x);
                batch.labels.push(samples[i].label as u32);
                batch.n += 1;
            }
            Err(e) if cfg.strict => return Err(e),
            Err(e) => {
                let mut w = warnings.lock().unwrap();
                w.count += 1;
                if w.first.len() < NAMED_WARNINGS {
                    eprintln!("warning: skipping image: {e}");
                    w.first.push(e.to_string());
                }
            }
        }
    }
    Ok(batch)
}

/// One epoch's batches. Dropping it early stops the background thread.
pub struct Epoch {
    rx: Receiver<Result<Batch>>,
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        match self.rx.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                // The worker is done; a panic in it must not pass for a short epoch.
                if let Some(Err(panic)) = self.worker.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Replace the receiver so the worker's pending send fails, then wait for it,
        // so no decoding thread outlives its epoch.
        self.rx = sync_channel(0).1;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
