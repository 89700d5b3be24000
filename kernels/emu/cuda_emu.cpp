// The emulator's runtime: the block pool, the fiber scheduler, barriers and warp
// exchanges. The semantics are documented at the top of cuda_emu.h.

// glibc's fortified longjmp (__longjmp_chk) rejects jumps to another stack, which is
// exactly what switching fibers is.
#undef _FORTIFY_SOURCE
#include "cuda_emu.h"

#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace emu {
namespace {

// 64 KiB is plenty for our kernels (no big local arrays, no recursion); a guard page
// below each stack turns an overflow into a segfault instead of silent corruption.
constexpr size_t STACK_BYTES = 64 * 1024;
constexpr size_t GUARD_BYTES = 4096;
constexpr unsigned MAX_BLOCK_THREADS = 1024;

enum class State : uint8_t { Ready, Waiting, Done };

struct Fiber {
    jmp_buf ctx;            // where the fiber resumes
    void* mapping = nullptr;
    uint3 tid;
    unsigned lane, warp;
    State state;
    const unsigned* wait_gen; // Waiting: runnable again once *wait_gen != wait_val
    unsigned wait_val;
};

struct Warp {
    unsigned gen;      // bumped when all lanes of the mask have arrived
    unsigned arrived;  // lanes arrived in this round
    unsigned mask;     // the mask of this round
    unsigned exists;   // lanes of this warp that exist in the block
    uint64_t vals[2][32]; // double-buffered by gen parity: a lane can only write round
                          // g+2 after everyone has passed round g+1, i.e. read round g
};

// A host thread that runs blocks: its fibers (created once, reused by every block it
// runs) and the state of the block it is running.
struct Worker {
    jmp_buf sched;
    std::vector<Fiber*> fibers;
    Fiber* cur = nullptr;
    void (*thread_fn)(void*) = nullptr;
    void* ctx = nullptr;
    unsigned alive = 0, bar_count = 0, bar_gen = 0;
    const char* bar_site = nullptr; // where this round's first thread called __syncthreads
    Warp warps[MAX_BLOCK_THREADS / 32];

    ~Worker() {
        for (Fiber* f : fibers) {
            munmap(f->mapping, STACK_BYTES + GUARD_BYTES);
            delete f;
        }
    }
};

thread_local Worker t_worker;
thread_local ucontext_t t_creator;
thread_local Fiber* t_new_fiber;
thread_local std::string t_last_error;

// noinline: each keeps its jmp_buf inside its own live frame.
__attribute__((noinline)) void resume(Worker& w, Fiber* f) {
    if (_setjmp(w.sched) == 0) _longjmp(f->ctx, 1);
}
__attribute__((noinline)) void suspend(Worker& w, Fiber* f) {
    if (_setjmp(f->ctx) == 0) _longjmp(w.sched, 1);
}

void finish_thread(Worker& w, Fiber* f) {
    f->state = State::Done;
    --w.alive;
    // exited threads count as arrived at a pending __syncthreads
    if (w.bar_count > 0 && w.bar_count == w.alive) {
        w.bar_count = 0;
        ++w.bar_gen;
    }
}

void fiber_main() {
    Fiber* f = t_new_fiber;
    Worker& w = t_worker;
    // Park here; the first resume of this fiber continues into the loop.
    if (_setjmp(f->ctx) == 0) setcontext(&t_creator);
    for (;;) {
        w.thread_fn(w.ctx);
        finish_thread(w, f);
        suspend(w, f);
    }
}

Fiber* new_fiber() {
    auto* f = new Fiber();
    f->mapping = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (f->mapping == MAP_FAILED) fail("mmap of a fiber stack failed");
    mprotect(f->mapping, GUARD_BYTES, PROT_NONE);
    ucontext_t uc;
    getcontext(&uc);
    uc.uc_stack.ss_sp = static_cast<char*>(f->mapping) + GUARD_BYTES;
    uc.uc_stack.ss_size = STACK_BYTES;
    uc.uc_link = nullptr;
    makecontext(&uc, fiber_main, 0);
    t_new_fiber = f;
    swapcontext(&t_creator, &uc); // runs fiber_main up to its park point
    return f;
}

[[noreturn]] void deadlock(Worker& w, unsigned n) {
    unsigned at_bar = 0, at_warp = 0;
    for (unsigned i = 0; i < n; ++i) {
        Fiber* f = w.fibers[i];
        if (f->state != State::Waiting) continue;
        if (f->wait_gen == &w.bar_gen) ++at_bar; else ++at_warp;
    }
    char msg[256];
    snprintf(msg, sizeof msg,
             "deadlock in block (%u,%u,%u): %u threads wait at __syncthreads, %u at warp operations, %u exited",
             t_block_idx.x, t_block_idx.y, t_block_idx.z, at_bar, at_warp, n - w.alive);
    fail(msg);
}

// The order fibers run in between barriers (DFKD_EMU_SCHEDULE, or emu_set_schedule).
// -1: not read from the environment yet.
std::atomic<int> g_schedule{-1};

bool schedule_reverse() {
    int s = g_schedule.load(std::memory_order_relaxed);
    if (s < 0) {
        const char* e = getenv("DFKD_EMU_SCHEDULE");
        if (!e || !*e || strcmp(e, "forward") == 0) s = 0;
        else if (strcmp(e, "reverse") == 0) s = 1;
        else fail("DFKD_EMU_SCHEDULE must be `forward` or `reverse`");
        int unset = -1;
        g_schedule.compare_exchange_strong(unset, s);
    }
    return s == 1;
}

void run_block(Worker& w, const Config& c, unsigned b) {
    const unsigned bx = c.block[0], by = c.block[1];
    const unsigned n = bx * by * c.block[2];
    t_block_idx = uint3{b % c.grid[0], (b / c.grid[0]) % c.grid[1], b / (c.grid[0] * c.grid[1])};
    while (w.fibers.size() < n) w.fibers.push_back(new_fiber());
    for (unsigned i = 0; i < n; ++i) {
        Fiber* f = w.fibers[i];
        // CUDA's linear thread id is x + y*bx + z*bx*by; lanes are its low 5 bits
        f->tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
        f->lane = i % 32;
        f->warp = i / 32;
        f->state = State::Ready;
    }
    for (unsigned k = 0; k < (n + 31) / 32; ++k) {
        Warp& wp = w.warps[k];
        wp.arrived = 0;
        unsigned lanes = n - k * 32 < 32 ? n - k * 32 : 32;
        wp.exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    }
    w.alive = n;
    w.bar_count = 0;
    // A GPU hands a block shared memory holding whatever the last block left there:
    // all-ones bytes (NaN as f32, -1 as int) make a read before any write show.
    memset(dfkd_smem, 0xff, c.shared_bytes);
    // Round-robin over the fibers still alive until all are done; a full pass with
    // nothing runnable is a deadlock. The order within a pass is the schedule: a
    // kernel that is missing a barrier gives different results under the two orders.
    const bool reverse = schedule_reverse();
    while (w.alive > 0) {
        bool progress = false;
        for (unsigned k = 0; k < n; ++k) {
            Fiber* f = w.fibers[reverse ? n - 1 - k : k];
            if (f->state == State::Done || (f->state == State::Waiting && *f->wait_gen == f->wait_val)) continue;
            f->state = State::Ready;
            w.cur = f;
            t_thread_idx = f->tid;
            resume(w, f);
            progress = true;
        }
        if (!progress) deadlock(w, n);
    }
}

struct Job {
    const Config* cfg;
    void (*thread_fn)(void*);
    void* ctx;
    unsigned n_blocks;
    std::atomic<unsigned> next{0};
};

void run_blocks(Job& j) {
    Worker& w = t_worker;
    w.thread_fn = j.thread_fn;
    w.ctx = j.ctx;
    t_grid_dim = dim3(j.cfg->grid[0], j.cfg->grid[1], j.cfg->grid[2]);
    t_block_dim = dim3(j.cfg->block[0], j.cfg->block[1], j.cfg->block[2]);
    for (unsigned b; (b = j.next.fetch_add(1)) < j.n_blocks;) run_block(w, *j.cfg, b);
}

// The host threads that run blocks beside the launching thread. One launch at a time:
// the whole pool works on it and the launch returns when every block is done, as a
// synchronised CUDA stream would.
class Pool {
  public:
    Pool() {
        unsigned n = std::thread::hardware_concurrency();
        if (const char* s = getenv("DFKD_EMU_THREADS")) n = (unsigned)atoi(s);
        for (unsigned i = 1; i < (n > 1 ? n : 1); ++i) std::thread([this] { loop(); }).detach();
        helpers_ = n > 1 ? n - 1 : 0;
    }
    void launch(Job& j) {
        std::lock_guard<std::mutex> one_launch(launch_mu_);
        const bool share = j.n_blocks > 1 && helpers_ > 0;
        if (share) {
            std::lock_guard<std::mutex> lk(mu_);
            job_ = &j;
            ++seq_;
            busy_ = helpers_;
        }
        work_cv_.notify_all();
        run_blocks(j);
        if (share) {
            std::unique_lock<std::mutex> lk(mu_);
            done_cv_.wait(lk, [this] { return busy_ == 0; });
        }
    }

  private:
    void loop() {
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(mu_);
        for (;;) {
            work_cv_.wait(lk, [&] { return seq_ != seen; });
            seen = seq_;
            Job* j = job_;
            lk.unlock();
            run_blocks(*j);
            lk.lock();
            if (--busy_ == 0) done_cv_.notify_all();
        }
    }
    unsigned helpers_ = 0;
    std::mutex launch_mu_, mu_;
    std::condition_variable work_cv_, done_cv_;
    Job* job_ = nullptr;
    uint64_t seq_ = 0;
    unsigned busy_ = 0;
};

int config_error(const char* what) {
    t_last_error = what;
    return 1;
}

} // namespace

void fail(const char* what) {
    fprintf(stderr, "cuda emulator: %s\n", what);
    abort();
}

unsigned int lane_id() { return t_worker.cur->lane; }

void syncthreads(const char* site) {
    Worker& w = t_worker;
    Fiber* f = w.cur;
    const unsigned g = w.bar_gen;
    if (w.bar_count == 0) {
        w.bar_site = site;
    } else if (strcmp(site, w.bar_site) != 0) {
        char msg[512];
        snprintf(msg, sizeof msg,
                 "divergent __syncthreads in block (%u,%u,%u): thread (%u,%u,%u) waits at %s while others wait at %s",
                 t_block_idx.x, t_block_idx.y, t_block_idx.z, f->tid.x, f->tid.y, f->tid.z, site, w.bar_site);
        fail(msg);
    }
    if (++w.bar_count == w.alive) { // the last to arrive releases the others and goes on
        w.bar_count = 0;
        ++w.bar_gen;
        return;
    }
    f->state = State::Waiting;
    f->wait_gen = &w.bar_gen;
    f->wait_val = g;
    suspend(w, f);
}

const uint64_t* warp_exchange(unsigned int mask, uint64_t v) {
    Worker& w = t_worker;
    Fiber* f = w.cur;
    Warp& wp = w.warps[f->warp];
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit)) fail("a lane calls a *_sync warp operation with a mask that excludes itself");
    if (wp.arrived == 0) wp.mask = mask;
    else if (wp.mask != mask) fail("lanes of one warp call *_sync warp operations with different masks");
    const unsigned g = wp.gen;
    wp.vals[g & 1][f->lane] = v;
    wp.arrived |= bit;
    if (wp.arrived == (mask & wp.exists)) {
        wp.arrived = 0;
        ++wp.gen;
    } else {
        f->state = State::Waiting;
        f->wait_gen = &wp.gen;
        f->wait_val = g;
        suspend(w, f);
    }
    return wp.vals[g & 1];
}

int run(const Config* c, void (*thread_fn)(void*), void* ctx) {
    static Pool* pool = new Pool(); // never destroyed: its threads are detached
    const unsigned threads = c->block[0] * c->block[1] * c->block[2];
    if (c->grid[0] == 0 || c->grid[1] == 0 || c->grid[2] == 0 || threads == 0)
        return config_error("launch with an empty grid or block");
    if (threads > MAX_BLOCK_THREADS || c->block[2] > 64 || c->grid[1] > 65535 || c->grid[2] > 65535)
        return config_error("launch configuration exceeds CUDA limits (1024 threads a block, block.z <= 64, grid.y/z <= 65535)");
    if (c->shared_bytes > DFKD_EMU_MAX_DYN_SHARED)
        return config_error("dynamic shared memory above 48 KiB");
    Job j;
    j.cfg = c;
    j.thread_fn = thread_fn;
    j.ctx = ctx;
    j.n_blocks = c->grid[0] * c->grid[1] * c->grid[2];
    pool->launch(j);
    return 0;
}

} // namespace emu

extern "C" const char* emu_last_error() { return emu::t_last_error.c_str(); }

// ---- memcheck: buffers between guard pages ------------------------------------------
//
// With DFKD_EMU_MEMCHECK=1 the Rust side (src/backend/cuda/emu.rs) copies every buffer
// a launch gets into a fresh mapping laid out as
//   [guard page][canary][buffer][guard page]    (DFKD_EMU_MEMCHECK=1 or end)
//   [guard page][buffer][canary][guard page]    (DFKD_EMU_MEMCHECK=start)
// with the buffer touching one guard page exactly: past its end, or before its start.
// Ending at a page leaves it aligned to its length's alignment (element-aligned
// always; the kernels' vector paths check 16-byte alignment and fall back otherwise);
// starting at one aligns it to the page. A kernel touching a guard page stops the
// process with a message naming the kernel, the argument, the offset and the thread;
// a write into the canary is reported when the buffer is released after the launch.

namespace emu {
namespace {

constexpr unsigned char CANARY = 0xa5;
constexpr int MAX_GUARDED = 512;

struct Guarded {
    std::atomic<bool> used{false};
    char* map = nullptr;
    size_t map_bytes = 0;
    char* data = nullptr;
    size_t bytes = 0;
    int arg = 0;
    char kernel[96] = {};
};

Guarded g_guarded[MAX_GUARDED];
std::mutex g_guard_mu;
struct sigaction g_old_segv;

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

// SIGSEGV: a guard page names the buffer; any other fault goes to the previous handler
// (Rust's stack-overflow report, or the default crash).
void on_segv(int sig, siginfo_t* si, void* uctx) {
    const uintptr_t a = (uintptr_t)si->si_addr;
    const size_t page = page_size();
    for (Guarded& g : g_guarded) {
        if (!g.used.load(std::memory_order_acquire)) continue;
        const uintptr_t lo = (uintptr_t)g.map, hi = lo + g.map_bytes, data = (uintptr_t)g.data;
        if (a < lo || a >= hi || (a >= lo + page && a < hi - page)) continue;
        char msg[512];
        const bool after = a >= data;
        int len = snprintf(msg, sizeof msg,
                           "cuda-emu memcheck: kernel `%s` touched argument #%d (a buffer of %zu bytes) %zu bytes %s, "
                           "in thread (%u,%u,%u) of block (%u,%u,%u)\n",
                           g.kernel, g.arg, g.bytes, after ? (size_t)(a - data) - g.bytes : (size_t)(data - a),
                           after ? "past its end" : "before its start", t_thread_idx.x, t_thread_idx.y, t_thread_idx.z,
                           t_block_idx.x, t_block_idx.y, t_block_idx.z);
        if (len > 0) {
            ssize_t ignored = write(2, msg, (size_t)len < sizeof msg ? (size_t)len : sizeof msg - 1);
            (void)ignored;
        }
        abort();
    }
    sigaction(SIGSEGV, &g_old_segv, nullptr); // not ours: re-fault into the old handler
    (void)sig;
    (void)uctx;
}

void install_segv_handler() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
}

} // namespace
} // namespace emu

// Sets the schedule (0 forward, 1 reverse) for launches from now on; returns the old one.
extern "C" int emu_set_schedule(int reverse) {
    const int old = emu::schedule_reverse() ? 1 : 0;
    emu::g_schedule.store(reverse ? 1 : 0);
    return old;
}

// A guarded copy of `bytes` bytes at `src`, as argument `arg` of `kernel`; returns the
// copy's address, or null when the guard table is full (the caller passes the buffer
// unguarded then).
extern "C" void* emu_guard_alloc(const void* src, size_t bytes, int arg, const char* kernel, int at_start) {
    using namespace emu;
    static std::once_flag once;
    std::call_once(once, install_segv_handler);
    const size_t page = page_size();
    const size_t inner = (bytes + page - 1) / page * page;
    const size_t map_bytes = inner + 2 * page;
    std::lock_guard<std::mutex> lk(g_guard_mu);
    Guarded* g = nullptr;
    for (Guarded& c : g_guarded)
        if (!c.used.load(std::memory_order_relaxed)) { g = &c; break; }
    if (!g) return nullptr;
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("memcheck: mmap of a guarded buffer failed");
    char* map = static_cast<char*>(m);
    mprotect(map, page, PROT_NONE);
    mprotect(map + page + inner, page, PROT_NONE);
    memset(map + page, CANARY, inner);
    g->map = map;
    g->map_bytes = map_bytes;
    g->data = at_start ? map + page : map + page + inner - bytes;
    g->bytes = bytes;
    g->arg = arg;
    snprintf(g->kernel, sizeof g->kernel, "%s", kernel);
    if (bytes) memcpy(g->data, src, bytes);
    g->used.store(true, std::memory_order_release);
    return g->data;
}

// Releases a guarded copy made by emu_guard_alloc, first copying it back to `dst`
// (unless null). Returns 0, or 1 when the canary before the buffer was overwritten, 2
// when the one after it was.
extern "C" int emu_guard_release(void* data, void* dst) {
    using namespace emu;
    std::lock_guard<std::mutex> lk(g_guard_mu);
    for (Guarded& g : g_guarded) {
        if (!g.used.load(std::memory_order_relaxed) || g.data != data) continue;
        const size_t page = page_size();
        int rc = 0;
        for (char* p = g.map + page; p < g.data; ++p)
            if ((unsigned char)*p != CANARY) { rc = 1; break; }
        for (char* p = g.data + g.bytes; rc == 0 && p < g.map + g.map_bytes - page; ++p)
            if ((unsigned char)*p != CANARY) { rc = 2; break; }
        if (dst && g.bytes) memcpy(dst, g.data, g.bytes);
        g.used.store(false, std::memory_order_release);
        munmap(g.map, g.map_bytes);
        return rc;
    }
    fail("memcheck: release of a buffer that is not guarded");
}
