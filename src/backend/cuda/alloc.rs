//! The caching allocator's bookkeeping, in plain Rust so that it is unit-tested without
//! a GPU (`device.rs` pairs it with cuMemAlloc/cuMemFree).
//!
//! cuMemAlloc and cuMemFree cost tens of microseconds and cuMemFree synchronises the
//! device, while a training step allocates and drops thousands of buffers of the same
//! few sizes. So a dropped buffer is not freed: it goes on a free list keyed by its
//! size class, and the next request of that class takes it back. After the first step
//! every request is served from the lists (the step's sizes repeat), and the driver is
//! called again only when a new size appears, or to free the whole cache and retry
//! when an allocation runs out of memory.
//!
//! Reuse is safe without events because every kernel, copy and GEMM of a device runs on
//! one stream, in issue order: work queued after the reuse runs after the work queued
//! before the drop.

use std::collections::HashMap;

/// The smallest block, and the granularity of small ones: cuMemAlloc aligns to 256
/// bytes anyway, and a few hundred bytes per tiny tensor do not matter.
pub const MIN_BLOCK: usize = 512;

/// The block size served for a request of `bytes`: 0 for 0 (no allocation), else
/// rounded up to one of four classes per power of two (1, 1.25, 1.5, 1.75 times it, at
/// least `MIN_BLOCK` apart). Waste stays under 25% of the request (or under `MIN_BLOCK`
/// bytes for small ones), and sizes that differ slightly still share a class.
pub fn size_class(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    let step = (bytes.next_power_of_two() / 8).max(MIN_BLOCK);
    bytes.div_ceil(step) * step
}

/// What the allocator did so far, for tests and `distill bench` diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Requests served from a free list.
    pub hits: u64,
    /// Requests that had to call the driver.
    pub misses: u64,
    /// Bytes handed out and not yet returned (in whole blocks).
    pub in_use: usize,
    /// Bytes sitting on the free lists.
    pub cached: usize,
    /// The most `in_use + cached` ever held from the driver.
    pub peak: usize,
}

/// Free blocks by size class. `B` is a device address on a GPU, anything in tests.
#[derive(Debug)]
pub struct FreeLists<B> {
    lists: HashMap<usize, Vec<B>>,
    stats: AllocStats,
}

impl<B> Default for FreeLists<B> {
    fn default() -> Self {
        FreeLists { lists: HashMap::new(), stats: AllocStats::default() }
    }
}

impl<B> FreeLists<B> {
    /// A cached block of class `class` (from `size_class`), counted as in use; `None`
    /// (a miss) when the caller must ask the driver and then call `note_new`.
    pub fn take(&mut self, class: usize) -> Option<B> {
        let b = self.lists.get_mut(&class).and_then(Vec::pop);
        match b {
            Some(_) => {
                self.stats.hits += 1;
                self.stats.cached -= class;
                self.stats.in_use += class;
            }
            None => self.stats.misses += 1,
        }
        b
    }

    /// Records a block of `class` just obtained from the driver, in use.
    pub fn note_new(&mut self, class: usize) {
        self.stats.in_use += class;
        self.stats.peak = self.stats.peak.max(self.stats.in_use + self.stats.cached);
    }

    /// Returns a block of `class` to its list.
    pub fn put(&mut self, class: usize, b: B) {
        self.stats.in_use -= class;
        self.stats.cached += class;
        self.lists.entry(class).or_default().push(b);
    }

    /// Empties every list, handing the blocks back for the driver to free (the retry
    /// after an out-of-memory error).
    pub fn drain(&mut self) -> Vec<(usize, B)> {
        let out: Vec<(usize, B)> = self.lists.drain().flat_map(|(c, bs)| bs.into_iter().map(move |b| (c, b))).collect();
        self.stats.cached = 0;
        out
    }

    pub fn stats(&self) -> AllocStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_by_less_than_a_quarter() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(1), MIN_BLOCK);
        assert_eq!(size_class(MIN_BLOCK), MIN_BLOCK);
        assert_eq!(size_class(MIN_BLOCK + 1), 2 * MIN_BLOCK);
        // four classes between 4 and 8 MiB
        let mib = 1 << 20;
        assert_eq!(size_class(4 * mib + 1), 5 * mib);
        assert_eq!(size_class(5 * mib), 5 * mib);
        assert_eq!(size_class(5 * mib + 1), 6 * mib);
        assert_eq!(size_class(7 * mib + 1), 8 * mib);
        for bytes in (1..5000).chain((0..4000).map(|i| 12345 + i * 7919)).chain([(1 << 30) + 1, (3 << 29) - 3]) {
            let c = size_class(bytes);
            assert!(c >= bytes && c.is_multiple_of(MIN_BLOCK), "{bytes} -> {c}");
            assert!(c - bytes < MIN_BLOCK || (c - bytes) * 4 < bytes, "{bytes} -> {c} wastes a quarter or more");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }

    #[test]
    fn a_repeated_step_is_served_from_the_lists() {
        let mut f: FreeLists<u64> = FreeLists::default();
        let sizes = [4096usize, 100, 1 << 20, 4096, 333_333];
        let mut next = 1u64;
        // one "training step": allocate everything, then drop it all
        let mut step = |f: &mut FreeLists<u64>| {
            let blocks: Vec<(usize, u64)> = sizes
                .iter()
                .map(|&s| {
                    let c = size_class(s);
                    let b = f.take(c).unwrap_or_else(|| {
                        f.note_new(c);
                        next += 1;
                        next
                    });
                    (c, b)
                })
                .collect();
            for (c, b) in blocks {
                f.put(c, b);
            }
        };
        step(&mut f);
        let first = f.stats();
        assert_eq!((first.hits, first.misses), (0, 5));
        let held: usize = sizes.iter().map(|&s| size_class(s)).sum();
        assert_eq!((first.in_use, first.cached, first.peak), (0, held, held));
        for _ in 0..3 {
            step(&mut f);
        }
        let s = f.stats();
        assert_eq!(s.misses, 5, "the steady state never calls the driver");
        assert_eq!(s.hits, 15);
        assert_eq!((s.in_use, s.cached, s.peak), (0, held, held));
    }

    #[test]
    fn blocks_go_back_to_their_own_class_and_drain_empties_everything() {
        let mut f: FreeLists<&str> = FreeLists::default();
        let blocks = [(512, "a"), (1024, "b"), (512, "c")];
        for (c, _) in blocks {
            assert!(f.take(c).is_none());
            f.note_new(c);
        }
        for (c, b) in blocks {
            f.put(c, b);
        }
        assert_eq!(f.take(1024), Some("b"));
        assert_eq!(f.take(1024), None, "a class never borrows from another");
        let s = f.stats();
        assert_eq!((s.in_use, s.cached, s.peak), (1024, 1024, 2048));
        let mut drained = f.drain();
        drained.sort();
        assert_eq!(drained, vec![(512, "a"), (512, "c")]);
        assert_eq!(f.stats().cached, 0);
        assert!(f.take(512).is_none());
        f.put(1024, "b");
        assert_eq!(f.stats().in_use, 0);
    }
}
