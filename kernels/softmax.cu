// Softmax and log-softmax over the last dim of a contiguous [rows, d] tensor, max-
// subtracted for stability as the CPU reference is. One block per row (grid-stride
// over rows); three passes over the row: max, sum of exp, write.
#include "common.cuh"

template <bool LOG>
__device__ void softmax_rows(unsigned int rows, unsigned int d, const float* x, float* y) {
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (unsigned long long)r * d;
        float* yr = y + (unsigned long long)r * d;
        float m = MaxOp::identity();
        for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) m = MaxOp()(m, xr[j]);
        m = block_reduce(m, MaxOp());
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) s += expf(xr[j] - m);
        s = block_reduce(s, SumOp());
        if (LOG) {
            const float lse = logf(s) + m;
            for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] - lse;
        } else {
            const float inv = 1.0f / s;
            for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = expf(xr[j] - m) * inv;
        }
    }
}

DFKD_KERNEL(softmax_f32, (unsigned int rows, unsigned int d, const float* x, float* y)) {
    softmax_rows<false>(rows, d, x, y);
}
DFKD_KERNEL(log_softmax_f32, (unsigned int rows, unsigned int d, const float* x, float* y)) {
    softmax_rows<true>(rows, d, x, y);
}
