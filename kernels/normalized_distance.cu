// MHAD's distance between L2-normalised maps (docs/METHOD.md, "MHAD"), per row (sample) of
// a and b, [n, d] each:
//   fwd  sums   |a|^2, |b|^2 and a.b in one pass; alpha = 1 / max(|a|, eps), beta
//               = 1 / max(|b|, eps) (F.normalize's clamp)
//               dist = (alpha |a|)^2 + (beta |b|)^2 - 2 alpha beta a.b
//               stats = [|a|, |b|, a.b]                            f32 [n, 3]
//   bwd  with e = alpha a - beta b, pa = ahat.e = 1 - alpha beta a.b and
//        pb = bhat.e = alpha beta a.b - 1 (each 0 where its clamp is active: there the
//        clamp's derivative is 0, so ahat = a / eps has no projection term):
//               da = 2g alpha (e - pa ahat) = ka a + kb b,  ka = 2g alpha^2 (1 - pa)
//                                                          kb = -2g alpha beta
//               db = -2g beta (e - pb bhat) = la a + lb b,  la = -2g alpha beta
//                                                          lb = 2g beta^2 (1 + pb)
// The composition (normalise both, subtract, square, sum) makes ~9 passes over the
// maps forward and ~12 backward; this makes one each way. a, b, dist, g, da, db are T
// (float or bf16_t); math is f32 (the CPU sums in f64).
//
// Versions (unversioned so far):
//   fwd  one block per row, three block reductions. With n = 64 rows a GPU has fewer
//        blocks than twice its SMs; split rows across blocks if a measurement says so.
//   bwd  a grid-stride loop over all n*d elements, each thread computing its row's
//        four coefficients from stats (a few flops; no second kernel, no barrier).
#include "common.cuh"

template <class T>
__device__ void nd_fwd(unsigned int n, unsigned int d, float eps, const T* a, const T* b, T* dist, float* stats) {
    for (unsigned int r = blockIdx.x; r < n; r += gridDim.x) {
        const T *ar = a + r * d, *br = b + r * d;
        float saa = 0.0f, sbb = 0.0f, sab = 0.0f;
        for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
            const float x = to_float(ar[j]), y = to_float(br[j]);
            saa += x * x;
            sbb += y * y;
            sab += x * y;
        }
        saa = block_reduce(saa, SumOp());
        sbb = block_reduce(sbb, SumOp());
        sab = block_reduce(sab, SumOp());
        if (threadIdx.x == 0) {
            const float na = sqrtf(saa), nb = sqrtf(sbb);
            const float alpha = 1.0f / fmaxf(na, eps), beta = 1.0f / fmaxf(nb, eps);
            const float ua = alpha * na, ub = beta * nb;
            dist[r] = from_float<T>(ua * ua + ub * ub - 2.0f * alpha * beta * sab);
            stats[3 * r] = na, stats[3 * r + 1] = nb, stats[3 * r + 2] = sab;
        }
    }
}

template <class T>
__device__ void nd_bwd(unsigned int n, unsigned int d, float eps, const T* a, const T* b, const float* stats,
                       const T* g, T* da, T* db) {
    const unsigned int total = n * d;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const unsigned int r = i / d;
        const float na = stats[3 * r], nb = stats[3 * r + 1], ab = stats[3 * r + 2], gr = 2.0f * to_float(g[r]);
        const float alpha = 1.0f / fmaxf(na, eps), beta = 1.0f / fmaxf(nb, eps);
        const float pa = na > eps ? 1.0f - alpha * beta * ab : 0.0f;
        const float pb = nb > eps ? alpha * beta * ab - 1.0f : 0.0f;
        const float ka = gr * alpha * alpha * (1.0f - pa), lb = gr * beta * beta * (1.0f + pb), k = -gr * alpha * beta;
        const float x = to_float(a[i]), y = to_float(b[i]);
        da[i] = from_float<T>(ka * x + k * y);
        db[i] = from_float<T>(k * x + lb * y);
    }
}

#define ND_KERNELS(SUFFIX, T)                                                                                       \
    DFKD_KERNEL(normalized_distance_fwd_##SUFFIX,                                                                   \
                (unsigned int n, unsigned int d, float eps, const T* a, const T* b, T* dist, float* stats)) {       \
        nd_fwd(n, d, eps, a, b, dist, stats);                                                                       \
    }                                                                                                               \
    DFKD_KERNEL(normalized_distance_bwd_##SUFFIX, (unsigned int n, unsigned int d, float eps, const T* a,          \
                                                   const T* b, const float* stats, const T* g, T* da, T* db)) {     \
        nd_bwd(n, d, eps, a, b, stats, g, da, db);                                                                  \
    }

ND_KERNELS(f32, float)
ND_KERNELS(bf16, bf16_t)
