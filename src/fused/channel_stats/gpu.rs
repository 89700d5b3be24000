//! The launches of kernels/batch_norm.cu's statistics kernels: a block per channel
//! forward, a thread per element backward.

use crate::backend::cuda::{bn_dims, k, per_channel, LaunchCfg};
use crate::fused::Gpu;
use crate::{DType, Layout, Result};

/// `[2, c]`: per channel the mean, then the biased variance.
pub fn forward<G: Gpu>(g: &G, x: &G::Buf, l: &Layout) -> Result<G::Buf> {
    let (off, [n, c, s]) = bn_dims(g, x, l, "channel_stats")?;
    let mut stats = g.alloc(2 * c as usize, DType::F32)?;
    let args = (n, c, s, g.ptr(x, off), g.ptr_mut(&mut stats, 0));
    k::channel_stats_f32.launch(g, LaunchCfg::rows(c, n * s), args)?;
    Ok(stats)
}

/// `dx = dmean / m + dvar * 2 (x - mean) / m`, from the saved statistics and their
/// gradient (`[2, c]` each).
pub fn backward<G: Gpu>(g: &G, x: &G::Buf, l: &Layout, stats: &G::Buf, dstats: &G::Buf) -> Result<G::Buf> {
    let (off, [n, c, s]) = bn_dims(g, x, l, "channel_stats_backward")?;
    per_channel(g, stats, 2 * c, "channel statistics")?;
    per_channel(g, dstats, 2 * c, "channel statistics' gradient")?;
    let total = n * c * s;
    let mut dx = g.alloc(total as usize, DType::F32)?;
    let args = (total, c, s, n * s, g.ptr(x, off), g.ptr(stats, 0), g.ptr(dstats, 0), g.ptr_mut(&mut dx, 0));
    k::channel_stats_bwd_f32.launch(g, LaunchCfg::elementwise(total), args)?;
    Ok(dx)
}
