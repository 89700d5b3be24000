//! `--seeds`: the whole job once per distillation seed, each in its own run folder of
//! one sweep folder, sharing the cached data set and teacher; then the summary (mean,
//! standard deviation, 95% interval) as `summary.json` and `summary.md`.

use super::job::{run_job, RunOptions};
use crate::pipeline::checkpoint_dir::CheckpointDir;
use crate::pipeline::config::Config;
use crate::pipeline::sweep::{read_result, seed_dir, Summary};
use crate::{Device, Result};
use std::path::Path;

/// Runs (or, with `resume`, finishes) every seed of the sweep in `dir` and summarises
/// them. Resuming keeps the seeds that finished, continues those with a checkpoint and
/// restarts those killed before their first one; `overwrite` reruns every seed. With
/// neither, a seed folder that already holds a run is refused, as a single run's is.
pub fn run_sweep(cfg: &Config, device: Device, dir: &Path, seeds: &[u64], resume: bool, overwrite: bool) -> Result<Summary> {
    let mut results = vec![];
    for (i, &seed) in seeds.iter().enumerate() {
        let run_dir = seed_dir(dir, seed);
        let finished = if resume { read_result(&run_dir, seed)? } else { None };
        let result = match finished {
            Some(r) => {
                eprintln!("sweep: seed {seed} finished earlier ({:.2}% top-1), kept", r.student_top1);
                r
            }
            None => {
                eprintln!("sweep: seed {seed} ({} of {})", i + 1, seeds.len());
                let mut c = cfg.clone();
                c.distill.seed = seed;
                let has_checkpoint = CheckpointDir::new(&run_dir).existing().is_some();
                let opts = RunOptions {
                    run_dir: run_dir.clone(),
                    resume: resume && has_checkpoint,
                    overwrite: overwrite || (resume && !has_checkpoint && run_dir.exists()),
                };
                run_job(&c, device, &opts)?;
                read_result(&run_dir, seed)?.expect("a finished job writes its final record")
            }
        };
        eprintln!("sweep: seed {seed}: student top-1 {:.2}%, top-5 {:.2}%", result.student_top1, result.student_top5);
        results.push(result);
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
    let summary = Summary::new(&name, results)?;
    summary.write(dir)?;
    Ok(summary)
}
