// NF4 dequantization, bit-exact with bitsandbytes.
//
// Math (all in f32, then one round-to-nearest-even cast to the output dtype):
//
//     out[i] = T( NF4[q(i)] * scale[i >> log2_blocksize] )
//
//   q(i)    = high nibble of packed[i/2] for even i, low nibble for odd i
//   scale   = absmax[b]                                       (plain)
//           = (code2[qabsmax[b]] * absmax2[b >> log2_nested]) + offset
//                                                             (double-quant)
//
// The double-quant scale is two separately rounded f32 operations, multiply
// then add, because bitsandbytes computes it in two steps (an 8-bit blockwise
// dequant kernel, then `absmax += offset` in torch). `__fmul_rn`/`__fadd_rn`
// stop nvcc from contracting them into one FMA, which would change the last
// bit of some scales and so of every weight in their block.
//
// Shapes and dtypes:
//   packed   u8  [ceil(n/2)]      two codes per byte, element 2j in the high nibble
//   absmax   f32 [ceil(n/bs)]     (plain)
//   qabsmax  u8  [ceil(n/bs)]     (double quant) index into code2
//   absmax2  f32 [ceil(nblocks / nested_bs)]
//   code2    f32 [256]            bitsandbytes' signed dynamic map
//   out      T   [n]              T = f32 | bf16 | f16
//
// Work split: one thread owns one 32-element chunk, i.e. one 16-byte load of
// packed codes. Because every block size is a multiple of 32 and chunks start
// at multiples of 32, a chunk never straddles two scale blocks: each thread
// computes exactly one scale (one absmax load, or three small loads for
// double quant, all L1/L2 hits shared by the bs/32 threads of a block).
//
//     packed bytes   |<- 16 B ->|<- 16 B ->|<- 16 B ->| ...
//     thread         |    t0    |    t1    |    t2    | ...   (grid-stride)
//     out (bf16)     |<- 64 B ->|<- 64 B ->|<- 64 B ->|       4 x 16 B stores
//     out (f32)      |<- 128 B->|                             8 x 16 B stores
//
// A warp therefore reads 512 contiguous bytes and writes 2 KiB (bf16)
// contiguous bytes per step: every transaction is a full, coalesced 16-byte
// access. The last chunk (n not a multiple of 32) falls back to scalar loads
// and stores, so any n >= 1 is valid.
//
// The 16-entry code table lives in shared memory: lanes look up different
// codes, and a __constant__ table would serialise divergent addresses, while
// 16 floats in 16 distinct banks are read conflict-free (equal codes
// broadcast).
//
// Launch contract (checked in Rust before launch):
//   blockDim = (256,1,1), gridDim.x >= 1 (grid-stride loop covers any n);
//   packed and out 16-byte aligned; log2_bs in [5, 12]; n >= 1.
//
// Roofline (bf16 out, bs = 64): 0.5 B codes + 4/64 B absmax + 2 B out
// = 2.5625 B/element; at 3.35 TB/s (H100 SXM) a 4096x4096 weight (16.8 M
// elements, 43 MB of traffic) takes no less than 12.8 us.

#include "common/device.cuh"
#include "common/nf4.cuh"

namespace {

constexpr int kChunk = 32;           // elements per thread per step

// Pack two converted values into the 32-bit word that holds them in memory
// (little-endian: the first element at the lower address = low half).
TLI_DEVICE uint32_t pack2(__nv_bfloat16, float a, float b) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
TLI_DEVICE uint32_t pack2(__half, float a, float b) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(a))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
}

TLI_DEVICE void store_scalar(float* p, float v) { *p = v; }
TLI_DEVICE void store_scalar(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
TLI_DEVICE void store_scalar(__half* p, float v) { *p = __float2half_rn(v); }

// Store 32 values starting at out (16-byte aligned), 16 bytes at a time.
TLI_DEVICE void store_chunk(float* out, const float (&v)[kChunk]) {
    uint4* dst = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int k = 0; k < kChunk / 4; ++k) {
        uint4 w;
        w.x = __float_as_uint(v[4 * k + 0]);
        w.y = __float_as_uint(v[4 * k + 1]);
        w.z = __float_as_uint(v[4 * k + 2]);
        w.w = __float_as_uint(v[4 * k + 3]);
        tli_store_streaming_16(dst + k, w);
    }
}
template <typename T>
TLI_DEVICE void store_chunk(T* out, const float (&v)[kChunk]) {
    uint4* dst = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int k = 0; k < kChunk / 8; ++k) {
        uint4 w;
        w.x = pack2(T(), v[8 * k + 0], v[8 * k + 1]);
        w.y = pack2(T(), v[8 * k + 2], v[8 * k + 3]);
        w.z = pack2(T(), v[8 * k + 4], v[8 * k + 5]);
        w.w = pack2(T(), v[8 * k + 6], v[8 * k + 7]);
        tli_store_streaming_16(dst + k, w);
    }
}

// Scale sources. Both are tiny structs passed by value into the shared body,
// so the plain and double-quant entry points compile to separate, branch-free
// kernels.
struct PlainScales {
    const float* absmax;
    TLI_DEVICE float operator()(int64_t block) const { return tli_load_ro(absmax + block); }
};
struct NestedScales {
    const uint8_t* qabsmax;
    const float* absmax2;
    const float* code2;
    float offset;
    int log2_nested;
    TLI_DEVICE float operator()(int64_t block) const {
        const float c = tli_load_ro(code2 + tli_load_ro(qabsmax + block));
        const float a2 = tli_load_ro(absmax2 + (block >> log2_nested));
        return __fadd_rn(__fmul_rn(c, a2), offset);
    }
};

template <typename T, typename Scales>
TLI_DEVICE void dequant_body(const uint8_t* TLI_RESTRICT packed, Scales scales, T* TLI_RESTRICT out,
                             int64_t n, int log2_bs) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) {
        const float table[16] = {TLI_NF4_CODE_TABLE};
        lut[threadIdx.x] = table[threadIdx.x];
    }
    __syncthreads();

    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
        const int64_t first = c * kChunk;
        const float s = scales(first >> log2_bs);
        if (first + kChunk <= n) {
            // Full chunk: one 16-byte load, 32 multiplies, 16-byte stores.
            const uint4 q = tli_load_ro_16(reinterpret_cast<const uint4*>(packed) + c);
            const uint32_t words[4] = {q.x, q.y, q.z, q.w};
            float v[kChunk];
#pragma unroll
            for (int w = 0; w < 4; ++w) {
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    // Byte b of word w is packed byte 4w+b (little-endian),
                    // which holds elements 8w+2b (high nibble) and 8w+2b+1.
                    const uint32_t byte = (words[w] >> (8 * b)) & 0xffu;
                    v[8 * w + 2 * b] = __fmul_rn(lut[byte >> 4], s);
                    v[8 * w + 2 * b + 1] = __fmul_rn(lut[byte & 0xfu], s);
                }
            }
            store_chunk(out + first, v);
        } else {
            // Tail chunk: only the bytes that exist are read (an odd n has a
            // final byte whose low nibble is padding and is not written).
            for (int64_t i = first; i < n; ++i) {
                const uint32_t byte = tli_load_ro(packed + (i >> 1));
                const uint32_t code = (i & 1) ? (byte & 0xfu) : (byte >> 4);
                store_scalar(out + i, __fmul_rn(lut[code], s));
            }
        }
    }
}

}  // namespace

#define TLI_NF4_DEQUANT_ENTRIES(SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        nf4_dequant_##SUFFIX(const uint8_t* packed, const float* absmax, T* out, int64_t n,         \
                             int32_t log2_bs) {                                                    \
        dequant_body(packed, PlainScales{absmax}, out, n, log2_bs);                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) nf4_dequant_dq_##SUFFIX(                     \
        const uint8_t* packed, const uint8_t* qabsmax, const float* absmax2, const float* code2,   \
        float offset, int32_t log2_nested, T* out, int64_t n, int32_t log2_bs) {                   \
        dequant_body(packed, NestedScales{qabsmax, absmax2, code2, offset, log2_nested}, out, n,   \
                     log2_bs);                                                                     \
    }

TLI_NF4_DEQUANT_ENTRIES(f32, float)
TLI_NF4_DEQUANT_ENTRIES(bf16, __nv_bfloat16)
TLI_NF4_DEQUANT_ENTRIES(f16, __half)
