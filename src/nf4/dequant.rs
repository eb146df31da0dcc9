//! The CPU dequantizer: multi-threaded, table-driven, bit-exact.
//!
//! Per scale block it builds a 16-entry table of already converted outputs,
//! `T(NF4[q] * scale)`, then expands each packed byte into two table reads.
//! That is the same value the per-element formula gives (the table entry *is*
//! that formula for each of the 16 codes), at the cost of 16 multiplies and
//! conversions per block instead of one per element, and an inner loop with no
//! arithmetic at all, which the compiler unrolls and vectorises into gathers
//! and shuffles.
//!
//! Threads take runs of whole blocks (at least 64 KiB of output each) so
//! every thread writes a contiguous region and no two share a cache line.

use rayon::prelude::*;

use super::{NF4_CODE, Nf4View};
use crate::{Element, Error, Result};

/// Output bytes each rayon task should write at least (keeps task overhead
/// far below the work while leaving enough tasks to balance).
const TASK_BYTES: usize = 64 * 1024;

#[inline]
fn expand_block<T: Element>(packed: &[u8], scale: f32, out: &mut [T]) {
    let lut: [T; 16] = std::array::from_fn(|q| T::from_f32(NF4_CODE[q] * scale));
    let (pairs, tail) = out.as_chunks_mut::<2>();
    for (pair, &byte) in pairs.iter_mut().zip(packed) {
        pair[0] = lut[usize::from(byte >> 4)];
        pair[1] = lut[usize::from(byte & 0x0f)];
    }
    if let Some(last) = tail.first_mut() {
        // Odd element count: the final byte's low nibble is padding.
        *last = lut[usize::from(packed[pairs.len()] >> 4)];
    }
}

/// Dequantize `src` into `out` (`src.numel` elements) on the CPU.
///
/// # Errors
/// Whatever [`Nf4View::validate`] reports, and [`Error::ShapeMismatch`] if
/// `out` has the wrong length.
pub fn dequantize_into<T: Element>(src: &Nf4View<'_>, out: &mut [T]) -> Result<()> {
    const OP: &str = "nf4 dequantize (cpu)";
    src.validate(OP)?;
    if out.len() != src.numel {
        return Err(Error::shape(OP, "output", src.numel, out.len()));
    }
    let bs = src.blocksize;
    let blocks_per_task = (TASK_BYTES / (bs * std::mem::size_of::<T>())).max(1);
    out.par_chunks_mut(bs * blocks_per_task)
        .zip(src.packed.par_chunks(bs / 2 * blocks_per_task))
        .enumerate()
        .for_each(|(task, (out, packed))| {
            let first_block = task * blocks_per_task;
            for (i, (out, packed)) in out.chunks_mut(bs).zip(packed.chunks(bs / 2)).enumerate() {
                expand_block(packed, src.scale(first_block + i), out);
            }
        });
    Ok(())
}

/// Dequantize `src` into a new vector.
///
/// # Errors
/// As [`dequantize_into`].
pub fn dequantize<T: Element>(src: &Nf4View<'_>) -> Result<Vec<T>> {
    let mut out = vec![T::zeroed(); src.numel];
    dequantize_into(src, &mut out)?;
    Ok(out)
}
