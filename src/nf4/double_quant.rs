//! Double quantization of the NF4 block scales (bitsandbytes'
//! `compress_statistics=True`).
//!
//! bitsandbytes (`functional.quantize_4bit`) compresses the f32 absmax
//! values `a` of a 4-bit tensor in three steps, all reproduced here:
//!
//! 1. `offset = a.mean()`, an f32 scalar ([`mean_f32`]);
//! 2. `a - offset`, elementwise in f32;
//! 3. `quantize_blockwise(a - offset, blocksize=256)` with the default code,
//!    the signed "dynamic" 8-bit map ([`dynamic_map_signed`]), on the CUDA
//!    kernel `kQuantizeBlockwise<float, 256, 2, 0, General8bit>`
//!    ([`quantize_blockwise_dynamic`]).
//!
//! Block `b`'s scale is restored as `code2[q[b]] * absmax2[b / 256]`, rounded
//! to f32, plus `offset`, rounded again ([`dequantize_absmax`]): bitsandbytes
//! runs the 8-bit dequantization kernel and then adds the offset as a
//! separate tensor operation.
//!
//! # Where this can differ from a GPU-quantized checkpoint
//!
//! Dequantization reads `offset`, `absmax2` and `code2` from the checkpoint
//! and is exact, with one edge: bitsandbytes' fast-math 8-bit kernel flushes
//! a subnormal product `code2[q] * absmax2` to zero, which [`dequantize_absmax`]
//! does not (it takes `absmax2` below about 2^-105). Quantizing from scratch matches bitsandbytes' CUDA path
//! except in three documented places:
//!
//! * **The mean.** torch's CUDA `mean` of f32 accumulates in f32 (its
//!   accumulate type for float on CUDA is float), in a tree order that
//!   depends on `n`, the pointer's alignment and the GPU's number of SMs,
//!   then multiplies by the f32 factor `1.0f / n`. [`mean_f32`] replaces the
//!   order-dependent f32 sum with the exact sum rounded once to f32 and keeps
//!   the final multiply. For the positive absmax values of a real tensor
//!   the two sums differ by at most a few ulps (an f32 reduction of `n`
//!   positive terms errs by at most its depth × 2⁻²⁴ relative): a
//!   simulation of torch's reduction shape (512 threads × 4 sequential
//!   accumulators, then a tree) on 65536 log-normal absmax values was one
//!   ulp off the exact rounded sum in 7 of 20 trials and never more. A
//!   one-ulp offset changes most restored scales by about one ulp of the
//!   offset. bitsandbytes' CPU backend (torch's CPU `mean`: an f32 cascade
//!   sum divided by `n`) agreed with this function on the tests' fixture.
//! * **The reciprocal.** As in the 4-bit quantizer (see
//!   [`quantize`](super::quantize)), the device's `rcp.approx.ftz.f32` is
//!   replaced by the correctly rounded reciprocal; a code can differ only
//!   where the scaled value is within an ulp of a decision midpoint.
//! * **The code map.** torch builds the map on the CPU with `linspace`,
//!   whose `start + step * i` its compiler contracts to a fused multiply-add
//!   in the AVX2 and AVX512 builds of its CPU kernels but not in the
//!   baseline build (checked with torch 2.15 under each
//!   `ATEN_CPU_CAPABILITY`). 42 of the 256 values differ by one or two ulps
//!   between the two. [`dynamic_map_signed`] is the fused map, which every x86 GPU
//!   host of the last decade produces; [`dynamic_map_signed_unfused`] is the
//!   other. Checkpoints store the map they were quantized with, so this only
//!   matters when quantizing.

use super::quantize::{device_absmax, device_reciprocal, ftz};
use super::{DoubleQuant, NESTED_BLOCKSIZE};
use crate::{Error, Result};

/// Number of entries in an 8-bit code map.
pub const DYNAMIC_MAP_LEN: usize = 256;

/// torch's `linspace(start, end, steps, dtype=float32)` on the CPU: the
/// first half counts up from `start`, the second half down from `end`, each
/// point one multiply and one add of `step = (end - start) / (steps - 1)`,
/// fused into one rounding or not.
fn linspace_f32(start: f32, end: f32, steps: usize, fused: bool) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|idx| {
            if idx < halfway {
                let k = idx as f32;
                if fused {
                    step.mul_add(k, start)
                } else {
                    start + step * k
                }
            } else {
                let k = (steps - idx - 1) as f32;
                if fused {
                    (-step).mul_add(k, end)
                } else {
                    end - step * k
                }
            }
        })
        .collect()
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`.
fn dynamic_map(fused: bool) -> [f32; DYNAMIC_MAP_LEN] {
    // The python scale `10 ** (i - 6)` is a double (an int, 1, for i = 6)
    // that torch rounds to f32 before multiplying an f32 tensor with it.
    // These literals are the correctly rounded doubles `pow(10, i - 6)`
    // gives.
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(DYNAMIC_MAP_LEN);
    for (i, &decade) in DECADES.iter().enumerate() {
        // Signed: 2^i + 1 boundaries per decade, 2^i means between them.
        let boundaries = linspace_f32(0.1f64 as f32, 1.0, (1 << i) + 1, fused);
        let scale = decade as f32;
        let means: Vec<f32> = boundaries.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| scale * m));
        data.extend(means.iter().map(|&m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; DYNAMIC_MAP_LEN];
    // 2·(1 + 2 + ... + 64) + 2 = 256 values: the lengths agree by
    // construction.
    map.copy_from_slice(&data);
    map
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`),
/// as torch builds it with fused multiply-adds in `linspace` (its AVX2 and
/// AVX512 CPU kernels): 256 ascending f32 values, 127 negative,
/// `0.0` at index 127, 127 positive and `1.0` at index 255.
pub fn dynamic_map_signed() -> [f32; DYNAMIC_MAP_LEN] {
    dynamic_map(true)
}

/// The same map as torch's baseline CPU kernels build it (no fused
/// multiply-add; `ATEN_CPU_CAPABILITY=default`). 42 entries are one or two ulps
/// away from [`dynamic_map_signed`].
pub fn dynamic_map_signed_unfused() -> [f32; DYNAMIC_MAP_LEN] {
    dynamic_map(false)
}

/// The exact sum of `values`, rounded once to the nearest f32 (ties to even).
///
/// Non-finite inputs give what any f32 summation gives: NaN if there is a
/// NaN or both infinities, otherwise the infinity present. An exact sum
/// beyond the f32 range rounds to infinity.
fn exact_sum_f32(values: &[f32]) -> f32 {
    // A finite f32 is an integer multiple of 2^-149: mantissa m (24 bits)
    // times 2^k units with k = max(biased exponent, 1) - 1 in 0..254. Sum
    // the signed mantissas per k exactly in i128, then resolve the carries.
    const BUCKETS: usize = 254;
    let mut buckets = [0i128; BUCKETS];
    let (mut nan, mut pos_inf, mut neg_inf) = (false, false, false);
    for &x in values {
        if x.is_nan() {
            nan = true;
        } else if x == f32::INFINITY {
            pos_inf = true;
        } else if x == f32::NEG_INFINITY {
            neg_inf = true;
        } else {
            let bits = x.to_bits();
            let biased = (bits >> 23) & 0xff;
            let mut m = i128::from(bits & 0x7f_ffff);
            if biased != 0 {
                m |= 1 << 23;
            }
            let k = biased.max(1) as usize - 1;
            buckets[k] += if bits >> 31 == 1 { -m } else { m };
        }
    }
    if nan || (pos_inf && neg_inf) {
        return f32::NAN;
    }
    if pos_inf {
        return f32::INFINITY;
    }
    if neg_inf {
        return f32::NEG_INFINITY;
    }

    // Binary digits of the total in units of 2^-149, by carry propagation:
    // 254 bucket positions + 24 mantissa bits + up to 64 bits of count fit
    // in 7 limbs. Returns the digits and the final carry: 0 for a
    // non-negative total, -1 (an endless run of sign bits) for a negative
    // one.
    const LIMBS: usize = 7;
    let digits = |sign: i128| -> ([u64; LIMBS], i128) {
        let mut limbs = [0u64; LIMBS];
        let mut carry = 0i128;
        for (i, limb_bit) in (0..LIMBS * 64).map(|i| (i, 1u64 << (i % 64))) {
            let v = carry + buckets.get(i).map_or(0, |&b| sign * b);
            if v & 1 != 0 {
                limbs[i / 64] |= limb_bit;
            }
            carry = v >> 1;
        }
        (limbs, carry)
    };
    let (mut limbs, carry) = digits(1);
    let negative = carry < 0;
    if negative {
        limbs = digits(-1).0;
    }
    let bit = |i: usize| limbs[i / 64] >> (i % 64) & 1 == 1;
    let Some(top) = (0..LIMBS * 64).rev().find(|&i| bit(i)) else {
        return 0.0;
    };
    let magnitude = if top < 24 {
        // Below 2^-125: a multiple of 2^-149 under 2^24 units is exactly
        // representable, and its bit pattern is the unit count itself.
        f32::from_bits(limbs[0] as u32)
    } else {
        let mut shift = top - 23;
        let mut mantissa: u32 = (0..24).fold(0, |acc, j| acc | u32::from(bit(shift + j)) << j);
        let round = bit(shift - 1);
        let sticky = (0..shift - 1).any(bit);
        if round && (sticky || mantissa & 1 == 1) {
            mantissa += 1;
            if mantissa == 1 << 24 {
                mantissa >>= 1;
                shift += 1;
            }
        }
        // value = mantissa · 2^(shift - 149), mantissa in [2^23, 2^24):
        // biased exponent shift + 1.
        let biased = shift + 1;
        if biased >= 255 {
            f32::INFINITY
        } else {
            f32::from_bits((biased as u32) << 23 | (mantissa & 0x7f_ffff))
        }
    };
    if negative { -magnitude } else { magnitude }
}

/// The f32 mean bitsandbytes' double quantization subtracts: `sum * (1/n)`
/// with the f32 factor `1.0f / n` torch's CUDA `mean` multiplies by, and the
/// sum taken exactly and rounded once (torch's own f32 sum depends on the
/// GPU; see the module documentation for the possible difference).
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty slice.
pub fn mean_f32(values: &[f32]) -> Result<f32> {
    if values.is_empty() {
        return Err(Error::invalid("f32 mean", "mean of 0 values"));
    }
    let factor = 1.0f32 / values.len() as f32;
    Ok(exact_sum_f32(values) * factor)
}

/// The 255 decision midpoints of an ascending code map, as the CUDA kernel
/// forms them: `(code[k] + code[k+1]) * 0.5f` in f32.
fn midpoints(code: &[f32; DYNAMIC_MAP_LEN]) -> [f32; DYNAMIC_MAP_LEN - 1] {
    std::array::from_fn(|k| ftz(ftz(code[k] + code[k + 1]) * 0.5))
}

/// The 8-bit code the CUDA kernel (`dQuantize<0>`) picks for a scaled value.
///
/// Its seven-step binary search over an ascending map ends at an even index
/// `q` with `code[q-1] < x ≤ code[q+1]`, and it then moves to the neighbour
/// on `x`'s side of `code[q]` only if `x` is strictly beyond their f32
/// midpoint. That is the nearest code measured against the f32 midpoints,
/// a value exactly on a midpoint going to the even index of the two; values
/// beyond either end go to 0 or 255, and NaN (which fails every test) to 0.
fn encode_8bit(mids: &[f32; DYNAMIC_MAP_LEN - 1], x: f32) -> u8 {
    // Number of midpoints strictly below x (0 for NaN) ...
    let k = mids.partition_point(|&m| m < x);
    // ... with a tie on midpoint k, between codes k and k+1, to the even one.
    let k = if k < mids.len() && x == mids[k] && k % 2 == 1 {
        k + 1
    } else {
        k
    };
    // k ≤ 255 by construction.
    k as u8
}

/// bitsandbytes' 8-bit blockwise quantization with the signed dynamic map
/// (`quantize_blockwise(A, blocksize=...)` with the default code) as its
/// CUDA kernel computes it: per flat block of `blocksize` values, absmax and
/// reciprocal exactly as in the 4-bit quantizer (fmaxf fold from `-FLT_MAX`,
/// zero-padded tail, FTZ), then [`dynamic_map_signed`]'s nearest code of
/// `value * (1/absmax)` with ties to the even index. Returns
/// `(codes, absmax)`.
///
/// # Errors
/// [`Error::InvalidBlockSize`] unless `blocksize` is a power of two from 64
/// to 4096 (the 8-bit kernel's sizes); [`Error::InvalidArgument`] for empty
/// input.
pub fn quantize_blockwise_dynamic(values: &[f32], blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    const OP: &str = "8-bit blockwise quantize";
    if !(blocksize.is_power_of_two() && (64..=4096).contains(&blocksize)) {
        return Err(Error::InvalidBlockSize { op: OP, blocksize });
    }
    if values.is_empty() {
        return Err(Error::invalid(OP, "cannot quantize 0 values"));
    }
    let mids = midpoints(&dynamic_map_signed());
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let a = device_absmax(block, blocksize);
        let inv = device_reciprocal(a);
        codes.extend(block.iter().map(|&x| encode_8bit(&mids, ftz(x) * inv)));
        absmax.push(a);
    }
    Ok((codes, absmax))
}

/// Double-quantize NF4 block scales as bitsandbytes does for
/// `compress_statistics=True`: `offset = mean(absmax)` ([`mean_f32`]), then
/// `absmax - offset` (f32) through [`quantize_blockwise_dynamic`] with
/// blocksize [`NESTED_BLOCKSIZE`] (256).
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty slice.
pub fn quantize_absmax(absmax: &[f32]) -> Result<DoubleQuant> {
    const OP: &str = "double quant";
    if absmax.is_empty() {
        return Err(Error::invalid(OP, "no absmax values to quantize"));
    }
    let offset = mean_f32(absmax)?;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (qabsmax, absmax2) = quantize_blockwise_dynamic(&centred, NESTED_BLOCKSIZE)?;
    Ok(DoubleQuant {
        qabsmax,
        absmax2,
        code2: dynamic_map_signed().to_vec(),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    })
}

/// Restore the f32 block scales: `code2[qabsmax[b]] * absmax2[b / nested]`,
/// rounded to f32, then `+ offset`, rounded again (bitsandbytes' 8-bit
/// dequantization kernel followed by a separate tensor add).
///
/// # Errors
/// [`Error::InvalidArgument`] for a nested block size of 0 or a code map
/// that is not 256 long; [`Error::ShapeMismatch`] if `absmax2` does not have
/// one value per nested block.
pub fn dequantize_absmax(dq: &DoubleQuant) -> Result<Vec<f32>> {
    const OP: &str = "double quant dequantize";
    let nb = dq.nested_blocksize;
    if nb == 0 {
        return Err(Error::invalid(OP, "nested block size is 0"));
    }
    if dq.code2.len() != DYNAMIC_MAP_LEN {
        return Err(Error::invalid(
            OP,
            format!(
                "nested quant map has {} values, expected {DYNAMIC_MAP_LEN}",
                dq.code2.len()
            ),
        ));
    }
    let nb2 = dq.qabsmax.len().div_ceil(nb);
    if dq.absmax2.len() != nb2 {
        return Err(Error::shape(
            OP,
            format!(
                "nested absmax (nested blocksize {nb}, {} codes)",
                dq.qabsmax.len()
            ),
            format!("{nb2} values"),
            format!("{} values", dq.absmax2.len()),
        ));
    }
    Ok(dq
        .qabsmax
        .iter()
        .enumerate()
        .map(|(b, &q)| {
            let scaled = dq.code2[usize::from(q)] * dq.absmax2[b / nb];
            scaled + dq.offset
        })
        .collect())
}
