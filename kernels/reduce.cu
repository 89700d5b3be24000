// Reductions over any set of axes. The host splits the input view into `kept` (the
// output's dims) and `red` (the reduced dims, coalesced, offset 0): output o reduces
// x[at(kept, o) + at(red, j)] over j < n_red. One block per output (grid-stride over
// outputs), the block's threads stride over j, then a block reduction. Each
// `ReduceOp` maps to its kernel in src/backend/cuda/ops.rs.
#include "common.cuh"

template <class Op>
__device__ void reduce_rows(unsigned int n_out, unsigned int n_red, const Strided& kept, const Strided& red,
                            const float* x, float* y) {
    Op op;
    for (unsigned int o = blockIdx.x; o < n_out; o += gridDim.x) {
        const unsigned int base = at(kept, o);
        float acc = Op::identity();
        for (unsigned int j = threadIdx.x; j < n_red; j += blockDim.x) acc = op(acc, x[base + at(red, j)]);
        acc = block_reduce(acc, op);
        if (threadIdx.x == 0) y[o] = acc;
    }
}

DFKD_KERNEL(rsum_f32, (unsigned int n_out, unsigned int n_red, Strided kept, Strided red, const float* x, float* y)) {
    reduce_rows<SumOp>(n_out, n_red, kept, red, x, y);
}
DFKD_KERNEL(rmax_f32, (unsigned int n_out, unsigned int n_red, Strided kept, Strided red, const float* x, float* y)) {
    reduce_rows<MaxOp>(n_out, n_red, kept, red, x, y);
}
DFKD_KERNEL(rmin_f32, (unsigned int n_out, unsigned int n_red, Strided kept, Strided red, const float* x, float* y)) {
    reduce_rows<MinOp>(n_out, n_red, kept, red, x, y);
}
