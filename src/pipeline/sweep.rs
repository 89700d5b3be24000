//! Repeated runs of one configuration over several distillation seeds (`--seeds`): the
//! layout of a sweep folder (`seed-<k>/` run folders), each seed's final result read
//! back from its metrics, and the summaries: mean, standard deviation and 95% interval
//! per variant, and paired differences between variants run on the same seeds.

use super::report::{write_atomic, MetricsLog};
use super::stats::Interval;
use crate::{bail, Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Parses a seed list: `0,1,2`, `0-4` or a mix (`0-2,7`); no duplicates.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let mut seeds = vec![];
    for part in s.split(',').map(str::trim) {
        let num = |t: &str| t.trim().parse::<u64>().map_err(|_| Error::Msg(format!("--seeds `{s}`: `{t}` is not a seed (a whole number)")));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    bail!("--seeds `{s}`: the range `{part}` is empty");
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(num(part)?),
        }
    }
    let mut sorted = seeds.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        bail!("--seeds `{s}`: seed {} is listed twice", w[0]);
    }
    Ok(seeds)
}

/// The run folder of one seed in a sweep folder.
pub fn seed_dir(sweep: &Path, seed: u64) -> PathBuf {
    sweep.join(format!("seed-{seed}"))
}

/// What one finished run scored (its `"phase": "final"` metrics record).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SeedResult {
    pub seed: u64,
    pub student_top1: f64,
    pub student_top5: f64,
    pub agreement: f64,
    pub teacher_top1: f64,
    pub seconds: f64,
}

/// The final result of the run in `run_dir`, or `None` while it has not finished.
pub fn read_result(run_dir: &Path, seed: u64) -> Result<Option<SeedResult>> {
    let records = MetricsLog::read_all(&run_dir.join("metrics.jsonl"))?;
    let Some(r) = records.iter().rev().find(|r| r["phase"] == "final") else { return Ok(None) };
    let get = |k: &str| r[k].as_f64().ok_or_else(|| Error::Msg(format!("{}: the final record has no number `{k}`", run_dir.join("metrics.jsonl").display())));
    Ok(Some(SeedResult {
        seed,
        student_top1: get("student_top1")?,
        student_top5: get("student_top5")?,
        agreement: get("agreement")?,
        teacher_top1: get("teacher_top1")?,
        seconds: get("seconds")?,
    }))
}

/// Every finished seed of a sweep folder, by seed; an error when there is none.
pub fn read_sweep(dir: &Path) -> Result<Vec<SeedResult>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut results = vec![];
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(seed) = name.strip_prefix("seed-").and_then(|s| s.parse::<u64>().ok()) else { continue };
        if let Some(r) = read_result(&e.path(), seed)? {
            results.push(r);
        }
    }
    if results.is_empty() {
        bail!("{}: no finished seed-<k> run folder (a sweep folder is what `distill --seeds ...` writes)", dir.display());
    }
    results.sort_by_key(|r| r.seed);
    Ok(results)
}

/// One variant over its seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub name: String,
    pub seeds: Vec<SeedResult>,
    pub student_top1: Interval,
    pub student_top5: Interval,
    pub agreement: Interval,
    pub teacher_top1: f64,
}

impl Summary {
    pub fn new(name: &str, seeds: Vec<SeedResult>) -> Result<Summary> {
        let of = |f: fn(&SeedResult) -> f64| Interval::of(&seeds.iter().map(f).collect::<Vec<_>>());
        let (Some(top1), Some(top5), Some(agreement)) = (of(|r| r.student_top1), of(|r| r.student_top5), of(|r| r.agreement)) else {
            bail!("summary of `{name}`: no finished seed");
        };
        let teacher_top1 = seeds[0].teacher_top1;
        Ok(Summary { name: name.into(), seeds, student_top1: top1, student_top5: top5, agreement, teacher_top1 })
    }

    /// The mean student top-1 over the teacher's: the paper's measure of how much of
    /// its teacher a data-free student recovers (DFKD-FGVC: 0.74-0.94).
    pub fn ratio(&self) -> f64 {
        self.student_top1.mean / self.teacher_top1
    }

    /// Per-seed rows, then the mean with its 95% interval, as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut s = format!("{}: {} seeds, teacher top-1 {:.2}%, student / teacher {:.2}\n\n", self.name, self.seeds.len(), self.teacher_top1, self.ratio());
        s += "| seed | student top-1 % | top-5 % | agreement % | seconds |\n|---|---|---|---|---|\n";
        for r in &self.seeds {
            s += &format!("| {} | {:.2} | {:.2} | {:.2} | {:.0} |\n", r.seed, r.student_top1, r.student_top5, r.agreement, r.seconds);
        }
        s += &format!("| **mean ± 95% CI** | {} | {} | {} | |\n", self.student_top1.show(1), self.student_top5.show(1), self.agreement.show(1));
        s
    }

    /// Writes `summary.json` and `summary.md` into the sweep folder.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("summary serialises");
        write_atomic(&dir.join("summary.json"), json.as_bytes())?;
        write_atomic(&dir.join("summary.md"), self.markdown().as_bytes())
    }
}

/// Variant `b` minus variant `a` on the seeds both ran: the paired differences, which
/// remove the between-seed spread that both share.
#[derive(Clone, Debug, Serialize)]
pub struct Paired {
    pub a: String,
    pub b: String,
    pub seeds: Vec<u64>,
    pub student_top1: Interval,
    pub student_top5: Interval,
    pub agreement: Interval,
    /// Seeds on which `b`'s top-1 is higher, lower.
    pub wins: usize,
    pub losses: usize,
}

pub fn paired(a: &Summary, b: &Summary) -> Option<Paired> {
    let pairs: Vec<(&SeedResult, &SeedResult)> = a.seeds.iter().filter_map(|ra| b.seeds.iter().find(|rb| rb.seed == ra.seed).map(|rb| (ra, rb))).collect();
    let diff = |f: fn(&SeedResult) -> f64| Interval::of(&pairs.iter().map(|(x, y)| f(y) - f(x)).collect::<Vec<_>>());
    Some(Paired {
        a: a.name.clone(),
        b: b.name.clone(),
        seeds: pairs.iter().map(|(x, _)| x.seed).collect(),
        student_top1: diff(|r| r.student_top1)?,
        student_top5: diff(|r| r.student_top5)?,
        agreement: diff(|r| r.agreement)?,
        wins: pairs.iter().filter(|(x, y)| y.student_top1 > x.student_top1).count(),
        losses: pairs.iter().filter(|(x, y)| y.student_top1 < x.student_top1).count(),
    })
}

/// Several variants side by side (mean ± 95% CI), then each one's paired difference
/// from the first, as Markdown.
pub fn comparison_markdown(variants: &[Summary]) -> String {
    let mut s =
        String::from("| variant | seeds | teacher top-1 % | student top-1 % | student / teacher | top-5 % | agreement % |\n|---|---|---|---|---|---|---|\n");
    for v in variants {
        s += &format!(
            "| {} | {} | {:.1} | {} | {:.2} | {} | {} |\n",
            v.name,
            v.seeds.len(),
            v.teacher_top1,
            v.student_top1.show(1),
            v.ratio(),
            v.student_top5.show(1),
            v.agreement.show(1)
        );
    }
    if variants.len() > 1 {
        s += &format!("\nPaired differences from `{}` on the seeds both ran (95% CI; * = excludes 0):\n\n", variants[0].name);
        s += "| variant | seeds | Δ top-1 (points) | Δ top-5 | Δ agreement | higher / lower top-1 |\n|---|---|---|---|---|---|\n";
        for v in &variants[1..] {
            match paired(&variants[0], v) {
                Some(p) => {
                    let star = |i: &Interval| if i.sign() != 0 { " *" } else { "" };
                    s += &format!(
                        "| {} | {} | {}{} | {}{} | {}{} | {} / {} |\n",
                        v.name,
                        p.seeds.len(),
                        p.student_top1.show(1),
                        star(&p.student_top1),
                        p.student_top5.show(1),
                        star(&p.student_top5),
                        p.agreement.show(1),
                        star(&p.agreement),
                        p.wins,
                        p.losses
                    );
                }
                None => s += &format!("| {} | 0 | no common seed | | | |\n", v.name),
            }
        }
    }
    s
}

/// The comparison as JSON: each variant's summary and the paired differences from the
/// first.
pub fn comparison_json(variants: &[Summary]) -> serde_json::Value {
    let pairs: Vec<Paired> = variants.iter().skip(1).filter_map(|v| paired(&variants[0], v)).collect();
    serde_json::json!({ "variants": variants, "paired_from_first": pairs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(seed: u64, top1: f64) -> SeedResult {
        SeedResult { seed, student_top1: top1, student_top5: top1 + 40.0, agreement: top1 + 5.0, teacher_top1: 73.6, seconds: 200.0 }
    }

    #[test]
    fn seed_lists_parse_ranges_and_refuse_nonsense() {
        assert_eq!(parse_seeds("0-4").unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(parse_seeds("3, 1,7-8").unwrap(), vec![3, 1, 7, 8]);
        assert!(parse_seeds("1,x").unwrap_err().to_string().contains("`x` is not a seed"));
        assert!(parse_seeds("4-2").unwrap_err().to_string().contains("empty"));
        assert!(parse_seeds("1,0-2").unwrap_err().to_string().contains("seed 1 is listed twice"));
    }

    #[test]
    fn paired_differences_use_common_seeds_only() {
        let a = Summary::new("a", vec![result(0, 10.0), result(1, 20.0), result(2, 30.0)]).unwrap();
        // b is a's seeds 1 and 2 plus 3 points, and a seed a lacks
        let b = Summary::new("b", vec![result(1, 23.0), result(2, 33.0), result(5, 90.0)]).unwrap();
        let p = paired(&a, &b).unwrap();
        assert_eq!(p.seeds, vec![1, 2]);
        assert!((p.student_top1.mean - 3.0).abs() < 1e-12 && p.student_top1.std.unwrap().abs() < 1e-12);
        assert_eq!((p.wins, p.losses), (2, 0));
        let md = comparison_markdown(&[a.clone(), b]);
        assert!(md.contains("| b | 2 | 3.0 ± 0.0 [3.0, 3.0] * |"), "{md}");
        // a's mean 20.0 of its 73.6% teacher
        assert!(md.contains("| a | 3 | 73.6 | 20.0 ± 24.8 [-4.8, 44.8] | 0.27 |"), "{md}");
        assert!(a.markdown().contains("student / teacher 0.27"));
        let c = Summary::new("c", vec![result(9, 1.0)]).unwrap();
        assert!(paired(&a, &c).is_none());
    }
}
