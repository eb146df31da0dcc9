// Fused NF4 (or dense) linear + LoRA: forward and backward.
//
// Math (contract: src/lora/mod.rs), T = f32 | bf16 | f16, f32 accumulate:
//
//   y[M,N]  = x[M,K] · Wᵀ  +  s · (x̃ · Aᵀ) · Bᵀ  (+ bias[N])
//   dx[M,K] = dy[M,N] · W  +  mask ⊙ (s · (dy · B) · A) / (1 − p)
//   dA[r,K] = s · (dy · B)ᵀ · x̃          dB[N,r] = s · dyᵀ · (x̃ · Aᵀ)
//
//   W [N,K]: NF4 in bitsandbytes layout (the flattened row-major tensor cut
//            into blocks of bs = 2^log2_bs elements that may cross rows;
//            plain f32 absmax or double-quant scales) or dense T. Every
//            weight enters as exactly T(NF4[q] · scale) (f32 multiply with
//            __fmul_rn, one round-to-nearest-even to T): what nf4_dequant.cu
//            writes for dtype T.
//   A [r,K], B [N,r], r in 1..=64; x̃ = x with element (m,k) zeroed unless
//   tli_dropout_keep(seed, m·K + k, threshold); the 1/(1−p) factor is applied
//   to the f32 sum (ks · Σ kept x·A), not to x, so x̃ stays exact in T.
//   The LoRA intermediates u = x̃·Aᵀ and g = dy·B are f32, never rounded to T.
//   The result is rounded to T once, after the bias.
//
// Variants (all entry points take one TliLoraParams by value):
//
// (a) lora_fwd_tile_{dense,nf4,nf4dq}_{f32,bf16,f16}: block tile 64x64 of y,
//     128 threads = 4 warps, K in steps of 32:
//
//                 K →  (steps of kBK = 32)
//          ┌────────────────────────┐
//     x    │ m0..m0+63 │ p_s (T)    │──┬──► acc[64x64]  += p_s · q_sᵀ   (mma)
//          └────────────────────────┘  │
//          W rows n0..n0+63: NF4 bytes │
//          → dequantized in registers  │
//          → q_s (T, [n][k])  ─────────┘
//          A rows 0..r-1 → r_s (T) ────────► u[64xr] += x̃_s · r_sᵀ (mma, same x tile)
//
//       warp w: rows 32·(w/2)..+31, cols 32·(w%2)..+31 = 2 m16 x 4 n8 mma
//       tiles of acc, and the same fragment positions of u (columns ≥ r are
//       skipped per n8 tile). After the K loop u (f32, × s·ks) and B's 64
//       rows go to shared memory (aliasing the tiles) and the epilogue adds
//       Σ_j u[m][j]·B[n][j] (r f32 FMAs), the bias, rounds and stores: u
//       never leaves the chip. bf16/f16 use mma.sync.m16n8k16 (f32
//       accumulate); f32 inputs take the same tiling with SIMT FMAs on the
//       same fragment ownership: TF32 mma would round x and W to 10-bit
//       significands (relative error 2^-11), far outside the f32 accuracy
//       the contract promises for f32 inputs, and f32 is the reference /
//       debugging dtype here, not the hot path.
//
// (b) lora_fwd_gemv_{...}: for small M (≤ 8 rows per pass, any M works).
//     One warp per row n of W, grid-stride over rows. The row's flat range
//     [n·K, n·K + K) is walked in 16-byte-aligned chunks of the flat tensor
//     (NF4: 32 codes, one scale, one LDG.128; dense: 16 bytes of T), lanes
//     taking chunks lane, lane+32, ...; the ≤ 31 elements before the first
//     and after the last whole chunk go scalar. Every weight byte is read
//     exactly once per 8 rows of x. Per-lane f32 partial sums (one per x
//     row) are reduced through shared memory in a fixed order; the epilogue
//     adds Σ_j u[m][j]·B[n][j] with u = s·ks·x̃·Aᵀ from lora_proj (an [M,r]
//     f32 scratch, ≤ 2 KB for M ≤ 8: GEMV blocks share no x tile, so u is
//     computed once instead of per block), then bias, then one rounding.
//
// (c) lora_bwd_dx_{...}: the tile kernel of (a) with the reduction over N:
//     dx tile 64 (m) x 64 (k); each step reads 32 rows of W (row-wise, the
//     same NF4 run decoder as (a)) and stores them transposed in shared
//     memory (q_s[k][n]), so no transposed W ever exists in device memory.
//     The dy tile feeds both W and B (g = dy·B on chip, B rows stored
//     transposed); the epilogue adds mask·ks·Σ_j (s·g[m][j])·A[j][k].
//
// (d) lora_proj_{T}: out[m][j] = scale · Σ_l P[m][l]·Q(j,l), one block per
//     row m (u = x̃·Aᵀ: P = x masked, Q = A; g = dy·B: P = dy, Q = Bᵀ), and
//     lora_bwd_dadb_{T}: dA[j][k] = s·ks·Σ_m g[m][j]·x̃[m][k] and
//     dB[n][j] = s·Σ_m dy[m][n]·u[m][j], one thread per (k or n) x 8 ranks,
//     consecutive threads on consecutive k / n (coalesced x / dy reads).
//     SIMT f32: M·r·(2K + 2N) MACs in all, ≤ 3% of the base product at
//     r = 64 for the shapes below.
//
// Launch contract (checked in Rust before every launch): tile kernels
// blockDim 128, grid (ceil(cols/64), ceil(M/64)); gemv 256 threads, any
// grid; proj 256 threads, grid M; dadb 256 threads, grid as computed by
// dadb_blocks(). M, N, K ≥ 1; rank 0 (no LoRA) or 1..=64; packed codes
// 16-byte aligned (gemv LDG.128, tile 8-byte runs when K % 16 == 0), dense W
// 16-byte aligned for gemv; all other accesses are scalar.
//
// Roofline, Llama-3-8B shapes vs H100 SXM (3.35 TB/s, ~990 TFLOP/s dense
// bf16); NF4 bs = 64, plain scales = 0.5625 B/weight:
//
//   shape (N x K)     NF4 bytes   M = 1 (GEMV): floor        M = 4096 (tile): 2MNK   floor
//   q_proj 4096²      9.4 MB      2.8 µs (0.03 µs of math)   137 GFLOP              139 µs
//   v_proj 1024x4096  2.4 MB      0.7 µs                     34 GFLOP               35 µs
//   MLP 14336x4096    33.0 MB     9.9 µs                     481 GFLOP              486 µs
//
// Weights dominate until 2MNK/990e12 = 0.5625·NK/3.35e12, i.e. M ≈ 83
// tokens: below that the GEMV (and the tile kernel at small M) is bound by
// the weight stream, above it by the tensor cores. At M = 4096 the bf16
// activations add 2·M·(K+N) bytes (67 MB for q_proj, 20 µs): still compute
// bound. The fused LoRA branch costs 2·M·r·K·(N/64) flops in the tile
// kernel (u is recomputed by each of the N/64 column blocks: r/64 of the
// base product, 25% at r = 16) plus 2·M·N·r in the epilogue; that is the
// price of never writing u, and the first thing to revisit (a 128-wide N
// tile halves it). dx is the same GEMM as the forward (139 µs for q_proj at
// M = 4096); dA/dB read x and dy once per 8 ranks, memory bound.

#include "common/device.cuh"
#include "common/dropout.cuh"
#include "common/mma.cuh"
#include "common/nf4.cuh"

// The one argument of every entry point. The same layout as `LoraParams` in
// src/lora/kernel.rs (#[repr(C)], checked by size on both sides).
struct TliLoraParams {
    const void* x;             // [M,K] T
    const void* dy;            // [M,N] T (backward)
    const void* lora_a;        // [r,K] T
    const void* lora_b;        // [N,r] T
    const void* bias;          // [N] T, or null
    const void* w_dense;       // [N,K] T (dense weight)
    const uint8_t* w_packed;   // NF4 codes, ceil(N·K/2) bytes
    const float* w_absmax;     // plain scales
    const uint8_t* w_qabsmax;  // double-quant: 8-bit scale codes
    const float* w_absmax2;    // double-quant: nested absmax
    const float* w_code2;      // double-quant: 256-entry map
    void* out;                 // y [M,N] (forward) or dx [M,K]
    const float* u;            // gemv: s·ks·x̃·Aᵀ; dadb: ks·x̃·Aᵀ  [M,r] f32
    const float* g;            // dadb: dy·B [M,r] f32
    float* proj_out;           // lora_proj output [M,r] f32
    void* da;                  // [r,K] T, or null
    void* db;                  // [N,r] T, or null
    uint64_t drop_seed;
    int64_t M, N, K;
    int32_t rank;              // 0: no LoRA branch
    int32_t log2_bs;
    int32_t log2_nested;
    uint32_t drop_threshold;   // 0: no dropout
    float w_offset;            // double-quant offset
    float scale;               // s = alpha / r
    float keep_scale;          // 1 / (1 − p), 1 without dropout
    int32_t proj_mode;         // lora_proj: 0 = x̃·Aᵀ, 1 = dy·B
    float proj_scale;          // lora_proj: factor applied to the sum
    int32_t reserved;
};
static_assert(sizeof(TliLoraParams) == 208, "TliLoraParams must match src/lora/kernel.rs");

namespace {

constexpr int kBM = 64;             // tile rows (M)
constexpr int kBN = 64;             // tile columns (N forward, K for dx)
constexpr int kBK = 32;             // reduction step
constexpr int kStride = kBK + 8;    // padded smem row: 20 words, conflict-free fragment loads
constexpr int kTileThreads = 128;
constexpr int kMaxRank = 64;
constexpr int kEStride = kMaxRank + 1;
constexpr int kRun = 16;            // weights one thread decodes per step
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvRows = 8;        // x rows per pass of the GEMV
constexpr int kProjThreads = 256;
constexpr int kDadbThreads = 256;
constexpr int kDadbRanks = 8;       // ranks per dadb thread

enum class WMode { Dense, Nf4, Nf4Dq };

TLI_DEVICE float to_f32(float v) { return v; }
TLI_DEVICE float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
TLI_DEVICE float to_f32(__half v) { return __half2float(v); }

// A 16-bit element from its bits (the low 16 bits of b).
TLI_DEVICE float bits_to_f32(__nv_bfloat16, uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}
TLI_DEVICE float bits_to_f32(__half, uint32_t b) { return __half2float(__ushort_as_half(static_cast<unsigned short>(b))); }

template <typename T>
TLI_DEVICE T from_f32(float v);
template <>
TLI_DEVICE float from_f32<float>(float v) {
    return v;
}
template <>
TLI_DEVICE __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <>
TLI_DEVICE __half from_f32<__half>(float v) {
    return __float2half_rn(v);
}

template <typename T>
TLI_DEVICE float load_f(const void* base, int64_t i) {
    return to_f32(tli_load_ro(static_cast<const T*>(base) + i));
}

// The 16 NF4 code values in shared memory (see nf4_dequant.cu for why).
TLI_DEVICE void fill_lut(float* lut) {
    if (threadIdx.x < 16) {
        const float table[16] = {TLI_NF4_CODE_TABLE};
        lut[threadIdx.x] = table[threadIdx.x];
    }
}

// Reads W[n][k] = flat element n·K + k as the T-rounded value, in f32.
template <typename T, WMode kMode>
struct WeightReader {
    const TliLoraParams& p;
    const float* lut;

    TLI_DEVICE float block_scale(int64_t block) const {
        if constexpr (kMode == WMode::Nf4) {
            return tli_load_ro(p.w_absmax + block);
        } else {
            const float c = tli_load_ro(p.w_code2 + tli_load_ro(p.w_qabsmax + block));
            const float a2 = tli_load_ro(p.w_absmax2 + (block >> p.log2_nested));
            return __fadd_rn(__fmul_rn(c, a2), p.w_offset);
        }
    }

    TLI_DEVICE float decode(uint32_t code, float s) const { return to_f32(from_f32<T>(__fmul_rn(lut[code], s))); }

    // One element by flat index.
    TLI_DEVICE float at(int64_t i) const {
        if constexpr (kMode == WMode::Dense) {
            return load_f<T>(p.w_dense, i);
        } else {
            const uint32_t byte = tli_load_ro(p.w_packed + (i >> 1));
            const uint32_t code = (i & 1) ? (byte & 0xfu) : (byte >> 4);
            return decode(code, block_scale(i >> p.log2_bs));
        }
    }

    // kRun consecutive elements of row n from column k0; zero outside
    // [0,N) x [0,K).
    TLI_DEVICE void run(int64_t n, int64_t k0, float (&v)[kRun]) const {
        if (n >= p.N) {
#pragma unroll
            for (int e = 0; e < kRun; ++e) v[e] = 0.0f;
            return;
        }
        const int64_t base = n * p.K + k0;
        if constexpr (kMode != WMode::Dense) {
            // K % 16 == 0 (every real model): the run is 16 codes = 8
            // aligned bytes inside one 32-element chunk, so one scale.
            if ((p.K & 15) == 0) {
                if (k0 >= p.K) {
#pragma unroll
                    for (int e = 0; e < kRun; ++e) v[e] = 0.0f;
                    return;
                }
                const uint2 q = tli_load_ro_8(reinterpret_cast<const uint2*>(p.w_packed) + (base >> 4));
                const float s = block_scale(base >> p.log2_bs);
                const uint32_t words[2] = {q.x, q.y};
#pragma unroll
                for (int w = 0; w < 2; ++w) {
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        const uint32_t byte = (words[w] >> (8 * b)) & 0xffu;
                        v[8 * w + 2 * b] = decode(byte >> 4, s);
                        v[8 * w + 2 * b + 1] = decode(byte & 0xfu, s);
                    }
                }
                return;
            }
        }
#pragma unroll
        for (int e = 0; e < kRun; ++e) v[e] = (k0 + e < p.K) ? at(base + e) : 0.0f;
    }
};

// Shared memory of the tile kernels: the main-loop tiles, and (aliasing
// them after the loop) the epilogue's f32 u/g tile and B/A tile.
template <typename T>
struct TileSmem {
    T p[kBM][kStride];        // x (forward) or dy (dx) tile, [m][l]
    T pd[kBM][kStride];       // x̃: x with dropped elements zeroed (forward, dropout on)
    T q[kBN][kStride];        // W tile, [output column][l]
    T r[kMaxRank][kStride];   // A (forward) or Bᵀ (dx) tile, [j][l]
};
struct EpiSmem {
    float aux[kBM][kEStride];  // s·ks·u (forward) or s·g (dx), [m][j]
    float e[kBN][kEStride];    // B[n][j] (forward) or A[j][k] as [k][j] (dx)
};
template <typename T>
struct TileSmemBytes {
    static constexpr size_t value = sizeof(TileSmem<T>) > sizeof(EpiSmem) ? sizeof(TileSmem<T>) : sizeof(EpiSmem);
};

// One k16 step of a warp's 32x(8·tiles) block: acc[i][j] += A(rows a0+16i..)
// · B(rows b0+8j..)ᵀ over columns kk..kk+15 of the two smem tiles. Tensor
// cores for 16-bit types.
template <typename T>
TLI_DEVICE void warp_k16(float (&acc)[2][4][4], const T (*a_s)[kStride], int a0, const T (*b_s)[kStride], int b0,
                         int tiles, int kk, int lane) {
    const int g = lane >> 2, t = lane & 3;
    uint32_t af[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = a0 + 16 * i + g;
        af[i][0] = tli_load_pair_u32(&a_s[r][kk + 2 * t]);
        af[i][1] = tli_load_pair_u32(&a_s[r + 8][kk + 2 * t]);
        af[i][2] = tli_load_pair_u32(&a_s[r][kk + 2 * t + 8]);
        af[i][3] = tli_load_pair_u32(&a_s[r + 8][kk + 2 * t + 8]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (j < tiles) {  // warp-uniform
            const int c = b0 + 8 * j + g;
            const uint32_t bf[2] = {tli_load_pair_u32(&b_s[c][kk + 2 * t]),
                                    tli_load_pair_u32(&b_s[c][kk + 2 * t + 8])};
#pragma unroll
            for (int i = 0; i < 2; ++i) tli_mma_m16n8k16(T(), acc[i][j], af[i], bf, acc[i][j]);
        }
    }
}

// f32: SIMT FMAs over exactly the elements the mma accumulator fragment
// assigns to this lane, so the epilogue is shared with the 16-bit path.
template <>
TLI_DEVICE void warp_k16<float>(float (&acc)[2][4][4], const float (*a_s)[kStride], int a0,
                                const float (*b_s)[kStride], int b0, int tiles, int kk, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (j < tiles) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = a0 + 16 * i + g + 8 * (e >> 1);
                    const int c = b0 + 8 * j + 2 * t + (e & 1);
                    float s = acc[i][j][e];
#pragma unroll
                    for (int k = 0; k < 16; ++k) s = fmaf(a_s[r][kk + k], b_s[c][kk + k], s);
                    acc[i][j][e] = s;
                }
            }
        }
    }
}

// The tile kernels, (a) forward and (c) dx.
template <typename T, WMode kMode, bool kBackward>
TLI_DEVICE void tile_body(const TliLoraParams& p) {
    __shared__ __align__(16) unsigned char smem_raw[TileSmemBytes<T>::value];
    __shared__ float lut[16];
    TileSmem<T>& ts = *reinterpret_cast<TileSmem<T>*>(smem_raw);
    EpiSmem& es = *reinterpret_cast<EpiSmem*>(smem_raw);
    fill_lut(lut);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int64_t L = kBackward ? p.N : p.K;     // reduction length
    const int64_t cols = kBackward ? p.K : p.N;  // output columns
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
    const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kBN;
    const int rank = p.rank;
    const int rp = (rank + 7) & ~7;  // rank rounded up to whole n8 tiles
    const bool drop = !kBackward && p.drop_threshold != 0;
    int aux_tiles = (rp - 32 * wn) / 8;  // this warp's n8 tiles of u / g
    aux_tiles = aux_tiles < 0 ? 0 : (aux_tiles > 4 ? 4 : aux_tiles);
    const WeightReader<T, kMode> wr{p, lut};

    float acc[2][4][4], aux[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = aux[i][j][e] = 0.0f;

    for (int64_t l0 = 0; l0 < L; l0 += kBK) {
        __syncthreads();  // the previous step's fragments are consumed
        {
            // P tile: thread -> row tid/2, 16 columns.
            const int row = tid >> 1, cs = (tid & 1) * kRun;
            const int64_t m = m0 + row;
            const void* P = kBackward ? p.dy : p.x;
#pragma unroll
            for (int e = 0; e < kRun; ++e) {
                const int64_t l = l0 + cs + e;
                const bool in = m < p.M && l < L;
                const float v = in ? load_f<T>(P, m * L + l) : 0.0f;
                ts.p[row][cs + e] = from_f32<T>(v);
                if (drop) {
                    const bool keep = in && tli_dropout_keep(p.drop_seed, static_cast<uint64_t>(m * p.K + l),
                                                             p.drop_threshold);
                    ts.pd[row][cs + e] = from_f32<T>(keep ? v : 0.0f);
                }
            }
        }
        float w[kRun];
        if (!kBackward) {
            // W rows n0 + tid/2, 16 columns: q[n][k].
            const int row = tid >> 1, ks = (tid & 1) * kRun;
            wr.run(c0 + row, l0 + ks, w);
#pragma unroll
            for (int e = 0; e < kRun; ++e) ts.q[row][ks + e] = from_f32<T>(w[e]);
        } else {
            // W rows l0 + tid/4 (row-wise reads), 16 columns, stored
            // transposed: q[k][n].
            const int rr = tid >> 2, cs = (tid & 3) * kRun;
            wr.run(l0 + rr, c0 + cs, w);
#pragma unroll
            for (int e = 0; e < kRun; ++e) ts.q[cs + e][rr] = from_f32<T>(w[e]);
        }
        if (rank > 0) {
            if (!kBackward) {
                // A rows j = tid/2 < rp: r[j][k].
                const int j = tid >> 1, ls = (tid & 1) * kRun;
                if (j < rp) {
#pragma unroll
                    for (int e = 0; e < kRun; ++e) {
                        const int64_t l = l0 + ls + e;
                        const float v = (j < rank && l < p.K) ? load_f<T>(p.lora_a, j * p.K + l) : 0.0f;
                        ts.r[j][ls + e] = from_f32<T>(v);
                    }
                }
            } else {
                // B rows n = l0 + tid/4, ranks 16·(tid%4)..: r[j][n] = B[n][j].
                const int ll = tid >> 2, js = (tid & 3) * kRun;
                const int64_t n = l0 + ll;
#pragma unroll
                for (int e = 0; e < kRun; ++e) {
                    const int j = js + e;
                    if (j < rp) {
                        const float v = (j < rank && n < p.N) ? load_f<T>(p.lora_b, n * rank + j) : 0.0f;
                        ts.r[j][ll] = from_f32<T>(v);
                    }
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
            warp_k16<T>(acc, ts.p, 32 * wm, ts.q, 32 * wn, 4, kk, lane);
            if (aux_tiles > 0) warp_k16<T>(aux, drop ? ts.pd : ts.p, 32 * wm, ts.r, 32 * wn, aux_tiles, kk, lane);
        }
    }
    __syncthreads();  // the tiles die here; es aliases them

    if (rank > 0) {
        const float aux_scale = kBackward ? p.scale : __fmul_rn(p.scale, p.keep_scale);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (j < aux_tiles)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        es.aux[32 * wm + 16 * i + g + 8 * (e >> 1)][32 * wn + 8 * j + 2 * t + (e & 1)] =
                            __fmul_rn(aux[i][j][e], aux_scale);
        for (int idx = tid; idx < kBN * rank; idx += kTileThreads) {
            const int c = idx / rank, j = idx - c * rank;
            const int64_t oc = c0 + c;
            float v = 0.0f;
            if (oc < cols) v = kBackward ? load_f<T>(p.lora_a, j * p.K + oc) : load_f<T>(p.lora_b, oc * rank + j);
            es.e[c][j] = v;
        }
    }
    __syncthreads();

    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = 32 * wm + 16 * i + g + 8 * (e >> 1);
                const int col = 32 * wn + 8 * j + 2 * t + (e & 1);
                const int64_t m = m0 + row, oc = c0 + col;
                if (m < p.M && oc < cols) {
                    float v = acc[i][j][e];
                    if (rank > 0) {
                        float s = 0.0f;
                        for (int jj = 0; jj < rank; ++jj) s = fmaf(es.aux[row][jj], es.e[col][jj], s);
                        if (kBackward) {
                            const bool keep = p.drop_threshold == 0 ||
                                              tli_dropout_keep(p.drop_seed, static_cast<uint64_t>(m * p.K + oc),
                                                               p.drop_threshold);
                            if (keep) v = __fadd_rn(v, __fmul_rn(s, p.keep_scale));
                        } else {
                            v = __fadd_rn(v, s);
                        }
                    }
                    if (!kBackward && p.bias != nullptr) v = __fadd_rn(v, load_f<T>(p.bias, oc));
                    out[m * cols + oc] = from_f32<T>(v);
                }
            }
        }
    }
}

// The GEMV's unit of weight traffic: 16-byte chunk c of the flat weight
// tensor, CE elements (NF4: 32 codes under one scale; dense: 16 B of T),
// decoded one 32-bit word (PW = CE/4 elements) at a time so only one word's
// values and x operands are live at once.
template <typename T, WMode kMode>
struct Chunk {
    static constexpr int CE = kMode == WMode::Dense ? 16 / static_cast<int>(sizeof(T)) : 32;
    static constexpr int PW = CE / 4;

    uint4 q;
    float s;  // NF4 scale of the chunk

    TLI_DEVICE Chunk(const WeightReader<T, kMode>& wr, int64_t c) {
        if constexpr (kMode == WMode::Dense) {
            q = tli_load_ro_16(static_cast<const uint4*>(wr.p.w_dense) + c);
            s = 1.0f;
        } else {
            q = tli_load_ro_16(reinterpret_cast<const uint4*>(wr.p.w_packed) + c);
            s = wr.block_scale((c * 32) >> wr.p.log2_bs);
        }
    }

    TLI_DEVICE void word(const WeightReader<T, kMode>& wr, int w, float (&v)[PW]) const {
        const uint32_t x = w == 0 ? q.x : (w == 1 ? q.y : (w == 2 ? q.z : q.w));
        if constexpr (kMode != WMode::Dense) {
            // Byte b of the word holds elements 2b (high nibble) and 2b+1.
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const uint32_t byte = (x >> (8 * b)) & 0xffu;
                v[2 * b] = wr.decode(byte >> 4, s);
                v[2 * b + 1] = wr.decode(byte & 0xfu, s);
            }
        } else if constexpr (sizeof(T) == 4) {
            v[0] = __uint_as_float(x);
        } else {
            v[0] = bits_to_f32(T(), x & 0xffffu);
            v[1] = bits_to_f32(T(), x >> 16);
        }
    }
};

// One weight (flat index i, row starting at flat index begin) times its
// column of every x row of the pass.
template <typename T, WMode kMode>
TLI_DEVICE void gemv_scalar(const WeightReader<T, kMode>& wr, int64_t i, int64_t begin, int64_t xrow, int mc,
                            float (&acc)[kGemvRows]) {
    const float w = wr.at(i);
    const int64_t k = i - begin;
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
        if (r < mc) acc[r] = fmaf(w, load_f<T>(wr.p.x, xrow + r * wr.p.K + k), acc[r]);
}

// Word w of a chunk times its PW columns (starting at x offset xk) of every
// x row of the pass.
template <typename T, WMode kMode>
TLI_DEVICE void gemv_word(const WeightReader<T, kMode>& wr, const Chunk<T, kMode>& ch, int w, int64_t xk, int mc,
                          float (&acc)[kGemvRows]) {
    constexpr int PW = Chunk<T, kMode>::PW;
    float v[PW];
    ch.word(wr, w, v);
#pragma unroll
    for (int e = 0; e < PW; ++e) {
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r)
            if (r < mc) acc[r] = fmaf(v[e], load_f<T>(wr.p.x, xk + r * wr.p.K + e), acc[r]);
    }
}

// (b) the GEMV.
template <typename T, WMode kMode>
TLI_DEVICE void gemv_body(const TliLoraParams& p) {
    constexpr int CE = Chunk<T, kMode>::CE, PW = Chunk<T, kMode>::PW;
    __shared__ float lut[16];
    __shared__ float red[kGemvWarps][kGemvRows][33];
    fill_lut(lut);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const WeightReader<T, kMode> wr{p, lut};
    const int rank = p.rank;

    for (int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp; n < p.N;
         n += static_cast<int64_t>(gridDim.x) * kGemvWarps) {
        const int64_t begin = n * p.K, end = begin + p.K;
        const int64_t cfirst = (begin + CE - 1) / CE, clast = end / CE;  // whole chunks [cfirst, clast)
        for (int64_t mg = 0; mg < p.M; mg += kGemvRows) {
            const int mc = static_cast<int>(p.M - mg < kGemvRows ? p.M - mg : kGemvRows);
            const int64_t xrow = mg * p.K;
            float acc[kGemvRows];
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r) acc[r] = 0.0f;
            if (cfirst < clast) {
                for (int64_t c = cfirst + lane; c < clast; c += 32) {
                    const Chunk<T, kMode> ch(wr, c);
                    const int64_t k0 = c * CE - begin;
                    if constexpr (kMode == WMode::Dense) {
                        // ≤ 8 values: unroll the whole chunk.
#pragma unroll
                        for (int w = 0; w < 4; ++w) gemv_word(wr, ch, w, xrow + k0 + w * PW, mc, acc);
                    } else {
                        // 32 values x 8 rows: one word at a time keeps the
                        // registers below the budget.
#pragma unroll 1
                        for (int w = 0; w < 4; ++w) gemv_word(wr, ch, w, xrow + k0 + w * PW, mc, acc);
                    }
                }
                if (lane < cfirst * CE - begin) gemv_scalar(wr, begin + lane, begin, xrow, mc, acc);   // head, < CE elements
                if (lane < end - clast * CE) gemv_scalar(wr, clast * CE + lane, begin, xrow, mc, acc);  // tail, < CE elements
            } else {
                for (int64_t i = begin + lane; i < end; i += 32) gemv_scalar(wr, i, begin, xrow, mc, acc);  // row inside one chunk
            }
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r) red[warp][r][lane] = acc[r];
            __syncwarp();
            if (lane < mc) {
                float v = 0.0f;
                for (int l = 0; l < 32; ++l) v = __fadd_rn(v, red[warp][lane][l]);
                const int64_t m = mg + lane;
                if (rank > 0) {
                    float s = 0.0f;
                    for (int j = 0; j < rank; ++j) s = fmaf(p.u[m * rank + j], load_f<T>(p.lora_b, n * rank + j), s);
                    v = __fadd_rn(v, s);
                }
                if (p.bias != nullptr) v = __fadd_rn(v, load_f<T>(p.bias, n));
                static_cast<T*>(p.out)[m * p.N + n] = from_f32<T>(v);
            }
            __syncwarp();  // red is rewritten by the next pass
        }
    }
}

// (d) rank projections: proj_out[m][j] = proj_scale · Σ_l P[m][l]·Q(j,l).
template <typename T>
TLI_DEVICE void proj_body(const TliLoraParams& p) {
    __shared__ float red[kProjThreads];
    const int tid = threadIdx.x;
    const int rank = p.rank;
    int rp2 = 1;
    while (rp2 < rank) rp2 <<= 1;
    const int slices = kProjThreads / rp2;
    const int j = tid & (rp2 - 1), slice = tid / rp2;
    const int64_t m = blockIdx.x;
    const bool u_mode = p.proj_mode == 0;
    const int64_t L = u_mode ? p.K : p.N;
    const void* P = u_mode ? p.x : p.dy;
    float acc = 0.0f;
    if (j < rank) {
        for (int64_t l = slice; l < L; l += slices) {
            if (u_mode && p.drop_threshold != 0 &&
                !tli_dropout_keep(p.drop_seed, static_cast<uint64_t>(m * p.K + l), p.drop_threshold))
                continue;
            const float q = u_mode ? load_f<T>(p.lora_a, j * p.K + l) : load_f<T>(p.lora_b, l * rank + j);
            acc = fmaf(load_f<T>(P, m * L + l), q, acc);
        }
    }
    red[tid] = acc;
    __syncthreads();
    if (tid < rank) {
        float v = 0.0f;
        for (int s = 0; s < slices; ++s) v = __fadd_rn(v, red[s * rp2 + tid]);
        p.proj_out[m * rank + tid] = __fmul_rn(v, p.proj_scale);
    }
}

// (d) dA and dB: blocks [0, a_blocks) write dA, the rest dB.
template <typename T>
TLI_DEVICE void dadb_body(const TliLoraParams& p) {
    const int rank = p.rank;
    const int64_t jgroups = (rank + kDadbRanks - 1) / kDadbRanks;
    const int64_t a_blocks = p.da != nullptr ? (p.K + kDadbThreads - 1) / kDadbThreads * jgroups : 0;
    int64_t b = blockIdx.x;
    float acc[kDadbRanks];
#pragma unroll
    for (int jj = 0; jj < kDadbRanks; ++jj) acc[jj] = 0.0f;
    if (b < a_blocks) {
        const int64_t k = (b / jgroups) * kDadbThreads + threadIdx.x;
        const int j0 = static_cast<int>(b % jgroups) * kDadbRanks;
        if (k >= p.K) return;
        for (int64_t m = 0; m < p.M; ++m) {
            if (p.drop_threshold != 0 &&
                !tli_dropout_keep(p.drop_seed, static_cast<uint64_t>(m * p.K + k), p.drop_threshold))
                continue;
            const float xv = load_f<T>(p.x, m * p.K + k);
#pragma unroll
            for (int jj = 0; jj < kDadbRanks; ++jj)
                if (j0 + jj < rank) acc[jj] = fmaf(tli_load_ro(p.g + m * rank + j0 + jj), xv, acc[jj]);
        }
        const float f = __fmul_rn(p.scale, p.keep_scale);
#pragma unroll
        for (int jj = 0; jj < kDadbRanks; ++jj)
            if (j0 + jj < rank) static_cast<T*>(p.da)[(j0 + jj) * p.K + k] = from_f32<T>(__fmul_rn(acc[jj], f));
    } else {
        b -= a_blocks;
        const int64_t n = (b / jgroups) * kDadbThreads + threadIdx.x;
        const int j0 = static_cast<int>(b % jgroups) * kDadbRanks;
        if (n >= p.N) return;
        for (int64_t m = 0; m < p.M; ++m) {
            const float d = load_f<T>(p.dy, m * p.N + n);
#pragma unroll
            for (int jj = 0; jj < kDadbRanks; ++jj)
                if (j0 + jj < rank) acc[jj] = fmaf(tli_load_ro(p.u + m * rank + j0 + jj), d, acc[jj]);
        }
#pragma unroll
        for (int jj = 0; jj < kDadbRanks; ++jj)
            if (j0 + jj < rank) static_cast<T*>(p.db)[n * rank + j0 + jj] = from_f32<T>(__fmul_rn(acc[jj], p.scale));
    }
}

}  // namespace

#define TLI_LORA_WEIGHT_ENTRIES(WSUF, MODE, SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(kTileThreads)                                                  \
        lora_fwd_tile_##WSUF##_##SUFFIX(const TliLoraParams p) {                                               \
        tile_body<T, MODE, false>(p);                                                                          \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(kTileThreads) lora_bwd_dx_##WSUF##_##SUFFIX(const TliLoraParams p) { \
        tile_body<T, MODE, true>(p);                                                                           \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(kGemvThreads)                                                  \
        lora_fwd_gemv_##WSUF##_##SUFFIX(const TliLoraParams p) {                                               \
        gemv_body<T, MODE>(p);                                                                                 \
    }

#define TLI_LORA_ENTRIES(SUFFIX, T)                                                                            \
    TLI_LORA_WEIGHT_ENTRIES(dense, WMode::Dense, SUFFIX, T)                                                    \
    TLI_LORA_WEIGHT_ENTRIES(nf4, WMode::Nf4, SUFFIX, T)                                                        \
    TLI_LORA_WEIGHT_ENTRIES(nf4dq, WMode::Nf4Dq, SUFFIX, T)                                                    \
    extern "C" __global__ void __launch_bounds__(kProjThreads) lora_proj_##SUFFIX(const TliLoraParams p) {      \
        proj_body<T>(p);                                                                                       \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(kDadbThreads) lora_bwd_dadb_##SUFFIX(const TliLoraParams p) {  \
        dadb_body<T>(p);                                                                                       \
    }

TLI_LORA_ENTRIES(f32, float)
TLI_LORA_ENTRIES(bf16, __nv_bfloat16)
TLI_LORA_ENTRIES(f16, __half)
