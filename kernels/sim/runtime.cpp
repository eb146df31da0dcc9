// The simulator's launch engine: runs a kernel (compiled for the host against
// sim.h) over a grid, and implements the block barrier and the warp
// collectives that sim.h declares.
//
// One launch, step by step:
//   1. The configuration is validated; an invalid one is an error message,
//      never a crash.
//   2. A process-wide mutex is taken for the whole launch. `__shared__`
//      variables are function statics (sim.h), so two blocks must never run
//      at once anywhere in the process; cargo runs tests on parallel threads,
//      and this lock is what makes that safe.
//   3. blockDim.x*y*z OS threads are created (small explicit stacks), one per
//      CUDA thread of a block, and reused for every block of the grid.
//   4. For each block, in order (x fastest, then y, then z): dynamic shared
//      memory is poisoned, barrier and warp state reset, and the threads are
//      released to run the kernel body concurrently; the launching thread
//      waits until every one of them has returned (or unwound).
//   5. The first error any thread reports is the launch's result; every other
//      thread unwinds at its next barrier or collective, and no further block
//      starts.
//
// Barriers and collectives never wait forever: a waiting thread gives up when
// no thread of the block has arrived anywhere for the launch's timeout
// (progress-based, so a slow but live block is not a deadlock), and reports
// what every thread of the block was doing.

#include "sim.h"

#include <cxxabi.h>
#include <limits.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace tli_sim {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kDefaultTimeoutMs = 10000;
constexpr size_t kWorkerStack = 256 * 1024;
constexpr size_t kSmemAlign = 128;
constexpr uint64_t kPoison = ~uint64_t{0};

// A thread detected misuse (or a timeout); the message is the launch's error.
struct KernelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
// Thrown to unwind a thread because another thread already failed.
struct Unwind {};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    const int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return std::string("(unformattable message)");
    if (static_cast<size_t>(n) < sizeof buf) return std::string(buf, static_cast<size_t>(n));
    std::string big(static_cast<size_t>(n) + 1, '\0');
    va_start(ap, fmt);
    std::vsnprintf(&big[0], big.size(), fmt, ap);
    va_end(ap);
    big.resize(static_cast<size_t>(n));
    return big;
}

const char* base_name(const char* path) {
    if (path == nullptr) return "?";
    const char* slash = std::strrchr(path, '/');
    return slash ? slash + 1 : path;
}

std::string site_str(const char* file, unsigned line) { return format("%s:%u", base_name(file), line); }
std::string site_str(Site s) { return site_str(s.file, s.line); }

bool same_site(Site a, Site b) {
    return a.line == b.line && (a.file == b.file || (a.file && b.file && std::strcmp(a.file, b.file) == 0));
}

const char* barrier_name(int kind) {
    switch (kind) {
        case 1: return "__syncthreads_count";
        case 2: return "__syncthreads_and";
        case 3: return "__syncthreads_or";
        default: return "__syncthreads";
    }
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::SyncWarp: return "__syncwarp";
        case WarpOp::ReduceAddU: return "__reduce_add_sync";
        case WarpOp::ReduceMinU:
        case WarpOp::ReduceMinS: return "__reduce_min_sync";
        case WarpOp::ReduceMaxU:
        case WarpOp::ReduceMaxS: return "__reduce_max_sync";
        case WarpOp::ReduceAnd: return "__reduce_and_sync";
        case WarpOp::ReduceOr: return "__reduce_or_sync";
        case WarpOp::ReduceXor: return "__reduce_xor_sync";
        case WarpOp::Mma: return "mma.sync.m16n8k16";
    }
    return "warp collective";
}

bool is_shuffle(WarpOp op) {
    return op == WarpOp::ShflIdx || op == WarpOp::ShflUp || op == WarpOp::ShflDown || op == WarpOp::ShflXor;
}

// What a simulated thread is doing, for deadlock reports. Written by the
// thread itself, read by whichever thread writes a report.
enum : uint8_t { kIdle, kRunning, kAtBarrier, kAtWarp, kExited };

struct ThreadInfo {
    std::atomic<uint8_t> state{kIdle};
    std::atomic<int> what{0};  // barrier kind, or WarpOp
    std::atomic<unsigned> mask{0};
    std::atomic<const char*> file{nullptr};
    std::atomic<unsigned> line{0};
};

// One warp collective in flight: gathering until every non-exited lane of
// `mask` has arrived, then complete until every arrived lane has read its
// result.
struct Collective {
    bool live = false;
    bool gathering = false;
    WarpOp op = WarpOp::SyncWarp;
    unsigned mask = 0;
    int width = 32;
    Site site{nullptr, 0};
    unsigned arrived = 0;
    unsigned unread = 0;
    uint64_t vals[32] = {};
    unsigned args[32] = {};
    // Mma only: whether all 32 lanes took part (set when it completes).
    bool mma_ok = false;
};

struct Warp {
    std::mutex m;
    std::condition_variable cv;
    // Lanes that returned from the kernel, or do not exist (beyond blockDim
    // in a partial last warp). CUDA waits only for non-exited lanes.
    unsigned exited = 0;
    // Each lane is in at most one collective at a time, and a live
    // collective always holds a lane, so 32 slots suffice.
    Collective slots[32];

    void reset(unsigned existing) {
        exited = ~existing;
        for (Collective& c : slots) c.live = false;
    }
};

struct Barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned arrived = 0;
    unsigned exited = 0;
    uint64_t generation = 0;
    Site site{nullptr, 0};
    int kind = 0;
    int count = 0;
    int last_count = 0;

    void reset() {
        arrived = 0;
        exited = 0;
        generation = 0;
        count = 0;
        last_count = 0;
    }
};

class Launch;
thread_local Launch* t_launch = nullptr;
thread_local unsigned t_tid = 0;  // linear thread index within the block

std::string where() {
    return format("block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
                  threadIdx.z);
}

class Launch {
   public:
    Launch(const char* name, const TliSimLaunch& cfg, uint32_t timeout_ms, const std::function<void()>& body)
        : name_(name ? name : "?"),
          grid_(cfg.grid[0], cfg.grid[1], cfg.grid[2]),
          block_(cfg.block[0], cfg.block[1], cfg.block[2]),
          nthreads_(cfg.block[0] * cfg.block[1] * cfg.block[2]),
          nwarps_((nthreads_ + 31) / 32),
          timeout_(timeout_ms),
          slice_(std::clamp<uint32_t>(timeout_ms / 8, 1, 50)),
          body_(body),
          threads_(new ThreadInfo[nthreads_]),
          warps_(new Warp[nwarps_]),
          smem_bytes_(cfg.dynamic_smem),
          smem_raw_(new unsigned char[cfg.dynamic_smem + kSmemAlign]) {
        const uintptr_t raw = reinterpret_cast<uintptr_t>(smem_raw_.get());
        smem_ = smem_raw_.get() + ((kSmemAlign - raw % kSmemAlign) % kSmemAlign);
    }

    unsigned nthreads() const { return nthreads_; }
    const dim3& grid() const { return grid_; }
    const dim3& block() const { return block_; }
    void* smem() const { return smem_; }
    bool in_smem(const void* p) const {
        const unsigned char* c = static_cast<const unsigned char*>(p);
        return c >= smem_ && c < smem_ + smem_bytes_;
    }
    bool aborted() const { return aborted_.load(std::memory_order_acquire); }
    ThreadInfo& me() { return threads_[t_tid]; }

    // Record the first error and wake every waiting thread so it unwinds.
    // Called with no simulator lock held.
    void report(const std::string& msg) {
        {
            std::lock_guard<std::mutex> lk(err_m_);
            if (error_.empty()) error_ = msg;
        }
        aborted_.store(true, std::memory_order_release);
        {
            std::lock_guard<std::mutex> lk(bar_.m);
        }
        bar_.cv.notify_all();
        for (unsigned w = 0; w < nwarps_; ++w) {
            {
                std::lock_guard<std::mutex> lk(warps_[w].m);
            }
            warps_[w].cv.notify_all();
        }
    }

    std::string error() {
        std::lock_guard<std::mutex> lk(err_m_);
        return error_;
    }

    // Wait on `cv` until `ready()`; throw Unwind when the launch aborts, or
    // KernelError(describe(ms)) when no thread of the block has arrived at any
    // barrier or collective (or exited) for the timeout.
    template <class Ready, class Describe>
    void wait(std::unique_lock<std::mutex>& lk, std::condition_variable& cv, Ready ready, Describe describe) {
        uint64_t seen = progress_.load(std::memory_order_acquire);
        Clock::time_point since = Clock::now();
        while (!ready()) {
            if (aborted()) throw Unwind{};
            cv.wait_for(lk, slice_);
            if (ready()) return;
            if (aborted()) throw Unwind{};
            const uint64_t p = progress_.load(std::memory_order_acquire);
            const Clock::time_point now = Clock::now();
            if (p != seen) {
                seen = p;
                since = now;
            } else if (now - since >= timeout_) {
                throw KernelError(describe(static_cast<long long>(timeout_.count())));
            }
        }
    }

    // What every thread of the block is doing, grouped: "255 at __syncthreads
    // (k.cu:40), e.g. thread (1,0,0); 1 at __syncwarp mask 0x00000003 ...".
    std::string thread_summary() const {
        struct Group {
            uint8_t state;
            int what;
            unsigned mask;
            const char* file;
            unsigned line;
            unsigned count;
            unsigned first;
        };
        std::vector<Group> groups;
        for (unsigned t = 0; t < nthreads_; ++t) {
            const ThreadInfo& ti = threads_[t];
            const uint8_t st = ti.state.load(std::memory_order_acquire);
            const int what = (st == kAtBarrier || st == kAtWarp) ? ti.what.load() : 0;
            const unsigned mask = st == kAtWarp ? ti.mask.load() : 0;
            const char* file = (st == kAtBarrier || st == kAtWarp) ? ti.file.load() : nullptr;
            const unsigned line = (st == kAtBarrier || st == kAtWarp) ? ti.line.load() : 0;
            bool found = false;
            for (Group& g : groups) {
                if (g.state == st && g.what == what && g.mask == mask && g.line == line &&
                    same_site(Site{g.file, g.line}, Site{file, line})) {
                    ++g.count;
                    found = true;
                    break;
                }
            }
            if (!found) groups.push_back(Group{st, what, mask, file, line, 1, t});
        }
        std::string out;
        for (const Group& g : groups) {
            if (!out.empty()) out += "; ";
            const unsigned tx = g.first % block_.x;
            const unsigned ty = (g.first / block_.x) % block_.y;
            const unsigned tz = g.first / (block_.x * block_.y);
            std::string doing;
            switch (g.state) {
                case kAtBarrier:
                    doing = format("at %s (%s)", barrier_name(g.what), site_str(g.file, g.line).c_str());
                    break;
                case kAtWarp:
                    doing = format("at %s mask 0x%08x (%s)", op_name(static_cast<WarpOp>(g.what)), g.mask,
                                   site_str(g.file, g.line).c_str());
                    break;
                case kExited: doing = "returned from the kernel"; break;
                case kRunning: doing = "running (not at any barrier or collective)"; break;
                default: doing = "not started"; break;
            }
            out += format("%u %s, e.g. thread (%u,%u,%u)", g.count, doing.c_str(), tx, ty, tz);
        }
        return out;
    }

    // Reset per-block state and poison dynamic shared memory. Called by the
    // launching thread while every worker is idle.
    void prepare_block() {
        bar_.reset();
        for (unsigned w = 0; w < nwarps_; ++w) {
            const unsigned lanes = std::min(32u, nthreads_ - 32u * w);
            warps_[w].reset(lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u));
        }
        for (unsigned t = 0; t < nthreads_; ++t) threads_[t].state.store(kIdle, std::memory_order_relaxed);
        std::memset(smem_, TLI_SIM_POISON_BYTE, smem_bytes_);
    }

    int block_barrier(int kind, int predicate, Site site);
    uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, unsigned arg, int width, Site site);
    void thread_exit();
    void run_body() { body_(); }

    // Pool control, used by the workers and the launching thread.
    std::mutex pm;
    std::condition_variable start_cv;
    std::condition_variable done_cv;
    uint64_t start_gen = 0;
    unsigned done = 0;
    bool stop = false;
    uint3 cur_block{0, 0, 0};

   private:
    void set_state(uint8_t st, int what, unsigned mask, Site site) {
        ThreadInfo& ti = me();
        ti.what.store(what, std::memory_order_relaxed);
        ti.mask.store(mask, std::memory_order_relaxed);
        ti.file.store(site.file, std::memory_order_relaxed);
        ti.line.store(site.line, std::memory_order_relaxed);
        ti.state.store(st, std::memory_order_release);
    }
    void set_running() { me().state.store(kRunning, std::memory_order_release); }
    void bump() { progress_.fetch_add(1, std::memory_order_acq_rel); }
    static void complete(Warp& w, Collective& c) {
        if (c.op == WarpOp::Mma) {
            // All 32 lanes, all with the same operand type.
            c.mma_ok = c.arrived == 0xffffffffu;
            for (unsigned l = 1; c.mma_ok && l < 32; ++l) c.mma_ok = c.args[l] == c.args[0];
            if (c.mma_ok) run_mma(c);
        }
        c.gathering = false;
        c.unread = c.arrived;
        w.cv.notify_all();
    }
    static uint64_t result(const Collective& c, unsigned lane);
    static void run_mma(Collective& c);

    std::string name_;
    dim3 grid_;
    dim3 block_;
    unsigned nthreads_;
    unsigned nwarps_;
    std::chrono::milliseconds timeout_;
    std::chrono::milliseconds slice_;
    const std::function<void()>& body_;
    std::unique_ptr<ThreadInfo[]> threads_;
    std::unique_ptr<Warp[]> warps_;
    Barrier bar_;
    size_t smem_bytes_;
    std::unique_ptr<unsigned char[]> smem_raw_;
    unsigned char* smem_ = nullptr;
    std::atomic<bool> aborted_{false};
    std::atomic<uint64_t> progress_{0};
    std::mutex err_m_;
    std::string error_;
};

int Launch::block_barrier(int kind, int predicate, Site site) {
    set_state(kAtBarrier, kind, 0, site);
    std::unique_lock<std::mutex> lk(bar_.m);
    if (aborted()) throw Unwind{};
    if (bar_.exited > 0) {
        throw KernelError(format("%s: reached %s (%s), but %u thread(s) of the block have already returned from the "
                                 "kernel; every thread of a block must reach every __syncthreads (on the device this "
                                 "is undefined behaviour, usually a hang). Threads: %s",
                                 where().c_str(), barrier_name(kind), site_str(site).c_str(), bar_.exited,
                                 thread_summary().c_str()));
    }
    if (bar_.arrived > 0 && (bar_.kind != kind || !same_site(bar_.site, site))) {
        throw KernelError(format("%s: reached %s (%s) while %u thread(s) wait at %s (%s); all threads of a block must "
                                 "meet at the same barrier",
                                 where().c_str(), barrier_name(kind), site_str(site).c_str(), bar_.arrived,
                                 barrier_name(bar_.kind), site_str(bar_.site).c_str()));
    }
    if (bar_.arrived == 0) {
        bar_.site = site;
        bar_.kind = kind;
    }
    bar_.count += predicate != 0;
    ++bar_.arrived;
    bump();
    if (bar_.arrived == nthreads_) {
        bar_.last_count = bar_.count;
        bar_.count = 0;
        bar_.arrived = 0;
        ++bar_.generation;
        const int r = bar_.last_count;
        lk.unlock();
        bar_.cv.notify_all();
        set_running();
        return r;
    }
    const uint64_t gen = bar_.generation;
    wait(lk, bar_.cv, [&] { return bar_.generation != gen; },
         [&](long long ms) {
             return format("%s: %s (%s) timed out: no thread of the block arrived at any barrier or collective for %lld "
                           "ms, with %u of %u threads at this barrier. Threads: %s",
                           where().c_str(), barrier_name(kind), site_str(site).c_str(), ms, bar_.arrived, nthreads_,
                           thread_summary().c_str());
         });
    // The next generation cannot complete before this thread arrives again,
    // so last_count still belongs to this one.
    const int r = bar_.last_count;
    lk.unlock();
    set_running();
    return r;
}

// The m16n8k16 matrix product of one warp (sim.h, section 8, documents the
// fragment layout and the accumulation order). Called with the warp's lock
// held, once all 32 lanes have deposited their MmaLane; every lane is still
// blocked in the collective, so the registers the pointers name are live.
void Launch::run_mma(Collective& c) {
    const MmaLane* lanes[32];
    for (unsigned l = 0; l < 32; ++l) lanes[l] = reinterpret_cast<const MmaLane*>(static_cast<uintptr_t>(c.vals[l]));
    const bool f16 = static_cast<MmaType>(c.args[0]) == MmaType::F16;
    auto half_to_f32 = [f16](uint32_t bits) {
        return f16 ? f16_bits_to_f32(static_cast<uint16_t>(bits)) : bf16_bits_to_f32(static_cast<uint16_t>(bits));
    };
    float A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3u;
        const MmaLane& f = *lanes[l];
        for (unsigned r = 0; r < 4; ++r) {
            const unsigned row = g + 8u * (r & 1u), col = 2u * t + 8u * (r >> 1);
            A[row][col] = half_to_f32(f.a[r] & 0xffffu);
            A[row][col + 1] = half_to_f32(f.a[r] >> 16);
        }
        for (unsigned r = 0; r < 2; ++r) {
            const unsigned k = 2u * t + 8u * r;
            B[k][g] = half_to_f32(f.b[r] & 0xffffu);
            B[k + 1][g] = half_to_f32(f.b[r] >> 16);
        }
        for (unsigned i = 0; i < 4; ++i) C[g + 8u * (i >> 1)][2u * t + (i & 1u)] = f.c[i];
    }
    float D[16][8];
    for (unsigned i = 0; i < 16; ++i) {
        for (unsigned j = 0; j < 8; ++j) {
            float acc = C[i][j];
            // Exact products (see sim.h); one f32 rounding per addition.
            for (unsigned k = 0; k < 16; ++k) acc = acc + A[i][k] * B[k][j];
            D[i][j] = acc;
        }
    }
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3u;
        for (unsigned i = 0; i < 4; ++i) lanes[l]->d[i] = D[g + 8u * (i >> 1)][2u * t + (i & 1u)];
    }
}

uint64_t Launch::result(const Collective& c, unsigned lane) {
    if (is_shuffle(c.op)) {
        // shfl.sync as the PTX ISA defines it, with the clamp/segment operand
        // CUDA passes for `width`: lanes are split into segments of `width`;
        // idx reads lane (srcLane mod width) of its own segment; up/down read
        // lane -/+ delta unless that leaves the segment (then their own
        // value); xor reads lane ^ mask unless that lies in a later segment.
        const int l = static_cast<int>(lane);
        const int b = static_cast<int>(c.args[lane] & 31u);
        const int segmask = (32 - c.width) & 31;
        const int min_lane = l & segmask;
        const int max_lane = min_lane | (31 & ~segmask);
        int j = l;
        bool in_range = true;
        switch (c.op) {
            case WarpOp::ShflIdx: j = min_lane | (b & ~segmask); break;
            case WarpOp::ShflUp:
                j = l - b;
                in_range = j >= min_lane;
                break;
            case WarpOp::ShflDown:
                j = l + b;
                in_range = j <= max_lane;
                break;
            default:
                j = l ^ b;
                in_range = j <= max_lane;
                break;
        }
        if (!in_range) j = l;
        // A source lane that did not take part (not in the mask, exited, or
        // beyond blockDim) yields an undefined value on the device: poison.
        if (!(c.arrived & (1u << j))) return kPoison;
        return c.vals[j];
    }
    uint32_t acc = 0;
    bool first = true;
    for (unsigned k = 0; k < 32; ++k) {
        if (!(c.arrived & (1u << k))) continue;
        const uint32_t v = static_cast<uint32_t>(c.vals[k]);
        switch (c.op) {
            case WarpOp::Ballot: acc |= (v != 0 ? 1u : 0u) << k; break;
            case WarpOp::Any: acc = acc || v != 0; break;
            case WarpOp::All: acc = (first || acc) && v != 0; break;
            case WarpOp::ReduceAddU: acc += v; break;
            case WarpOp::ReduceMinU: acc = first ? v : std::min(acc, v); break;
            case WarpOp::ReduceMaxU: acc = first ? v : std::max(acc, v); break;
            case WarpOp::ReduceMinS:
                acc = first ? v
                            : static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
                break;
            case WarpOp::ReduceMaxS:
                acc = first ? v
                            : static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
                break;
            case WarpOp::ReduceAnd: acc = first ? v : (acc & v); break;
            case WarpOp::ReduceOr: acc |= v; break;
            case WarpOp::ReduceXor: acc ^= v; break;
            default: break;
        }
        first = false;
    }
    return acc;
}

uint64_t Launch::warp_collective(WarpOp op, unsigned mask, uint64_t value, unsigned arg, int width, Site site) {
    const unsigned lane = t_tid & 31u;
    const unsigned bit = 1u << lane;
    Warp& w = warps_[t_tid >> 5];
    set_state(kAtWarp, static_cast<int>(op), mask, site);
    if (aborted()) throw Unwind{};
    if (!(mask & bit)) {
        throw KernelError(format("%s: %s (%s) with mask 0x%08x, which does not name the calling lane %u; each calling "
                                 "thread must have its own bit set in the mask",
                                 where().c_str(), op_name(op), site_str(site).c_str(), mask, lane));
    }
    if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
        throw KernelError(format("%s: %s (%s) with width %d; width must be a power of two from 1 to 32",
                                 where().c_str(), op_name(op), site_str(site).c_str(), width));
    }
    std::unique_lock<std::mutex> lk(w.m);
    if (aborted()) throw Unwind{};
    Collective* c = nullptr;
    for (Collective& s : w.slots) {
        if (!s.live || !s.gathering) continue;
        if (s.mask == mask) {
            c = &s;
            break;
        }
        if ((s.mask & bit) && (mask & s.arrived)) {
            throw KernelError(format("%s: %s (%s) with mask 0x%08x waits for lanes 0x%08x, which wait at %s (%s) with "
                                     "mask 0x%08x, which waits for this lane: the two collectives can never complete",
                                     where().c_str(), op_name(op), site_str(site).c_str(), mask, mask & s.arrived,
                                     op_name(s.op), site_str(s.site).c_str(), s.mask));
        }
    }
    if (c != nullptr) {
        const bool same_call = c->op == op && c->width == width && (op == WarpOp::SyncWarp || same_site(c->site, site));
        if (!same_call) {
            throw KernelError(format("%s: %s (%s, width %d) with mask 0x%08x, while lanes 0x%08x of the same mask wait "
                                     "at %s (%s, width %d); all lanes named in a mask must call the same collective",
                                     where().c_str(), op_name(op), site_str(site).c_str(), width, mask, c->arrived,
                                     op_name(c->op), site_str(c->site).c_str(), c->width));
        }
    } else {
        for (Collective& s : w.slots) {
            if (!s.live) {
                c = &s;
                break;
            }
        }
        if (c == nullptr) {
            throw KernelError(format("%s: internal simulator error: no free warp collective slot", where().c_str()));
        }
        c->live = true;
        c->gathering = true;
        c->op = op;
        c->mask = mask;
        c->width = width;
        c->site = site;
        c->arrived = 0;
        c->unread = 0;
    }
    c->vals[lane] = value;
    c->args[lane] = arg;
    c->arrived |= bit;
    bump();
    if (((mask & ~w.exited) & ~c->arrived) == 0) {
        complete(w, *c);
    } else {
        wait(lk, w.cv, [&] { return !c->gathering; },
             [&](long long ms) {
                 return format("%s: %s (%s) with mask 0x%08x timed out: no thread of the block arrived at any barrier "
                               "or collective for %lld ms; lanes 0x%08x of the mask never arrived. Threads: %s",
                               where().c_str(), op_name(op), site_str(site).c_str(), mask, ms,
                               mask & ~w.exited & ~c->arrived, thread_summary().c_str());
             });
    }
    if (op == WarpOp::Mma && !c->mma_ok) {
        throw KernelError(format("%s: %s (%s): lanes 0x%08x of the warp executed it; mma.sync needs all 32 lanes "
                                 "with the same operand type (a partial warp, lanes that returned or diverged, or "
                                 "mixed bf16/f16)",
                                 where().c_str(), op_name(op), site_str(site).c_str(), c->arrived));
    }
    const uint64_t r = result(*c, lane);
    c->unread &= ~bit;
    if (c->unread == 0) c->live = false;
    lk.unlock();
    set_running();
    return r;
}

// A thread returned from the kernel body.
void Launch::thread_exit() {
    me().state.store(kExited, std::memory_order_release);
    if (aborted()) return;
    const unsigned bit = 1u << (t_tid & 31u);
    Warp& w = warps_[t_tid >> 5];
    {
        std::lock_guard<std::mutex> lk(w.m);
        w.exited |= bit;
        // Collectives that were waiting only for this lane can complete now:
        // CUDA waits for the non-exited lanes of the mask.
        for (Collective& s : w.slots) {
            if (s.live && s.gathering && ((s.mask & ~w.exited) & ~s.arrived) == 0) complete(w, s);
        }
    }
    std::string err;
    {
        std::lock_guard<std::mutex> lk(bar_.m);
        ++bar_.exited;
        if (bar_.arrived > 0) {
            err = format("%s: returned from the kernel while %u thread(s) wait at %s (%s); every thread of a block "
                         "must reach every __syncthreads (on the device this is undefined behaviour, usually a hang). "
                         "Threads: %s",
                         where().c_str(), bar_.arrived, barrier_name(bar_.kind), site_str(bar_.site).c_str(),
                         thread_summary().c_str());
        }
    }
    bump();
    if (!err.empty()) throw KernelError(err);
}

struct WorkerArg {
    Launch* launch;
    unsigned tid;
};

void* worker_main(void* p) {
    const WorkerArg arg = *static_cast<const WorkerArg*>(p);
    Launch& L = *arg.launch;
    t_launch = &L;
    t_tid = arg.tid;
    const dim3 b = L.block();
    threadIdx = uint3{arg.tid % b.x, (arg.tid / b.x) % b.y, arg.tid / (b.x * b.y)};
    blockDim = b;
    gridDim = L.grid();
    uint64_t seen = 0;
    for (;;) {
        {
            std::unique_lock<std::mutex> lk(L.pm);
            L.start_cv.wait(lk, [&] { return L.start_gen != seen; });
            seen = L.start_gen;
            if (L.stop) break;
            blockIdx = L.cur_block;
        }
        L.me().state.store(kRunning, std::memory_order_release);
        try {
            L.run_body();
            L.thread_exit();
        } catch (abi::__forced_unwind&) {
            throw;
        } catch (const KernelError& e) {
            L.report(e.what());
        } catch (const Unwind&) {
        } catch (const std::exception& e) {
            L.report(format("%s: the kernel threw a C++ exception: %s", where().c_str(), e.what()));
        } catch (...) {
            L.report(format("%s: the kernel threw an unknown C++ exception", where().c_str()));
        }
        {
            std::lock_guard<std::mutex> lk(L.pm);
            if (++L.done == L.nthreads()) L.done_cv.notify_one();
        }
    }
    t_launch = nullptr;
    return nullptr;
}

void write_err(char* err, size_t errlen, const std::string& msg) {
    if (err == nullptr || errlen == 0) return;
    const size_t n = std::min(msg.size(), errlen - 1);
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
}

uint32_t effective_timeout(uint32_t requested) {
    if (requested != 0) return requested;
    if (const char* env = std::getenv("TLI_SIM_TIMEOUT_MS")) {
        char* end = nullptr;
        errno = 0;
        const unsigned long v = std::strtoul(env, &end, 10);
        if (errno == 0 && end != env && *end == '\0' && v > 0 && v <= UINT32_MAX) return static_cast<uint32_t>(v);
    }
    return kDefaultTimeoutMs;
}

std::string validate(const TliSimLaunch& c) {
    const uint32_t* g = c.grid;
    const uint32_t* b = c.block;
    if (b[0] == 0 || b[1] == 0 || b[2] == 0) {
        return format("blockDim (%u,%u,%u): every dimension must be at least 1", b[0], b[1], b[2]);
    }
    if (b[0] > 1024 || b[1] > 1024 || b[2] > 64) {
        return format("blockDim (%u,%u,%u) exceeds the per-dimension limits (1024, 1024, 64)", b[0], b[1], b[2]);
    }
    const uint64_t threads = uint64_t{b[0]} * b[1] * b[2];
    if (threads > TLI_SIM_MAX_BLOCK_THREADS) {
        return format("blockDim (%u,%u,%u) has %llu threads; a block has at most %u", b[0], b[1], b[2],
                      static_cast<unsigned long long>(threads), TLI_SIM_MAX_BLOCK_THREADS);
    }
    if (g[0] == 0 || g[1] == 0 || g[2] == 0) {
        return format("gridDim (%u,%u,%u): every dimension must be at least 1", g[0], g[1], g[2]);
    }
    if (g[0] > 0x7fffffffu || g[1] > 65535 || g[2] > 65535) {
        return format("gridDim (%u,%u,%u) exceeds the limits (2^31-1, 65535, 65535)", g[0], g[1], g[2]);
    }
    if (c.dynamic_smem > TLI_SIM_MAX_DYNAMIC_SMEM) {
        return format("%zu bytes of dynamic shared memory requested; the limit is %u bytes (227 KiB)", c.dynamic_smem,
                      TLI_SIM_MAX_DYNAMIC_SMEM);
    }
    return std::string();
}

// Serializes launches: see step 2 at the top of this file.
std::mutex& launch_lock() {
    static std::mutex m;
    return m;
}

Launch& current(const char* what) {
    if (t_launch == nullptr) {
        std::fprintf(stderr, "tli_sim: %s called outside a simulated kernel launch\n", what);
        std::abort();
    }
    return *t_launch;
}

}  // namespace

int block_barrier(int kind, int predicate, Site site) {
    return current("__syncthreads").block_barrier(kind, predicate, site);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, unsigned arg, int width, Site site) {
    return current(op_name(op)).warp_collective(op, mask, value, arg, width, site);
}

void kernel_trap(const char* what, Site site) {
    throw KernelError(format("%s: %s at %s", where().c_str(), what, site_str(site).c_str()));
}

bool is_shared_address(const void* p) { return t_launch != nullptr && t_launch->in_smem(p); }

int launch(const char* name, const TliSimLaunch* cfg, char* err, size_t errlen, std::function<void()> body) {
    const char* kname = name ? name : "?";
    if (cfg == nullptr) {
        write_err(err, errlen, format("%s: the launch configuration pointer is null", kname));
        return kBadConfig;
    }
    const TliSimLaunch c = *cfg;
    const std::string bad = validate(c);
    if (!bad.empty()) {
        write_err(err, errlen, format("%s: invalid launch: %s", kname, bad.c_str()));
        return kBadConfig;
    }
    try {
        std::lock_guard<std::mutex> serial(launch_lock());
        Launch L(kname, c, effective_timeout(c.timeout_ms), body);
        const unsigned n = L.nthreads();
        std::vector<WorkerArg> args(n);
        std::vector<pthread_t> threads;
        threads.reserve(n);

        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0) {
            write_err(err, errlen, format("%s: pthread_attr_init failed", kname));
            return kHostError;
        }
        long min_stack = sysconf(_SC_THREAD_STACK_MIN);
        const size_t stack = std::max(kWorkerStack, min_stack > 0 ? static_cast<size_t>(min_stack) : size_t{0});
        pthread_attr_setstacksize(&attr, stack);
        int create_err = 0;
        for (unsigned t = 0; t < n; ++t) {
            args[t] = WorkerArg{&L, t};
            pthread_t th;
            create_err = pthread_create(&th, &attr, worker_main, &args[t]);
            if (create_err != 0) break;
            threads.push_back(th);
        }
        pthread_attr_destroy(&attr);

        if (create_err == 0) {
            const dim3 g = L.grid();
            for (unsigned bz = 0; bz < g.z && !L.aborted(); ++bz) {
                for (unsigned by = 0; by < g.y && !L.aborted(); ++by) {
                    for (unsigned bx = 0; bx < g.x && !L.aborted(); ++bx) {
                        L.prepare_block();
                        {
                            std::lock_guard<std::mutex> lk(L.pm);
                            L.cur_block = uint3{bx, by, bz};
                            L.done = 0;
                            ++L.start_gen;
                        }
                        L.start_cv.notify_all();
                        std::unique_lock<std::mutex> lk(L.pm);
                        L.done_cv.wait(lk, [&] { return L.done == n; });
                    }
                }
            }
        }
        {
            std::lock_guard<std::mutex> lk(L.pm);
            L.stop = true;
            ++L.start_gen;
        }
        L.start_cv.notify_all();
        for (pthread_t th : threads) pthread_join(th, nullptr);

        if (create_err != 0) {
            write_err(err, errlen,
                      format("%s: could not create simulator thread %zu of %u: %s", kname, threads.size(), n,
                             std::strerror(create_err)));
            return kHostError;
        }
        const std::string e = L.error();
        if (!e.empty()) {
            write_err(err, errlen, e);
            return kKernelError;
        }
        return kOk;
    } catch (const std::exception& e) {
        write_err(err, errlen, format("%s: simulator failure: %s", kname, e.what()));
        return kHostError;
    } catch (...) {
        write_err(err, errlen, format("%s: simulator failure", kname));
        return kHostError;
    }
}

}  // namespace tli_sim

void* tli_sim_dynamic_shared() { return tli_sim::t_launch != nullptr ? tli_sim::t_launch->smem() : nullptr; }
