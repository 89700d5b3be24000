// Shared by every kernel file: the kernel declaration macro, the strided-view argument,
// grid-stride loops and block reductions. Compiled three ways: nvcc (PTX/cubin), NVRTC
// at run time (no system headers there, so nothing is included), and g++ through the
// emulator (kernels/emu/cuda_emu.h, force-included by build.rs, which also defines
// DFKD_KERNEL to add a host launch entry).
//
// Conventions: f32 compute; indices are 32-bit (the host refuses buffers of 2^31
// elements or more); outputs are contiguous and written with `=`, never accumulated,
// unless a kernel's comment says otherwise; block sizes are multiples of 32.
#pragma once

#ifndef DFKD_EMU
#define DFKD_KERNEL(name, params) extern "C" __global__ void name params
#endif

#define DFKD_MAX_DIMS 8

// A strided view passed by value (host twin: `KernelLayout` in src/backend/cuda).
// rank == 0 means contiguous from `offset`: the common case skips the index division.
// A field's offset in a struct with a Rust twin. NVRTC has no offsetof: nvcc and the
// emulator's g++ check the very same definitions.
#ifdef __CUDACC_RTC__
#define DFKD_ASSERT_OFFSET(T, field, n)
#else
#define DFKD_ASSERT_OFFSET(T, field, n) static_assert(__builtin_offsetof(T, field) == (n), #T "." #field " is not at byte " #n)
#endif

struct Strided {
    unsigned int rank;
    unsigned int offset;
    unsigned int dims[DFKD_MAX_DIMS];
    unsigned int strides[DFKD_MAX_DIMS];
};
// Twin of `KernelLayout` (src/backend/cuda/launch.rs), which asserts the same numbers;
// the `twins_agree_with_the_kernels` test compares the two lists.
static_assert(sizeof(Strided) == 72, "Strided: size");
DFKD_ASSERT_OFFSET(Strided, rank, 0);
DFKD_ASSERT_OFFSET(Strided, offset, 4);
DFKD_ASSERT_OFFSET(Strided, dims, 8);
DFKD_ASSERT_OFFSET(Strided, strides, 40);

// Storage offset of the element at row-major position i of the view. The loop runs over
// all DFKD_MAX_DIMS slots, unrolled, so every index into `dims`/`strides` is a constant:
// a loop bounded by `rank` indexes them dynamically, which makes nvcc copy the struct
// from parameter space to a local-memory stack frame in every strided kernel.
__device__ __forceinline__ unsigned int at(const Strided& l, unsigned int i) {
    if (l.rank == 0) return l.offset + i;
    unsigned int off = l.offset;
#pragma unroll
    for (int d = DFKD_MAX_DIMS - 1; d >= 0; --d) {
        if (d < (int)l.rank) {
            off += (i % l.dims[d]) * l.strides[d];
            i /= l.dims[d];
        }
    }
    return off;
}

#define GRID_STRIDE(i, n) \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float f32_nan() { return __int_as_float(0x7fc00000); }

struct SumOp {
    __device__ __forceinline__ static float identity() { return 0.0f; }
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
// max/min propagate NaN, as PyTorch (and the CPU reference) do; fmaxf would drop it.
struct MaxOp {
    __device__ __forceinline__ static float identity() { return -f32_inf(); }
    __device__ __forceinline__ float operator()(float a, float b) const {
        return (a != a || b != b) ? f32_nan() : fmaxf(a, b);
    }
};
struct MinOp {
    __device__ __forceinline__ static float identity() { return f32_inf(); }
    __device__ __forceinline__ float operator()(float a, float b) const {
        return (a != a || b != b) ? f32_nan() : fminf(a, b);
    }
};

// Reduces `v` over the block; every thread gets the result. All threads of the block
// must call it (it has barriers). Lanes combine by a shuffle butterfly, then each
// thread folds the per-warp partials in warp order, so the result is the same in
// every thread and on every run.
template <class Op> __device__ float block_reduce(float v, Op op) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const unsigned int warp = threadIdx.x / 32, n_warps = (blockDim.x + 31) / 32;
    __syncthreads(); // the previous call's readers are done with `partial`
    if (threadIdx.x % 32 == 0) partial[warp] = v;
    __syncthreads();
    float r = partial[0];
    for (unsigned int w = 1; w < n_warps; ++w) r = op(r, partial[w]);
    return r;
}

// ---- element types -------------------------------------------------------------------
// Kernels that take "f32 or bf16" inputs are templates over the element type and
// accumulate in f32. bf16 travels as its bits: NVRTC here has no system headers (so no
// cuda_bf16.h) and g++ has none either; widening is a shift, narrowing rounds to
// nearest even as `half::bf16::from_f32` does, NaN staying NaN.
struct bf16_t {
    unsigned short bits;
};
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) { return __uint_as_float((unsigned int)x.bits << 16); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float x) {
    const unsigned int u = __float_as_uint(x);
    bf16_t r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x40u); // quiet NaN
    } else {
        r.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return r;
}

// Four consecutive elements as one 16-byte (f32) or 8-byte (bf16) load or store: the
// "vectorised" kernel versions use them where the host has checked that every pointer
// they touch is 4-element aligned. The emulator copies bytes (no aliasing games).
struct f32x4 {
    float v[4];
};
__device__ __forceinline__ f32x4 load4(const float* p) {
#ifdef DFKD_EMU
    f32x4 r;
    memcpy(r.v, p, 16);
    return r;
#else
    const float4 q = *reinterpret_cast<const float4*>(p);
    return f32x4{{q.x, q.y, q.z, q.w}};
#endif
}
__device__ __forceinline__ f32x4 load4(const bf16_t* p) {
    unsigned int w[2];
#ifdef DFKD_EMU
    memcpy(w, p, 8);
#else
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    w[0] = q.x, w[1] = q.y;
#endif
    return f32x4{{__uint_as_float(w[0] << 16), __uint_as_float(w[0] & 0xffff0000u), __uint_as_float(w[1] << 16),
                  __uint_as_float(w[1] & 0xffff0000u)}};
}
__device__ __forceinline__ void store4(float* p, const f32x4& x) {
#ifdef DFKD_EMU
    memcpy(p, x.v, 16);
#else
    *reinterpret_cast<float4*>(p) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
#endif
}
__device__ __forceinline__ void store4(bf16_t* p, const f32x4& x) {
    unsigned int w[2];
    for (int k = 0; k < 2; ++k)
        w[k] = (unsigned int)from_float<bf16_t>(x.v[2 * k]).bits | ((unsigned int)from_float<bf16_t>(x.v[2 * k + 1]).bits << 16);
#ifdef DFKD_EMU
    memcpy(p, w, 8);
#else
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
#endif
}

// Warp reductions (all 32 lanes must call them); every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = MaxOp()(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Online softmax statistics (Milakov & Gimelshein 2018): the running max `m` and the
// sum `s` of exp(x - m), merged pairwise, so one pass over the data gives both.
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum max_sum_push(MaxSum a, float x) {
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
    } else {
        a.s += expf(x - a.m);
    }
    return a;
}
__device__ __forceinline__ MaxSum max_sum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -f32_inf()) return a; // both empty
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}
__device__ __forceinline__ MaxSum warp_max_sum(MaxSum v) {
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum w{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = max_sum_merge(v, w);
    }
    return v;
}
// Block version of warp_max_sum: the same barriers as block_reduce.
__device__ __forceinline__ MaxSum block_max_sum(MaxSum v) {
    __shared__ float pm[32], ps[32];
    v = warp_max_sum(v);
    const unsigned int warp = threadIdx.x / 32, n_warps = (blockDim.x + 31) / 32;
    __syncthreads();
    if (threadIdx.x % 32 == 0) pm[warp] = v.m, ps[warp] = v.s;
    __syncthreads();
    MaxSum r{pm[0], ps[0]};
    for (unsigned int w = 1; w < n_warps; ++w) r = max_sum_merge(r, MaxSum{pm[w], ps[w]});
    return r;
}
