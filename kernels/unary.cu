// Element-wise maps y = f(x) over a strided input into a contiguous output, and strided
// copies. Each `UnaryOp` maps to its kernel in src/backend/cuda/ops.rs; every unary kernel
// has the same signature so the host launches them alike: `p0`, `p1` are the op's parameters
// (leaky slope, exponent, clamp or range bounds, affine mul and add), unused otherwise.
// The expressions mirror `UnaryOp::apply` in src/backend/ops.rs; tests/cuda_parity.rs
// checks that they agree.
#include "common.cuh"

#define UNARY(NAME, EXPR)                                                                  \
    DFKD_KERNEL(NAME##_f32, (unsigned int n, Strided lx, const float* x, float* y, float p0, float p1)) { \
        (void)p0, (void)p1;                                                                \
        GRID_STRIDE(i, n) {                                                                \
            const float v = x[at(lx, i)];                                                  \
            y[i] = (EXPR);                                                                 \
        }                                                                                  \
    }

UNARY(uneg, -v)
UNARY(urecip, 1.0f / v)
UNARY(uexp, expf(v))
UNARY(ulog, logf(v))
UNARY(usqrt, sqrtf(v))
UNARY(usqr, v * v)
UNARY(uabs, fabsf(v))
UNARY(usign, v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f))
UNARY(urelu, fmaxf(v, 0.0f))
UNARY(usigmoid, 1.0f / (1.0f + expf(-v)))
UNARY(utanh, tanhf(v))
UNARY(uleaky_relu, v > 0.0f ? v : p0 * v)
UNARY(uleaky_step, v > 0.0f ? 1.0f : p0)
UNARY(upowf, powf(v, p0))
UNARY(uclamp, fminf(fmaxf(v, p0), p1))
UNARY(uin_range, (v > p0 && v < p1) ? 1.0f : 0.0f)
UNARY(uaffine, v * p0 + p1)

// Strided copies move bits, so one kernel per element width serves every dtype
// (f32 and u32 as 32-bit words; f16 and bf16 as 16-bit ones).
#define COPY(BITS, T)                                                                      \
    DFKD_KERNEL(copy##BITS, (unsigned int n, Strided lx, const T* x, T* y)) {               \
        GRID_STRIDE(i, n) y[i] = x[at(lx, i)];                                             \
    }                                                                                      \
    DFKD_KERNEL(copy##BITS##_into, (unsigned int n, Strided lx, const T* x, Strided ly, T* y)) { \
        GRID_STRIDE(i, n) y[at(ly, i)] = x[at(lx, i)];                                     \
    }
COPY(32, unsigned int)
COPY(16, unsigned short)
