//! The student on real data (docs/METHOD.md, "Baselines"): no synthesis at all; every
//! student step distils from the teacher on a batch of the *real* training images,
//! with the training augmentations, under the same loss (KD at `distill.tau_kd`),
//! optimiser, schedule and number of steps as the data-free methods. Not data-free: it
//! is the ceiling those methods are measured against (the paper's "student on real
//! data" row).

use super::{DistillMethod, Recipe, Setup, Synthesis};
use crate::data::loader::{Epoch, Loader, LoaderConfig};
use crate::models::Features;
use crate::pipeline::augment::Augment;
use crate::pipeline::config::Config;
use crate::pipeline::data_set;
use crate::pipeline::loop_state::{Losses, Loop};
use crate::{bail, Result, Tensor};
use std::path::Path;

pub struct RealKd {
    /// The training split in global batches of `distill.batch_size`, shuffled by
    /// `distill.seed`; every rank reads the same batch and keeps its share.
    loader: Loader,
    /// Global batches drawn so far (`distill.s_steps` an iteration), and the epoch
    /// they are drawn from.
    drawn: usize,
    epoch: Option<Epoch>,
    /// The last batch (this rank's share), shown in the run's image grids.
    last: Option<Tensor>,
}

impl Recipe for RealKd {
    const SYNTHESIS: Synthesis = Synthesis::Pixels;
    fn new(setup: &mut Setup) -> Result<Self> {
        let cfg = setup.cfg;
        let ds = data_set::open(cfg)?;
        let loader = Loader::new(&ds.train, LoaderConfig::train(&ds, cfg.distill.batch_size, cfg.data.image_size as u32, cfg.distill.seed));
        if loader.is_empty() {
            bail!("real-kd: {} training images in {} are fewer than one batch of {}", ds.train.len(), ds.root.display(), cfg.distill.batch_size);
        }
        Ok(RealKd { loader, drawn: 0, epoch: None, last: None })
    }
}

impl RealKd {
    /// The next global batch, in order through the shuffled epochs.
    fn next_batch(&mut self) -> Result<crate::data::Batch> {
        let per_epoch = self.loader.len();
        loop {
            if self.drawn.is_multiple_of(per_epoch) || self.epoch.is_none() {
                let (epoch, skip) = (self.drawn / per_epoch, self.drawn % per_epoch);
                let mut batches = self.loader.epoch(epoch as u64);
                // a resumed run picks the stream up where the checkpoint left it
                for _ in 0..skip {
                    batches.next().transpose()?;
                }
                self.epoch = Some(batches);
            }
            match self.epoch.as_mut().and_then(Iterator::next) {
                Some(b) => {
                    self.drawn += 1;
                    return b;
                }
                // an epoch cut short by unreadable images: go on with the next
                None => self.drawn = self.drawn.next_multiple_of(per_epoch),
            }
        }
    }
}

impl DistillMethod for RealKd {
    fn pool_capacity(&self, _cfg: &Config) -> usize { 0 }

    /// Real images come augmented by the loader's training transforms, as the
    /// teacher's did; the synthetic images' augmentation is not added on top.
    fn augment(&self, _cfg: &Config) -> Augment { Augment::NONE }

    /// Nothing to synthesise.
    fn synthesize(&mut self, _lp: &mut Loop) -> Result<Losses> { Ok(vec![]) }

    fn student_batch(&mut self, lp: &mut Loop) -> Result<Tensor> {
        let b = self.next_batch()?;
        let (world, local) = (lp.world(), lp.local_batch);
        if b.n != local * world {
            bail!("real-kd: a batch of {} readable images cannot give {world} ranks {local} each (unreadable training images?)", b.n);
        }
        let rank = lp.group.as_ref().map_or(0, |g| g.rank());
        let x = Tensor::from_vec(b.images, &[b.n, 3, b.size, b.size], lp.device)?.narrow(0, rank * local, local)?.contiguous()?;
        self.last = Some(x.clone());
        Ok(x)
    }

    fn student_loss(&self, lp: &Loop, t: &Features, s: &Features) -> Result<(Tensor, Losses)> { lp.student_kd(t, s) }

    fn samples(&mut self, _lp: &mut Loop) -> Result<Option<Tensor>> { Ok(self.last.clone()) }

    /// The batches drawn follow from the iterations done, so the checkpoint needs
    /// nothing of the method's own.
    fn restore(&mut self, _dir: &Path, lp: &Loop) -> Result<()> {
        self.drawn = lp.iteration * lp.cfg.distill.s_steps;
        self.epoch = None;
        Ok(())
    }
}
