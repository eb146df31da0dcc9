//! The NF4 4-bit format as bitsandbytes stores it.
//!
//! A tensor of `n` values is cut into flat blocks of `blocksize` consecutive
//! elements of its row-major flattening (a block may cross a row). Each block
//! keeps one f32 `absmax`; each value keeps the 4-bit index of the nearest
//! [`NF4_CODE`] value to `value / absmax`. Two codes share a byte, the even
//! element in the high nibble. With double quantization the absmax values
//! are themselves stored as 8-bit codes (see [`double_quant`]).
//!
//! * [`quantize`]: f32 → [`Nf4Tensor`], bit-exact with bitsandbytes' CUDA
//!   quantizer.
//! * [`dequant`]: the fast multi-threaded CPU dequantizer.
//! * [`checkpoint`]: the safetensors form transformers and bitsandbytes
//!   write.

pub mod checkpoint;
pub mod dequant;
pub mod double_quant;
pub mod quantize;

use crate::{DType, Error, Result};

// The generated literals keep bitsandbytes' decimal digits, more than an f32
// holds, on purpose: they are the text the kernels compile.
#[allow(clippy::excessive_precision)]
mod tables {
    include!(concat!(env!("OUT_DIR"), "/nf4_tables.rs"));
}
pub use tables::{NF4_CODE, NF4_MIDPOINTS};

/// Smallest supported block size.
pub const MIN_BLOCKSIZE: usize = 32;
/// Largest supported block size.
pub const MAX_BLOCKSIZE: usize = 4096;
/// The default block size (bitsandbytes' and transformers').
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// The block size bitsandbytes uses to double-quantize absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Check a 4-bit block size: a power of two from 32 to 4096.
///
/// # Errors
/// [`Error::InvalidBlockSize`] naming the value.
pub fn check_blocksize(op: &'static str, blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidBlockSize { op, blocksize })
    }
}

/// Number of packed bytes for `n` elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of scale blocks for `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Bytes a dequantization of `numel` elements must move: packed codes and
/// scales read, `out_bytes_per_element` written per element. With double
/// quantization the scales are one byte each plus the nested absmax and the
/// 1 KiB code map. This is the roofline numerator for the dequant benches.
pub fn dequant_traffic_bytes(
    numel: usize,
    blocksize: usize,
    double_quant: bool,
    out_bytes_per_element: usize,
) -> usize {
    let nb = num_blocks(numel, blocksize);
    let scales = if double_quant {
        nb + 4 * nb.div_ceil(NESTED_BLOCKSIZE) + 4 * 256
    } else {
        4 * nb
    };
    packed_len(numel) + scales + out_bytes_per_element * numel
}

/// Double-quantized block scales (`compress_statistics=True`).
///
/// Scale of block `b` = `code2[qabsmax[b]] * absmax2[b / nested_blocksize] + offset`,
/// each operation rounded to f32 separately.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// 8-bit codes of `absmax - offset`, one per block.
    pub qabsmax: Vec<u8>,
    /// f32 absmax of each nested block of `nested_blocksize` codes.
    pub absmax2: Vec<f32>,
    /// The 256-entry 8-bit code map (bitsandbytes' signed dynamic map).
    pub code2: Vec<f32>,
    /// Mean of the original absmax values.
    pub offset: f32,
    /// Nested block size (256 in bitsandbytes).
    pub nested_blocksize: usize,
}

/// Block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// One f32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized absmax.
    Double(DoubleQuant),
}

/// An NF4-quantized tensor in bitsandbytes layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Packed codes, `ceil(n/2)` bytes.
    pub packed: Vec<u8>,
    /// Block scales.
    pub scales: Scales,
    /// Elements per scale block.
    pub blocksize: usize,
    /// Original shape (row-major); `n` is its product.
    pub shape: Vec<usize>,
    /// The dtype the tensor had before quantization (the quant state's
    /// `dtype`, and the default output dtype when dequantizing).
    pub dtype: DType,
}

impl Nf4Tensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A borrowed view for the ops.
    pub fn view(&self) -> Nf4View<'_> {
        Nf4View {
            packed: &self.packed,
            scales: match &self.scales {
                Scales::Plain(a) => ScalesView::Plain(a),
                Scales::Double(d) => ScalesView::Double {
                    qabsmax: &d.qabsmax,
                    absmax2: &d.absmax2,
                    code2: &d.code2,
                    offset: d.offset,
                    nested_blocksize: d.nested_blocksize,
                },
            },
            blocksize: self.blocksize,
            numel: self.numel(),
        }
    }
}

/// Borrowed block scales.
#[derive(Debug, Clone, Copy)]
pub enum ScalesView<'a> {
    /// One f32 absmax per block.
    Plain(&'a [f32]),
    /// Double-quantized absmax; see [`DoubleQuant`].
    Double {
        /// 8-bit codes, one per block.
        qabsmax: &'a [u8],
        /// Nested absmax, one per `nested_blocksize` blocks.
        absmax2: &'a [f32],
        /// 256-entry code map.
        code2: &'a [f32],
        /// Added after the nested dequantization.
        offset: f32,
        /// Nested block size.
        nested_blocksize: usize,
    },
}

/// The lengths of an NF4 tensor's parts: what validation needs, whether the
/// data is on the host ([`Nf4View`]) or on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Lengths {
    /// Number of elements.
    pub numel: usize,
    /// Elements per block.
    pub blocksize: usize,
    /// Bytes of packed codes.
    pub packed: usize,
    /// Lengths of the scales.
    pub scales: ScaleLengths,
}

/// Lengths of the block scales; see [`ScalesView`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLengths {
    /// One f32 absmax per block.
    Plain {
        /// Values of absmax.
        absmax: usize,
    },
    /// Double-quantized absmax.
    Double {
        /// Codes of the quantized absmax.
        qabsmax: usize,
        /// Values of the nested absmax.
        absmax2: usize,
        /// Entries of the nested code map.
        code2: usize,
        /// Nested block size.
        nested_blocksize: usize,
    },
}

impl Nf4Lengths {
    /// Number of scale blocks.
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.numel, self.blocksize)
    }

    /// Check every length against the others.
    ///
    /// # Errors
    /// [`Error::InvalidBlockSize`], [`Error::ShapeMismatch`] or
    /// [`Error::InvalidArgument`] naming the field and both values.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        check_blocksize(op, self.blocksize)?;
        if self.numel == 0 {
            return Err(Error::invalid(op, "tensor has 0 elements"));
        }
        if self.packed != packed_len(self.numel) {
            return Err(Error::shape(
                op,
                format!("packed codes for {} elements", self.numel),
                format!("{} bytes", packed_len(self.numel)),
                format!("{} bytes", self.packed),
            ));
        }
        let nb = self.num_blocks();
        match self.scales {
            ScaleLengths::Plain { absmax } => {
                if absmax != nb {
                    return Err(Error::shape(
                        op,
                        format!("absmax (blocksize {})", self.blocksize),
                        format!("{nb} values"),
                        format!("{absmax} values"),
                    ));
                }
            }
            ScaleLengths::Double {
                qabsmax,
                absmax2,
                code2,
                nested_blocksize,
            } => {
                if !nested_blocksize.is_power_of_two() {
                    return Err(Error::invalid(
                        op,
                        format!("nested block size {nested_blocksize} is not a power of two"),
                    ));
                }
                if qabsmax != nb {
                    return Err(Error::shape(
                        op,
                        format!("quantized absmax (blocksize {})", self.blocksize),
                        format!("{nb} codes"),
                        format!("{qabsmax} codes"),
                    ));
                }
                let nb2 = nb.div_ceil(nested_blocksize);
                if absmax2 != nb2 {
                    return Err(Error::shape(
                        op,
                        format!("nested absmax (nested blocksize {nested_blocksize})"),
                        format!("{nb2} values"),
                        format!("{absmax2} values"),
                    ));
                }
                if code2 != 256 {
                    return Err(Error::shape(op, "nested quant map", "256 values", code2));
                }
            }
        }
        Ok(())
    }
}

/// A borrowed NF4 tensor: what the dequantization op reads.
#[derive(Debug, Clone, Copy)]
pub struct Nf4View<'a> {
    /// Packed codes.
    pub packed: &'a [u8],
    /// Block scales.
    pub scales: ScalesView<'a>,
    /// Elements per block.
    pub blocksize: usize,
    /// Number of elements.
    pub numel: usize,
}

impl Nf4View<'_> {
    /// Number of scale blocks.
    pub fn num_blocks(&self) -> usize {
        num_blocks(self.numel, self.blocksize)
    }

    /// Check every length and size against the others.
    ///
    /// # Errors
    /// As [`Nf4Lengths::validate`].
    pub fn validate(&self, op: &'static str) -> Result<()> {
        self.lengths().validate(op)
    }

    /// The lengths of its parts.
    pub fn lengths(&self) -> Nf4Lengths {
        Nf4Lengths {
            numel: self.numel,
            blocksize: self.blocksize,
            packed: self.packed.len(),
            scales: match self.scales {
                ScalesView::Plain(a) => ScaleLengths::Plain { absmax: a.len() },
                ScalesView::Double {
                    qabsmax,
                    absmax2,
                    code2,
                    nested_blocksize,
                    ..
                } => ScaleLengths::Double {
                    qabsmax: qabsmax.len(),
                    absmax2: absmax2.len(),
                    code2: code2.len(),
                    nested_blocksize,
                },
            },
        }
    }

    /// The f32 scale of block `b`, computed as bitsandbytes does (double
    /// quant: multiply, round, add offset, round).
    ///
    /// Call only after [`validate`](Self::validate); `b` must be in range.
    #[inline]
    pub fn scale(&self, b: usize) -> f32 {
        match self.scales {
            ScalesView::Plain(a) => a[b],
            ScalesView::Double {
                qabsmax,
                absmax2,
                code2,
                offset,
                nested_blocksize,
            } => code2[usize::from(qabsmax[b])] * absmax2[b / nested_blocksize] + offset,
        }
    }
}
