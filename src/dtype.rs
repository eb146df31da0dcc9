//! Floating-point element types the ops read and write.

use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A floating-point dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE binary16.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Short name: `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// The name torch and bitsandbytes use in quant-state JSON
    /// (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// The matching safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
        }
    }

    /// The `DType` of a safetensors dtype, if it is one of ours.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Accepts `f32`/`float32`/`torch.float32`, `bf16`/`bfloat16`,
    /// `f16`/`float16`/`half` (as written in quant-state JSON or on the CLI).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().trim_start_matches("torch.") {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "half" => Ok(DType::F16),
            other => Err(Error::UnsupportedDtype {
                op: "dtype",
                dtype: other.to_string(),
                supported: "f32 (float32), bf16 (bfloat16), f16 (float16)",
            }),
        }
    }
}

/// An element type the kernels produce: f32, bf16 or f16.
///
/// Conversions from f32 round to nearest even, as the device's
/// `__float2bfloat16_rn` / `__float2half_rn` do, so CPU and GPU outputs agree
/// bit for bit on every non-NaN value.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + PartialEq + fmt::Debug + 'static {
    /// The runtime dtype tag.
    const DTYPE: DType;
    /// Round an f32 to this type (nearest even).
    fn from_f32(v: f32) -> Self;
    /// Widen to f32 (exact).
    fn to_f32(self) -> f32;
    /// The raw bits, widened, for bit-exact comparisons.
    fn to_bits_u32(self) -> u32;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        u32::from(self.to_bits())
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn to_bits_u32(self) -> u32 {
        u32::from(self.to_bits())
    }
}
