// cuda_emu.h: lets g++ compile our CUDA kernels (kernels/*.cu) as C++ and run them on
// the CPU, so CI (no GPU) tests the very sources nvcc compiles. build.rs force-includes
// this header (`-include`) before every .cu file; kernels never include it themselves.
//
// Execution model (what is emulated):
// - A launch runs its blocks on a pool of host threads, one block at a time per thread,
//   each block to completion. The threads of a block are fibers on that host thread,
//   switched cooperatively (makecontext once per fiber, then _setjmp/_longjmp: no
//   syscall per switch). A fiber runs until it finishes or reaches a barrier or a warp
//   operation, so `__syncthreads` costs two context switches per thread.
// - `__syncthreads()`: a barrier among the block's threads that have not exited (as on
//   sm_70+: exited threads count as arrived). All threads of a round must arrive at
//   the same call site (file and line): a barrier in divergent code, reached at two
//   sites, is undefined in CUDA and aborts here.
// - Warp operations (`__shfl*_sync`, `__ballot_sync`, `__all_sync`, `__any_sync`,
//   `__syncwarp`) are barriers among the lanes of `mask`: every lane of `mask` that
//   exists in the block must call one with the same mask, then all read each other's
//   values. Lanes are `linear thread id % 32`. One mask group per warp at a time.
//   Stricter than hardware (aborts with a message): a lane calling with a mask that
//   excludes itself, lanes disagreeing on the mask, a shuffle reading a lane outside
//   the mask, a barrier some live thread never reaches (deadlock).
// - Not emulated: independent thread scheduling beyond the above (a spin-wait on
//   another thread of the same block without a barrier never ends), memory ordering
//   between threads of a block other than at barriers (fibers interleave only there,
//   so within a block everything is sequentially consistent), any timing, warp-
//   synchronous code without `*_sync` (implicit lock-step is not emulated), texture/
//   surface memory, __constant__ memory, cooperative groups, clusters, dynamic
//   parallelism.
// - Atomics are real host atomics (blocks run concurrently on host threads).
//
// Shared memory: `__shared__` expands to `thread_local`. At block scope `thread_local`
// implies `static`, so `__shared__ float s[256];` is one array per host thread: shared
// by the fibers of the block that thread is running, distinct from the blocks other
// threads run at the same time, and reused (uninitialised, as on a GPU) by the next
// block. No arena, no per-launch allocation. Dynamic shared memory must be declared
// with the one project-wide name and type `extern __shared__ __align__(16) unsigned
// char dfkd_smem[];` (cast it to the type wanted): it resolves to the thread_local
// array defined below, of DFKD_EMU_MAX_DYN_SHARED bytes; launches asking for more fail.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <string>
#include <cmath>
#include <type_traits>
#include <utility>

#define DFKD_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __shared__ thread_local

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};

// The CUDA default (no opt-in): 48 KiB of dynamic shared memory per block.
#define DFKD_EMU_MAX_DYN_SHARED 49152
inline thread_local __attribute__((aligned(16))) unsigned char dfkd_smem[DFKD_EMU_MAX_DYN_SHARED];

namespace emu {

// Launch configuration as the Rust host code passes it (repr(C) twin in src/backend/cuda).
struct Config {
    unsigned int grid[3];
    unsigned int block[3];
    unsigned int shared_bytes;
};
// Twin of `EmuConfig` in src/backend/cuda/kernels.rs, which asserts the same numbers.
static_assert(sizeof(Config) == 28, "Config: size");
static_assert(__builtin_offsetof(Config, grid) == 0, "Config.grid");
static_assert(__builtin_offsetof(Config, block) == 12, "Config.block");
static_assert(__builtin_offsetof(Config, shared_bytes) == 24, "Config.shared_bytes");

// Per host thread: the running fiber's thread index and the running block's geometry.
// The scheduler rewrites them at every switch, so kernels read them like the builtins.
inline thread_local uint3 t_thread_idx;
inline thread_local uint3 t_block_idx;
inline thread_local dim3 t_block_dim;
inline thread_local dim3 t_grid_dim;

// Runtime entry points (cuda_emu.cpp).
// `site` is "file:line" of the `__syncthreads()` call, a string literal.
void syncthreads(const char* site);
// Barrier among the lanes of `mask`; stores `v` as this lane's value and returns the
// 32 lane values of this round (entries of lanes outside `mask` are meaningless).
const uint64_t* warp_exchange(unsigned int mask, uint64_t v);
unsigned int lane_id();
[[noreturn]] void fail(const char* what);
// Runs `thread_fn(ctx)` for every thread of every block. Returns 0, or an error code
// (1: bad configuration) with the reason in `emu_last_error()`.
int run(const Config* cfg, void (*thread_fn)(void*), void* ctx);

template <class T> uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp ops take values of at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

// Calls the kernel `k` with the arguments cuLaunchKernel-style `args` point to.
template <class... A, size_t... I>
void call_kernel(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

// One parameter's kind as the Rust host's `Arg` describes it: "p" a pointer, "u4"/"i4"/
// "f4" an unsigned, signed or floating number of that many bytes, "s72" a struct of
// that many bytes (a `#[repr(C)]` twin).
template <class T> std::string param_code() {
    if constexpr (std::is_pointer_v<T>) return "p";
    else if constexpr (std::is_floating_point_v<T>) return "f" + std::to_string(sizeof(T));
    else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T>) return "u" + std::to_string(sizeof(T));
    else if constexpr (std::is_integral_v<T>) return "i" + std::to_string(sizeof(T));
    else return "s" + std::to_string(sizeof(T));
}

// A kernel's parameter kinds, comma-separated ("u4,s72,p,p,f4,f4"): the emulated launch
// on the Rust side refuses an argument list that does not match them, so a host/kernel
// signature mismatch fails every test that launches the kernel instead of reading
// garbage (the GPU cannot tell).
template <class... A> const char* signature(void (*)(A...)) {
    static const std::string s = [] {
        std::string out;
        ((out += (out.empty() ? "" : ",") + param_code<std::remove_cv_t<A>>()), ...);
        return out;
    }();
    return s.c_str();
}

template <class... A> int launch(void (*k)(A...), const Config* cfg, void** args) {
    struct Ctx { void (*k)(A...); void** args; } ctx{k, args};
    auto thread_fn = [](void* c) {
        auto* x = static_cast<Ctx*>(c);
        call_kernel(x->k, x->args, std::index_sequence_for<A...>{});
    };
    return run(cfg, thread_fn, &ctx);
}

} // namespace emu

extern "C" const char* emu_last_error();

#define threadIdx (emu::t_thread_idx)
#define blockIdx (emu::t_block_idx)
#define blockDim (emu::t_block_dim)
#define gridDim (emu::t_grid_dim)
#define warpSize 32

// Every kernel is declared with DFKD_KERNEL(name, (params)) { body }. Under nvcc/NVRTC
// that is `extern "C" __global__ void name(params)`; here it also defines the host entry
// `int emu_launch_<name>(const emu::Config*, void** args)` that build.rs lists for Rust,
// and `const char* emu_params_<name>()`, the kernel's parameter kinds (emu::signature).
#define DFKD_KERNEL(name, params)                                                      \
    extern "C" void name params;                                                       \
    extern "C" int emu_launch_##name(const emu::Config* cfg, void** args) {            \
        return emu::launch(name, cfg, args);                                           \
    }                                                                                  \
    extern "C" const char* emu_params_##name() { return emu::signature(name); }        \
    extern "C" void name params

// ---- barriers, warp operations ---------------------------------------------------------

#define DFKD_EMU_STR2(x) #x
#define DFKD_EMU_STR(x) DFKD_EMU_STR2(x)
#define __syncthreads() emu::syncthreads(__FILE__ ":" DFKD_EMU_STR(__LINE__))
inline void __syncwarp(unsigned int mask = 0xffffffffu) { emu::warp_exchange(mask, 0); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace emu {
// Source lane of a shuffle within its `width`-lane segment; `own` when out of range.
template <class T> T shfl_from(unsigned int mask, T v, int src, bool in_range) {
    const uint64_t* vals = warp_exchange(mask, to_bits(v));
    if (!in_range) return v;
    if (!((mask >> src) & 1u)) fail("warp shuffle reads a lane outside its mask");
    return from_bits<T>(vals[src]);
}
} // namespace emu

template <class T> T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32) {
    int lane = (int)emu::lane_id();
    int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
    return emu::shfl_from(mask, v, src, true);
}
template <class T> T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    int lane = (int)emu::lane_id();
    int src = lane + (int)delta;
    return emu::shfl_from(mask, v, src, (src & ~(width - 1)) == (lane & ~(width - 1)));
}
template <class T> T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    int lane = (int)emu::lane_id();
    int src = lane - (int)delta;
    return emu::shfl_from(mask, v, src, src >= (lane & ~(width - 1)));
}
template <class T> T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    int lane = (int)emu::lane_id();
    int src = lane ^ lane_mask;
    return emu::shfl_from(mask, v, src, (src & ~(width - 1)) == (lane & ~(width - 1)));
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
    const uint64_t* vals = emu::warp_exchange(mask, pred != 0);
    unsigned int out = 0;
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && vals[l]) out |= 1u << l;
    return out;
}
inline int __all_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) != 0; }

// ---- atomics: real host atomics, since blocks run concurrently on host threads ---------

template <class T> T __emu_atomic_add(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline float atomicAdd(float* p, float v) { return __emu_atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return __emu_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return __emu_atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __emu_atomic_add(p, v); }
template <class T> T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected; // the old value, as CUDA's atomicCAS returns
}
template <class T> T __emu_atomic_update(T* p, T v, bool want_max) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while ((want_max ? v > old : v < old) && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline int atomicMax(int* p, int v) { return __emu_atomic_update(p, v, true); }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) { return __emu_atomic_update(p, v, true); }
inline int atomicMin(int* p, int v) { return __emu_atomic_update(p, v, false); }
inline unsigned int atomicMin(unsigned int* p, unsigned int v) { return __emu_atomic_update(p, v, false); }

// ---- math intrinsics and bit casts -------------------------------------------------------

using std::isinf;
using std::isnan;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned int __float_as_uint(float x) { unsigned int i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned int i) { float x; memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T> T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Checks the emulator offers beyond CUDA's semantics (cuda_emu.cpp):
// - DFKD_EMU_SCHEDULE=forward|reverse: the order the threads of a block run in between
//   barriers. A missing `__syncthreads` makes a kernel's result depend on it, so the
//   suite runs under both orders (scripts/test).
// - Dynamic shared memory starts every block as all-ones bytes (NaN, -1), as a GPU
//   leaves it holding garbage; static `__shared__` arrays keep the previous block's.
// - DFKD_EMU_MEMCHECK=1|end|start (read by the Rust side): buffers between guard pages,
//   touching the one past their end or the one before their start; see emu_guard_alloc.
extern "C" int emu_set_schedule(int reverse);
extern "C" void* emu_guard_alloc(const void* src, size_t bytes, int arg, const char* kernel, int at_start);
extern "C" int emu_guard_release(void* data, void* dst);
