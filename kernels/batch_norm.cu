// Batch norm over contiguous [n, c, spatial] tensors (training mode; evaluation mode as
// a per-channel affine map; the batch statistics alone), with the CPU
// reference's formulas (src/backend/cpu/batch_norm.rs). Per-channel statistics take
// one block per channel (grid-stride over channels); element-wise passes one thread
// per element. Statistics are float block reductions where the CPU sums in f64.
#include "common.cuh"

// Element j of channel ch: planes of `s` values, `c` planes per batch item.
__device__ __forceinline__ unsigned int channel_at(unsigned int j, unsigned int ch, unsigned int c, unsigned int s) {
    return (j / s) * c * s + ch * s + j % s;
}

struct MeanVar {
    float mean, var;
};

// Channel ch's mean and biased var, from two passes (mean, then centred squares) so a
// large mean cannot cancel the variance. Every thread of the block calls it (block
// reductions); every thread gets the result.
__device__ MeanVar channel_mean_var(unsigned int n, unsigned int c, unsigned int s, unsigned int ch, const float* x) {
    const unsigned int m = n * s;
    float acc = 0.0f;
    for (unsigned int j = threadIdx.x; j < m; j += blockDim.x) acc += x[channel_at(j, ch, c, s)];
    const float mu = block_reduce(acc, SumOp()) / (float)m;
    acc = 0.0f;
    for (unsigned int j = threadIdx.x; j < m; j += blockDim.x) {
        const float d = x[channel_at(j, ch, c, s)] - mu;
        acc += d * d;
    }
    return MeanVar{mu, block_reduce(acc, SumOp()) / (float)m};
}

// mean and invstd = 1 / sqrt(var + eps) per channel.
DFKD_KERNEL(bn_stats_f32, (unsigned int n, unsigned int c, unsigned int s, float eps, const float* x, float* mean,
                           float* invstd)) {
    for (unsigned int ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const MeanVar mv = channel_mean_var(n, c, s, ch, x);
        if (threadIdx.x == 0) {
            mean[ch] = mv.mean;
            invstd[ch] = 1.0f / sqrtf(mv.var + eps);
        }
    }
}

// y = x * scale + shift per channel: batch norm in evaluation mode, one pass.
DFKD_KERNEL(channel_affine_f32, (unsigned int total, unsigned int c, unsigned int s, const float* x,
                                 const float* scale, const float* shift, float* y)) {
    GRID_STRIDE(i, total) {
        const unsigned int ch = (i / s) % c;
        y[i] = x[i] * scale[ch] + shift[ch];
    }
}

// stats [2, c]: per channel the mean, then the biased var, as bn_stats computes them
// (DFKD's BN-statistics loss reads the statistics without normalising).
DFKD_KERNEL(channel_stats_f32, (unsigned int n, unsigned int c, unsigned int s, const float* x, float* stats)) {
    for (unsigned int ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const MeanVar mv = channel_mean_var(n, c, s, ch, x);
        if (threadIdx.x == 0) {
            stats[ch] = mv.mean;
            stats[c + ch] = mv.var;
        }
    }
}

// The gradient of channel_stats: dx = dmean / m + dvar * 2 (x - mean) / m, with
// dstats [2, c] = (dmean; dvar).
DFKD_KERNEL(channel_stats_bwd_f32, (unsigned int total, unsigned int c, unsigned int s, unsigned int m, const float* x,
                                    const float* stats, const float* dstats, float* dx)) {
    GRID_STRIDE(i, total) {
        const unsigned int ch = (i / s) % c;
        dx[i] = dstats[ch] / (float)m + 2.0f * dstats[c + ch] / (float)m * (x[i] - stats[ch]);
    }
}

// y = (x - mean) * (invstd * gamma) + beta
DFKD_KERNEL(bn_apply_f32, (unsigned int total, unsigned int c, unsigned int s, const float* x, const float* mean,
                           const float* invstd, const float* gamma, const float* beta, float* y)) {
    GRID_STRIDE(i, total) {
        const unsigned int ch = (i / s) % c;
        y[i] = (x[i] - mean[ch]) * (invstd[ch] * gamma[ch]) + beta[ch];
    }
}

// dbeta = sum dy, dgamma = invstd * sum (x - mean) * dy, per channel.
DFKD_KERNEL(bn_backward_reduce_f32, (unsigned int n, unsigned int c, unsigned int s, const float* x, const float* dy,
                                     const float* mean, const float* invstd, float* dgamma, float* dbeta)) {
    const unsigned int m = n * s;
    for (unsigned int ch = blockIdx.x; ch < c; ch += gridDim.x) {
        float sdy = 0.0f, dot = 0.0f;
        for (unsigned int j = threadIdx.x; j < m; j += blockDim.x) {
            const unsigned int k = channel_at(j, ch, c, s);
            sdy += dy[k];
            dot += (x[k] - mean[ch]) * dy[k];
        }
        sdy = block_reduce(sdy, SumOp());
        dot = block_reduce(dot, SumOp());
        if (threadIdx.x == 0) {
            dbeta[ch] = sdy;
            dgamma[ch] = dot * invstd[ch];
        }
    }
}

// dx = gamma * invstd * (dy - dbeta / m - (x - mean) * invstd * dgamma / m)
DFKD_KERNEL(bn_backward_dx_f32, (unsigned int total, unsigned int c, unsigned int s, unsigned int m, const float* x,
                                 const float* dy, const float* mean, const float* invstd, const float* gamma,
                                 const float* dgamma, const float* dbeta, float* dx)) {
    GRID_STRIDE(i, total) {
        const unsigned int ch = (i / s) % c;
        const float k = gamma[ch] * invstd[ch], db = dbeta[ch] / (float)m, dg = invstd[ch] * dgamma[ch] / (float)m;
        dx[i] = k * (dy[i] - db - (x[i] - mean[ch]) * dg);
    }
}
