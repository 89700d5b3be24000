//! Recycling of large f32 buffers. Activations of a training step have the same sizes
//! every step; handing a dropped buffer to the next op of that size avoids both the
//! allocator returning pages to the OS (and faulting them back, zeroed, ~10% of a step)
//! and zeroing outputs that are about to be overwritten (~16% of a distillation step).

use std::collections::HashMap;
use std::sync::Mutex;

/// Smaller buffers are cheap to allocate; only these sizes are pooled.
const MIN_LEN: usize = 1 << 14;
/// Idle buffers kept at most (bytes).
const MAX_POOLED_BYTES: usize = 1 << 30;

struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Called when a CPU storage is dropped.
pub(crate) fn recycle(v: Vec<f32>) {
    if v.len() < MIN_LEN || v.len() != v.capacity() {
        return;
    }
    let mut guard = POOL.lock().unwrap();
    let pool = guard.get_or_insert_with(|| Pool { free: HashMap::new(), bytes: 0 });
    let bytes = v.len() * 4;
    if pool.bytes + bytes <= MAX_POOLED_BYTES {
        pool.bytes += bytes;
        pool.free.entry(v.len()).or_default().push(v);
    }
}

fn take(n: usize) -> Option<Vec<f32>> {
    if n < MIN_LEN {
        return None;
    }
    let mut guard = POOL.lock().unwrap();
    let pool = guard.as_mut()?;
    let v = pool.free.get_mut(&n)?.pop()?;
    pool.bytes -= n * 4;
    Some(v)
}

/// A buffer of `n` elements for `fill`, which must overwrite every element: a recycled
/// buffer holds stale values.
pub(crate) fn filled(n: usize, fill: impl FnOnce(&mut [f32])) -> Vec<f32> {
    let mut v = take(n).unwrap_or_else(|| vec![0.0; n]);
    fill(&mut v);
    v
}

/// A zeroed buffer of `n` elements.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    match take(n) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => vec![0.0; n],
    }
}

/// An empty buffer with room for exactly `n` elements, for a caller that builds its
/// contents by pushing and hands the result to a tensor (the data loader's batches).
/// Taken from the pool when one is there: every full buffer goes back to the pool when
/// its tensor drops, so one allocated outside it and never taken again stays there (a
/// training batch each step: 13 MB an epoch of 32 px teacher training, up to the cap).
pub(crate) fn with_capacity(n: usize) -> Vec<f32> {
    match take(n) {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(n),
    }
}

/// The element-wise sum of equally long buffers (per-thread partial sums): added into
/// the first, the others recycled.
pub(crate) fn sum(parts: Vec<Vec<f32>>) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut total = parts.next().expect("at least one buffer to sum");
    for part in parts {
        assert_eq!(part.len(), total.len(), "buffers::sum: lengths differ");
        total.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
        recycle(part);
    }
    total
}

#[cfg(test)]
mod tests {
    #[test]
    fn recycled_buffers_are_reused_and_zeroed_on_request() {
        let n = super::MIN_LEN + 17;
        super::recycle(vec![3.0; n]);
        let v = super::zeroed(n);
        assert!(v.len() == n && v.iter().all(|&x| x == 0.0));
        super::recycle(v);
        let w = super::filled(n, |o| o.fill(1.0));
        assert!(w.iter().all(|&x| x == 1.0));
    }

    /// A buffer built by pushing takes a pooled one of its size, so one that comes and
    /// goes every step (a data batch) leaves the pool as it found it.
    #[test]
    fn pushed_buffers_come_from_the_pool() {
        let n = super::MIN_LEN + 29;
        super::recycle(vec![2.0; n]);
        let pooled = |n: usize| super::POOL.lock().unwrap().as_ref().map_or(0, |p| p.free.get(&n).map_or(0, Vec::len));
        let before = pooled(n);
        for _ in 0..3 {
            let mut v = super::with_capacity(n);
            assert!(v.is_empty() && v.capacity() >= n);
            v.extend(std::iter::repeat_n(1.0, n));
            super::recycle(v);
        }
        assert_eq!(pooled(n), before, "pushed buffers of one size piled up in the pool");
    }
}
