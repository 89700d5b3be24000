// Convolution helpers: im2col and col2im over contiguous NCHW, so that convolution and
// its gradients are GEMMs (cuBLAS on a GPU; the CPU GEMM on the emulator) between
// weights and column buffers `col[b, c_in * kh * kw, h_out * w_out]`.
#include "common.cuh"

// A convolution's geometry (host twin: `ConvGeom` in src/backend/cuda/launch.rs).
struct ConvGeom {
    unsigned int c_in, h_in, w_in, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw;
};
// Twin of `ConvGeom` in src/backend/cuda/launch.rs, which asserts the same numbers.
static_assert(sizeof(ConvGeom) == 52, "ConvGeom: size");
DFKD_ASSERT_OFFSET(ConvGeom, c_in, 0);
DFKD_ASSERT_OFFSET(ConvGeom, h_in, 4);
DFKD_ASSERT_OFFSET(ConvGeom, w_in, 8);
DFKD_ASSERT_OFFSET(ConvGeom, h_out, 12);
DFKD_ASSERT_OFFSET(ConvGeom, w_out, 16);
DFKD_ASSERT_OFFSET(ConvGeom, kh, 20);
DFKD_ASSERT_OFFSET(ConvGeom, kw, 24);
DFKD_ASSERT_OFFSET(ConvGeom, sh, 28);
DFKD_ASSERT_OFFSET(ConvGeom, sw, 32);
DFKD_ASSERT_OFFSET(ConvGeom, ph, 36);
DFKD_ASSERT_OFFSET(ConvGeom, pw, 40);
DFKD_ASSERT_OFFSET(ConvGeom, dh, 44);
DFKD_ASSERT_OFFSET(ConvGeom, dw, 48);

// col[b, (c * kh + i) * kw + j, oh * w_out + ow] = x[b, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw],
// zero where that lies in the padding. One thread per column element.
DFKD_KERNEL(im2col_f32, (unsigned int n, ConvGeom g, const float* x, float* col)) {
    const unsigned int l_len = g.h_out * g.w_out, k_len = g.c_in * g.kh * g.kw;
    GRID_STRIDE(t, n) {
        const unsigned int l = t % l_len, k = (t / l_len) % k_len, b = t / (l_len * k_len);
        const unsigned int c = k / (g.kh * g.kw), i = (k / g.kw) % g.kh, j = k % g.kw;
        const int ih = (int)((l / g.w_out) * g.sh + i * g.dh) - (int)g.ph;
        const int iw = (int)((l % g.w_out) * g.sw + j * g.dw) - (int)g.pw;
        const bool inside = ih >= 0 && ih < (int)g.h_in && iw >= 0 && iw < (int)g.w_in;
        col[t] = inside ? x[((unsigned long long)b * g.c_in + c) * g.h_in * g.w_in + ih * g.w_in + iw] : 0.0f;
    }
}

// The adjoint of im2col: dx[b, c, ih, iw] = the sum of the column elements im2col
// copied from it. One thread per input element gathers them (no atomics).
DFKD_KERNEL(col2im_f32, (unsigned int n, ConvGeom g, const float* col, float* dx)) {
    const unsigned int l_len = g.h_out * g.w_out, k_len = g.c_in * g.kh * g.kw;
    GRID_STRIDE(t, n) {
        const unsigned int iw = t % g.w_in, ih = (t / g.w_in) % g.h_in, c = (t / (g.w_in * g.h_in)) % g.c_in;
        const unsigned int b = t / (g.w_in * g.h_in * g.c_in);
        const float* cb = col + (unsigned long long)b * k_len * l_len;
        float acc = 0.0f;
        for (unsigned int i = 0; i < g.kh; ++i) {
            const int th = (int)(ih + g.ph) - (int)(i * g.dh);
            if (th < 0 || th % g.sh != 0 || th / g.sh >= g.h_out) continue;
            for (unsigned int j = 0; j < g.kw; ++j) {
                const int tw = (int)(iw + g.pw) - (int)(j * g.dw);
                if (tw < 0 || tw % g.sw != 0 || tw / g.sw >= g.w_out) continue;
                acc += cb[((c * g.kh + i) * g.kw + j) * l_len + (th / g.sh) * g.w_out + tw / g.sw];
            }
        }
        dx[t] = acc;
    }
}
