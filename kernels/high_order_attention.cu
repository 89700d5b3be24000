// Mixed high-order attention (MHA, docs/METHOD.md) after its 1x1 convolutions, as two
// element-wise kernels around a GEMM:
//   A  products  h[r] = relu(prod_{k<r} z[r][k])           for all orders r = 1..R
//      GEMM      u[r] = V_r h[r] + b_r                       (one grouped 1x1 conv)
//   B  combine   y = f * (1/R) sum_r sigmoid(u[r])
// Layouts (contiguous): z [n, P, cq, hw] with P = R(R+1)/2 slices, order r (1-based)
// owning slices r(r-1)/2 .. r(r-1)/2 + r-1, cq = C/4; h [n, R, cq, hw]; u [n, R, C, hw];
// f, y [n, C, hw]. "chw" below is the size of one slice of one sample.
//
// What stays a GEMM, and why: the stacked W_{r,k} projection (C -> P*C/4) and the V_r
// projections (C/4 -> C each, one grouped conv) are dense products with K = C or C/4
// reduction depth; cuBLAS runs them near the card's FP32 peak (no TF32: see
// cublas.rs), and fusing A into the W GEMM's epilogue (or B into V's) would need a
// hand-written GEMM as fast as cuBLAS's for a saving of one read of z and u. A and B themselves are pure bandwidth: each reads its
// inputs once and writes its outputs once, instead of the ~12 element-wise passes
// (products, ReLU, sigmoid, sums, scale, multiply) of the composition, and their
// backward kernels recompute the products and sigmoids instead of saving them.
//
// Versions (T is float or bf16_t, f32 math):
//   v1  one thread per position, all orders in a loop (grid-stride).
//   v2  one thread per 4 consecutive positions with 16-byte (f32) / 8-byte (bf16)
//       loads and stores, when chw and every pointer are 4-aligned; else as v1.
//       Host default: v2. The backward kernels have only v1: they are the same
//       one-pass shape, and stay scalar until a GPU measurement says vectorising pays.
#include "common.cuh"

template <class T> __device__ __forceinline__ bool aligned4(const T* p) {
    return ((unsigned long long)p % (4 * sizeof(T))) == 0;
}

// ---- A: products + ReLU ------------------------------------------------------------------

// One position (z and h point at the position within slice 0 of the sample).
template <class T> __device__ __forceinline__ void products_at(unsigned int order, unsigned int chw, const T* z, T* h) {
    for (unsigned int r = 1; r <= order; ++r) {
        const T* zr = z + (r * (r - 1) / 2) * chw;
        float p = to_float(zr[0]);
        for (unsigned int k = 1; k < r; ++k) p *= to_float(zr[k * chw]);
        h[(r - 1) * chw] = from_float<T>(fmaxf(p, 0.0f));
    }
}

template <class T> __device__ __forceinline__ void products4_at(unsigned int order, unsigned int chw, const T* z, T* h) {
    for (unsigned int r = 1; r <= order; ++r) {
        const T* zr = z + (r * (r - 1) / 2) * chw;
        f32x4 p = load4(zr);
        for (unsigned int k = 1; k < r; ++k) {
            const f32x4 q = load4(zr + k * chw);
            for (int e = 0; e < 4; ++e) p.v[e] *= q.v[e];
        }
        for (int e = 0; e < 4; ++e) p.v[e] = fmaxf(p.v[e], 0.0f);
        store4(h + (r - 1) * chw, p);
    }
}

// dz[r][k] = dh[r] * [prod > 0] * prod_{j != k} z[r][j]. The products over j != k are
// re-read rather than kept: r is small (3 in the paper), the re-reads hit L1, and no
// per-thread array (local memory) is needed for a run-time order.
template <class T>
__device__ __forceinline__ void products_bwd_at(unsigned int order, unsigned int chw, const T* z, const T* dh, T* dz) {
    for (unsigned int r = 1; r <= order; ++r) {
        const unsigned int first = (r * (r - 1) / 2) * chw;
        float p = 1.0f;
        for (unsigned int k = 0; k < r; ++k) p *= to_float(z[first + k * chw]);
        const float g = p > 0.0f ? to_float(dh[(r - 1) * chw]) : 0.0f;
        for (unsigned int k = 0; k < r; ++k) {
            float q = g;
            for (unsigned int j = 0; j < r; ++j)
                if (j != k) q *= to_float(z[first + j * chw]);
            dz[first + k * chw] = from_float<T>(q);
        }
    }
}

template <class T>
__device__ void products_fwd(bool try_vec, unsigned int order, unsigned int n, unsigned int chw, const T* z, T* h) {
    const unsigned int slices = order * (order + 1) / 2;
    if (try_vec && chw % 4 == 0 && aligned4(z) && aligned4(h)) {
        GRID_STRIDE(i4, n * chw / 4) {
            const unsigned int s = (4 * i4) / chw, pos = 4 * i4 - s * chw;
            products4_at(order, chw, z + s * slices * chw + pos, h + s * order * chw + pos);
        }
        return;
    }
    GRID_STRIDE(i, n * chw) {
        const unsigned int s = i / chw, pos = i - s * chw;
        products_at(order, chw, z + s * slices * chw + pos, h + s * order * chw + pos);
    }
}

template <class T>
__device__ void products_bwd(unsigned int order, unsigned int n, unsigned int chw, const T* z, const T* dh, T* dz) {
    const unsigned int slices = order * (order + 1) / 2;
    GRID_STRIDE(i, n * chw) {
        const unsigned int s = i / chw, pos = i - s * chw;
        products_bwd_at(order, chw, z + s * slices * chw + pos, dh + s * order * chw + pos, dz + s * slices * chw + pos);
    }
}

// ---- B: sigmoid, mean over orders, multiply by f ---------------------------------------

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <class T>
__device__ void combine_fwd(bool try_vec, unsigned int order, unsigned int n, unsigned int chw, const T* u, const T* f, T* y) {
    const float inv_r = 1.0f / (float)order;
    if (try_vec && chw % 4 == 0 && aligned4(u) && aligned4(f) && aligned4(y)) {
        GRID_STRIDE(i4, n * chw / 4) {
            const unsigned int i = 4 * i4, s = i / chw, pos = i - s * chw;
            const T* us = u + s * order * chw + pos;
            f32x4 acc = {{0.0f, 0.0f, 0.0f, 0.0f}};
            for (unsigned int r = 0; r < order; ++r) {
                const f32x4 ur = load4(us + r * chw);
                for (int e = 0; e < 4; ++e) acc.v[e] += sigmoid(ur.v[e]);
            }
            const f32x4 fv = load4(f + i);
            for (int e = 0; e < 4; ++e) acc.v[e] = acc.v[e] * inv_r * fv.v[e];
            store4(y + i, acc);
        }
        return;
    }
    GRID_STRIDE(i, n * chw) {
        const unsigned int s = i / chw, pos = i - s * chw;
        const T* us = u + s * order * chw + pos;
        float acc = 0.0f;
        for (unsigned int r = 0; r < order; ++r) acc += sigmoid(to_float(us[r * chw]));
        y[i] = from_float<T>(acc * inv_r * to_float(f[i]));
    }
}

// du[r] = dy * f / R * s_r (1 - s_r);  df = dy * (1/R) sum_r s_r
template <class T>
__device__ void combine_bwd(unsigned int order, unsigned int n, unsigned int chw, const T* u, const T* f, const T* dy, T* du, T* df) {
    const float inv_r = 1.0f / (float)order;
    GRID_STRIDE(i, n * chw) {
        const unsigned int s = i / chw, pos = i - s * chw, o = s * order * chw + pos;
        const float g = to_float(dy[i]), gf = g * to_float(f[i]) * inv_r;
        float acc = 0.0f;
        for (unsigned int r = 0; r < order; ++r) {
            const float sr = sigmoid(to_float(u[o + r * chw]));
            acc += sr;
            du[o + r * chw] = from_float<T>(gf * (sr * (1.0f - sr)));
        }
        df[i] = from_float<T>(g * (acc * inv_r));
    }
}

#define HOA_KERNELS(SUFFIX, T)                                                                                       \
    DFKD_KERNEL(hoa_products_fwd_v1_##SUFFIX, (unsigned int order, unsigned int n, unsigned int chw, const T* z, T* h)) { \
        products_fwd(false, order, n, chw, z, h);                                                                    \
    }                                                                                                                \
    DFKD_KERNEL(hoa_products_fwd_v2_##SUFFIX, (unsigned int order, unsigned int n, unsigned int chw, const T* z, T* h)) { \
        products_fwd(true, order, n, chw, z, h);                                                                     \
    }                                                                                                                \
    DFKD_KERNEL(hoa_products_bwd_v1_##SUFFIX,                                                                        \
                (unsigned int order, unsigned int n, unsigned int chw, const T* z, const T* dh, T* dz)) {            \
        products_bwd(order, n, chw, z, dh, dz);                                                                      \
    }                                                                                                                \
    DFKD_KERNEL(hoa_combine_fwd_v1_##SUFFIX,                                                                         \
                (unsigned int order, unsigned int n, unsigned int chw, const T* u, const T* f, T* y)) {              \
        combine_fwd(false, order, n, chw, u, f, y);                                                                  \
    }                                                                                                                \
    DFKD_KERNEL(hoa_combine_fwd_v2_##SUFFIX,                                                                         \
                (unsigned int order, unsigned int n, unsigned int chw, const T* u, const T* f, T* y)) {              \
        combine_fwd(true, order, n, chw, u, f, y);                                                                   \
    }                                                                                                                \
    DFKD_KERNEL(hoa_combine_bwd_v1_##SUFFIX, (unsigned int order, unsigned int n, unsigned int chw, const T* u,      \
                                              const T* f, const T* dy, T* du, T* df)) {                              \
        combine_bwd(order, n, chw, u, f, dy, du, df);                                                                \
    }

HOA_KERNELS(f32, float)
HOA_KERNELS(bf16, bf16_t)
