// Simulator exports of the cosine kernels (kernels/cosine.cu), one per
// `extern "C"` entry point, with the kernel's exact parameter lists.
#include "../cosine.cu"

#define TLI_SIM_COSINE_EXPORTS(SUFFIX, T)                                                                      \
    TLI_SIM_EXPORT(cosine_pool_##SUFFIX,                                                                       \
                   (const T* h, int64_t stride_b, int64_t stride_t, const uint8_t* mask, int32_t rows,         \
                    int32_t seq, int32_t dim, float eps, int32_t normalize, float* out, float* row_scale),     \
                   (h, stride_b, stride_t, mask, rows, seq, dim, eps, normalize, out, row_scale))             \
    TLI_SIM_EXPORT(cosine_pairs_##SUFFIX,                                                                      \
                   (const T* ha, int64_t sab, int64_t sat, const uint8_t* mask_a, int32_t seq_a, const T* hb,  \
                    int64_t sbb, int64_t sbt, const uint8_t* mask_b, int32_t seq_b, int32_t pairs,             \
                    int32_t dim, float eps, float* cos, float* pooled_a, float* pooled_b),                     \
                   (ha, sab, sat, mask_a, seq_a, hb, sbb, sbt, mask_b, seq_b, pairs, dim, eps, cos, pooled_a,  \
                    pooled_b))                                                                                 \
    TLI_SIM_EXPORT(cosine_matrix_##SUFFIX,                                                                     \
                   (const T* a, int64_t lda, const float* scale_a, int32_t n, const T* b, int64_t ldb,         \
                    const float* scale_b, int32_t m, int32_t dim, float* out),                                 \
                   (a, lda, scale_a, n, b, ldb, scale_b, m, dim, out))

TLI_SIM_COSINE_EXPORTS(f32, float)
TLI_SIM_COSINE_EXPORTS(bf16, __nv_bfloat16)
TLI_SIM_COSINE_EXPORTS(f16, __half)
