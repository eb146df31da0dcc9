// Self-test kernels for the simulator, written as ordinary CUDA.
//
// Each kernel exercises one part of the execution model that sim.h and
// runtime.cpp implement; tests/sim.rs launches them (through the exports in
// selftest.cpp) and checks the results against expectations computed
// independently in Rust. Some kernels are wrong on purpose (a skipped
// barrier, a deadlock) and must make the launch fail, quickly.
//
// Conventions: 1-D output indexed by the global linear thread id
//   gid = linear(blockIdx) * threads_per_block + linear(threadIdx)
// unless a kernel says otherwise. Lane and warp are computed from the linear
// thread index within the block, as on the device.
#pragma once

#include "../common/device.cuh"
#include "../common/mma.cuh"

namespace tli_selftest {

TLI_DEVICE unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }
TLI_DEVICE unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
TLI_DEVICE unsigned linear_bid() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }
TLI_DEVICE unsigned long long global_tid() {
    return static_cast<unsigned long long>(linear_bid()) * block_threads() + linear_tid();
}

}  // namespace tli_selftest

// Every thread writes its coordinates: out[gid * 10 + k] for
// k = threadIdx.xyz, blockIdx.xyz, blockDim product, gridDim product,
// lane (linear tid % 32), warpSize.
extern "C" __global__ void tli_selftest_index(uint32_t* out) {
    using namespace tli_selftest;
    uint32_t* o = out + global_tid() * 10;
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
    o[6] = blockDim.x * blockDim.y * blockDim.z;
    o[7] = gridDim.x * gridDim.y * gridDim.z;
    o[8] = linear_tid() % 32;
    o[9] = warpSize;
}

// Block sum through static shared memory and a __syncthreads tree
// (blockDim.x need not be a power of two), plus __syncthreads_count/_and/_or
// of (value != 0). 1-D blocks of at most 1024 threads.
//   sums[b]  = sum of in[b * blockDim.x + t] over the block (0 past n)
//   votes[3b + 0..2] = count, and, or of (value != 0)
extern "C" __global__ void tli_selftest_block_sum(const int* in, int n, long long* sums, int* votes) {
    __shared__ long long buf[1024];
    const unsigned t = threadIdx.x;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + t;
    const int v = i < n ? in[i] : 0;
    buf[t] = v;
    const int count = __syncthreads_count(v != 0);
    const int all = __syncthreads_and(v != 0);
    const int any = __syncthreads_or(v != 0);
    unsigned span = 1;
    while (span < blockDim.x) span <<= 1;
    for (unsigned s = span / 2; s > 0; s >>= 1) {
        if (t < s && t + s < blockDim.x) buf[t] += buf[t + s];
        __syncthreads();
    }
    if (t == 0) {
        sums[blockIdx.x] = buf[0];
        votes[3 * blockIdx.x + 0] = count;
        votes[3 * blockIdx.x + 1] = all;
        votes[3 * blockIdx.x + 2] = any;
    }
}

// Every shuffle, once per thread, over the lanes that exist
// (mask = __ballot_sync(0xffffffff, 1): a partial last warp has fewer).
//   out[gid * 6 + 0] = __shfl_sync(mask, v, src_lane, width)
//   out[gid * 6 + 1] = __shfl_up_sync(mask, v, delta, width)
//   out[gid * 6 + 2] = __shfl_down_sync(mask, v, delta, width)
//   out[gid * 6 + 3] = __shfl_xor_sync(mask, v, lane_mask, width)
//   out[gid * 6 + 4] = __shfl_sync(mask, v, (lane * 7 + src_lane) & 31, width)   (per-lane source)
//   out[gid * 6 + 5] = mask
extern "C" __global__ void tli_selftest_shuffle(const uint32_t* in, uint32_t* out, int src_lane, int delta,
                                                int lane_mask, int width) {
    using namespace tli_selftest;
    const unsigned long long g = global_tid();
    const unsigned lane = linear_tid() % 32;
    const uint32_t v = in[g];
    const unsigned mask = __ballot_sync(0xffffffffu, 1);
    uint32_t* o = out + g * 6;
    o[0] = __shfl_sync(mask, v, src_lane, width);
    o[1] = __shfl_up_sync(mask, v, static_cast<unsigned>(delta), width);
    o[2] = __shfl_down_sync(mask, v, static_cast<unsigned>(delta), width);
    o[3] = __shfl_xor_sync(mask, v, lane_mask, width);
    o[4] = __shfl_sync(mask, v, static_cast<int>((lane * 7 + static_cast<unsigned>(src_lane)) & 31u), width);
    o[5] = mask;
}

// Shuffles of 8-byte and float values, full warps only:
//   out64[gid] = __shfl_xor_sync(full, in64[gid], 1)
//   outf[gid]  = __shfl_down_sync(full, inf[gid], 1)
extern "C" __global__ void tli_selftest_shuffle_wide(const unsigned long long* in64, unsigned long long* out64,
                                                     const float* inf, float* outf) {
    using namespace tli_selftest;
    const unsigned long long g = global_tid();
    out64[g] = __shfl_xor_sync(0xffffffffu, in64[g], 1);
    outf[g] = __shfl_down_sync(0xffffffffu, inf[g], 1u);
}

// Votes and warp reductions over the lanes that exist:
//   out[gid * 7 + k] for k = ballot(p), any(p), all(p), reduce_add(u),
//   reduce_min(int), reduce_max(int), reduce_xor(u), with p = (v != 0).
extern "C" __global__ void tli_selftest_vote(const int* in, uint32_t* out) {
    using namespace tli_selftest;
    const unsigned long long g = global_tid();
    const int v = in[g];
    const unsigned mask = __ballot_sync(0xffffffffu, 1);
    uint32_t* o = out + g * 7;
    o[0] = __ballot_sync(mask, v != 0);
    o[1] = static_cast<uint32_t>(__any_sync(mask, v != 0));
    o[2] = static_cast<uint32_t>(__all_sync(mask, v != 0));
    o[3] = __reduce_add_sync(mask, static_cast<unsigned>(v));
    o[4] = static_cast<uint32_t>(__reduce_min_sync(mask, v));
    o[5] = static_cast<uint32_t>(__reduce_max_sync(mask, v));
    o[6] = __reduce_xor_sync(mask, static_cast<unsigned>(v));
}

// __syncwarp as the only ordering between a shared-memory write and a read by
// a neighbouring lane, first over the whole warp, then separately in each
// half-warp from two different call sites (legal: only the mask must match).
//   out[gid * 2 + 0] = in of lane ^ 1 (same warp)
//   out[gid * 2 + 1] = in of lane ^ 2 (same half-warp), + 1000
// Full warps only (blockDim.x a multiple of 32, at most 1024).
extern "C" __global__ void tli_selftest_syncwarp(const int* in, int* out) {
    using namespace tli_selftest;
    __shared__ int s[1024];
    const unsigned long long g = global_tid();
    const unsigned t = linear_tid();
    const unsigned lane = t % 32;
    s[t] = in[g];
    __syncwarp();
    const int a = s[t ^ 1u];
    __syncwarp();
    s[t] = in[g] + 1000;
    if (lane < 16) {
        __syncwarp(0x0000ffffu);
    } else {
        __syncwarp(0xffff0000u);
    }
    out[g * 2 + 0] = a;
    out[g * 2 + 1] = s[t ^ 2u];
}

// Atomics from every thread of every block on a handful of counters.
// Threads with gid >= n do nothing.
//   ints[0] += v   ints[1] = max   ints[2] = min   ints[3] += 1 by a CAS loop
//   ints[4]: atomicExch(gid); the value it returned goes to exch_prev[gid]
//   uints[0] += (unsigned)v   uints[1] = max   uints[2] = min
//   uints[3] |= 1 << (gid % 32)   uints[4] &= ~(1 << (gid % 29))   uints[5] ^= (unsigned)v
//   u64[0] += (unsigned long long)(v & 0xffff) << 24
//   f[0] += (float)(v % 1000)  (whole numbers: the sum is exact in any order)
extern "C" __global__ void tli_selftest_atomics(const int* vals, int n, int* ints, unsigned* uints,
                                                unsigned long long* u64, float* f, int* exch_prev) {
    using namespace tli_selftest;
    const unsigned long long g = global_tid();
    if (g >= static_cast<unsigned long long>(n)) return;
    const int v = vals[g];
    atomicAdd(&ints[0], v);
    atomicMax(&ints[1], v);
    atomicMin(&ints[2], v);
    int old = atomicCAS(&ints[3], 0, 0);
    for (;;) {
        const int seen = atomicCAS(&ints[3], old, old + 1);
        if (seen == old) break;
        old = seen;
    }
    exch_prev[g] = atomicExch(&ints[4], static_cast<int>(g));
    const unsigned u = static_cast<unsigned>(v);
    atomicAdd(&uints[0], u);
    atomicMax(&uints[1], u);
    atomicMin(&uints[2], u);
    atomicOr(&uints[3], 1u << (g % 32));
    atomicAnd(&uints[4], ~(1u << (g % 29)));
    atomicXor(&uints[5], u);
    atomicAdd(&u64[0], static_cast<unsigned long long>(v & 0xffff) << 24);
    atomicAdd(&f[0], static_cast<float>(v % 1000));
}

// f32 atomicAdd of a subnormal, on global memory (flushed to zero, as the
// device does) and on dynamic shared memory (kept). One block; thread 0 does
// the work. Needs dynamic shared memory of at least 4 bytes.
//   global_acc[0] += tiny ; out[0] = shared value after += tiny ; out[1] = tiny
extern "C" __global__ void tli_selftest_atomic_subnormal(float tiny, float* global_acc, float* out) {
    TLI_DYNAMIC_SHARED(float, s);
    if (threadIdx.x == 0) s[0] = 0.0f;
    __syncthreads();
    if (threadIdx.x == 0) {
        atomicAdd(&s[0], tiny);
        atomicAdd(&global_acc[0], tiny);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        out[0] = s[0];
        out[1] = tiny;
    }
}

// Dynamic shared memory. Per block, before writing anything, thread 0 copies
// the first `words` 32-bit words of dynamic shared memory to
// raw[blockIdx.x * words + k] (they must read as poison), and writes the
// address modulo 16 to align[blockIdx.x]. Then each thread stores its input
// in shared memory and reads back its mirror image within the block:
//   out[b * blockDim.x + t] = in[b * blockDim.x + (blockDim.x - 1 - t)]
// Needs dynamic_smem >= 4 * max(words, blockDim.x); 1-D blocks.
extern "C" __global__ void tli_selftest_dynamic_smem(const uint32_t* in, uint32_t* out, uint32_t* raw,
                                                     uint32_t* align, int words) {
    TLI_DYNAMIC_SHARED(uint32_t, s);
    const unsigned t = threadIdx.x;
    const unsigned long long base = static_cast<unsigned long long>(blockIdx.x) * blockDim.x;
    if (t == 0) {
        for (int k = 0; k < words; ++k) raw[static_cast<unsigned long long>(blockIdx.x) * words + k] = s[k];
        align[blockIdx.x] = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(s) % 16);
    }
    __syncthreads();
    s[t] = in[base + t];
    __syncthreads();
    out[base + t] = s[blockDim.x - 1 - t];
}

// f32 -> bf16/f16 and back, one element per thread (gid < n):
//   bf[i] = bits of __float2bfloat16_rn(x[i])   h[i] = bits of __float2half_rn(x[i])
//   bf_back[i] = __bfloat162float(bf16 from bits16[i])
//   h_back[i]  = __half2float(f16 from bits16[i])
//   pairs[i]   = the 32-bit word of __floats2bfloat162_rn(x[i], -x[i])
extern "C" __global__ void tli_selftest_convert(const float* x, const uint16_t* bits16, int n, uint16_t* bf,
                                                uint16_t* h, float* bf_back, float* h_back, uint32_t* pairs) {
    using namespace tli_selftest;
    const unsigned long long i = global_tid();
    if (i >= static_cast<unsigned long long>(n)) return;
    bf[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
    h[i] = __half_as_ushort(__float2half_rn(x[i]));
    bf_back[i] = __bfloat162float(__ushort_as_bfloat16(bits16[i]));
    h_back[i] = __half2float(__ushort_as_half(bits16[i]));
    const __nv_bfloat162 p = __floats2bfloat162_rn(x[i], -x[i]);
    uint32_t word;
    memcpy(&word, &p, sizeof word);
    pairs[i] = word;
}

// Float and integer intrinsics, one element per thread (gid < n):
//   f[i * 4 + 0] = __fmaf_rn(a, b, c)   (fused, one rounding)
//   f[i * 4 + 1] = __fadd_rn(__fmul_rn(a, b), c)   (two roundings)
//   f[i * 4 + 2] = min(a, b)   f[i * 4 + 3] = max(a, b)
//   u[i * 4 + 0] = __popc(w)  u[i * 4 + 1] = __clz(w)  u[i * 4 + 2] = __ffs(w)
//   u[i * 4 + 3] = __float_as_uint(__uint_as_float(w))
extern "C" __global__ void tli_selftest_math(const float* a, const float* b, const float* c, const uint32_t* w,
                                             int n, float* f, uint32_t* u) {
    using namespace tli_selftest;
    const unsigned long long i = global_tid();
    if (i >= static_cast<unsigned long long>(n)) return;
    f[i * 4 + 0] = __fmaf_rn(a[i], b[i], c[i]);
    f[i * 4 + 1] = __fadd_rn(__fmul_rn(a[i], b[i]), c[i]);
    f[i * 4 + 2] = min(a[i], b[i]);
    f[i * 4 + 3] = max(a[i], b[i]);
    u[i * 4 + 0] = static_cast<uint32_t>(__popc(w[i]));
    u[i * 4 + 1] = static_cast<uint32_t>(__clz(static_cast<int>(w[i])));
    u[i * 4 + 2] = static_cast<uint32_t>(__ffs(static_cast<int>(w[i])));
    u[i * 4 + 3] = __float_as_uint(__uint_as_float(w[i]));
}

// Broken on purpose: misbehaviour selects how.
//   0: thread `who` skips the __syncthreads and returns while the others wait
//   1: thread `who` waits at a different __syncthreads than the others
//   2: thread `who` (lane 0 of its warp) waits in __syncwarp for its
//      neighbour lane, which waits at __syncthreads for it: a deadlock that
//      only the timeout can end
//   3: thread `who` calls __trap()
//   4: thread `who` calls __shfl_sync with a mask that does not name itself
//   5: every lane of warp 0 calls __shfl_xor_sync, thread `who` (in warp 0)
//      calls __shfl_down_sync instead
//   6: nothing wrong (the control run); out[gid] = gid
extern "C" __global__ void tli_selftest_broken(int misbehaviour, unsigned who, uint32_t* out) {
    using namespace tli_selftest;
    const unsigned t = linear_tid();
    const unsigned long long g = global_tid();
    switch (misbehaviour) {
        case 0:
            if (t == who) return;
            __syncthreads();
            break;
        case 1:
            if (t == who) {
                __syncthreads();
            } else {
                __syncthreads();
            }
            break;
        case 2:
            if (t == who) {
                __syncwarp(0x3u << (t % 32));
            }
            __syncthreads();
            break;
        case 3:
            if (t == who) __trap();
            break;
        case 4:
            if (t == who) out[g] = __shfl_sync(0u, 1u, 0);
            break;
        case 5:
            if (t < 32) {
                if (t == who) {
                    out[g] = __shfl_down_sync(0xffffffffu, static_cast<uint32_t>(t), 1u);
                } else {
                    out[g] = __shfl_xor_sync(0xffffffffu, static_cast<uint32_t>(t), 1);
                }
            }
            break;
        default: break;
    }
    out[g] = static_cast<uint32_t>(g);
}

// The tensor-core fragment contract. Every warp of the launch builds the
// fragments of one m16n8k16 product by indexing the matrices element by
// element with the PTX ISA's formulas ("Matrix Fragments for mma.m16n8k16
// with floating point type": row/col of a_i, b_i, c_i from groupID and
// threadID_in_group), independently of the register-pair loads the kernels
// use, runs it, and scatters D the same way:
//   a: 16x16 row-major 16-bit patterns, b: 16x8 (k, n) row-major, c: 16x8 f32
//   d[warp * 128 + row * 8 + col] = (C + A·B)[row][col];  f16 != 0: f16, else bf16
// A launch with a partial warp must fail (mma.sync needs all 32 lanes).
extern "C" __global__ void tli_selftest_mma(int f16, const uint16_t* a, const uint16_t* b, const float* c, float* d) {
    using namespace tli_selftest;
    const unsigned tid = linear_tid(), lane = tid % 32, warp = tid / 32;
    const unsigned group = lane >> 2, tig = lane % 4;
    uint32_t ar[4] = {0, 0, 0, 0}, br[2] = {0, 0};
    float cr[4], dr[4];
    for (unsigned i = 0; i < 8; ++i) {
        const unsigned row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
        const unsigned col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        ar[i / 2] |= static_cast<uint32_t>(a[row * 16 + col]) << (16 * (i & 1));
    }
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        br[i / 2] |= static_cast<uint32_t>(b[row * 8 + group]) << (16 * (i & 1));
    }
    for (unsigned i = 0; i < 4; ++i) cr[i] = c[(i < 2 ? group : group + 8) * 8 + tig * 2 + (i & 1)];
    if (f16) {
        tli_mma_m16n8k16_f16(dr, ar, br, cr);
    } else {
        tli_mma_m16n8k16_bf16(dr, ar, br, cr);
    }
    for (unsigned i = 0; i < 4; ++i) d[warp * 128 + (i < 2 ? group : group + 8) * 8 + tig * 2 + (i & 1)] = dr[i];
}
