// Simulator exports of the self-test kernels (selftest.cuh), for tests/sim.rs.
#include "selftest.cuh"

TLI_SIM_EXPORT(tli_selftest_index, (uint32_t * out), (out))
TLI_SIM_EXPORT(tli_selftest_block_sum, (const int* in, int n, long long* sums, int* votes), (in, n, sums, votes))
TLI_SIM_EXPORT(tli_selftest_shuffle,
               (const uint32_t* in, uint32_t* out, int src_lane, int delta, int lane_mask, int width),
               (in, out, src_lane, delta, lane_mask, width))
TLI_SIM_EXPORT(tli_selftest_shuffle_wide,
               (const unsigned long long* in64, unsigned long long* out64, const float* inf, float* outf),
               (in64, out64, inf, outf))
TLI_SIM_EXPORT(tli_selftest_vote, (const int* in, uint32_t* out), (in, out))
TLI_SIM_EXPORT(tli_selftest_syncwarp, (const int* in, int* out), (in, out))
TLI_SIM_EXPORT(tli_selftest_atomics,
               (const int* vals, int n, int* ints, unsigned* uints, unsigned long long* u64, float* f,
                int* exch_prev),
               (vals, n, ints, uints, u64, f, exch_prev))
TLI_SIM_EXPORT(tli_selftest_atomic_subnormal, (float tiny, float* global_acc, float* out), (tiny, global_acc, out))
TLI_SIM_EXPORT(tli_selftest_dynamic_smem,
               (const uint32_t* in, uint32_t* out, uint32_t* raw, uint32_t* align, int words),
               (in, out, raw, align, words))
TLI_SIM_EXPORT(tli_selftest_convert,
               (const float* x, const uint16_t* bits16, int n, uint16_t* bf, uint16_t* h, float* bf_back,
                float* h_back, uint32_t* pairs),
               (x, bits16, n, bf, h, bf_back, h_back, pairs))
TLI_SIM_EXPORT(tli_selftest_math,
               (const float* a, const float* b, const float* c, const uint32_t* w, int n, float* f, uint32_t* u),
               (a, b, c, w, n, f, u))
TLI_SIM_EXPORT(tli_selftest_broken, (int misbehaviour, unsigned who, uint32_t* out), (misbehaviour, who, out))
TLI_SIM_EXPORT(tli_selftest_mma, (int f16, const uint16_t* a, const uint16_t* b, const float* c, float* d),
               (f16, a, b, c, d))
