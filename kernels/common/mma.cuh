// Tensor-core matrix multiply-accumulate, one warp-wide instruction:
//
//     D[16x8] (f32) = A[16x16] (bf16|f16, row-major) * B[16x8] (same, "col")
//                     + C[16x8] (f32)
//
// i.e. PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`
// (sm_80+). Every lane of the warp must call it, with the same type, from
// converged code. Fragment ownership per lane (groupID g = lane >> 2,
// threadID_in_group t = lane % 4; a .b32 register holds two 16-bit elements,
// the lower column/row index in the low half):
//
//     a[0] = A[g][2t..2t+1]      a[1] = A[g+8][2t..2t+1]
//     a[2] = A[g][2t+8..2t+9]    a[3] = A[g+8][2t+8..2t+9]
//     b[0] = B[2t..2t+1][g]      b[1] = B[2t+8..2t+9][g]
//     c/d[0..1] = C[g][2t..2t+1] c/d[2..3] = C[g+8][2t..2t+1]
//
// On the device this is inline PTX; under the simulator it is a warp
// collective that gathers the 32 fragments, computes in f32 and scatters the
// results (kernels/sim/sim.h, section 8, also documents the accumulation
// order). `d` may be the same array as `c`.
#pragma once

#include "device.cuh"

TLI_DEVICE void tli_mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                      const float (&c)[4]) {
#if TLI_SIM
    tli_sim_mma_m16n8k16(tli_sim::MmaType::BF16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

TLI_DEVICE void tli_mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                     const float (&c)[4]) {
#if TLI_SIM
    tli_sim_mma_m16n8k16(tli_sim::MmaType::F16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// Overloads by element type, for kernels templated on it.
TLI_DEVICE void tli_mma_m16n8k16(__nv_bfloat16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
    tli_mma_m16n8k16_bf16(d, a, b, c);
}
TLI_DEVICE void tli_mma_m16n8k16(__half, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
    tli_mma_m16n8k16_f16(d, a, b, c);
}

// Two consecutive 16-bit elements (p 4-byte aligned) as one .b32 fragment
// register: p[0] in the low half. Shared or global memory.
template <typename T>
TLI_DEVICE uint32_t tli_load_pair_u32(const T* p) {
    static_assert(sizeof(T) == 2, "fragment registers pack two 16-bit elements");
#if TLI_SIM
    uint32_t v;
    memcpy(&v, static_cast<const void*>(p), sizeof v);
    return v;
#else
    return *reinterpret_cast<const uint32_t*>(p);
#endif
}
