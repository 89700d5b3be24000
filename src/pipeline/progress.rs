//! Progress bars for long phases (hidden when stderr is not a terminal, e.g. in CI,
//! where one line per finished phase is printed instead).

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

pub struct Progress {
    bar: ProgressBar,
    phase: String,
    start: Instant,
}

impl Progress {
    pub fn new(phase: &str, total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        bar.set_style(ProgressStyle::with_template("{prefix:>14.bold} [{bar:30}] {pos}/{len} {per_sec:>10} eta {eta:>4} {msg}").unwrap().progress_chars("=> "));
        bar.set_prefix(phase.to_string());
        Progress { bar, phase: phase.to_string(), start: Instant::now() }
    }
    pub fn step(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
        self.bar.inc(1);
    }
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos)
    }
    pub fn finish(&self, summary: &str) {
        self.bar.finish_and_clear();
        eprintln!("{:>14} done in {:.1}s: {summary}", self.phase, self.start.elapsed().as_secs_f32());
    }
}
