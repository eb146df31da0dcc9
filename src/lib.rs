//! # tli-kernels
//!
//! Hand-written CUDA kernels for the hot operations of QLoRA-style
//! fine-tuning and embedding evaluation, with safe Rust wrappers:
//!
//! * [`nf4`]: the bitsandbytes NF4 4-bit format — quantization, bit-exact
//!   dequantization, and the safetensors form transformers writes.
//! * [`cosine`]: masked mean pooling, L2 normalisation and cosine
//!   similarity of embeddings (fused pair path and N×M matrix), with
//!   [`candle_ops::cosine`] wrapping them as candle ops with autograd.
//! * [`ops`]: the operations, each runnable on three [`Device`]s: `cpu` (the
//!   multi-threaded Rust reference), `sim` (the `.cu` kernel source compiled
//!   for the host and run under `kernels/sim`) and `cuda` (PTX on a GPU).
//! * [`pairs`]: the Swahili–English word lists TLI trains and evaluates on,
//!   their `swahili<TAB>english` format and parser, and the shipped lists.
//! * [`tli`]: the TLI pipeline — layer scan, training, before/after
//!   evaluation with statistics, plots.
//!
//! The `tli` binary drives them (see the README).

#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod candle_ops;
pub mod cosine;
pub mod demo;
pub mod dtype;
pub mod error;
pub mod io;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod pairs;
pub mod roofline;
pub mod tli;

pub use backend::Device;
pub use dtype::{DType, Element};
pub use error::{Error, Result};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
