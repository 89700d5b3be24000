// Pooling, plane gather/scatter and nearest upsampling over contiguous NCHW planes,
// with the CPU reference's semantics (src/backend/cpu/pool.rs). One thread per output
// element (grid-stride). Backward passes are written as gathers over the outputs that
// touch an input, in the CPU's accumulation order, so they need no atomics and match
// it bit for bit; only scatter_add_planes (arbitrary indices) uses atomicAdd.
#include "common.cuh"

// Geometry of a pooling window (host twin: `PoolGeom` in src/backend/cuda/launch.rs).
struct PoolGeom {
    unsigned int h_in, w_in, h_out, w_out, kh, kw, sh, sw, ph, pw;
};
// Twin of `PoolGeom` in src/backend/cuda/launch.rs, which asserts the same numbers.
static_assert(sizeof(PoolGeom) == 40, "PoolGeom: size");
DFKD_ASSERT_OFFSET(PoolGeom, h_in, 0);
DFKD_ASSERT_OFFSET(PoolGeom, w_in, 4);
DFKD_ASSERT_OFFSET(PoolGeom, h_out, 8);
DFKD_ASSERT_OFFSET(PoolGeom, w_out, 12);
DFKD_ASSERT_OFFSET(PoolGeom, kh, 16);
DFKD_ASSERT_OFFSET(PoolGeom, kw, 20);
DFKD_ASSERT_OFFSET(PoolGeom, sh, 24);
DFKD_ASSERT_OFFSET(PoolGeom, sw, 28);
DFKD_ASSERT_OFFSET(PoolGeom, ph, 32);
DFKD_ASSERT_OFFSET(PoolGeom, pw, 36);

// Input rows [lo, hi) that output row `o` pools, clipped to the input.
__device__ __forceinline__ void window(unsigned int o, unsigned int s, unsigned int p, unsigned int k, unsigned int n,
                                       unsigned int& lo, unsigned int& hi) {
    const int start = (int)(o * s) - (int)p;
    lo = start < 0 ? 0u : (unsigned int)start;
    hi = min(start + (int)k, (int)n) < 0 ? 0u : (unsigned int)min(start + (int)k, (int)n);
}

// Output rows whose window contains input row `i`: [lo, hi).
__device__ __forceinline__ void covering(unsigned int i, unsigned int s, unsigned int p, unsigned int k, unsigned int n_out,
                                         unsigned int& lo, unsigned int& hi) {
    lo = i + p < k ? 0u : (i + p - k) / s + 1;
    hi = min((i + p) / s + 1, n_out);
}

// Max pooling: padding never wins, the first maximum in row-major window order wins
// ties, and a NaN wins over any number (the last NaN of the window).
DFKD_KERNEL(max_pool2d_f32, (unsigned int n, PoolGeom g, const float* x, float* y, unsigned int* idx)) {
    GRID_STRIDE(i, n) {
        const unsigned int plane = i / (g.h_out * g.w_out), o = i % (g.h_out * g.w_out);
        const float* xp = x + (unsigned long long)plane * g.h_in * g.w_in;
        unsigned int r0, r1, c0, c1;
        window(o / g.w_out, g.sh, g.ph, g.kh, g.h_in, r0, r1);
        window(o % g.w_out, g.sw, g.pw, g.kw, g.w_in, c0, c1);
        float best = -f32_inf();
        unsigned int best_i = r0 * g.w_in + c0;
        for (unsigned int r = r0; r < r1; ++r)
            for (unsigned int c = c0; c < c1; ++c) {
                const float v = xp[r * g.w_in + c];
                if (v > best || v != v) { best = v; best_i = r * g.w_in + c; }
            }
        y[i] = xp[best_i];
        idx[i] = best_i;
    }
}

// Average pooling, zero padding counted in the divisor (kh * kw); sums a row at a time
// and then the rows, as the CPU does.
DFKD_KERNEL(avg_pool2d_f32, (unsigned int n, PoolGeom g, const float* x, float* y)) {
    const float scale = 1.0f / (float)(g.kh * g.kw);
    GRID_STRIDE(i, n) {
        const unsigned int plane = i / (g.h_out * g.w_out), o = i % (g.h_out * g.w_out);
        const float* xp = x + (unsigned long long)plane * g.h_in * g.w_in;
        unsigned int r0, r1, c0, c1;
        window(o / g.w_out, g.sh, g.ph, g.kh, g.h_in, r0, r1);
        window(o % g.w_out, g.sw, g.pw, g.kw, g.w_in, c0, c1);
        float sum = 0.0f;
        for (unsigned int r = r0; r < r1; ++r) {
            float row = 0.0f;
            for (unsigned int c = c0; c < c1; ++c) row += xp[r * g.w_in + c];
            sum += row;
        }
        y[i] = sum * scale;
    }
}

// One thread per input element: the sum of grad over the windows covering it, times
// scale (once, after the sum, as the CPU reference: no multiply-add to fuse).
DFKD_KERNEL(avg_pool2d_backward_f32, (unsigned int n, PoolGeom g, const float* grad, float* dx)) {
    const float scale = 1.0f / (float)(g.kh * g.kw);
    GRID_STRIDE(i, n) {
        const unsigned int plane = i / (g.h_in * g.w_in), r = (i / g.w_in) % g.h_in, c = i % g.w_in;
        const float* gp = grad + (unsigned long long)plane * g.h_out * g.w_out;
        unsigned int o0, o1, q0, q1;
        covering(r, g.sh, g.ph, g.kh, g.h_out, o0, o1);
        covering(c, g.sw, g.pw, g.kw, g.w_out, q0, q1);
        float acc = 0.0f;
        for (unsigned int oh = o0; oh < o1; ++oh)
            for (unsigned int ow = q0; ow < q1; ++ow) acc += gp[oh * g.w_out + ow];
        dx[i] = acc * scale;
    }
}

// out[i] = src[plane(i), idx[i]]; indices past the plane read 0 (the host validates).
DFKD_KERNEL(gather_planes_f32, (unsigned int n, unsigned int len, unsigned int plane, const float* src,
                                const unsigned int* idx, float* out)) {
    GRID_STRIDE(i, n) {
        const unsigned int j = idx[i];
        out[i] = j < plane ? src[(unsigned long long)(i / len) * plane + j] : 0.0f;
    }
}

// out[plane(i), idx[i]] += src[i] into a zeroed `out`; accumulates with atomicAdd, so the
// order of additions into one element (overlapping windows) is not fixed.
DFKD_KERNEL(scatter_add_planes_f32, (unsigned int n, unsigned int len, unsigned int out_plane, const float* src,
                                     const unsigned int* idx, float* out)) {
    GRID_STRIDE(i, n) {
        const unsigned int j = idx[i];
        if (j < out_plane) atomicAdd(out + (unsigned long long)(i / len) * out_plane + j, src[i]);
    }
}

// [planes, h, w] -> [planes, h * sh, w * sw], each pixel copied into an sh x sw block.
DFKD_KERNEL(upsample_nearest2d_f32, (unsigned int n, unsigned int h, unsigned int w, unsigned int sh, unsigned int sw,
                                     const float* x, float* y)) {
    const unsigned int wo = w * sw, plane_out = h * sh * wo;
    GRID_STRIDE(i, n) {
        const unsigned int plane = i / plane_out, o = i % plane_out;
        y[i] = x[(unsigned long long)plane * h * w + (o / wo / sh) * w + (o % wo) / sw];
    }
}

// The sum of each input pixel's block, rows then columns in order, as the CPU adds them.
DFKD_KERNEL(upsample_nearest2d_backward_f32, (unsigned int n, unsigned int h, unsigned int w, unsigned int sh,
                                              unsigned int sw, const float* grad, float* dx)) {
    const unsigned int wo = w * sw;
    GRID_STRIDE(i, n) {
        const unsigned int plane = i / (h * w), r = (i / w) % h, c = i % w;
        const float* gp = grad + (unsigned long long)plane * h * sh * wo;
        float acc = 0.0f;
        for (unsigned int oh = r * sh; oh < r * sh + sh; ++oh)
            for (unsigned int ow = c * sw; ow < c * sw + sw; ++ow) acc += gp[oh * wo + ow];
        dx[i] = acc;
    }
}
