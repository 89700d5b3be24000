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
struct Strided {
    unsigned int rank;
    unsigned int offset;
    unsigned int dims[DFKD_MAX_DIMS];
    unsigned int strides[DFKD_MAX_DIMS];
};

// Storage offset of the element at row-major position i of the view.
__device__ __forceinline__ unsigned int at(const Strided& l, unsigned int i) {
    if (l.rank == 0) return l.offset + i;
    unsigned int off = l.offset;
    for (int d = (int)l.rank - 1; d >= 0; --d) {
        off += (i % l.dims[d]) * l.strides[d];
        i /= l.dims[d];
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
