// Element-wise y = f(a, b) over two strided operands already broadcast to one shape
// (broadcast dims have stride 0), into a contiguous output. Each
// `BinaryOp` maps to its kernel in src/backend/cuda/ops.rs; expressions mirror `BinaryOp::apply`
// (tests/cuda_parity.rs checks that they agree).
#include "common.cuh"

#define BINARY(NAME, EXPR)                                                                 \
    DFKD_KERNEL(NAME##_f32, (unsigned int n, Strided la, const float* a, Strided lb, const float* b, float* y)) { \
        GRID_STRIDE(i, n) {                                                                \
            const float u = a[at(la, i)], v = b[at(lb, i)];                                \
            y[i] = (EXPR);                                                                 \
        }                                                                                  \
    }

BINARY(badd, u + v)
BINARY(bsub, u - v)
BINARY(bmul, u * v)
BINARY(bdiv, u / v)
BINARY(bmax, fmaxf(u, v))
BINARY(bmin, fminf(u, v))
BINARY(beq, u == v ? 1.0f : 0.0f)
BINARY(bgt, u > v ? 1.0f : 0.0f)
BINARY(bwhere_positive, v > 0.0f ? u : 0.0f)
