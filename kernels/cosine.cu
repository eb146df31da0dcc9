// Masked mean pooling, L2 normalisation and cosine similarity of embeddings:
// the evaluation hot path (thousands of word embeddings per layer).
//
// Math (inputs T = f32 | bf16 | f16, widened exactly to f32; every sum and
// product in f32, written as explicit fmaf so the simulator and the device
// round identically):
//
//   pool      p[b,d]  = fl(1/c_b) * sum_{t : mask[b,t] != 0} h[b,t,d]   (t ascending)
//                       c_b = #{t : mask[b,t] != 0}; c_b = 0 gives p[b,:] = 0
//                       (a defined zero, never an error: no device-to-host
//                       round trip to validate masks)
//   normalise q[b,:]  = p[b,:] * (1 / max(||p[b,:]||, eps))  (F.normalize, eps 1e-12)
//   pairs     cos[i]  = clamp( <p_a, p_b> * (1 / max(||p_a||, eps)) * (1 / max(||p_b||, eps)), -1, 1 )
//                       (F.cosine_similarity's per-norm clamp, eps 1e-8;
//                       zero vectors give 0; NaN propagates)
//   matrix    C[i,j]  = clamp( <a_i / max(||a_i||, eps), b_j / max(||b_j||, eps)>, -1, 1 )
//
// Overflow: ||p||^2 overflows f32 once ||p|| > 1.8e19, long before p does.
// Every reduction first runs in plain f32; when a block's sums are not all
// finite it recomputes them on p * 2^-e, where 2^e bounds max |p| (exact
// power-of-two scaling; cosine is scale invariant and the eps clamp is scaled
// with it). That slow path costs two more passes and runs only for such
// rows, so huge magnitudes up to the f32 range give the right answer.
//
// Layout:
//   h     T  [B, S, D] with strides (stride_b, stride_t, 1) in elements: a
//            layer slice of a larger tensor is a pointer and two strides
//   mask  u8 [B, S] contiguous, nonzero = pooled; null = every position
//   out   f32, contiguous: pooled [B, D], cos [N], C [N, M], row_scale [R, 2]
//
// Work split:
//   cosine_pool, cosine_pairs: one 256-thread block per row / pair
//   (grid-stride over rows). Thread k owns the 16-byte column chunks
//   k, k+256, ... (8 bf16/f16 or 4 f32 columns each) and, per chunk, walks
//   the set positions of the mask, so a warp reads 512 contiguous bytes per
//   position and masked-out positions cost no traffic at all. The pooled
//   chunk stays in registers: the pair kernel folds it straight into the
//   thread's partial <p_a,p_b>, ||p_a||^2, ||p_b||^2, which a warp xor
//   butterfly and one shared-memory step reduce for the block. Pooled
//   vectors are written only when the caller passes an output for them.
//   When an operand is not 16-byte aligned, or D or a stride is not a whole
//   number of chunks, the block uses 1-column units instead (pooled values
//   are bit-identical either way; the dot products are summed in another
//   order, so they may differ in the last bits).
//
//   cosine_matrix: a tiled SIMT product. 64x64 output tile per block,
//   k-steps of 16; each thread accumulates a 4x4 micro-tile (rows ty+16i,
//   columns tx+16j). Operands are widened and scaled to unit rows on their
//   way into shared memory (x * 2^-e * r, with (2^-e, r) per row from
//   cosine_pool's row_scale output), so the dot products are of unit
//   vectors and cannot overflow.
//
// Launch contract (checked in Rust before launch): blockDim = (256,1,1);
// cosine_pool / cosine_pairs any gridDim.x >= 1; cosine_matrix
// gridDim = (ceil(M/64), ceil(N/64)); 1 <= D <= 2^30; every index the
// strides imply lies inside its buffer.
//
// Roofline (H100 SXM, 3.35 TB/s, ~990 dense bf16 TFLOP/s):
//   pairs, bf16, D = 4096, S set positions per side: 2 * S * 8 KiB read per
//   pair + 4 B written; N = 10k pairs of single vectors (S = 1) is 164 MB,
//   49 us. About 6 flop per 2-byte element: memory bound by ~150x.
//   matrix, N = M = 8192, D = 4096: 2NMD = 550 GFLOP, 0.56 ms on tensor
//   cores, 2 * 67 MB in and 268 MB out (0.12 ms): compute bound. This SIMT
//   version peaks at the f32 FMA rate (~67 TFLOP/s, 8.2 ms floor); a
//   tensor-core (mma.sync bf16) variant is the next step once the simulator
//   models mma fragments.

#include "common/device.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Resident blocks per SM the pool/pair kernels ask ptxas for: a register cap
// of 65536 / (3 * 256) = 85. With only a thread count in __launch_bounds__,
// nvcc 13.4 held cosine_pairs_f32 to 48 registers and spilled; at 3 blocks
// (768 threads, 24 warps per SM) every entry fits without spills, and
// 24 warps each with a 16-byte load in flight per position is the memory
// parallelism this first version settles for.
constexpr int kMinBlocks = 3;

// Elements per 16-byte chunk.
template <typename T>
struct Chunk {
    static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// ---- loads: W consecutive elements widened to f32 ----------------------

TLI_DEVICE float widen(float v) { return v; }
TLI_DEVICE float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
TLI_DEVICE float widen(__half v) { return __half2float(v); }

template <typename T>
TLI_DEVICE void load_units(const T* p, float (&v)[1]) {
    v[0] = widen(*p);
}
TLI_DEVICE void load_units(const float* p, float (&v)[4]) {
    const uint4 q = tli_load_ro_16(reinterpret_cast<const uint4*>(p));
    v[0] = __uint_as_float(q.x);
    v[1] = __uint_as_float(q.y);
    v[2] = __uint_as_float(q.z);
    v[3] = __uint_as_float(q.w);
}
// bf16 -> f32 is exact: the 16 bits become the high half of the f32.
TLI_DEVICE void load_units(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 q = tli_load_ro_16(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
TLI_DEVICE void load_units(const __half* p, float (&v)[8]) {
    const uint4 q = tli_load_ro_16(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] & 0xffffu)));
        v[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16)));
    }
}

// Finite (not NaN, not +-inf): spelled with fabsf because the C++ and CUDA
// headers disagree on where isfinite lives.
TLI_DEVICE bool is_finite(float x) { return fabsf(x) <= 3.40282347e38f; }

// Correctly rounded 1/x for a normal x whose reciprocal is normal, without
// div.rn / rcp.rn (on the device those are subroutine calls, and the
// register saves around a call show up as spills): start from the fast
// reciprocal (MUFU.RCP on the device, exact under the simulator), take one
// Newton step, then keep whichever of r and its two neighbours leaves the
// smallest residual |1 - x*r|. The FMA computes each residual exactly, and
// |1/x - r| = |1 - x*r| / |x|, so the smallest residual is the nearest
// float; a tie would need 1/x to be a 25-bit midpoint, which only a power
// of two x could give, and its reciprocal is exact.
TLI_DEVICE float rcp_exact(float x) {
    float r = __fdividef(1.0f, x);
    r = __fmaf_rn(r, __fmaf_rn(-x, r, 1.0f), r);
    const float lo = __uint_as_float(__float_as_uint(r) - 1u);
    const float hi = __uint_as_float(__float_as_uint(r) + 1u);
    float best = r;
    float e = fabsf(__fmaf_rn(-x, r, 1.0f));
    const float e_lo = fabsf(__fmaf_rn(-x, lo, 1.0f));
    if (e_lo < e) {
        best = lo;
        e = e_lo;
    }
    if (fabsf(__fmaf_rn(-x, hi, 1.0f)) < e) best = hi;
    return best;
}

// sqrt(x) for finite x >= 0 within an ulp, without sqrt.rn (a subroutine
// call on the device, like div.rn): the fast reciprocal square root
// (MUFU.RSQ on the device, 1/sqrt rounded twice under the simulator), then
// one Newton step on r = x * rsqrt(x) with an exact FMA residual. The device
// and the simulator may differ in the last bit of a norm; nothing depends on
// more. 0, NaN and infinity are returned as they are.
TLI_DEVICE float sqrt_near(float x) {
    if (!(x > 0.0f) || !is_finite(x)) return x;
    const float y = rsqrtf(x);
    const float r = __fmul_rn(x, y);
    return __fmaf_rn(__fmul_rn(0.5f, y), __fmaf_rn(-r, r, x), r);
}

// ---- one masked row: [S, D] with its mask --------------------------------

template <typename T>
struct Row {
    const T* h;             // h[b, 0, 0]
    int64_t stride_t;       // elements between positions
    const uint8_t* mask;    // mask[b, 0], or null = all positions
    int seq;                // S
    float inv_count;        // 1 / positions pooled (rounded once), 0 for none

    TLI_DEVICE static Row make(const T* h0, int64_t stride_b, int64_t stride_t, const uint8_t* mask0, int seq,
                               int64_t b) {
        Row r;
        r.h = h0 + b * stride_b;
        r.stride_t = stride_t;
        r.mask = mask0 != nullptr ? mask0 + b * seq : nullptr;
        r.seq = seq;
        int c = seq;
        if (r.mask != nullptr) {
            c = 0;
            for (int t = 0; t < seq; ++t) c += tli_load_ro(r.mask + t) != 0;
        }
        // Exact count (S < 2^24 is checked in Rust), one correctly rounded
        // reciprocal: the mean is sum * (1/c), two roundings, and the
        // pooling loop has no division.
        r.inv_count = c > 0 ? rcp_exact(static_cast<float>(c)) : 0.0f;
        return r;
    }

    // Whether 16-byte chunk loads are valid for this row and dim.
    TLI_DEVICE bool vector_ok(int dim) const {
        constexpr int V = Chunk<T>::kElems;
        return (reinterpret_cast<uintptr_t>(h) & 15u) == 0 && stride_t % V == 0 && dim % V == 0;
    }

    // p[k] = mean over the pooled positions of h[t, d0 + k], k < W.
    template <int W>
    TLI_DEVICE void pooled(int64_t d0, float (&p)[W]) const {
#pragma unroll
        for (int k = 0; k < W; ++k) p[k] = 0.0f;
        for (int t = 0; t < seq; ++t) {
            if (mask != nullptr && tli_load_ro(mask + t) == 0) continue;
            float v[W];
            load_units(h + t * stride_t + d0, v);
#pragma unroll
            for (int k = 0; k < W; ++k) p[k] = __fadd_rn(p[k], v[k]);
        }
        // A row with no pooled position is the zero vector (its sums are 0).
#pragma unroll
        for (int k = 0; k < W; ++k) p[k] = __fmul_rn(p[k], inv_count);
    }
};

// ---- block reductions (blockDim.x == kThreads) ---------------------------
//
// Warp xor butterflies leave the warp total in every lane (a + b and b + a
// are the same float), then warp totals meet in shared memory and every
// thread adds them in the same order: all threads end with identical bits,
// so branches on the result are uniform over the block.

template <int N>
TLI_DEVICE void block_sum(float (&v)[N]) {
    __shared__ float red[kWarps * N];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < N; ++k) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v[k] = __fadd_rn(v[k], __shfl_xor_sync(kFullMask, v[k], off));
        if (lane == 0) red[warp * N + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) {
        float s = red[k];
        for (int w = 1; w < kWarps; ++w) s = __fadd_rn(s, red[w * N + k]);
        v[k] = s;
    }
    __syncthreads();  // red is reused by the next reduction
}

template <int N>
TLI_DEVICE void block_max(float (&v)[N]) {
    __shared__ float red[kWarps * N];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < N; ++k) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v[k] = fmaxf(v[k], __shfl_xor_sync(kFullMask, v[k], off));
        if (lane == 0) red[warp * N + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) {
        float s = red[k];
        for (int w = 1; w < kWarps; ++w) s = fmaxf(s, red[w * N + k]);
        v[k] = s;
    }
    __syncthreads();
}

// A power of two s such that m * s < 4 (and >= 0.5 unless m is above
// 2^126): s = 2^(126 - E) for m's biased exponent E, clamped to the normal
// range [2^-126, 2^126]. Built from the exponent bits rather than
// frexpf/ldexpf, which compile to calls (and spills) on the device. 1 for
// m = 0 or a non-finite m (nothing to gain from scaling then).
TLI_DEVICE float scale_for(float m) {
    if (!(m > 0.0f) || !is_finite(m)) return 1.0f;
    const int biased = static_cast<int>((__float_as_uint(m) >> 23) & 0xffu);
    const int se = min(max(253 - biased, 1), 253);
    return __uint_as_float(static_cast<uint32_t>(se) << 23);
}

TLI_DEVICE bool all_finite(float a, float b, float c) { return is_finite(a) && is_finite(b) && is_finite(c); }

// Clamp to [-1, 1] keeping NaN (fminf/fmaxf would turn NaN into a bound).
TLI_DEVICE float clamp_unit(float c) { return c > 1.0f ? 1.0f : (c < -1.0f ? -1.0f : c); }

// ---- per-thread passes over the columns a thread owns ---------------------

// Sum of (p*s)^2 over this thread's units of one row; optionally store p.
template <int W, typename T>
TLI_DEVICE float row_sumsq(const Row<T>& r, int dim, float s, float* store) {
    float acc = 0.0f;
    for (int64_t d0 = static_cast<int64_t>(threadIdx.x) * W; d0 < dim; d0 += static_cast<int64_t>(kThreads) * W) {
        float p[W];
        r.template pooled<W>(d0, p);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            if (store != nullptr) store[d0 + k] = p[k];
            const float x = __fmul_rn(p[k], s);
            acc = __fmaf_rn(x, x, acc);
        }
    }
    return acc;
}

template <int W, typename T>
TLI_DEVICE float row_absmax(const Row<T>& r, int dim) {
    float m = 0.0f;
    for (int64_t d0 = static_cast<int64_t>(threadIdx.x) * W; d0 < dim; d0 += static_cast<int64_t>(kThreads) * W) {
        float p[W];
        r.template pooled<W>(d0, p);
#pragma unroll
        for (int k = 0; k < W; ++k) m = fmaxf(m, fabsf(p[k]));
    }
    return m;
}

// acc += (<pa*sa, pb*sb>, ||pa*sa||^2, ||pb*sb||^2) over this thread's units.
template <int W, typename T>
TLI_DEVICE void pair_sums(const Row<T>& a, const Row<T>& b, int dim, float sa, float sb, float* store_a,
                          float* store_b, float (&acc)[3]) {
    for (int64_t d0 = static_cast<int64_t>(threadIdx.x) * W; d0 < dim; d0 += static_cast<int64_t>(kThreads) * W) {
        float pa[W], pb[W];
        a.template pooled<W>(d0, pa);
        b.template pooled<W>(d0, pb);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            if (store_a != nullptr) store_a[d0 + k] = pa[k];
            if (store_b != nullptr) store_b[d0 + k] = pb[k];
            const float xa = __fmul_rn(pa[k], sa);
            const float xb = __fmul_rn(pb[k], sb);
            acc[0] = __fmaf_rn(xa, xb, acc[0]);
            acc[1] = __fmaf_rn(xa, xa, acc[1]);
            acc[2] = __fmaf_rn(xb, xb, acc[2]);
        }
    }
}

template <int W, typename T>
TLI_DEVICE void pair_absmax(const Row<T>& a, const Row<T>& b, int dim, float (&m)[2]) {
    m[0] = row_absmax<W>(a, dim);
    m[1] = row_absmax<W>(b, dim);
}

// ---- cosine_pool -----------------------------------------------------------

// One row: the pooled (optionally normalised) vector into out (if not null)
// and the row's (scale, 1 / max(||p * scale||, eps * scale)) into
// row_scale (if not null).
template <int W, typename T>
TLI_DEVICE void pool_row(const Row<T>& r, int dim, float eps, bool normalize, float* out, float* row_scale) {
    float ss[1] = {row_sumsq<W>(r, dim, 1.0f, out)};
    block_sum(ss);
    float s = 1.0f;
    if (!is_finite(ss[0])) {
        float m[1] = {row_absmax<W>(r, dim)};
        block_max(m);
        s = scale_for(m[0]);
        ss[0] = row_sumsq<W>(r, dim, s, nullptr);
        block_sum(ss);
    }
    const float den = fmaxf(sqrt_near(ss[0]), __fmul_rn(eps, s));
    const float inv = rcp_exact(den);
    if (normalize && out != nullptr) {
        // Each thread rescales exactly the elements it stored above.
        for (int64_t d0 = static_cast<int64_t>(threadIdx.x) * W; d0 < dim; d0 += static_cast<int64_t>(kThreads) * W) {
#pragma unroll
            for (int k = 0; k < W; ++k) out[d0 + k] = __fmul_rn(__fmul_rn(out[d0 + k], s), inv);
        }
    }
    if (row_scale != nullptr && threadIdx.x == 0) {
        row_scale[0] = s;
        row_scale[1] = inv;
    }
}

template <typename T>
TLI_DEVICE void pool_body(const T* TLI_RESTRICT h, int64_t stride_b, int64_t stride_t, const uint8_t* TLI_RESTRICT mask,
                          int rows, int seq, int dim, float eps, int normalize, float* TLI_RESTRICT out,
                          float* TLI_RESTRICT row_scale) {
    constexpr int V = Chunk<T>::kElems;
    for (int64_t b = blockIdx.x; b < rows; b += gridDim.x) {
        const Row<T> r = Row<T>::make(h, stride_b, stride_t, mask, seq, b);
        float* o = out != nullptr ? out + b * dim : nullptr;
        float* rs = row_scale != nullptr ? row_scale + 2 * b : nullptr;
        if (r.vector_ok(dim)) {
            pool_row<V>(r, dim, eps, normalize != 0, o, rs);
        } else {
            pool_row<1>(r, dim, eps, normalize != 0, o, rs);
        }
    }
}

// ---- cosine_pairs ------------------------------------------------------------

template <int W, typename T>
TLI_DEVICE float pair_cosine(const Row<T>& a, const Row<T>& b, int dim, float eps, float* store_a, float* store_b) {
    float acc[3] = {0.0f, 0.0f, 0.0f};
    pair_sums<W>(a, b, dim, 1.0f, 1.0f, store_a, store_b, acc);
    block_sum(acc);
    float sa = 1.0f, sb = 1.0f;
    if (!all_finite(acc[0], acc[1], acc[2])) {
        float m[2];
        pair_absmax<W>(a, b, dim, m);
        block_max(m);
        sa = scale_for(m[0]);
        sb = scale_for(m[1]);
        acc[0] = acc[1] = acc[2] = 0.0f;
        pair_sums<W>(a, b, dim, sa, sb, nullptr, nullptr, acc);
        block_sum(acc);
    }
    const float da = fmaxf(sqrt_near(acc[1]), __fmul_rn(eps, sa));
    const float db = fmaxf(sqrt_near(acc[2]), __fmul_rn(eps, sb));
    // dot * (1/da) * (1/db), left to right: da * db can overflow where
    // dot / da cannot.
    return clamp_unit(__fmul_rn(__fmul_rn(acc[0], rcp_exact(da)), rcp_exact(db)));
}

template <typename T>
TLI_DEVICE void pairs_body(const T* TLI_RESTRICT ha, int64_t sab, int64_t sat, const uint8_t* TLI_RESTRICT mask_a,
                           int seq_a, const T* TLI_RESTRICT hb, int64_t sbb, int64_t sbt,
                           const uint8_t* TLI_RESTRICT mask_b, int seq_b, int pairs, int dim, float eps,
                           float* TLI_RESTRICT cos, float* TLI_RESTRICT pooled_a, float* TLI_RESTRICT pooled_b) {
    constexpr int V = Chunk<T>::kElems;
    for (int64_t i = blockIdx.x; i < pairs; i += gridDim.x) {
        const Row<T> a = Row<T>::make(ha, sab, sat, mask_a, seq_a, i);
        const Row<T> b = Row<T>::make(hb, sbb, sbt, mask_b, seq_b, i);
        float* sa = pooled_a != nullptr ? pooled_a + i * dim : nullptr;
        float* sb = pooled_b != nullptr ? pooled_b + i * dim : nullptr;
        const float c = (a.vector_ok(dim) && b.vector_ok(dim)) ? pair_cosine<V>(a, b, dim, eps, sa, sb)
                                                               : pair_cosine<1>(a, b, dim, eps, sa, sb);
        if (threadIdx.x == 0) cos[i] = c;
    }
}

// ---- cosine_matrix -------------------------------------------------------------

constexpr int kTileM = 64;  // rows of a per block
constexpr int kTileN = 64;  // rows of b per block
constexpr int kTileK = 16;  // depth per shared-memory step
// +1 column of padding: the transposed tile stores (k fastest across a warp)
// then hit 16 different banks instead of one.
constexpr int kPad = 1;

// Load a kTileK x 64 slab of rows [row0, row0 + 64) x depth [k0, k0 + 16),
// widened, scaled to unit rows, transposed into tile[k][row]. Out-of-range
// rows and depths load 0.
template <typename T>
TLI_DEVICE void load_tile(const T* TLI_RESTRICT x, int64_t ld, const float* TLI_RESTRICT scale, int rows, int dim,
                          int row0, int k0, float (&tile)[kTileK][kTileM + kPad]) {
#pragma unroll
    for (int i = 0; i < (kTileM * kTileK) / kThreads; ++i) {
        const int idx = threadIdx.x + i * kThreads;
        const int r = idx / kTileK;  // k fastest: a half-warp reads 16 consecutive elements of one row
        const int k = idx % kTileK;
        const int row = row0 + r;
        const int kk = k0 + k;
        float v = 0.0f;
        if (row < rows && kk < dim) {
            const float s = tli_load_ro(scale + 2 * static_cast<int64_t>(row));
            const float inv = tli_load_ro(scale + 2 * static_cast<int64_t>(row) + 1);
            v = __fmul_rn(__fmul_rn(widen(x[row * ld + kk]), s), inv);
        }
        tile[k][r] = v;
    }
}

template <typename T>
TLI_DEVICE void matrix_body(const T* TLI_RESTRICT a, int64_t lda, const float* TLI_RESTRICT scale_a, int n,
                            const T* TLI_RESTRICT b, int64_t ldb, const float* TLI_RESTRICT scale_b, int m, int dim,
                            float* TLI_RESTRICT out) {
    __shared__ float as[kTileK][kTileM + kPad];
    __shared__ float bs[kTileK][kTileN + kPad];
    const int tx = threadIdx.x % 16;  // column group
    const int ty = threadIdx.x / 16;  // row group
    const int row0 = blockIdx.y * kTileM;
    const int col0 = blockIdx.x * kTileN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    for (int k0 = 0; k0 < dim; k0 += kTileK) {
        load_tile(a, lda, scale_a, n, dim, row0, k0, as);
        load_tile(b, ldb, scale_b, m, dim, col0, k0, bs);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kTileK; ++k) {
            float ra[4], rb[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) ra[i] = as[k][ty + 16 * i];  // two rows per warp: broadcasts
#pragma unroll
            for (int j = 0; j < 4; ++j) rb[j] = bs[k][tx + 16 * j];  // 16 consecutive words: conflict-free
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(ra[i], rb[j], acc[i][j]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + ty + 16 * i;
        if (row >= n) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = col0 + tx + 16 * j;
            if (col < m) out[static_cast<int64_t>(row) * m + col] = clamp_unit(acc[i][j]);
        }
    }
}

}  // namespace

#define TLI_COSINE_ENTRIES(SUFFIX, T)                                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)                                             \
        cosine_pool_##SUFFIX(const T* h, int64_t stride_b, int64_t stride_t, const uint8_t* mask, int32_t rows,     \
                             int32_t seq, int32_t dim, float eps, int32_t normalize, float* out, float* row_scale) { \
        pool_body(h, stride_b, stride_t, mask, rows, seq, dim, eps, normalize, out, row_scale);                    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) cosine_pairs_##SUFFIX(                                   \
        const T* ha, int64_t sab, int64_t sat, const uint8_t* mask_a, int32_t seq_a, const T* hb, int64_t sbb,      \
        int64_t sbt, const uint8_t* mask_b, int32_t seq_b, int32_t pairs, int32_t dim, float eps, float* cos,        \
        float* pooled_a, float* pooled_b) {                                                                         \
        pairs_body(ha, sab, sat, mask_a, seq_a, hb, sbb, sbt, mask_b, seq_b, pairs, dim, eps, cos, pooled_a,        \
                   pooled_b);                                                                                       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads)                                                         \
        cosine_matrix_##SUFFIX(const T* a, int64_t lda, const float* scale_a, int32_t n, const T* b, int64_t ldb,    \
                               const float* scale_b, int32_t m, int32_t dim, float* out) {                          \
        matrix_body(a, lda, scale_a, n, b, ldb, scale_b, m, dim, out);                                              \
    }

TLI_COSINE_ENTRIES(f32, float)
TLI_COSINE_ENTRIES(bf16, __nv_bfloat16)
TLI_COSINE_ENTRIES(f16, __half)
