// LoRA dropout mask: a pure function of (seed, element index), so the
// forward and backward kernels (and the CPU, `src/lora/mod.rs`
// `dropout_keep`) draw the same mask without storing it.
//
// SplitMix64's finaliser over seed + index * golden-ratio constant; the
// element is dropped when the top 32 bits are below `threshold`
// (= round(p * 2^32), computed once on the host so no float enters the
// decision). tests hold this and the Rust function equal through the
// simulator.
#pragma once

#include "device.cuh"

TLI_DEVICE bool tli_dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
    uint64_t z = seed + index * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<uint32_t>(z >> 32) >= threshold;
}
