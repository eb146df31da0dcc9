//! f32 → NF4, bit-exact with bitsandbytes' CUDA quantizer
//! (`kQuantizeBlockwise` with `General8bit=false, DATA_TYPE=NF4`).
//!
//! The rules, each of which changes output bits if done differently:
//!
//! * blocks run over the flattened tensor, so a block may cross a row;
//! * `absmax` is the f32 maximum of `|x|` over the block (NaN inputs are
//!   skipped, as `fmaxf` skips them);
//! * each value is scaled by *multiplying* with the f32 reciprocal
//!   `1.0 / absmax`, not by dividing;
//! * the code is the number of [`NF4_MIDPOINTS`] the scaled value is
//!   strictly greater than, so a value exactly on a midpoint takes the lower
//!   code, and NaN (which fails every `>`) takes code 0;
//! * element `2j` goes in the high nibble of byte `j`; an odd count leaves
//!   the last low nibble 0.
//!
//! An all-zero block follows the CUDA rules too: `1/0 = inf`, `0·inf = NaN`,
//! code 0 everywhere, which dequantizes to `-1.0 · 0 = -0.0`. (bitsandbytes'
//! CPU backend clamps absmax and gives code 7, `+0.0`, instead; real
//! checkpoints are quantized on GPUs, so the CUDA rule is the format here.)

use rayon::prelude::*;

use super::{NF4_MIDPOINTS, Nf4Tensor, Scales, check_blocksize, double_quant, num_blocks, packed_len};
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

/// The 4-bit code of an already scaled value.
#[inline]
pub fn encode(scaled: f32) -> u8 {
    // Branch-free count of thresholds strictly below the value: the same
    // number bitsandbytes' binary decision tree arrives at.
    NF4_MIDPOINTS.iter().map(|&m| u8::from(scaled > m)).sum()
}

/// Quantize one block: returns its absmax and writes `ceil(block.len()/2)`
/// packed bytes.
fn quantize_block(block: &[f32], packed: &mut [u8]) -> f32 {
    let absmax = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let inv = 1.0f32 / absmax;
    for (pair, byte) in block.chunks(2).zip(packed.iter_mut()) {
        let hi = encode(pair[0] * inv);
        let lo = pair.get(1).map_or(0, |&x| encode(x * inv));
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
        .for_each(|((block, bytes), a)| *a = quantize_block(block, bytes));
    Ok((packed, absmax))
}

/// Quantize a tensor of the given `shape` (row-major `data`) to NF4.
///
/// `dtype` records the tensor's original dtype in the result (the values
/// themselves are given as f32, exactly widened from bf16/f16 if that is
/// where they came from).
///
/// # Errors
/// [`Error::ShapeMismatch`] if `data.len()` is not the product of `shape`;
/// [`Error::InvalidBlockSize`]; [`Error::InvalidArgument`] for empty input.
pub fn quantize(data: &[f32], shape: &[usize], dtype: DType, opts: QuantizeOptions) -> Result<Nf4Tensor> {
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
