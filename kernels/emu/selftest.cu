// Self-test of the emulator's semantics (barriers, shared memory, warp shuffles and
// votes, atomics, 3-D indices) and its launch cost. Compiled only for the emulator;
// `emu_selftest` is called by tests/cuda_parity.rs.
#include <chrono>
#include <stdio.h>
#include <vector>

// Block sum of 0..n-1 through shared memory, two barriers, then a warp-shuffle tree.
DFKD_KERNEL(st_block_sum, (const float* x, float* out, unsigned n)) {
    __shared__ float partial[32];
    __shared__ float total;
    const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
    float v = 0;
    for (unsigned i = blockIdx.x * blockDim.x + t; i < n; i += blockDim.x * gridDim.x) v += x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (t == 0) {
        float s = 0;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
        total = s;
    }
    __syncthreads();
    if (t == blockDim.x - 1) atomicAdd(out, total);
}

// Inclusive warp scan with __shfl_up_sync, votes, __shfl_xor_sync butterfly, __shfl_sync.
DFKD_KERNEL(st_warp_ops, (int* scan, unsigned* votes, int* xor_sum, int* bcast)) {
    const int lane = threadIdx.x % 32;
    int v = lane + 1;
    for (int o = 1; o < 32; o <<= 1) {
        int u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    scan[threadIdx.x] = v;
    unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
    int all = __all_sync(0xffffffffu, lane < 32), any = __any_sync(0xffffffffu, lane == 40);
    if (lane == 0) { votes[0] = b; votes[1] = all; votes[2] = any; }
    int s = lane;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    xor_sum[threadIdx.x] = s;
    bcast[threadIdx.x] = __shfl_sync(0xffffffffu, lane * 10, 7);
}

// Reverses each block's slice through dynamic shared memory; 3-D indices are checked.
DFKD_KERNEL(st_reverse, (const int* x, int* y, unsigned* bad)) {
    extern __shared__ __align__(16) unsigned char dfkd_smem[];
    int* s = reinterpret_cast<int*>(dfkd_smem);
    const unsigned t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    const unsigned block = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
    if (threadIdx.x >= blockDim.x || threadIdx.y >= blockDim.y || threadIdx.z >= blockDim.z) atomicAdd(bad, 1u);
    s[t] = x[block * n + t];
    __syncthreads();
    y[block * n + t] = s[n - 1 - t];
}

// Threads exit early, the rest meet at a barrier: exited threads count as arrived.
DFKD_KERNEL(st_early_exit, (int* y)) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = 7;
    if (threadIdx.x % 2) return;
    __syncthreads();
    y[threadIdx.x] = flag;
}

// Deliberately wrong kernels, for the tests of the emulator's checks
// (src/backend/cuda/emu.rs): each must be caught.

// Writes y[first..=last]: off by one when the host gives -1 or the length.
DFKD_KERNEL(st_bad_write_range, (float* y, int first, int last)) {
    for (int i = first + (int)threadIdx.x; i <= last; i += (int)blockDim.x) y[i] = 1.0f;
}

// Off by one: reads x[1..=n].
DFKD_KERNEL(st_bad_read_past_end, (const float* x, float* y, unsigned n)) {
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[i + 1];
}

// Writes through a pointer the host passed read-only.
DFKD_KERNEL(st_bad_write_input, (const float* x, float* y)) {
    if (threadIdx.x == 0) const_cast<float*>(x)[0] = y[0];
}

// Shifts a block's values by one through shared memory with no barrier between the
// writes and the reads: right only when thread t-1 happens to run before thread t.
DFKD_KERNEL(st_bad_missing_barrier, (const float* x, float* y)) {
    extern __shared__ __align__(16) unsigned char dfkd_smem[];
    float* s = reinterpret_cast<float*>(dfkd_smem);
    const unsigned t = threadIdx.x;
    s[t] = x[t];
    y[t] = s[t == 0 ? 0 : t - 1];
}

// Odd and even threads wait at different barriers: undefined in CUDA.
DFKD_KERNEL(st_bad_divergent_barrier, (float* y)) {
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = 1.0f;
}

namespace {
int launch(int (*entry)(const emu::Config*, void**), dim3 g, dim3 b, unsigned shmem, std::vector<void*> args) {
    emu::Config c{{g.x, g.y, g.z}, {b.x, b.y, b.z}, shmem};
    return entry(&c, args.data());
}
} // namespace

// Returns the number of failed checks (each printed to stderr); `launch_ms` gets the
// best time of one 64 x 256 launch with two barriers and a warp reduction.
extern "C" int emu_selftest(double* launch_ms) {
    int failures = 0;
    auto check = [&](bool ok, const char* what) {
        if (!ok) { fprintf(stderr, "emulator self-test failed: %s\n", what); ++failures; }
    };

    const unsigned n = 100003;
    std::vector<float> x(n);
    for (unsigned i = 0; i < n; ++i) x[i] = (float)(i % 7);
    double want = 0;
    for (float v : x) want += v;
    float out = 0;
    const float* xp = x.data();
    float* op = &out;
    unsigned nn = n;
    check(launch(emu_launch_st_block_sum, dim3(13), dim3(256), 0, {&xp, &op, &nn}) == 0, "launch st_block_sum");
    check(out == (float)want, "block sum through shared memory, barriers, shuffles, atomicAdd");

    std::vector<int> scan(64), xs(64), bc(64);
    std::vector<unsigned> votes(3);
    int *sp = scan.data(), *xsp = xs.data(), *bcp = bc.data();
    unsigned* vp = votes.data();
    check(launch(emu_launch_st_warp_ops, dim3(1), dim3(64), 0, {&sp, &vp, &xsp, &bcp}) == 0, "launch st_warp_ops");
    bool ok = true;
    for (int t = 0; t < 64; ++t) {
        int l = t % 32;
        ok &= scan[t] == (l + 1) * (l + 2) / 2 && xs[t] == 496 && bc[t] == 70;
    }
    check(ok, "__shfl_up_sync scan, __shfl_xor_sync butterfly, __shfl_sync broadcast");
    check(votes[0] == 0x49249249u && votes[1] == 1 && votes[2] == 0, "__ballot_sync, __all_sync, __any_sync");

    const dim3 g3(3, 2, 2), b3(4, 3, 5);
    const unsigned per = 60, total = 12 * per;
    std::vector<int> in(total), rev(total);
    for (unsigned i = 0; i < total; ++i) in[i] = (int)i;
    unsigned bad = 0;
    const int* ip = in.data();
    int* rp = rev.data();
    unsigned* bp = &bad;
    check(launch(emu_launch_st_reverse, g3, b3, per * 4, {&ip, &rp, &bp}) == 0, "launch st_reverse");
    ok = bad == 0;
    for (unsigned i = 0; i < total; ++i) ok &= rev[i] == (int)((i / per) * per + per - 1 - i % per);
    check(ok, "dynamic shared memory and 3-D grid/block indices");
    check(launch(emu_launch_st_reverse, g3, b3, 1 << 20, {&ip, &rp, &bp}) == 1, "too much dynamic shared memory is refused");
    check(launch(emu_launch_st_reverse, g3, dim3(2048), 0, {&ip, &rp, &bp}) == 1, "a 2048-thread block is refused");

    std::vector<int> ee(96, -1);
    int* ep = ee.data();
    check(launch(emu_launch_st_early_exit, dim3(1), dim3(96), 0, {&ep}) == 0, "launch st_early_exit");
    ok = true;
    for (int t = 0; t < 96; ++t) ok &= ee[t] == (t % 2 ? -1 : 7);
    check(ok, "exited threads count as arrived at __syncthreads");

    // Launch cost: 64 blocks x 256 threads, two barriers and five shuffles per thread.
    const unsigned big = 64 * 256;
    std::vector<float> ones(big, 1.0f);
    const float* onep = ones.data();
    double best = 1e9;
    for (int rep = 0; rep < 5; ++rep) {
        out = 0;
        auto t0 = std::chrono::steady_clock::now();
        launch(emu_launch_st_block_sum, dim3(64), dim3(256), 0, {&onep, &op, const_cast<unsigned*>(&big)});
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        best = ms < best ? ms : best;
    }
    check(out == (float)big, "64 x 256 block sum");
    *launch_ms = best;
    return failures;
}
