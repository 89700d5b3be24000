//! Per-op timing, for finding where a step's time goes before fusing or rewriting a
//! kernel. Off by default, at the cost of one relaxed atomic load per op; on with
//! `DFKD_PROFILE=1` in the environment (read once) or `enable()`. Then every compute
//! method of `backend::Storage` records its wall time under its name and operand shape,
//! and `report()` tabulates them.
//!
//! On a GPU, kernels are queued, so a timed op first waits for the work queued before
//! it and then for its own: each op is charged its own kernels' time, and the run is
//! slower (no overlap of launches with execution). On the CPU the times are exact.
//! An op that calls another timed op is charged the whole time; the inner one is not
//! recorded twice.

use crate::Device;
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// 0: not read from the environment yet, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// (op, shape) -> (calls, total time).
type Times = HashMap<(&'static str, String), (u64, Duration)>;
static TIMES: Mutex<Option<Times>> = Mutex::new(None);

thread_local! {
    /// Whether a timed op is running on this thread (its inner ops are not recorded).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether ops are being timed.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("DFKD_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Starts timing every op from now on, whatever the environment says.
pub fn enable() {
    STATE.store(2, Ordering::Relaxed)
}

/// Forgets every time recorded so far (after a warm-up, say).
pub fn reset() {
    *lock() = None
}

fn lock() -> std::sync::MutexGuard<'static, Option<Times>> {
    TIMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Times one op until dropped, when profiling is on: `shape` names its operands (called
/// only then).
pub(crate) fn scope(op: &'static str, device: Device, shape: impl FnOnce() -> String) -> Option<Scope> {
    if !enabled() || INSIDE.with(|i| i.replace(true)) {
        return None;
    }
    wait_for(device);
    Some(Scope { op, shape: shape(), device, start: Instant::now() })
}

/// A running op's timer (see `scope`).
pub(crate) struct Scope {
    op: &'static str,
    shape: String,
    device: Device,
    start: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        wait_for(self.device);
        let took = self.start.elapsed();
        INSIDE.with(|i| i.set(false));
        let mut times = lock();
        let entry = times.get_or_insert_with(HashMap::new).entry((self.op, std::mem::take(&mut self.shape))).or_default();
        entry.0 += 1;
        entry.1 += took;
    }
}

/// Waits for a GPU's queued work; an error here is the next op's to report.
fn wait_for(device: Device) {
    if let Device::Cuda(n) = device {
        let _ = crate::backend::cuda::cuda_synchronize(n);
    }
}

/// One row of a report: an op, or an op on one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub op: &'static str,
    /// The operands' shapes (empty in the per-op rows).
    pub shape: String,
    pub calls: u64,
    pub total: Duration,
}

/// What was recorded since the start or the last `reset`.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One row per op and shape, longest total first.
    pub by_shape: Vec<Row>,
}

/// The times recorded so far.
pub fn report() -> Report {
    let times = lock();
    let mut by_shape: Vec<Row> = times.iter().flatten().map(|((op, shape), &(calls, total))| Row { op, shape: shape.clone(), calls, total }).collect();
    by_shape.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| (a.op, &a.shape).cmp(&(b.op, &b.shape))));
    Report { by_shape }
}

impl Report {
    /// One row per op (its shapes summed), longest total first.
    pub fn by_op(&self) -> Vec<Row> {
        let mut ops: HashMap<&'static str, Row> = HashMap::new();
        for r in &self.by_shape {
            let row = ops.entry(r.op).or_insert_with(|| Row { op: r.op, shape: String::new(), calls: 0, total: Duration::ZERO });
            row.calls += r.calls;
            row.total += r.total;
        }
        let mut rows: Vec<Row> = ops.into_values().collect();
        rows.sort_by(|a, b| b.total.cmp(&a.total).then(a.op.cmp(b.op)));
        rows
    }

    /// Time in all ops.
    pub fn total(&self) -> Duration {
        self.by_shape.iter().map(|r| r.total).sum()
    }

    /// Two tables: every op, then the `top` slowest (op, shape) pairs; shares are of
    /// `wall` (the time the profiled work took, so the ops' sum shows what was spent
    /// outside them) or, without it, of the ops' total.
    pub fn table(&self, wall: Option<Duration>, top: usize) -> String {
        let whole = wall.unwrap_or_else(|| self.total()).as_secs_f64().max(1e-12);
        let mut s = String::new();
        let line = |s: &mut String, name: &str, calls: u64, total: Duration| {
            let ms = total.as_secs_f64() * 1e3;
            let mean = if calls == 0 { "-".to_string() } else { format!("{:.1}", ms * 1e3 / calls as f64) };
            let _ = writeln!(s, "{name:<58} {calls:>8} {ms:>11.1} {mean:>9} {:>7.1}%", 100.0 * total.as_secs_f64() / whole);
        };
        let _ = writeln!(s, "{:<58} {:>8} {:>11} {:>9} {:>8}", "op", "calls", "total ms", "mean us", "share");
        for r in self.by_op() {
            line(&mut s, r.op, r.calls, r.total);
        }
        if let Some(wall) = wall {
            line(&mut s, "(outside ops: graph, allocation, the caller's own work)", 0, wall.saturating_sub(self.total()));
        }
        let _ = writeln!(s, "\n{:<58} {:>8} {:>11} {:>9} {:>8}", "op on shape (slowest first)", "calls", "total ms", "mean us", "share");
        for r in self.by_shape.iter().take(top) {
            line(&mut s, &format!("{} {}", r.op, r.shape), r.calls, r.total);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_ops_by_shape_once_each_and_not_nested_ones() {
        enable();
        reset();
        for _ in 0..3 {
            let _outer = scope("test_outer", Device::Cpu, || "[2, 3]".into());
            // a timed op inside another is the outer one's time
            assert!(scope("test_inner", Device::Cpu, || "[1]".into()).is_none());
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(scope("test_other", Device::Cpu, || "[4]".into()));
        let r = report();
        let outer = r.by_shape.iter().find(|r| r.op == "test_outer").expect("the outer op is recorded");
        assert_eq!((outer.calls, outer.shape.as_str()), (3, "[2, 3]"));
        assert!(outer.total >= Duration::from_millis(6), "{:?}", outer.total);
        assert!(r.by_shape.iter().all(|r| r.op != "test_inner"));
        // (other tests running now may record ops too: compare only this test's)
        let order: Vec<&str> = r.by_op().iter().map(|r| r.op).filter(|op| op.starts_with("test_")).collect();
        assert_eq!(order, ["test_outer", "test_other"], "longest first");
        let table = r.table(Some(outer.total * 2), 5);
        assert!(table.contains("test_outer [2, 3]") && table.contains("outside ops"), "{table}");
    }
}
