//! Double quantization of absmax (PLACEHOLDER: being written).
use super::DoubleQuant;
use crate::Result;

/// Quantize absmax values (being written).
pub fn quantize_absmax(_absmax: &[f32]) -> Result<DoubleQuant> {
    Err(crate::Error::invalid("double quant", "not yet written"))
}
