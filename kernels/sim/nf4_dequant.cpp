// Simulator exports of the NF4 dequantization kernels (kernels/nf4_dequant.cu),
// one per `extern "C"` entry point, with the kernel's exact parameter lists.
#include "../nf4_dequant.cu"

#define TLI_SIM_NF4_EXPORTS(SUFFIX, T)                                                                         \
    TLI_SIM_EXPORT(nf4_dequant_##SUFFIX,                                                                       \
                   (const uint8_t* packed, const float* absmax, T* out, int64_t n, int32_t log2_bs),         \
                   (packed, absmax, out, n, log2_bs))                                                         \
    TLI_SIM_EXPORT(nf4_dequant_dq_##SUFFIX,                                                                    \
                   (const uint8_t* packed, const uint8_t* qabsmax, const float* absmax2, const float* code2,  \
                    float offset, int32_t log2_nested, T* out, int64_t n, int32_t log2_bs),                   \
                   (packed, qabsmax, absmax2, code2, offset, log2_nested, out, n, log2_bs))

TLI_SIM_NF4_EXPORTS(f32, float)
TLI_SIM_NF4_EXPORTS(bf16, __nv_bfloat16)
TLI_SIM_NF4_EXPORTS(f16, __half)
