// Simulator exports of the fused NF4 + LoRA kernels (kernels/lora_matmul.cu):
// one per `extern "C"` entry point, each taking the kernel's one
// TliLoraParams argument by value.
#include "../lora_matmul.cu"

#define TLI_SIM_LORA_WEIGHT_EXPORTS(WSUF, SUFFIX)                                                 \
    TLI_SIM_EXPORT(lora_fwd_tile_##WSUF##_##SUFFIX, (TliLoraParams p), (p))                       \
    TLI_SIM_EXPORT(lora_bwd_dx_##WSUF##_##SUFFIX, (TliLoraParams p), (p))                         \
    TLI_SIM_EXPORT(lora_fwd_gemv_##WSUF##_##SUFFIX, (TliLoraParams p), (p))

#define TLI_SIM_LORA_EXPORTS(SUFFIX)                                                              \
    TLI_SIM_LORA_WEIGHT_EXPORTS(dense, SUFFIX)                                                    \
    TLI_SIM_LORA_WEIGHT_EXPORTS(nf4, SUFFIX)                                                      \
    TLI_SIM_LORA_WEIGHT_EXPORTS(nf4dq, SUFFIX)                                                    \
    TLI_SIM_EXPORT(lora_proj_##SUFFIX, (TliLoraParams p), (p))                                    \
    TLI_SIM_EXPORT(lora_bwd_dadb_##SUFFIX, (TliLoraParams p), (p))

TLI_SIM_LORA_EXPORTS(f32)
TLI_SIM_LORA_EXPORTS(bf16)
TLI_SIM_LORA_EXPORTS(f16)
