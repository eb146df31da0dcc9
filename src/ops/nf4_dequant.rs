//! NF4 dequantization on any device, from host slices.
//!
//! For device-resident buffers (no host round trip) use
//! `backend::cuda::Cuda::nf4_dequant` (feature `cuda`).

use crate::nf4::Nf4View;
use crate::{Device, Element, Error, Result};

/// Dequantize `src` into `out` on `device`.
///
/// `cpu` and `sim` work on the slices directly; `cuda` copies the inputs to
/// the device, runs the kernel and copies the result back.
///
/// # Errors
/// Validation errors naming the mismatched sizes (checked before anything
/// runs); [`Error::NoCudaDevice`] or [`Error::Driver`] from `cuda`;
/// [`Error::Sim`] from the simulator.
pub fn dequantize_into<T: Element>(device: Device, src: &Nf4View<'_>, out: &mut [T]) -> Result<()> {
    const OP: &str = "nf4 dequantize";
    src.validate(OP)?;
    if out.len() != src.numel {
        return Err(Error::shape(OP, "output", src.numel, out.len()));
    }
    match device {
        Device::Cpu => crate::nf4::dequant::dequantize_into(src, out),
        Device::Sim => {
            #[cfg(feature = "sim")]
            {
                crate::backend::sim::nf4_dequant(src, out)
            }
            #[cfg(not(feature = "sim"))]
            {
                Device::Sim.check_available()
            }
        }
        Device::Cuda => {
            #[cfg(tli_cuda)]
            {
                crate::backend::cuda::Cuda::global()?.nf4_dequant_host(src, out)
            }
            #[cfg(not(tli_cuda))]
            {
                Device::Cuda.check_available()
            }
        }
    }
}

/// Dequantize `src` into a new vector on `device`.
///
/// # Errors
/// As [`dequantize_into`].
pub fn dequantize<T: Element>(device: Device, src: &Nf4View<'_>) -> Result<Vec<T>> {
    let mut out = vec![T::zeroed(); src.numel];
    dequantize_into(device, src, &mut out)?;
    Ok(out)
}
