"""Regenerate tests/data/bnb/nf4_cpu.safetensors with bitsandbytes' CPU backend.

Run from anywhere, in an environment with torch, bitsandbytes and safetensors
(see README.md in this directory for the exact versions used):

    python tests/data/bnb/generate.py

The inputs are not stored: they come from a 64-bit linear congruential
generator that tests/nf4_format.rs reimplements, and every value is an exact
f32 (24-bit integer times a power of two), so both sides see the same bits.
The file stores, per case, what bitsandbytes' QuantState.as_dict(packed=True)
gives (the keys transformers writes for a 4-bit Linear), the first 16 inputs
as a check on the generator, bitsandbytes' dequantization of each case
(`C.dequantized`), and the two dynamic 8-bit maps torch builds.
"""

import os
import pathlib
import struct
from fractions import Fraction
import subprocess
import sys

import torch
import bitsandbytes
import bitsandbytes.functional as F
import bitsandbytes.backends.default.ops as default_ops
from safetensors.torch import save_file

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "nf4_cpu.safetensors"

MUL = 6364136223846793005
INC = 1442695040888963407
MASK = (1 << 64) - 1

# bitsandbytes' CUDA thresholds (dQuantizeNF4), as the decimal literals its
# source writes with an `f` suffix. The compiler rounds each straight to the
# nearest f32; going through a Python float (a double) first would round
# twice and land one ulp off for four of them, so f32_nearest does it exactly.
CUDA_MIDPOINT_LITERALS = [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906",
    "-0.33967943489551544", "-0.23460740596055984", "-0.13791173323988914",
    "-0.045525018125772476", "0.03979014977812767", "0.1202552504837513",
    "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
]


def f32_nearest(literal):
    """The f32 nearest to a decimal literal (ties to even), exactly."""
    target = Fraction(literal)
    x = float(target)  # nearest double; the f32 answer is within an ulp of it
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    candidates = []
    for b in (bits - 1, bits, bits + 1):
        v = struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]
        candidates.append((abs(Fraction(v) - target), b & 1, v))
    return min(candidates)[2]


CUDA_MIDPOINTS = [f32_nearest(s) for s in CUDA_MIDPOINT_LITERALS]


def lcg_values(n, seed, row_len):
    """n exact f32 values: 24 random bits mapped to [-1, 1), scaled by
    2^((i // row_len) % 7 - 3) so rows span several magnitudes."""
    h = seed & MASK
    out = []
    for i in range(n):
        h = (h * MUL + INC) & MASK
        u = ((h >> 40) - (1 << 23)) / float(1 << 23)
        out.append(u * 2.0 ** ((i // row_len) % 7 - 3))
    return torch.tensor(out, dtype=torch.float32)


def probe_block():
    """64 values with absmax exactly 1.0: 1.0, the 15 CUDA midpoint literals
    and the 15 f32 means of neighbouring codes (the CPU backend's bounds),
    then a few plain values."""
    code = F.get_4bit_type("nf4", device="cpu")
    means = ((code[:-1] + code[1:]) / 2).tolist()
    vals = [1.0] + CUDA_MIDPOINTS + means
    vals += [(-1) ** k * k / 40.0 for k in range(64 - len(vals))]
    return torch.tensor(vals, dtype=torch.float32)


def case_tensors(name, A, blocksize, compress):
    packed, state = F.quantize_4bit(
        A, blocksize=blocksize, compress_statistics=compress, quant_type="nf4"
    )
    tensors = {f"{name}.weight": packed.contiguous()}
    for k, v in state.as_dict(packed=True).items():
        tensors[f"{name}.weight.{k}"] = v.contiguous()
    tensors[f"{name}.input_head"] = A.reshape(-1)[:16].float().contiguous()
    # bitsandbytes' own dequantization of what it just quantized, in the
    # quant state's dtype and shape: what `tli nf4 dequantize` must reproduce.
    # It comes from bitsandbytes' generic torch path (`default` backend),
    # which follows the format (blocks run over the flattened tensor) as its
    # CUDA kernel does. The AVX512 CPU kernel that F.dequantize_4bit picks on
    # this machine does not when a block crosses a row: it is stored too, as
    # `C.dequantized_cpu_kernel`, to document the difference (see README.md).
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = F.get_4bit_type("nf4", device="cpu")
    tensors[f"{name}.dequantized"] = default_ops._dequantize_4bit_compute(
        packed.reshape(-1), absmax, code, blocksize, state.shape, state.dtype
    ).contiguous()
    tensors[f"{name}.dequantized_cpu_kernel"] = F.dequantize_4bit(packed, state).contiguous()
    return tensors


def dynamic_map_under(capability):
    """create_dynamic_map(signed=True) as torch builds it under one
    ATEN_CPU_CAPABILITY, in a child process (the dispatch is fixed per
    process)."""
    code = (
        "import sys, torch, bitsandbytes.functional as F;"
        "sys.stdout.write(F.create_dynamic_map(signed=True).numpy().tobytes().hex())"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    hexbytes = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout
    return torch.frombuffer(bytearray.fromhex(hexbytes), dtype=torch.float32).clone()


def main():
    tensors = {}

    # Plain absmax, blocksize 64, [37, 64]: block 0 all zeros, block 1 the
    # midpoint probes, the rest generated.
    a = lcg_values(37 * 64, 1, 64)
    a[:64] = 0.0
    a[64:128] = probe_block()
    tensors.update(case_tensors("plain64", a.reshape(37, 64), 64, False))

    # Odd element count with a tail block: [3, 789], blocksize 64.
    b = lcg_values(3 * 789, 2, 789)
    tensors.update(case_tensors("tail64", b.reshape(3, 789), 64, False))

    # bf16 input, blocksize 128, [24, 96] (blocks cross rows).
    c = lcg_values(24 * 96, 3, 96).to(torch.bfloat16)
    tensors.update(case_tensors("bf16_128", c.reshape(24, 96), 128, False))

    # Double quantization: 260 blocks of 64, so two nested blocks (256 + 4).
    d = lcg_values(130 * 128, 4, 128)
    tensors.update(case_tensors("dq64", d.reshape(130, 128), 64, True))

    # f16 input with double quantization, blocksize 256, [9, 200].
    e = lcg_values(9 * 200, 5, 200).to(torch.float16)
    tensors.update(case_tensors("f16_dq256", e.reshape(9, 200), 256, True))

    tensors["dynamic_map.default"] = dynamic_map_under("default")
    tensors["dynamic_map.avx2"] = dynamic_map_under("avx2")

    meta = {
        "generator": "tests/data/bnb/generate.py",
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT.name}: {len(tensors)} tensors, {OUT.stat().st_size} bytes", meta)


if __name__ == "__main__":
    main()
