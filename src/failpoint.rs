//! Crash points for the crash test (tests/crash.rs): `DFKD_FAILPOINT=<name>:<n>` makes
//! the process abort at the n-th time it reaches the point `name`, as a kill -9 there
//! would (or, at `rank<r>-iteration`, rank r's distillation fail with an error: the
//! multi-process test's failing rank, tests/mpi.rs). Unset (always, outside that test) a point costs one atomic load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

fn armed() -> Option<&'static (String, usize)> {
    static ARMED: OnceLock<Option<(String, usize)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("DFKD_FAILPOINT").ok()?;
            let (name, n) = v.rsplit_once(':')?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .as_ref()
}

/// Whether this is the armed point's n-th hit: the caller does what a crash would have
/// left half done, then calls `crash`.
pub fn hit(name: &str) -> bool {
    static HITS: AtomicUsize = AtomicUsize::new(0);
    match armed() {
        Some((armed, n)) if armed == name => HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n,
        _ => false,
    }
}

pub fn crash(name: &str) -> ! {
    eprintln!("failpoint {name}: aborting");
    std::process::abort()
}
