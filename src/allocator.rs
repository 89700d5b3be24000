//! The allocator the binaries and benches install (`#[global_allocator]`), and its one
//! setting that matters for training loops.

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed pages mapped instead of handing them back to the OS after 10 ms (the
/// default). A training step frees and reallocates the same large activation buffers
/// every few milliseconds; with purging on, each reuse faulted its pages back in and the
/// kernel zeroed them: 450,000 page faults and ~10% of a CPU-demo distillation's time
/// (`clear_page_erms` in perf), down to ~1,300 faults with it off, at the same peak memory.
/// Call first thing in `main`.
pub fn keep_freed_pages() {
    // SAFETY: sets an integer option; mimalloc reads it whenever it considers purging.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
