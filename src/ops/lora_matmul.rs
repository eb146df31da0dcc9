//! The fused NF4 + LoRA linear on any device, from host slices.
//!
//! The contract (shapes, numerics, dropout) is in [`crate::lora`]. For
//! device-resident buffers use `backend::cuda::Cuda::lora_forward` /
//! `lora_backward` (feature `cuda`); to pick a kernel variant under the
//! simulator, `backend::sim::lora_forward_variant`.

use crate::lora::{BackwardArgs, ForwardArgs, Grads};
use crate::{Device, Element, Error, Result};

/// `out = T(x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ + bias)` on `device`.
///
/// `cpu` and `sim` work on the slices directly; `cuda` copies the inputs to
/// the device, runs the kernels and copies the result back.
///
/// # Errors
/// Validation errors naming the operand and both sizes (checked before
/// anything runs); [`Error::NoCudaDevice`] or [`Error::Driver`] from `cuda`;
/// [`Error::Sim`] from the simulator.
pub fn forward<T: Element>(device: Device, args: &ForwardArgs<'_, T>, out: &mut [T]) -> Result<()> {
    const OP: &str = "lora forward";
    args.validate(OP)?;
    if out.len() != args.out_len() {
        return Err(Error::shape(OP, "output [M, N]", args.out_len(), out.len()));
    }
    match device {
        Device::Cpu => crate::lora::cpu::forward(args, out),
        Device::Sim => {
            #[cfg(feature = "sim")]
            {
                crate::backend::sim::lora_forward(args, out)
            }
            #[cfg(not(feature = "sim"))]
            {
                Device::Sim.check_available()
            }
        }
        Device::Cuda => {
            #[cfg(tli_cuda)]
            {
                crate::backend::cuda::Cuda::global()?.lora_forward_host(args, out)
            }
            #[cfg(not(tli_cuda))]
            {
                Device::Cuda.check_available()
            }
        }
    }
}

/// The gradients `grads` asks for (`dx`, `dA`, `dB`) on `device`.
///
/// # Errors
/// As [`forward`], plus [`Error::InvalidArgument`] when `dA`/`dB` are asked
/// for without LoRA factors.
pub fn backward<T: Element>(
    device: Device,
    args: &BackwardArgs<'_, T>,
    grads: Grads<'_, T>,
) -> Result<()> {
    const OP: &str = "lora backward";
    args.validate(OP, &grads)?;
    match device {
        Device::Cpu => crate::lora::cpu::backward(args, grads),
        Device::Sim => {
            #[cfg(feature = "sim")]
            {
                crate::backend::sim::lora_backward(args, grads)
            }
            #[cfg(not(feature = "sim"))]
            {
                Device::Sim.check_available()
            }
        }
        Device::Cuda => {
            #[cfg(tli_cuda)]
            {
                crate::backend::cuda::Cuda::global()?.lora_backward_host(args, grads)
            }
            #[cfg(not(tli_cuda))]
            {
                Device::Cuda.check_available()
            }
        }
    }
}
