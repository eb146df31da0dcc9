// Portability layer: the only place where device-only spellings live.
//
// Every kernel includes this header first. Under nvcc it pulls in the CUDA
// headers; under the host C++ compiler it pulls in the simulator
// (`kernels/sim/sim.h`), which defines the CUDA execution model for the host.
// Kernel bodies then use the `tli_*` helpers below for anything the two
// compilers spell differently (cache hints, read-only loads, dynamic shared
// memory), so the same source text runs on both.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__CUDACC_RTC__)
// NVRTC (what build.rs compiles with) has no C library headers; these are
// the LP64 widths <stdint.h> gives on every platform CUDA supports.
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
static_assert(sizeof(void*) == 8, "the kernels are built for 64-bit devices only");
#else
#include <stdint.h>
#endif
#define TLI_SIM 0
#else
#include "../sim/sim.h"
#define TLI_SIM 1
#endif

// Inlined device helper.
#define TLI_DEVICE __device__ __forceinline__
// Pointer that no other pointer argument aliases (lets nvcc keep loads in
// registers and use the read-only path).
#define TLI_RESTRICT __restrict__

// Dynamic shared memory (the `smem` bytes of a launch) as an array of `type`.
#if TLI_SIM
#define TLI_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(tli_sim_dynamic_shared())
#else
#define TLI_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// 16-byte load through the read-only (non-coherent) data path: the kernels
// only read their inputs, and LDG.E.128.CONSTANT keeps them out of the way of
// the output stream in L1.
TLI_DEVICE uint4 tli_load_ro_16(const uint4* p) {
#if TLI_SIM
    return *p;
#else
    return __ldg(p);
#endif
}

// Scalar read-only loads.
TLI_DEVICE float tli_load_ro(const float* p) {
#if TLI_SIM
    return *p;
#else
    return __ldg(p);
#endif
}
TLI_DEVICE uint8_t tli_load_ro(const uint8_t* p) {
#if TLI_SIM
    return *p;
#else
    return __ldg(p);
#endif
}

TLI_DEVICE __nv_bfloat16 tli_load_ro(const __nv_bfloat16* p) {
#if TLI_SIM
    return *p;
#else
    return __ldg(p);
#endif
}
TLI_DEVICE __half tli_load_ro(const __half* p) {
#if TLI_SIM
    return *p;
#else
    return __ldg(p);
#endif
}

// 8-byte read-only load (p 8-byte aligned).
TLI_DEVICE uint2 tli_load_ro_8(const uint2* p) {
#if TLI_SIM
    return *p;
#else
    return __ldg(p);
#endif
}

// 16-byte streaming store (evict-first): outputs that this kernel writes once
// and never reads should not displace the inputs still to be read from L2.
TLI_DEVICE void tli_store_streaming_16(uint4* p, uint4 v) {
#if TLI_SIM
    *p = v;
#else
    __stcs(p, v);
#endif
}
