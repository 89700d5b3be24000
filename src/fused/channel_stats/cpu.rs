//! The CPU reference: batch norm's statistics (`backend::cpu::batch_norm`), two f64
//! passes per channel.

use crate::backend::cpu::batch_norm;
use crate::backend::CpuStorage;
use crate::{Layout, Result};

pub fn forward(x: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    Ok(CpuStorage::F32(batch_norm::channel_stats(x.contiguous_f32(l, "channel_stats")?, l.shape())?))
}

/// `stats` and `dstats` are read whole (`[2, c]` each).
pub fn backward(x: &CpuStorage, l: &Layout, stats: &CpuStorage, dstats: &CpuStorage) -> Result<CpuStorage> {
    let op = "channel_stats_backward";
    let x = x.contiguous_f32(l, op)?;
    Ok(CpuStorage::F32(batch_norm::channel_stats_backward(x, l.shape(), stats.f32(op)?, dstats.f32(op)?)?))
}
