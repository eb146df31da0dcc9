// NF4 constants: the one definition in this project.
//
// The 16 NormalFloat-4 code values, indexed by the 4-bit code, exactly as
// bitsandbytes stores them (functional.py `get_4bit_type("nf4")` and the
// `dDequantizeNF4` tree in csrc/kernels.cu). Each value is the f32 nearest to
// the decimal written here; the C++ compiler and build.rs (which parses these
// lines to generate the Rust constants) both round decimal to nearest f32.
//
// The 15 midpoints are bitsandbytes' CUDA quantizer thresholds
// (`dQuantizeNF4`): a scaled value maps to the number of midpoints it is
// strictly greater than. Four of them are one ulp away from the f32 mean of
// neighbouring codes; these literals, not recomputed means, are the format.
//
// Do not edit the layout of the two #define blocks: build.rs reads them.
#pragma once

#define TLI_NF4_CODE_TABLE \
    -1.0f, \
    -0.6961928009986877f, \
    -0.5250730514526367f, \
    -0.39491748809814453f, \
    -0.28444138169288635f, \
    -0.18477343022823334f, \
    -0.09105003625154495f, \
    0.0f, \
    0.07958029955625534f, \
    0.16093020141124725f, \
    0.24611230194568634f, \
    0.33791524171829224f, \
    0.44070982933044434f, \
    0.5626170039176941f, \
    0.7229568362236023f, \
    1.0f

#define TLI_NF4_MIDPOINT_TABLE \
    -0.8480964004993439f, \
    -0.6106329262256622f, \
    -0.4599952697753906f, \
    -0.33967943489551544f, \
    -0.23460740596055984f, \
    -0.13791173323988914f, \
    -0.045525018125772476f, \
    0.03979014977812767f, \
    0.1202552504837513f, \
    0.2035212516784668f, \
    0.2920137718319893f, \
    0.3893125355243683f, \
    0.5016634166240692f, \
    0.6427869200706482f, \
    0.8614784181118011f

// Block sizes bitsandbytes accepts for 4-bit quantization: 2^5 .. 2^12.
#define TLI_NF4_MIN_LOG2_BLOCKSIZE 5
#define TLI_NF4_MAX_LOG2_BLOCKSIZE 12
