//! f32 → NF4 following bitsandbytes' CUDA quantizer
//! (`kQuantizeBlockwise` / `kQuantizeBlockwiseSmall` in `csrc/kernels.cu`
//! with `DATA_TYPE = NF4`, code choice by `dQuantizeNF4`).
//!
//! The rules, each of which changes output bits if done differently:
//!
//! * Blocks run over the flattened tensor, so a block may cross a row.
//! * The kernel loads a tail block (the last one, when `n` is not a multiple
//!   of the block size) padded with `0.0` up to the full block size, and
//!   stores only the real elements.
//! * `absmax` is the `fmaxf` fold of `|x|` over the (padded) block, starting
//!   from `-FLT_MAX`. `fmaxf` skips NaN, so NaN inputs do not count; a full
//!   block of NaNs therefore keeps `absmax = -FLT_MAX`, while an all-NaN tail
//!   block gets `0` from its padding.
//! * Each value is scaled by *multiplying* with the reciprocal `1.0f / absmax`
//!   (computed once per block), not by dividing.
//! * The code is the number of [`NF4_MIDPOINTS`] the scaled value is strictly
//!   greater than (the kernel evaluates the same 15 thresholds as a binary
//!   decision tree of strict `>` tests, which gives the same count). A value
//!   exactly on a midpoint takes the lower code; NaN fails every `>` and
//!   takes code 0.
//! * Element `2j` goes in the high nibble of byte `j`. For odd `n` the last
//!   low nibble is the code of the zero padding, `0.0 * (1/absmax)`: code 7,
//!   or code 0 when the last block's absmax is 0 (`0 * inf` is NaN).
//!
//! bitsandbytes builds its CUDA library with `--use_fast_math`, which makes
//! the kernel arithmetic flush subnormals to zero (FTZ) and turns the
//! reciprocal into the hardware approximation `rcp.approx.ftz.f32`. FTZ is
//! reproduced here exactly: subnormal inputs count as zero of the same sign
//! (in the absmax and in the scaling), and a reciprocal that would be
//! subnormal (absmax ≥ 2^126) is zero. The reciprocal itself is the correctly
//! rounded `1/absmax`. The hardware approximation is specified only to within
//! 1 ulp, so where it differs the device's scaled value differs by about one
//! ulp and a code can differ, but only for an element whose scaled value lies
//! within that ulp of a midpoint. (All of this is visible in the SASS of the
//! shipped library, e.g. bitsandbytes 0.50.2's `libbitsandbytes_cuda132.so`
//! for sm_80: `FMNMX.FTZ` from `-3.4e38`, a bare `MUFU.RCP`, `FMUL.FTZ`, and
//! `FSETP.GT.FTZ` against the 15 thresholds, each the f32 nearest its
//! decimal literal.)
//!
//! An all-zero block: `1/0 = inf`, `0·inf = NaN`, code 0 everywhere, which
//! dequantizes to `-1.0 · 0 = -0.0`. (bitsandbytes' CPU backend clamps absmax
//! and gives code 7, `+0.0`, instead; real checkpoints are quantized on GPUs,
//! so the CUDA rule is the format here.)

use rayon::prelude::*;

use super::{
    NF4_MIDPOINTS, Nf4Tensor, Scales, check_blocksize, double_quant, num_blocks, packed_len,
};
use crate::{DType, Error, Result};

/// Options for [`quantize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// Elements per block (32..=4096, a power of two).
    pub blocksize: usize,
    /// Double-quantize the absmax values (`compress_statistics=True`).
    pub double_quant: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self {
            blocksize: super::DEFAULT_BLOCKSIZE,
            double_quant: false,
        }
    }
}

/// A subnormal flushed to zero of the same sign, as the device's `.ftz`
/// arithmetic sees it; every other value unchanged.
#[inline]
pub(crate) fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// The block absmax as bitsandbytes' quantize kernels compute it: the
/// `fmaxf` fold of `|ftz(x)|` from `-FLT_MAX` (NaN skipped), with the zero
/// padding of a block shorter than `blocksize` taking part.
#[inline]
pub(crate) fn device_absmax(block: &[f32], blocksize: usize) -> f32 {
    // f32::max returns the other operand when one is NaN, as fmaxf does.
    let m = block.iter().fold(-f32::MAX, |m, &x| m.max(ftz(x).abs()));
    if block.len() < blocksize {
        m.max(0.0)
    } else {
        m
    }
}

/// `1.0f / absmax` with the device's flush of a subnormal result.
#[inline]
pub(crate) fn device_reciprocal(absmax: f32) -> f32 {
    ftz(1.0f32 / ftz(absmax))
}

/// The 4-bit code of an already scaled value.
#[inline]
pub fn encode(scaled: f32) -> u8 {
    // Branch-free count of thresholds strictly below the value: the same
    // number bitsandbytes' binary decision tree arrives at.
    NF4_MIDPOINTS.iter().map(|&m| u8::from(scaled > m)).sum()
}

/// Quantize one block: returns its absmax and writes `ceil(block.len()/2)`
/// packed bytes.
fn quantize_block(block: &[f32], blocksize: usize, packed: &mut [u8]) -> f32 {
    let absmax = device_absmax(block, blocksize);
    let inv = device_reciprocal(absmax);
    // Subnormal products would be flushed on the device, but any |value|
    // below 0.045 gets code 7, as ±0 does, so only the inputs need flushing.
    let code = |x: f32| encode(ftz(x) * inv);
    for (pair, byte) in block.chunks(2).zip(packed.iter_mut()) {
        let hi = code(pair[0]);
        // An odd block length only happens in the tail block: its missing
        // partner is the kernel's zero padding.
        let lo = code(pair.get(1).copied().unwrap_or(0.0));
        *byte = (hi << 4) | lo;
    }
    absmax
}

/// Quantize `data` in flat blocks of `blocksize`: returns `(packed, absmax)`.
///
/// # Errors
/// [`Error::InvalidBlockSize`]; [`Error::InvalidArgument`] for empty input.
pub fn quantize_blocks(data: &[f32], blocksize: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    const OP: &str = "nf4 quantize";
    check_blocksize(OP, blocksize)?;
    if data.is_empty() {
        return Err(Error::invalid(OP, "cannot quantize 0 elements"));
    }
    let mut packed = vec![0u8; packed_len(data.len())];
    let mut absmax = vec![0f32; num_blocks(data.len(), blocksize)];
    // blocksize is even, so block b owns packed bytes [b*bs/2, (b+1)*bs/2).
    data.par_chunks(blocksize)
        .zip(packed.par_chunks_mut(blocksize / 2))
        .zip(absmax.par_iter_mut())
        .for_each(|((block, bytes), a)| *a = quantize_block(block, blocksize, bytes));
    Ok((packed, absmax))
}

/// Quantize a tensor of the given `shape` (row-major `data`) to NF4.
///
/// `dtype` records the tensor's original dtype in the result (the values
/// themselves are given as f32, exactly widened from bf16/f16 if that is
/// where they came from). With `opts.double_quant` the absmax values are
/// compressed by [`double_quant::quantize_absmax`].
///
/// # Errors
/// [`Error::ShapeMismatch`] if `data.len()` is not the product of `shape`;
/// [`Error::InvalidBlockSize`]; [`Error::InvalidArgument`] for empty input.
pub fn quantize(
    data: &[f32],
    shape: &[usize],
    dtype: DType,
    opts: QuantizeOptions,
) -> Result<Nf4Tensor> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::shape(
            "nf4 quantize",
            format!("data for shape {shape:?}"),
            format!("{n} values"),
            format!("{} values", data.len()),
        ));
    }
    let (packed, absmax) = quantize_blocks(data, opts.blocksize)?;
    let scales = if opts.double_quant {
        Scales::Double(double_quant::quantize_absmax(&absmax)?)
    } else {
        Scales::Plain(absmax)
    };
    Ok(Nf4Tensor {
        packed,
        scales,
        blocksize: opts.blocksize,
        shape: shape.to_vec(),
        dtype,
    })
}
