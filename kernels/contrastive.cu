// Contrastive similarity, SFCL's NT-Xent (docs/METHOD.md), around one GEMM each way:
//   fwd  normalize  zhat = [t; s] / max(||row||, eps)        [2n, d] f32, norms [2n]
//        GEMM       sim = zhat[:n] zhatᵀ                      [n, 2n]   (cuBLAS)
//        rows       l = sim / tau; loss_i = logsumexp_{j != i} l_ij - l_{i, n+i}
//   bwd  sym        S = G + Gᵀ, G[i][j] = dloss_i (p_ij - [j == n+i]) / tau for i < n,
//                   0 for i >= n, with p the masked softmax of row i    [2n, 2n]
//        GEMM       dzhat = S zhat                            [2n, d]   (cuBLAS)
//        normalize  dx = (dzhat - zhat (zhat . dzhat)) / ||x||  (dzhat / eps if clamped)
// The symmetric S turns the two gradient GEMMs of sim = zhat[:n] zhatᵀ (one per
// factor) into one, and needs no add of their results. The GEMMs stay in cuBLAS: at
// 2n = 128, d = 128 they are 2-4 MFLOP, a few microseconds even in plain FP32; the
// kernels around them are where the composition spends its ~20 launches.
// t, s and dt, ds are T (float or bf16_t); zhat, sim, S and all math are f32.
//
// Versions:
//   normalize fwd/bwd  one warp per row (d = 64..512: 2-16 values a lane).
//   rows v1            one block per row, max then sum of exp (two passes).
//   rows v2            one warp per row, online softmax (one pass). Host default: v2
//                      for rows of at most 4096 values, else v1.
//   sym v1             one thread per entry of S.
#include "common.cuh"

template <class T>
__device__ void normalize_fwd(unsigned int n, unsigned int d, float eps, const T* t, const T* s, float* zhat, float* norm) {
    const unsigned int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned int r = blockIdx.x * warps + threadIdx.x / 32; r < 2 * n; r += gridDim.x * warps) {
        const T* x = r < n ? t + r * d : s + (r - n) * d;
        float ss = 0.0f;
        for (unsigned int j = lane; j < d; j += 32) {
            const float v = to_float(x[j]);
            ss += v * v;
        }
        const float nrm = sqrtf(warp_sum(ss)), den = fmaxf(nrm, eps);
        // a division, as the composition (x / clamp(norm)) does
        for (unsigned int j = lane; j < d; j += 32) zhat[r * d + j] = to_float(x[j]) / den;
        if (lane == 0) norm[r] = nrm;
    }
}

template <class T>
__device__ void normalize_bwd(unsigned int n, unsigned int d, float eps, const float* zhat, const float* norm,
                              const float* dzhat, T* dt, T* ds) {
    const unsigned int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned int r = blockIdx.x * warps + threadIdx.x / 32; r < 2 * n; r += gridDim.x * warps) {
        const float *z = zhat + r * d, *g = dzhat + r * d;
        T* dx = r < n ? dt + r * d : ds + (r - n) * d;
        const float nrm = norm[r];
        if (nrm > eps) {
            float dot = 0.0f;
            for (unsigned int j = lane; j < d; j += 32) dot += z[j] * g[j];
            dot = warp_sum(dot);
            for (unsigned int j = lane; j < d; j += 32) dx[j] = from_float<T>((g[j] - z[j] * dot) / nrm);
        } else {
            // the clamp is active: its derivative is 0, zhat = x / eps
            for (unsigned int j = lane; j < d; j += 32) dx[j] = from_float<T>(g[j] / eps);
        }
    }
}

DFKD_KERNEL(contrastive_normalize_fwd_f32,
            (unsigned int n, unsigned int d, float eps, const float* t, const float* s, float* zhat, float* norm)) {
    normalize_fwd(n, d, eps, t, s, zhat, norm);
}
DFKD_KERNEL(contrastive_normalize_fwd_bf16,
            (unsigned int n, unsigned int d, float eps, const bf16_t* t, const bf16_t* s, float* zhat, float* norm)) {
    normalize_fwd(n, d, eps, t, s, zhat, norm);
}
DFKD_KERNEL(contrastive_normalize_bwd_f32, (unsigned int n, unsigned int d, float eps, const float* zhat,
                                            const float* norm, const float* dzhat, float* dt, float* ds)) {
    normalize_bwd(n, d, eps, zhat, norm, dzhat, dt, ds);
}
DFKD_KERNEL(contrastive_normalize_bwd_bf16, (unsigned int n, unsigned int d, float eps, const float* zhat,
                                             const float* norm, const float* dzhat, bf16_t* dt, bf16_t* ds)) {
    normalize_bwd(n, d, eps, zhat, norm, dzhat, dt, ds);
}

// Row i of sim [n, 2n]: logits l_j = sim_ij * inv_tau over j != i (the anchor itself is
// masked out); writes lse_i = logsumexp and loss_i = lse_i - l_{i, n+i}.
DFKD_KERNEL(contrastive_rows_v1_f32, (unsigned int n, float inv_tau, const float* sim, float* loss, float* lse)) {
    const unsigned int m = 2 * n;
    for (unsigned int i = blockIdx.x; i < n; i += gridDim.x) {
        const float* row = sim + i * m;
        float mx = MaxOp::identity();
        for (unsigned int j = threadIdx.x; j < m; j += blockDim.x)
            if (j != i) mx = MaxOp()(mx, row[j] * inv_tau);
        mx = block_reduce(mx, MaxOp());
        float acc = 0.0f;
        for (unsigned int j = threadIdx.x; j < m; j += blockDim.x)
            if (j != i) acc += expf(row[j] * inv_tau - mx);
        const float l = logf(block_reduce(acc, SumOp())) + mx;
        if (threadIdx.x == 0) lse[i] = l, loss[i] = l - row[n + i] * inv_tau;
    }
}

DFKD_KERNEL(contrastive_rows_v2_f32, (unsigned int n, float inv_tau, const float* sim, float* loss, float* lse)) {
    const unsigned int m = 2 * n, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned int i = blockIdx.x * warps + threadIdx.x / 32; i < n; i += gridDim.x * warps) {
        const float* row = sim + i * m;
        MaxSum ms{-f32_inf(), 0.0f};
        for (unsigned int j = lane; j < m; j += 32)
            if (j != i) ms = max_sum_push(ms, row[j] * inv_tau);
        ms = warp_max_sum(ms);
        const float l = logf(ms.s) + ms.m;
        if (lane == 0) lse[i] = l, loss[i] = l - row[n + i] * inv_tau;
    }
}

// G[i][j] of the header, from the saved sim and lse.
__device__ __forceinline__ float grad_logit(unsigned int n, float inv_tau, const float* sim, const float* lse,
                                            const float* dloss, unsigned int i, unsigned int j) {
    if (i >= n) return 0.0f;
    const float p = j == i ? 0.0f : expf(sim[i * 2 * n + j] * inv_tau - lse[i]);
    return dloss[i] * (p - (j == n + i ? 1.0f : 0.0f)) * inv_tau;
}

DFKD_KERNEL(contrastive_sym_v1_f32,
            (unsigned int n, float inv_tau, const float* sim, const float* lse, const float* dloss, float* sym)) {
    const unsigned int m = 2 * n;
    GRID_STRIDE(e, m * m) {
        const unsigned int i = e / m, j = e - i * m;
        sym[e] = grad_logit(n, inv_tau, sim, lse, dloss, i, j) + grad_logit(n, inv_tau, sim, lse, dloss, j, i);
    }
}
