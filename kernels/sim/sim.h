// Host simulator of the CUDA execution model.
//
// `kernels/common/device.cuh` includes this header instead of the CUDA
// headers when the compiler is not nvcc. With it, a kernel source (`.cu`)
// compiles as ordinary C++17 with g++ or clang++, and `kernels/sim/runtime.cpp`
// runs it: one launch at a time (a process-wide lock), the blocks of a grid one
// after another, the threads of a block concurrently as OS threads. Each
// thread sees its own `threadIdx`; every barrier and warp collective below is
// a real rendezvous between those threads, with a timeout, so a missing lane
// or a missing `__syncthreads` shows up as an error instead of a hang.
//
// What is and is not modelled is written down in `kernels/sim/README.md`.
// In short: it proves indexing, tails, reductions and barrier discipline; it
// says nothing about speed, the memory model, bank conflicts or occupancy.
//
// Layout of this file:
//   1. qualifiers and built-in types (dim3, vector types)
//   2. built-in variables (threadIdx, ...), the runtime interface
//   3. block and warp synchronisation, warp shuffles, votes, reductions
//   4. atomics
//   5. bf16 / f16 storage types and their conversions
//   6. float intrinsics, integer intrinsics, min/max
//   7. cache-hinted loads and stores
//   8. matrix (tensor core) primitives: mma.sync m16n8k16 (bf16/f16 -> f32)
//   9. the launch API used by the per-op export files (TLI_SIM_EXPORT)
#pragma once

#if defined(__CUDACC__)
#error "kernels/sim/sim.h is the host simulator; nvcc must use the CUDA headers"
#endif

#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>

// ---------------------------------------------------------------------------
// 1. Qualifiers and built-in types
// ---------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// `__restrict__` is a keyword of g++ and clang++ already; nothing to define.

// `__shared__` variables are function (or namespace) statics: one copy per
// process, shared by all threads of the running block. That is per-block
// storage only because the runtime runs one block at a time and holds a
// process-wide lock for the whole of every launch (see runtime.cpp), so no two
// blocks, of this launch or any other, ever use the storage at once.
// Consequences documented in the README: static shared memory is zero at
// process start and keeps its contents from one block to the next (it is not
// poisoned; only dynamic shared memory is), and a `__shared__` variable must
// not have an initializer (CUDA forbids that too).
#define __shared__ static
// `__constant__` data is ordinary read-only data on the host.
#define __constant__

// CUDA's built-in vector types, with the alignment CUDA gives them (a uint4
// is 16-byte aligned, which is what makes it a single 16-byte access).
#define TLI_SIM_VEC2(name, T, align) \
    struct __align__(align) name {   \
        T x, y;                      \
    };
#define TLI_SIM_VEC3(name, T) \
    struct name {             \
        T x, y, z;            \
    };
#define TLI_SIM_VEC4(name, T, align) \
    struct __align__(align) name {   \
        T x, y, z, w;                \
    };
TLI_SIM_VEC2(char2, signed char, 2)
TLI_SIM_VEC2(uchar2, unsigned char, 2)
TLI_SIM_VEC4(char4, signed char, 4)
TLI_SIM_VEC4(uchar4, unsigned char, 4)
TLI_SIM_VEC2(short2, short, 4)
TLI_SIM_VEC2(ushort2, unsigned short, 4)
TLI_SIM_VEC4(short4, short, 8)
TLI_SIM_VEC4(ushort4, unsigned short, 8)
TLI_SIM_VEC2(int2, int, 8)
TLI_SIM_VEC2(uint2, unsigned int, 8)
TLI_SIM_VEC3(int3, int)
TLI_SIM_VEC3(uint3, unsigned int)
TLI_SIM_VEC4(int4, int, 16)
TLI_SIM_VEC4(uint4, unsigned int, 16)
TLI_SIM_VEC2(float2, float, 8)
TLI_SIM_VEC3(float3, float)
TLI_SIM_VEC4(float4, float, 16)
TLI_SIM_VEC2(longlong2, long long, 16)
TLI_SIM_VEC2(ulonglong2, unsigned long long, 16)
TLI_SIM_VEC2(double2, double, 16)
#undef TLI_SIM_VEC2
#undef TLI_SIM_VEC3
#undef TLI_SIM_VEC4

#define TLI_SIM_MAKE2(name, T) \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define TLI_SIM_MAKE3(name, T) \
    inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define TLI_SIM_MAKE4(name, T) \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
TLI_SIM_MAKE2(char2, signed char)
TLI_SIM_MAKE2(uchar2, unsigned char)
TLI_SIM_MAKE4(char4, signed char)
TLI_SIM_MAKE4(uchar4, unsigned char)
TLI_SIM_MAKE2(short2, short)
TLI_SIM_MAKE2(ushort2, unsigned short)
TLI_SIM_MAKE4(short4, short)
TLI_SIM_MAKE4(ushort4, unsigned short)
TLI_SIM_MAKE2(int2, int)
TLI_SIM_MAKE2(uint2, unsigned int)
TLI_SIM_MAKE3(int3, int)
TLI_SIM_MAKE3(uint3, unsigned int)
TLI_SIM_MAKE4(int4, int)
TLI_SIM_MAKE4(uint4, unsigned int)
TLI_SIM_MAKE2(float2, float)
TLI_SIM_MAKE3(float3, float)
TLI_SIM_MAKE4(float4, float)
TLI_SIM_MAKE2(longlong2, long long)
TLI_SIM_MAKE2(ulonglong2, unsigned long long)
TLI_SIM_MAKE2(double2, double)
#undef TLI_SIM_MAKE2
#undef TLI_SIM_MAKE3
#undef TLI_SIM_MAKE4

static_assert(alignof(uint4) == 16 && sizeof(uint4) == 16, "uint4 must be one 16-byte access");
static_assert(alignof(float4) == 16 && alignof(int4) == 16, "4-vectors of 32-bit types are 16-byte aligned");
static_assert(alignof(uint2) == 8 && alignof(float2) == 8, "2-vectors of 32-bit types are 8-byte aligned");
static_assert(sizeof(uint3) == 12 && alignof(uint3) == 4, "3-vectors have no extra alignment");

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------------------
// 2. Built-in variables and the runtime interface
// ---------------------------------------------------------------------------

// Set by the runtime for each simulated thread (runtime.cpp defines them).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// The launch's dynamic shared memory (`TliSimLaunch::dynamic_smem` bytes),
// 128-byte aligned and filled with TLI_SIM_POISON_BYTE before every block, so
// a kernel that reads it before writing it reads garbage and fails its test.
// Kernels reach it through TLI_DYNAMIC_SHARED (kernels/common/device.cuh).
void* tli_sim_dynamic_shared();
#define TLI_SIM_POISON_BYTE 0xFF

namespace tli_sim {

// A source location, captured at the call site of a synchronisation
// primitive so that error messages can say which barrier each thread is at.
struct Site {
    const char* file;
    unsigned line;
};

// Every warp-level collective the runtime implements.
enum class WarpOp : int {
    ShflIdx,
    ShflUp,
    ShflDown,
    ShflXor,
    Ballot,
    Any,
    All,
    SyncWarp,
    ReduceAddU,
    ReduceMinU,
    ReduceMaxU,
    ReduceMinS,
    ReduceMaxS,
    ReduceAnd,
    ReduceOr,
    ReduceXor,
    // One warp-wide mma.sync.m16n8k16 (section 8): `value` points at the
    // lane's MmaLane, `arg` is the MmaType.
    Mma,
};

// The block barrier. `kind` 0 is __syncthreads, 1 _count, 2 _and, 3 _or;
// returns the count of threads with a non-zero predicate.
int block_barrier(int kind, int predicate, Site site);

// One warp collective: every non-exited lane named in `mask` must call it
// (from the same call site, with the same op, width and mask) before any
// returns. For shuffles `value` holds the caller's bits and `arg` the source
// lane / delta / lane mask; the result is the source lane's bits, or all ones
// (poison) when the source lane did not take part (not in the mask, exited,
// or beyond blockDim). For votes and reductions the result is the combined
// value over the lanes that took part.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, unsigned arg, int width, Site site);

// Abort the launch with a message (used by __trap).
[[noreturn]] void kernel_trap(const char* what, Site site);

// Whether `p` points into this launch's dynamic shared memory (atomics on
// shared and global memory round differently, see atomicAdd(float*)).
bool is_shared_address(const void* p);

template <typename To, typename From>
inline To bit_cast(const From& v) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
    static_assert(std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
                  "bit_cast needs trivially copyable types");
    To out;
    std::memcpy(static_cast<void*>(&out), static_cast<const void*>(&v), sizeof(To));
    return out;
}

template <typename T>
inline uint64_t to_bits64(const T& v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move at most 8 bytes of a trivially copyable type");
    uint64_t u = 0;
    std::memcpy(&u, static_cast<const void*>(&v), sizeof(T));
    return u;
}

template <typename T>
inline T from_bits64(uint64_t u) {
    T v;
    std::memcpy(static_cast<void*>(&v), &u, sizeof(T));
    return v;
}

}  // namespace tli_sim

// ---------------------------------------------------------------------------
// 3. Synchronisation, shuffles, votes, warp reductions
// ---------------------------------------------------------------------------
//
// The trailing `file`/`line` parameters default to the caller's location
// (__builtin_FILE/__builtin_LINE are evaluated at the call site); kernels
// never pass them.

#define TLI_SIM_SITE_PARAMS const char *tli_file = __builtin_FILE(), unsigned tli_line = __builtin_LINE()
#define TLI_SIM_SITE (tli_sim::Site{tli_file, tli_line})

inline void __syncthreads(TLI_SIM_SITE_PARAMS) { tli_sim::block_barrier(0, 0, TLI_SIM_SITE); }
inline int __syncthreads_count(int predicate, TLI_SIM_SITE_PARAMS) {
    return tli_sim::block_barrier(1, predicate, TLI_SIM_SITE);
}
inline int __syncthreads_and(int predicate, TLI_SIM_SITE_PARAMS) {
    return tli_sim::block_barrier(2, predicate, TLI_SIM_SITE) == static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int predicate, TLI_SIM_SITE_PARAMS) {
    return tli_sim::block_barrier(3, predicate, TLI_SIM_SITE) != 0;
}

inline void __syncwarp(unsigned mask = 0xffffffffu, TLI_SIM_SITE_PARAMS) {
    tli_sim::warp_collective(tli_sim::WarpOp::SyncWarp, mask, 0, 0, warpSize, TLI_SIM_SITE);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, TLI_SIM_SITE_PARAMS) {
    return tli_sim::from_bits64<T>(tli_sim::warp_collective(tli_sim::WarpOp::ShflIdx, mask, tli_sim::to_bits64(var),
                                                            static_cast<unsigned>(srcLane), width, TLI_SIM_SITE));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, TLI_SIM_SITE_PARAMS) {
    return tli_sim::from_bits64<T>(
        tli_sim::warp_collective(tli_sim::WarpOp::ShflUp, mask, tli_sim::to_bits64(var), delta, width, TLI_SIM_SITE));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, TLI_SIM_SITE_PARAMS) {
    return tli_sim::from_bits64<T>(tli_sim::warp_collective(tli_sim::WarpOp::ShflDown, mask, tli_sim::to_bits64(var),
                                                            delta, width, TLI_SIM_SITE));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, TLI_SIM_SITE_PARAMS) {
    return tli_sim::from_bits64<T>(tli_sim::warp_collective(tli_sim::WarpOp::ShflXor, mask, tli_sim::to_bits64(var),
                                                            static_cast<unsigned>(laneMask), width, TLI_SIM_SITE));
}

inline unsigned __ballot_sync(unsigned mask, int predicate, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::Ballot, mask, predicate != 0, 0, warpSize, TLI_SIM_SITE));
}
inline int __any_sync(unsigned mask, int predicate, TLI_SIM_SITE_PARAMS) {
    return static_cast<int>(
        tli_sim::warp_collective(tli_sim::WarpOp::Any, mask, predicate != 0, 0, warpSize, TLI_SIM_SITE));
}
inline int __all_sync(unsigned mask, int predicate, TLI_SIM_SITE_PARAMS) {
    return static_cast<int>(
        tli_sim::warp_collective(tli_sim::WarpOp::All, mask, predicate != 0, 0, warpSize, TLI_SIM_SITE));
}

// sm_80 warp reductions.
inline unsigned __reduce_add_sync(unsigned mask, unsigned value, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::ReduceAddU, mask, value, 0, warpSize, TLI_SIM_SITE));
}
inline int __reduce_add_sync(unsigned mask, int value, TLI_SIM_SITE_PARAMS) {
    return static_cast<int>(tli_sim::warp_collective(tli_sim::WarpOp::ReduceAddU, mask, static_cast<unsigned>(value), 0,
                                                     warpSize, TLI_SIM_SITE));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::ReduceMinU, mask, value, 0, warpSize, TLI_SIM_SITE));
}
inline int __reduce_min_sync(unsigned mask, int value, TLI_SIM_SITE_PARAMS) {
    return static_cast<int>(tli_sim::warp_collective(tli_sim::WarpOp::ReduceMinS, mask, static_cast<unsigned>(value), 0,
                                                     warpSize, TLI_SIM_SITE));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned value, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::ReduceMaxU, mask, value, 0, warpSize, TLI_SIM_SITE));
}
inline int __reduce_max_sync(unsigned mask, int value, TLI_SIM_SITE_PARAMS) {
    return static_cast<int>(tli_sim::warp_collective(tli_sim::WarpOp::ReduceMaxS, mask, static_cast<unsigned>(value), 0,
                                                     warpSize, TLI_SIM_SITE));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned value, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::ReduceAnd, mask, value, 0, warpSize, TLI_SIM_SITE));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::ReduceOr, mask, value, 0, warpSize, TLI_SIM_SITE));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned value, TLI_SIM_SITE_PARAMS) {
    return static_cast<unsigned>(
        tli_sim::warp_collective(tli_sim::WarpOp::ReduceXor, mask, value, 0, warpSize, TLI_SIM_SITE));
}

// Memory fences. The simulator's threads are host threads: a sequentially
// consistent fence is at least as strong as any CUDA fence.
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// A device-side abort: the launch fails with this location in the message.
[[noreturn]] inline void __trap(TLI_SIM_SITE_PARAMS) { tli_sim::kernel_trap("__trap()", TLI_SIM_SITE); }

// ---------------------------------------------------------------------------
// 4. Atomics
// ---------------------------------------------------------------------------
//
// Real read-modify-write operations on the host (the GCC/Clang __atomic
// builtins, i.e. what std::atomic_ref compiles to; std::atomic_ref itself is
// C++20). CUDA's plain atomics are relaxed; so are these. Threads of a block
// run concurrently, so these are genuinely contended.

namespace tli_sim {
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, f(old), true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
// Flush a subnormal f32 to a zero of the same sign.
inline float flush_subnormal(float v) {
    const uint32_t u = bit_cast<uint32_t>(v);
    return (u & 0x7f800000u) == 0 ? bit_cast<float>(u & 0x80000000u) : v;
}
}  // namespace tli_sim

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
// f32 atomic add. PTX: "atom.add.f32 rounds to nearest even and flushes
// subnormal inputs and results to sign-preserving zero" -- observed for
// global memory; the shared-memory version keeps subnormals. The simulator
// can tell the two apart only for dynamic shared memory (static `__shared__`
// variables are ordinary statics), so an f32 atomicAdd on a static shared
// variable flushes as if it were global.
inline float atomicAdd(float* p, float v) {
    uint32_t* w = reinterpret_cast<uint32_t*>(p);
    const bool ftz = !tli_sim::is_shared_address(p);
    const uint32_t old = tli_sim::atomic_update(w, [&](uint32_t o) {
        float a = tli_sim::bit_cast<float>(o);
        float b = v;
        if (ftz) {
            a = tli_sim::flush_subnormal(a);
            b = tli_sim::flush_subnormal(b);
        }
        float r = a + b;
        if (ftz) r = tli_sim::flush_subnormal(r);
        return tli_sim::bit_cast<uint32_t>(r);
    });
    return tli_sim::bit_cast<float>(old);
}
inline double atomicAdd(double* p, double v) {
    uint64_t* w = reinterpret_cast<uint64_t*>(p);
    const uint64_t old = tli_sim::atomic_update(
        w, [&](uint64_t o) { return tli_sim::bit_cast<uint64_t>(tli_sim::bit_cast<double>(o) + v); });
    return tli_sim::bit_cast<double>(old);
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }

#define TLI_SIM_ATOMIC_MINMAX(T)                                                               \
    inline T atomicMax(T* p, T v) {                                                            \
        return tli_sim::atomic_update(p, [&](T o) { return o < v ? v : o; });                  \
    }                                                                                          \
    inline T atomicMin(T* p, T v) {                                                            \
        return tli_sim::atomic_update(p, [&](T o) { return v < o ? v : o; });                  \
    }
TLI_SIM_ATOMIC_MINMAX(int)
TLI_SIM_ATOMIC_MINMAX(unsigned)
TLI_SIM_ATOMIC_MINMAX(long long)
TLI_SIM_ATOMIC_MINMAX(unsigned long long)
#undef TLI_SIM_ATOMIC_MINMAX

#define TLI_SIM_ATOMIC_BITS(T)                                                                            \
    inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                  \
    inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                    \
    inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                  \
    inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                \
    inline T atomicCAS(T* p, T compare, T v) {                                                            \
        __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);           \
        return compare;                                                                                   \
    }
TLI_SIM_ATOMIC_BITS(int)
TLI_SIM_ATOMIC_BITS(unsigned)
TLI_SIM_ATOMIC_BITS(unsigned long long)
#undef TLI_SIM_ATOMIC_BITS

inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
inline float atomicExch(float* p, float v) {
    return tli_sim::bit_cast<float>(
        __atomic_exchange_n(reinterpret_cast<uint32_t*>(p), tli_sim::bit_cast<uint32_t>(v), __ATOMIC_RELAXED));
}
// ((old >= limit) ? 0 : old + 1) and (((old == 0) || (old > limit)) ? limit : old - 1).
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    return tli_sim::atomic_update(p, [&](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
    return tli_sim::atomic_update(p, [&](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}

// ---------------------------------------------------------------------------
// 5. bf16 and f16
// ---------------------------------------------------------------------------
//
// 16-bit storage structs with CUDA's names, sizes and alignment. Conversions
// from f32 round to nearest even like the device (`cvt.rn.bf16.f32`,
// `cvt.rn.f16.f32`): subnormals are produced, overflow gives infinity, and
// every NaN becomes the canonical NaN 0x7FFF (as CUDA's cuda_bf16.hpp /
// cuda_fp16.hpp host paths do). Widening bf16 -> f32 is a shift (NaN payload
// kept); f16 -> f32 is exact and turns a NaN into the canonical f32 NaN
// 0x7FFFFFFF (cuda_fp16.hpp's host path). Arithmetic operators between two
// bf16 or two f16 values are deleted: the kernels compute in f32, and a
// silently float-promoted `a * b` would not round like the device's bf16/f16
// instructions.

namespace tli_sim {

inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t x = bit_cast<uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    // Round to nearest even on the 16 bits that are dropped: add just under
    // half an ulp, plus one when the kept part is odd. A carry walks into the
    // exponent (and to infinity) exactly when the rounded value needs it.
    const uint32_t lsb = (x >> 16) & 1u;
    return static_cast<uint16_t>((x + 0x7fffu + lsb) >> 16);
}

inline float bf16_bits_to_f32(uint16_t h) { return bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_f16_bits(float f) {
    const uint32_t x = bit_cast<uint32_t>(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return 0x7fffu;  // NaN
    // 65520 = 0x477ff000 is halfway between the largest f16 (65504, odd
    // significand) and 2^16: it and everything above round to infinity.
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
    if (a >= 0x38800000u) {
        // Normal f16 (|f| >= 2^-14): rebias the exponent (127 -> 15) and
        // round the 23-bit significand to 10 bits; a carry into the exponent
        // is the correct result.
        const uint32_t m = a - 0x38000000u;
        const uint32_t lsb = (m >> 13) & 1u;
        return static_cast<uint16_t>(sign | ((m + 0xfffu + lsb) >> 13));
    }
    // Subnormal f16: the result is |f| / 2^-24 rounded to an integer (1024,
    // reached by rounding up, is the encoding of the smallest normal).
    // |f| <= 2^-25 rounds to zero (2^-25 itself is a tie, and 0 is even).
    if (a <= 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t e = a >> 23;                           // 102 ..= 112
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;    // |f| = mant * 2^(e - 150)
    const uint32_t shift = 126u - e;                      // |f| / 2^-24 = mant >> shift
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0x1fu) return bit_cast<float>(m != 0 ? 0x7fffffffu : (sign | 0x7f800000u));
    if (e != 0) return bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
    // Zero or subnormal: m * 2^-24, exact in f32.
    const float mag = static_cast<float>(m) * 0x1p-24f;
    return sign ? -mag : mag;
}

}  // namespace tli_sim

struct __align__(2) __nv_bfloat16_raw {
    unsigned short x;
};
struct __align__(2) __half_raw {
    unsigned short x;
};

struct __align__(2) __nv_bfloat16 {
   private:
    unsigned short bits_;

   public:
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : bits_(tli_sim::f32_to_bf16_bits(f)) {}
    // A double would be rounded twice (to f32, then to bf16): convert
    // explicitly to float in the kernel instead.
    __nv_bfloat16(double) = delete;
    __nv_bfloat16(__nv_bfloat16_raw r) : bits_(r.x) {}
    operator float() const { return tli_sim::bf16_bits_to_f32(bits_); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{bits_}; }
};

struct __align__(2) __half {
   private:
    unsigned short bits_;

   public:
    __half() = default;
    __half(float f) : bits_(tli_sim::f32_to_f16_bits(f)) {}
    __half(double) = delete;
    __half(__half_raw r) : bits_(r.x) {}
    operator float() const { return tli_sim::f16_bits_to_f32(bits_); }
    operator __half_raw() const { return __half_raw{bits_}; }
};

static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "bf16 is 2 bytes");
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "f16 is 2 bytes");
static_assert(std::is_trivially_copyable<__nv_bfloat16>::value && std::is_trivially_copyable<__half>::value,
              "16-bit float types must be trivially copyable");

#define TLI_SIM_DELETE_ARITH(T)                   \
    T operator+(T, T) = delete;                   \
    T operator-(T, T) = delete;                   \
    T operator*(T, T) = delete;                   \
    T operator/(T, T) = delete;                   \
    T& operator+=(T&, T) = delete;                \
    T& operator-=(T&, T) = delete;                \
    T& operator*=(T&, T) = delete;                \
    T& operator/=(T&, T) = delete;
TLI_SIM_DELETE_ARITH(__nv_bfloat16)
TLI_SIM_DELETE_ARITH(__half)
#undef TLI_SIM_DELETE_ARITH

struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct __align__(4) __half2 {
    __half x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;
typedef __half half;
typedef __half2 half2;

inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return tli_sim::bit_cast<unsigned short>(h); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return tli_sim::bit_cast<__nv_bfloat16>(u); }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return tli_sim::bit_cast<short>(h); }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return tli_sim::bit_cast<__nv_bfloat16>(s); }

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline unsigned short __half_as_ushort(__half h) { return tli_sim::bit_cast<unsigned short>(h); }
inline __half __ushort_as_half(unsigned short u) { return tli_sim::bit_cast<__half>(u); }
inline short __half_as_short(__half h) { return tli_sim::bit_cast<short>(h); }
inline __half __short_as_half(short s) { return tli_sim::bit_cast<__half>(s); }

// Pairs: `.x` is the low 16 bits (the lower address), `.y` the high.
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __nv_bfloat162 __float2bfloat162_rn(float v) { return __floats2bfloat162_rn(v, v); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162{lo, hi}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }

inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __half2 __float2half2_rn(float v) { return __floats2half2_rn(v, v); }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }

// ---------------------------------------------------------------------------
// 6. Float and integer intrinsics, min/max
// ---------------------------------------------------------------------------
//
// `_rn` operations are single IEEE operations rounded to nearest even; the
// host computes them the same way provided it does not contract `a * b + c`
// into an FMA (build.rs passes -ffp-contract=off). `__fmaf_rn` is a fused
// multiply-add on both. Approximate device functions (`__fdividef`, `rsqrtf`)
// are computed exactly here: the device may differ in the last bits.

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __saturatef(float a) { return a >= 1.0f ? 1.0f : (a > 0.0f ? a : 0.0f); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// `fmaf` itself comes from <cmath> (the C library's fused multiply-add).

inline unsigned __float_as_uint(float f) { return tli_sim::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return tli_sim::bit_cast<float>(u); }
inline int __float_as_int(float f) { return tli_sim::bit_cast<int>(f); }
inline float __int_as_float(int i) { return tli_sim::bit_cast<float>(i); }
inline long long __double_as_longlong(double d) { return tli_sim::bit_cast<long long>(d); }
inline double __longlong_as_double(long long i) { return tli_sim::bit_cast<double>(i); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// CUDA's min/max overloads (crt/math_functions.hpp): integer ones compare in
// the common type (mixed signed/unsigned compares unsigned), float ones are
// fminf/fmaxf (a NaN operand yields the other operand).
#define TLI_SIM_MINMAX(R, A, B)                              \
    inline R min(A a, B b) {                                 \
        return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
    }                                                        \
    inline R max(A a, B b) {                                 \
        return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
    }
TLI_SIM_MINMAX(int, int, int)
TLI_SIM_MINMAX(unsigned, unsigned, unsigned)
TLI_SIM_MINMAX(unsigned, int, unsigned)
TLI_SIM_MINMAX(unsigned, unsigned, int)
TLI_SIM_MINMAX(long, long, long)
TLI_SIM_MINMAX(unsigned long, unsigned long, unsigned long)
TLI_SIM_MINMAX(unsigned long, long, unsigned long)
TLI_SIM_MINMAX(unsigned long, unsigned long, long)
TLI_SIM_MINMAX(long long, long long, long long)
TLI_SIM_MINMAX(unsigned long long, unsigned long long, unsigned long long)
TLI_SIM_MINMAX(unsigned long long, long long, unsigned long long)
TLI_SIM_MINMAX(unsigned long long, unsigned long long, long long)
#undef TLI_SIM_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

// ---------------------------------------------------------------------------
// 7. Cache-hinted loads and stores: plain accesses on the host
// ---------------------------------------------------------------------------

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline T __ldcv(const T* p) { return *p; }
template <typename T>
inline void __stwb(T* p, T v) { *p = v; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------
// 8. Matrix (tensor core) primitives
// ---------------------------------------------------------------------------
//
// `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`, with
// the per-lane fragment layout of the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type"), groupID = lane >> 2 and
// tig = lane % 4 (threadID_in_group):
//
//   A (16x16, row-major), four .b32 registers of two 16-bit elements each
//   (element 2j in the low half, 2j+1 in the high half):
//     a[0] = A[g    ][2t, 2t+1]      a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, 2t+9]    a[3] = A[g + 8][2t+8, 2t+9]
//   B (16x8, K x N, "col"), two .b32 registers:
//     b[0] = B[2t, 2t+1  ][g]        b[1] = B[2t+8, 2t+9][g]
//   C, D (16x8 f32), four registers:
//     c[0], c[1] = C[g][2t], C[g][2t+1]    c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//
// Kernels call it through `tli_mma_m16n8k16_*` (kernels/common/mma.cuh).
// Here it is one warp collective: every lane deposits a pointer to its
// registers, and when all 32 lanes have arrived the runtime gathers A, B and
// C from the 32 fragments, computes D and scatters each lane's four values
// back (runtime.cpp, `run_mma`). A lane that has exited, a partial warp, or
// lanes at different collectives make the launch fail, as `mma.sync`
// requires all 32 threads to execute the same instruction.
//
// Arithmetic: each product of two bf16 (or two f16) values is exact in f32
// (8x8 or 11x11 significant bits); the sum is emulated as
// D = (((C + p0) + p1) + ... + p15), k ascending, each addition an f32
// round-to-nearest-even. The hardware's internal order, width and rounding
// of this sum are not specified by PTX (Ampere and Hopper are reported to
// add with truncation at a slightly wider width), so results may differ from
// the device in the last bits of the f32 accumulator: tests bound the error
// of an accumulation over K terms by K * 2^-23 * sum |a*b| (2^-23 = twice the
// f32 unit roundoff, covering truncation as well as rounding), never by bit
// equality with the device.
namespace tli_sim {
enum class MmaType : unsigned { BF16 = 0, F16 = 1 };
// One lane's operands; `d` may alias `c` (the runtime reads every lane's A,
// B and C before it writes any D).
struct MmaLane {
    const uint32_t* a;  // 4 registers
    const uint32_t* b;  // 2 registers
    const float* c;     // 4 accumulators
    float* d;           // 4 results
};
}  // namespace tli_sim

inline void tli_sim_mma_m16n8k16(tli_sim::MmaType type, float* d, const uint32_t* a, const uint32_t* b,
                                 const float* c, TLI_SIM_SITE_PARAMS) {
    tli_sim::MmaLane lane{a, b, c, d};
    tli_sim::warp_collective(tli_sim::WarpOp::Mma, 0xffffffffu,
                             static_cast<uint64_t>(reinterpret_cast<uintptr_t>(&lane)),
                             static_cast<unsigned>(type), warpSize, TLI_SIM_SITE);
}

// ---------------------------------------------------------------------------
// 9. Launch API for the export files (kernels/sim/OP.cpp)
// ---------------------------------------------------------------------------

extern "C" {
// One launch's configuration; the same layout as `TliSimLaunch` in
// src/backend/sim.rs.
struct TliSimLaunch {
    uint32_t grid[3];      // gridDim: every component >= 1
    uint32_t block[3];     // blockDim: every component >= 1, product <= 1024
    size_t dynamic_smem;   // bytes of dynamic shared memory (<= TLI_SIM_MAX_DYNAMIC_SMEM)
    uint32_t timeout_ms;   // deadlock timeout; 0 = $TLI_SIM_TIMEOUT_MS or 10 s
};
}

// The largest dynamic shared memory a launch may ask for: 227 KiB, the
// per-block opt-in maximum of sm_90 (sm_80: 163 KiB).
#define TLI_SIM_MAX_DYNAMIC_SMEM (227u * 1024u)
#define TLI_SIM_MAX_BLOCK_THREADS 1024u

namespace tli_sim {

// Return codes of `launch` and of every exported `tli_sim_*` function.
enum : int {
    kOk = 0,
    kBadConfig = 1,    // the launch configuration is invalid; nothing ran
    kKernelError = 2,  // a thread failed (barrier misuse, timeout, __trap, exception)
    kHostError = 3,    // the simulator could not run (e.g. thread creation failed)
};

// Run `body` (one call of the kernel with its arguments) on every thread of
// every block of the grid in `cfg`. Returns kOk, or an error code with a
// NUL-terminated message in `err` (truncated to `errlen` bytes).
int launch(const char* name, const TliSimLaunch* cfg, char* err, size_t errlen, std::function<void()> body);

}  // namespace tli_sim

#define TLI_SIM_STRIP_PARENS(...) __VA_ARGS__

// TLI_SIM_EXPORT(kernel, (typed params...), (args...)) defines
//   extern "C" int tli_sim_<kernel>(const TliSimLaunch*, char* err, size_t errlen, params...)
// which launches `kernel(args...)` under the simulator. The kernel must take
// at least one parameter.
#define TLI_SIM_EXPORT(kernel, params, args)                                                          \
    extern "C" int tli_sim_##kernel(const TliSimLaunch* tli_cfg, char* tli_err, size_t tli_errlen,    \
                                    TLI_SIM_STRIP_PARENS params) {                                    \
        return tli_sim::launch(#kernel, tli_cfg, tli_err, tli_errlen, [=]() { kernel args; });        \
    }
