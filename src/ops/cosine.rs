//! Masked mean pooling, L2 normalisation and cosine similarity on any
//! device, from host slices.
//!
//! The conventions (zero vector for an empty mask, `F.normalize`'s
//! `max(‖v‖, 1e-12)`, `F.cosine_similarity`'s per-norm `max(‖·‖, 1e-8)`,
//! results clamped to [-1, 1], f32 accumulation and outputs) are written
//! down in [`crate::cosine`]. For device-resident buffers use the
//! `backend::cuda::Cuda::cosine_*` launchers (feature `cuda`).
//!
//! ```
//! use tli_kernels::cosine::{Hidden, PairOptions};
//! use tli_kernels::ops::cosine::{cosine_pairs, pooled_cosine};
//! use tli_kernels::Device;
//!
//! // Two pairs of 3-token sequences of width 4; the masks drop padding.
//! let a: Vec<f32> = (0..24).map(|i| (i as f32).sin()).collect();
//! let b: Vec<f32> = (0..24).map(|i| (i as f32).cos()).collect();
//! let mask = [1u8, 1, 0, 1, 0, 0];
//! let ha = Hidden::contiguous(&a, 2, 3, 4);
//! let hb = Hidden::contiguous(&b, 2, 3, 4);
//! let r = pooled_cosine(Device::Cpu, &ha, Some(&mask), &hb, Some(&mask), PairOptions::default())?;
//! assert_eq!(r.cos.len(), 2);
//! assert!(r.cos.iter().all(|c| (-1.0..=1.0).contains(c)));
//!
//! // Plain vectors: a [n, d] matrix is the view with seq 1.
//! let c = cosine_pairs(Device::Cpu, &Hidden::rows(&a, 6, 4), &Hidden::rows(&a, 6, 4))?;
//! assert!(c.iter().all(|&x| (x - 1.0).abs() < 1e-6));
//! # Ok::<(), tli_kernels::Error>(())
//! ```

use crate::cosine::{
    self, COSINE_EPS, Hidden, NORMALIZE_EPS, PairOptions, PooledCosine, check_element, check_eps,
    check_mask, check_matrix_args, check_pair_args,
};
use crate::{Device, Element, Error, Result};

/// Masked mean pooling: `[batch, seq, dim]` hidden states to `[batch, dim]`
/// f32 means over the positions `mask` selects (all positions for `None`).
/// A row with no selected position pools to the zero vector.
///
/// # Errors
/// [`Error::InvalidArgument`] or [`Error::ShapeMismatch`] naming the bad
/// size or stride (checked before anything runs); [`Error::NoCudaDevice`] or
/// [`Error::Driver`] from `cuda`; [`Error::Sim`] from the simulator.
pub fn masked_mean_pool<T: Element>(
    device: Device,
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
) -> Result<Vec<f32>> {
    pool(device, "masked mean pool", h, mask, None)
}

/// Masked mean pooling fused with L2 normalisation: each pooled row divided
/// by `max(‖row‖, eps)` (PyTorch `F.normalize`; pass
/// [`NORMALIZE_EPS`] for its default).
///
/// # Errors
/// As [`masked_mean_pool`], and [`Error::InvalidArgument`] for an `eps`
/// that is not finite and positive.
pub fn pool_normalize<T: Element>(
    device: Device,
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
    eps: f32,
) -> Result<Vec<f32>> {
    pool(device, "pool + normalize", h, mask, Some(eps))
}

/// L2 normalisation of the rows of a matrix view (`seq == 1`):
/// `v / max(‖v‖, 1e-12)`, as f32.
///
/// # Errors
/// As [`pool_normalize`], and [`Error::InvalidArgument`] when `v` is not a
/// matrix of vectors.
pub fn l2_normalize<T: Element>(device: Device, v: &Hidden<'_, T>) -> Result<Vec<f32>> {
    v.require_rows("l2 normalize", "input")?;
    pool(device, "l2 normalize", v, None, Some(NORMALIZE_EPS))
}

fn pool<T: Element>(
    device: Device,
    op: &'static str,
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
    normalize: Option<f32>,
) -> Result<Vec<f32>> {
    check_element::<T>(op)?;
    h.validate(op, "hidden states")?;
    check_mask(op, "hidden-state", h, mask)?;
    if let Some(eps) = normalize {
        check_eps(op, eps)?;
    }
    let mut out = vec![0.0f32; h.batch * h.dim];
    match device {
        Device::Cpu => cosine::cpu::pool_into(h, mask, normalize, &mut out),
        Device::Sim => {
            #[cfg(feature = "sim")]
            {
                crate::backend::sim::cosine_pool(
                    h,
                    mask,
                    normalize.unwrap_or(NORMALIZE_EPS),
                    normalize.is_some(),
                    Some(&mut out),
                    None,
                )?;
            }
            #[cfg(not(feature = "sim"))]
            {
                Device::Sim.check_available()?;
            }
        }
        Device::Cuda => {
            #[cfg(tli_cuda)]
            {
                crate::backend::cuda::Cuda::global()?
                    .cosine_pool_host(h, mask, normalize, &mut out)?;
            }
            #[cfg(not(tli_cuda))]
            {
                Device::Cuda.check_available()?;
            }
        }
    }
    Ok(out)
}

/// The fused evaluation op: from two batches of hidden states and their
/// masks straight to one cosine per pair (`a[i]` with `b[i]`), pooling,
/// normalising and dotting in one pass over the hidden states. The pooled
/// vectors are returned only when `opts.keep_pooled` asks for them.
///
/// # Errors
/// [`Error::ShapeMismatch`] for unequal batch or width, or masks of the
/// wrong length; what [`Hidden::validate`] reports; a bad `eps`. Device
/// errors as [`masked_mean_pool`].
pub fn pooled_cosine<T: Element>(
    device: Device,
    a: &Hidden<'_, T>,
    mask_a: Option<&[u8]>,
    b: &Hidden<'_, T>,
    mask_b: Option<&[u8]>,
    opts: PairOptions,
) -> Result<PooledCosine> {
    const OP: &str = "pooled cosine";
    check_element::<T>(OP)?;
    check_pair_args(OP, a, mask_a, b, mask_b, opts.eps)?;
    let n = a.batch;
    let mut cos = vec![0.0f32; n];
    let mut kept = opts
        .keep_pooled
        .then(|| (vec![0.0f32; n * a.dim], vec![0.0f32; n * a.dim]));
    let pooled = kept
        .as_mut()
        .map(|(x, y)| (x.as_mut_slice(), y.as_mut_slice()));
    match device {
        Device::Cpu => cosine::cpu::pairs_into(a, mask_a, b, mask_b, opts.eps, &mut cos, pooled),
        Device::Sim => {
            #[cfg(feature = "sim")]
            {
                crate::backend::sim::cosine_pairs(
                    a, mask_a, b, mask_b, opts.eps, &mut cos, pooled,
                )?;
            }
            #[cfg(not(feature = "sim"))]
            {
                let _ = pooled;
                Device::Sim.check_available()?;
            }
        }
        Device::Cuda => {
            #[cfg(tli_cuda)]
            {
                crate::backend::cuda::Cuda::global()?
                    .cosine_pairs_host(a, mask_a, b, mask_b, opts.eps, &mut cos, pooled)?;
            }
            #[cfg(not(tli_cuda))]
            {
                let _ = pooled;
                Device::Cuda.check_available()?;
            }
        }
    }
    let (pooled_a, pooled_b) = match kept {
        Some((x, y)) => (Some(x), Some(y)),
        None => (None, None),
    };
    Ok(PooledCosine {
        cos,
        pooled_a,
        pooled_b,
    })
}

/// `cos[i] = cos(a_i, b_i)` for two matrices of vectors (`seq == 1`) with
/// `F.cosine_similarity`'s per-norm clamp `eps = 1e-8`, clamped to
/// [-1, 1]; a zero vector gives 0.
///
/// # Errors
/// As [`pooled_cosine`], and [`Error::InvalidArgument`] when a view is not a
/// matrix of vectors.
pub fn cosine_pairs<T: Element>(
    device: Device,
    a: &Hidden<'_, T>,
    b: &Hidden<'_, T>,
) -> Result<Vec<f32>> {
    a.require_rows("cosine pairs", "a")?;
    b.require_rows("cosine pairs", "b")?;
    Ok(pooled_cosine(device, a, None, b, None, PairOptions::default())?.cos)
}

/// The cosine matrix `C[i, j] = cos(a_i, b_j)` of `a` (`[n, dim]`) and `b`
/// (`[m, dim]`), row-major `[n, m]` f32, with the per-norm clamp `eps`
/// ([`COSINE_EPS`] by default in PyTorch): for hardest-negative mining and
/// retrieval-style evaluation.
///
/// # Errors
/// [`Error::InvalidArgument`] for views that are not matrices of vectors or
/// a bad `eps`; [`Error::ShapeMismatch`] for unequal widths; an output too
/// large to address; device errors as [`masked_mean_pool`].
pub fn cosine_matrix<T: Element>(
    device: Device,
    a: &Hidden<'_, T>,
    b: &Hidden<'_, T>,
    eps: f32,
) -> Result<Vec<f32>> {
    const OP: &str = "cosine matrix";
    check_element::<T>(OP)?;
    check_matrix_args(OP, a, b, eps)?;
    let len = a.batch.checked_mul(b.batch).ok_or_else(|| {
        Error::invalid(
            OP,
            format!("{} x {} outputs overflow usize", a.batch, b.batch),
        )
    })?;
    let mut out = vec![0.0f32; len];
    match device {
        Device::Cpu => cosine::cpu::matrix_into(a, b, eps, &mut out),
        Device::Sim => {
            #[cfg(feature = "sim")]
            {
                crate::backend::sim::cosine_matrix(a, b, eps, &mut out)?;
            }
            #[cfg(not(feature = "sim"))]
            {
                Device::Sim.check_available()?;
            }
        }
        Device::Cuda => {
            #[cfg(tli_cuda)]
            {
                crate::backend::cuda::Cuda::global()?.cosine_matrix_host(a, b, eps, &mut out)?;
            }
            #[cfg(not(tli_cuda))]
            {
                Device::Cuda.check_available()?;
            }
        }
    }
    Ok(out)
}

/// [`cosine_matrix`] with PyTorch's default clamp, [`COSINE_EPS`].
///
/// # Errors
/// As [`cosine_matrix`].
pub fn cosine_matrix_default<T: Element>(
    device: Device,
    a: &Hidden<'_, T>,
    b: &Hidden<'_, T>,
) -> Result<Vec<f32>> {
    cosine_matrix(device, a, b, COSINE_EPS)
}
