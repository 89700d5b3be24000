// Spatial attention, SAM's last line (docs/METHOD.md): per (sample, channel) plane of
// hw = H*W values, with w = softmax(a) over the plane and k = lambda * (H*W or 1),
//     forward   y  = f + k * w * f                     (stats: max and 1/sum per plane)
//     backward  df = dy * (1 + k * w)
//               da = k * w * (f * dy - sum_plane(w * f * dy))
// w is recomputed from `a` and the saved stats in the backward pass, so nothing of
// plane size is saved besides the op's inputs. Host code: src/fused/spatial_attention/gpu.rs;
// CPU twin: src/fused/spatial_attention/cpu.rs. T is float or bf16_t (f32 math).
//
// Versions (llm.c style; all stay, the bench validates and times each):
//   fwd v1  one block per plane, three passes over `a` (max, sum of exp, write).
//   fwd v2  one block per plane, online softmax (max and sum in one pass), 4-wide
//           loads/stores when the plane and pointers allow: 2 reads of `a` instead of 3.
//   fwd v3  one warp per plane (8 planes per 256-thread block), online softmax with
//           warp shuffles only, no barriers: for small planes (7x7 .. 32x32) where a
//           256-thread block per plane leaves most threads idle. Host default: v3 for
//           hw <= 1024, else v2.
//   bwd v1  one block per plane: the dot product, then the write pass.
//   bwd v2  one warp per plane, as fwd v3. Host default: v2 for hw <= 1024, else v1.
#include "common.cuh"

// 4-wide access is possible when the plane length and every pointer allow it.
template <class T> __device__ __forceinline__ bool aligned4(const T* p) {
    return ((unsigned long long)p % (4 * sizeof(T))) == 0;
}

template <class T>
__device__ __forceinline__ void write_plane(unsigned int hw, unsigned int first, unsigned int step, bool vec, float k,
                                            float m, float inv, const T* a, const T* f, T* y) {
    if (vec) {
        for (unsigned int j = 4 * first; j < hw; j += 4 * step) {
            const f32x4 av = load4(a + j), fv = load4(f + j);
            f32x4 out;
            for (int e = 0; e < 4; ++e) out.v[e] = fv.v[e] + k * (expf(av.v[e] - m) * inv) * fv.v[e];
            store4(y + j, out);
        }
    } else {
        for (unsigned int j = first; j < hw; j += step) {
            const float fj = to_float(f[j]);
            y[j] = from_float<T>(fj + k * (expf(to_float(a[j]) - m) * inv) * fj);
        }
    }
}

template <class T>
__device__ __forceinline__ MaxSum plane_max_sum(unsigned int hw, unsigned int first, unsigned int step, bool vec, const T* a) {
    MaxSum ms{-f32_inf(), 0.0f};
    if (vec) {
        for (unsigned int j = 4 * first; j < hw; j += 4 * step) {
            const f32x4 av = load4(a + j);
            for (int e = 0; e < 4; ++e) ms = max_sum_push(ms, av.v[e]);
        }
    } else {
        for (unsigned int j = first; j < hw; j += step) ms = max_sum_push(ms, to_float(a[j]));
    }
    return ms;
}

template <class T>
__device__ void sa_fwd_v1(unsigned int planes, unsigned int hw, float k, const T* a, const T* f, T* y, float* stats) {
    for (unsigned int p = blockIdx.x; p < planes; p += gridDim.x) {
        const T *ap = a + p * hw, *fp = f + p * hw;
        float m = MaxOp::identity();
        for (unsigned int j = threadIdx.x; j < hw; j += blockDim.x) m = MaxOp()(m, to_float(ap[j]));
        m = block_reduce(m, MaxOp());
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < hw; j += blockDim.x) s += expf(to_float(ap[j]) - m);
        const float inv = 1.0f / block_reduce(s, SumOp());
        write_plane(hw, threadIdx.x, blockDim.x, false, k, m, inv, ap, fp, y + p * hw);
        if (threadIdx.x == 0) stats[2 * p] = m, stats[2 * p + 1] = inv;
    }
}

template <class T>
__device__ void sa_fwd_v2(unsigned int planes, unsigned int hw, float k, const T* a, const T* f, T* y, float* stats) {
    const bool vec = hw % 4 == 0 && aligned4(a) && aligned4(f) && aligned4(y);
    for (unsigned int p = blockIdx.x; p < planes; p += gridDim.x) {
        const T *ap = a + p * hw, *fp = f + p * hw;
        const MaxSum ms = block_max_sum(plane_max_sum(hw, threadIdx.x, blockDim.x, vec, ap));
        const float inv = 1.0f / ms.s;
        write_plane(hw, threadIdx.x, blockDim.x, vec, k, ms.m, inv, ap, fp, y + p * hw);
        if (threadIdx.x == 0) stats[2 * p] = ms.m, stats[2 * p + 1] = inv;
    }
}

template <class T>
__device__ void sa_fwd_v3(unsigned int planes, unsigned int hw, float k, const T* a, const T* f, T* y, float* stats) {
    const bool vec = hw % 4 == 0 && aligned4(a) && aligned4(f) && aligned4(y);
    const unsigned int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned int p = blockIdx.x * warps + threadIdx.x / 32; p < planes; p += gridDim.x * warps) {
        const T *ap = a + p * hw, *fp = f + p * hw;
        const MaxSum ms = warp_max_sum(plane_max_sum(hw, lane, 32, vec, ap));
        const float inv = 1.0f / ms.s;
        write_plane(hw, lane, 32, vec, k, ms.m, inv, ap, fp, y + p * hw);
        if (lane == 0) stats[2 * p] = ms.m, stats[2 * p + 1] = inv;
    }
}

// sum over the plane of w * f * dy, this thread's share
template <class T>
__device__ __forceinline__ float plane_dot(unsigned int hw, unsigned int first, unsigned int step, float m, float inv,
                                           const T* a, const T* f, const T* dy) {
    float dot = 0.0f;
    for (unsigned int j = first; j < hw; j += step) dot += expf(to_float(a[j]) - m) * inv * to_float(f[j]) * to_float(dy[j]);
    return dot;
}

template <class T>
__device__ __forceinline__ void plane_grads(unsigned int hw, unsigned int first, unsigned int step, float k, float m,
                                            float inv, float dot, const T* a, const T* f, const T* dy, T* da, T* df) {
    for (unsigned int j = first; j < hw; j += step) {
        const float w = expf(to_float(a[j]) - m) * inv, g = to_float(dy[j]);
        da[j] = from_float<T>(k * w * (to_float(f[j]) * g - dot));
        df[j] = from_float<T>(g * (1.0f + k * w));
    }
}

template <class T>
__device__ void sa_bwd_v1(unsigned int planes, unsigned int hw, float k, const T* a, const T* f, const T* dy,
                          const float* stats, T* da, T* df) {
    for (unsigned int p = blockIdx.x; p < planes; p += gridDim.x) {
        const unsigned int o = p * hw;
        const float m = stats[2 * p], inv = stats[2 * p + 1];
        const float dot = block_reduce(plane_dot(hw, threadIdx.x, blockDim.x, m, inv, a + o, f + o, dy + o), SumOp());
        plane_grads(hw, threadIdx.x, blockDim.x, k, m, inv, dot, a + o, f + o, dy + o, da + o, df + o);
    }
}

template <class T>
__device__ void sa_bwd_v2(unsigned int planes, unsigned int hw, float k, const T* a, const T* f, const T* dy,
                          const float* stats, T* da, T* df) {
    const unsigned int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (unsigned int p = blockIdx.x * warps + threadIdx.x / 32; p < planes; p += gridDim.x * warps) {
        const unsigned int o = p * hw;
        const float m = stats[2 * p], inv = stats[2 * p + 1];
        const float dot = warp_sum(plane_dot(hw, lane, 32, m, inv, a + o, f + o, dy + o));
        plane_grads(hw, lane, 32, k, m, inv, dot, a + o, f + o, dy + o, da + o, df + o);
    }
}

#define SA_KERNELS(SUFFIX, T)                                                                                       \
    DFKD_KERNEL(spatial_attention_fwd_v1_##SUFFIX,                                                                  \
                (unsigned int planes, unsigned int hw, float k, const T* a, const T* f, T* y, float* stats)) {      \
        sa_fwd_v1(planes, hw, k, a, f, y, stats);                                                                   \
    }                                                                                                               \
    DFKD_KERNEL(spatial_attention_fwd_v2_##SUFFIX,                                                                  \
                (unsigned int planes, unsigned int hw, float k, const T* a, const T* f, T* y, float* stats)) {      \
        sa_fwd_v2(planes, hw, k, a, f, y, stats);                                                                   \
    }                                                                                                               \
    DFKD_KERNEL(spatial_attention_fwd_v3_##SUFFIX,                                                                  \
                (unsigned int planes, unsigned int hw, float k, const T* a, const T* f, T* y, float* stats)) {      \
        sa_fwd_v3(planes, hw, k, a, f, y, stats);                                                                   \
    }                                                                                                               \
    DFKD_KERNEL(spatial_attention_bwd_v1_##SUFFIX, (unsigned int planes, unsigned int hw, float k, const T* a,      \
                                                    const T* f, const T* dy, const float* stats, T* da, T* df)) {   \
        sa_bwd_v1(planes, hw, k, a, f, dy, stats, da, df);                                                          \
    }                                                                                                               \
    DFKD_KERNEL(spatial_attention_bwd_v2_##SUFFIX, (unsigned int planes, unsigned int hw, float k, const T* a,      \
                                                    const T* f, const T* dy, const float* stats, T* da, T* df)) {   \
        sa_bwd_v2(planes, hw, k, a, f, dy, stats, da, df);                                                          \
    }

SA_KERNELS(f32, float)
SA_KERNELS(bf16, bf16_t)
