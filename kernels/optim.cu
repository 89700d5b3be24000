// Fused optimiser updates, in place on contiguous buffers of one length, with
// PyTorch's update rules in the CPU reference's order of operations
// (src/backend/cpu/optim.rs). Scalars that depend only on the step (Adam's bias
// corrections) are computed once on the host, as the CPU reference does.
#include "common.cuh"

DFKD_KERNEL(sgd_f32, (unsigned int n, float* p, const float* g, float* buf, float lr, float momentum,
                      float weight_decay, int nesterov)) {
    GRID_STRIDE(i, n) {
        const float d = g[i] + weight_decay * p[i];
        const float b = momentum * buf[i] + d;
        buf[i] = b;
        p[i] -= lr * (nesterov ? d + momentum * b : b);
    }
}

// step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
DFKD_KERNEL(adam_f32, (unsigned int n, float* p, const float* g, float* m, float* v, float beta1, float beta2,
                       float eps, float weight_decay, float step_size, float bc2_sqrt)) {
    GRID_STRIDE(i, n) {
        const float d = g[i] + weight_decay * p[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * d;
        const float vi = beta2 * v[i] + (1.0f - beta2) * d * d;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
