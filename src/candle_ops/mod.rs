//! candle custom ops over this crate's kernels, with autograd.
//!
//! Forward passes run the CPU path on CPU tensors and, with the
//! `candle-cuda` feature, the CUDA launchers on CUDA tensors; backward
//! passes are candle tensor ops from closed-form gradients.

pub mod cosine;
pub mod lora;
