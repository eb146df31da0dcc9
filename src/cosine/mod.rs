//! Masked mean pooling, L2 normalisation and cosine similarity of
//! embeddings: the shared definitions (views, conventions, validation) and
//! the multi-threaded CPU implementation in [`cpu`].
//!
//! Conventions, the same on every device (`kernels/cosine.cu` states them
//! with the kernel's layout):
//!
//! * **Pooling.** `p[b] = fl(1/c_b) · Σ_{t: mask[b,t] ≠ 0} h[b,t]` with
//!   positions summed in ascending order in f32 and `c_b` the number of set
//!   positions. A row whose mask has no set position pools to the **zero
//!   vector** (a defined zero, not an error: the CUDA path would need a
//!   device-to-host copy of the mask to report it, and a zero vector then
//!   gives cosine 0 downstream, which is visible). Masks are `u8`, nonzero =
//!   pooled, so they can exclude special tokens as well as padding.
//! * **Normalisation** follows PyTorch's `F.normalize`:
//!   `v / max(‖v‖, eps)` with [`NORMALIZE_EPS`] = 1e-12, written as a
//!   multiply by the rounded reciprocal. That is the convention of the
//!   sentence-embedding code TLI is compared against, and it maps a zero
//!   vector to zero instead of NaN.
//! * **Cosine** follows `F.cosine_similarity`'s per-norm clamp:
//!   `⟨a,b⟩ / (max(‖a‖, eps) · max(‖b‖, eps))` with [`COSINE_EPS`] = 1e-8,
//!   then clamped to [-1, 1] (rounding can step just outside; NaN stays NaN).
//!   A zero vector gives 0.
//! * **Precision.** Inputs f32, bf16 or f16 are widened exactly; everything
//!   is accumulated in f32. Norms are computed overflow-safely: when a sum of
//!   squares overflows f32, it is recomputed on the vector scaled by a power
//!   of two, so any finite pooled vector works.
//! * **Outputs** are f32: pooled vectors `[B, D]`, cosines `[N]`, cosine
//!   matrices `[N, M]`, all contiguous row-major.

pub mod cpu;

use crate::{DType, Element, Error, Result};

/// PyTorch `F.normalize`'s default epsilon: `v / max(‖v‖, 1e-12)`.
pub const NORMALIZE_EPS: f32 = 1e-12;

/// PyTorch `F.cosine_similarity`'s default epsilon, applied to each norm.
pub const COSINE_EPS: f32 = 1e-8;

/// The largest embedding width the kernels index (`int32` column offsets
/// with room for a 256-thread stride).
pub const MAX_DIM: usize = 1 << 30;

/// The longest sequence: counts of set positions must be exact in f32.
pub const MAX_SEQ: usize = (1 << 24) - 1;

/// The most rows / pairs one launch handles (the kernels' `int32` counts).
pub const MAX_ROWS: usize = i32::MAX as usize;

/// A read-only view of hidden states `[batch, seq, dim]` with element
/// strides `(stride_b, stride_t, 1)`: a contiguous tensor, or a layer slice
/// of a larger one (e.g. `[layers, batch, seq, dim]` at one layer, or
/// `[batch, seq, layers, dim]` with `stride_t = layers · dim`).
///
/// A matrix of vectors `[n, dim]` is the view with `seq = 1`
/// ([`Hidden::rows`], [`Hidden::rows_strided`]).
#[derive(Debug, Clone, Copy)]
pub struct Hidden<'a, T> {
    /// The elements; element `(b, t, d)` is `data[b·stride_b + t·stride_t + d]`.
    pub data: &'a [T],
    /// Rows (sequences, or vectors).
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Embedding width.
    pub dim: usize,
    /// Elements between consecutive rows.
    pub stride_b: usize,
    /// Elements between consecutive positions.
    pub stride_t: usize,
}

impl<'a, T> Hidden<'a, T> {
    /// A contiguous `[batch, seq, dim]` tensor.
    pub fn contiguous(data: &'a [T], batch: usize, seq: usize, dim: usize) -> Self {
        Hidden {
            data,
            batch,
            seq,
            dim,
            stride_b: seq.saturating_mul(dim),
            stride_t: dim,
        }
    }

    /// A strided `[batch, seq, dim]` view (unit stride along `dim`).
    pub fn strided(
        data: &'a [T],
        batch: usize,
        seq: usize,
        dim: usize,
        stride_b: usize,
        stride_t: usize,
    ) -> Self {
        Hidden {
            data,
            batch,
            seq,
            dim,
            stride_b,
            stride_t,
        }
    }

    /// A contiguous matrix of `n` vectors of width `dim`.
    pub fn rows(data: &'a [T], n: usize, dim: usize) -> Self {
        Self::rows_strided(data, n, dim, dim)
    }

    /// `n` vectors of width `dim`, `ld` elements apart.
    pub fn rows_strided(data: &'a [T], n: usize, dim: usize, ld: usize) -> Self {
        Hidden {
            data,
            batch: n,
            seq: 1,
            dim,
            stride_b: ld,
            stride_t: dim,
        }
    }

    /// Offset of element `(b, t, 0)`. Valid after [`validate`](Self::validate).
    #[inline]
    pub(crate) fn offset(&self, b: usize, t: usize) -> usize {
        b * self.stride_b + t * self.stride_t
    }

    /// Every size and stride against the data and the kernels' limits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero or too-large `batch`, `seq` or
    /// `dim`; [`Error::ShapeMismatch`] when the strides reach past the data.
    pub fn validate(&self, op: &'static str, what: &str) -> Result<()> {
        check_layout(
            op,
            what,
            [self.batch, self.seq, self.dim],
            [self.stride_b, self.stride_t],
            self.data.len(),
        )
    }

    /// Require a matrix of vectors (`seq == 1`).
    pub(crate) fn require_rows(&self, op: &'static str, what: &str) -> Result<()> {
        if self.seq != 1 {
            return Err(Error::invalid(
                op,
                format!(
                    "{what} must be a matrix of vectors (seq 1), got seq {}; use pooled_cosine for sequences",
                    self.seq
                ),
            ));
        }
        Ok(())
    }
}

/// Check a `[batch, seq, dim]` layout with strides `(stride_b, stride_t, 1)`
/// against a buffer of `len` elements and the kernels' limits.
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero or too-large dimension;
/// [`Error::ShapeMismatch`] when the strides reach past `len`.
pub fn check_layout(
    op: &'static str,
    what: &str,
    [batch, seq, dim]: [usize; 3],
    [stride_b, stride_t]: [usize; 2],
    len: usize,
) -> Result<()> {
    if batch == 0 || seq == 0 || dim == 0 {
        return Err(Error::invalid(
            op,
            format!(
                "{what} has shape [{}, {}, {}]; every dimension must be at least 1",
                batch, seq, dim
            ),
        ));
    }
    if batch > MAX_ROWS {
        return Err(Error::invalid(
            op,
            format!("{what} has {} rows; at most {MAX_ROWS} per call", batch),
        ));
    }
    if seq > MAX_SEQ {
        return Err(Error::invalid(
            op,
            format!(
                "{what} has {} positions; at most {MAX_SEQ} (counts must be exact in f32)",
                seq
            ),
        ));
    }
    if dim > MAX_DIM {
        return Err(Error::invalid(
            op,
            format!("{what} has width {}; at most {MAX_DIM}", dim),
        ));
    }
    let last = (batch - 1)
        .checked_mul(stride_b)
        .and_then(|x| x.checked_add((seq - 1).checked_mul(stride_t)?))
        .and_then(|x| x.checked_add(dim));
    let too_far = || {
        Error::shape(
            op,
            format!(
                "{what} data for shape [{}, {}, {}] with strides ({}, {}, 1)",
                batch, seq, dim, stride_b, stride_t
            ),
            format!(
                "at least {} elements",
                last.map_or_else(|| "more than usize::MAX".to_string(), |l| l.to_string())
            ),
            format!("{} elements", len),
        )
    };
    match last {
        Some(l) if l <= len && i64::try_from(l).is_ok() => Ok(()),
        _ => Err(too_far()),
    }
}

/// Check a mask against its hidden states: `batch · seq` bytes.
pub(crate) fn check_mask<T>(
    op: &'static str,
    what: &str,
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
) -> Result<()> {
    if let Some(m) = mask {
        let want = h.batch * h.seq;
        if m.len() != want {
            return Err(Error::shape(
                op,
                format!("{what} mask for [{}, {}]", h.batch, h.seq),
                format!("{want} bytes"),
                format!("{} bytes", m.len()),
            ));
        }
    }
    Ok(())
}

/// Check an epsilon: finite and positive.
pub(crate) fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::invalid(
            op,
            format!("eps {eps} must be finite and positive"),
        ));
    }
    Ok(())
}

/// Check that `T`'s size agrees with its dtype (a foreign `Element` impl
/// could disagree; the kernels read `T::DTYPE.size()` bytes per element).
pub(crate) fn check_element<T: Element>(op: &'static str) -> Result<()> {
    if size_of::<T>() != T::DTYPE.size() {
        return Err(Error::UnsupportedDtype {
            op,
            dtype: format!("{} of {} bytes", T::DTYPE, size_of::<T>()),
            supported: "f32, bf16, f16",
        });
    }
    Ok(())
}

/// What a pair-cosine call returns.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledCosine {
    /// One cosine per pair.
    pub cos: Vec<f32>,
    /// The pooled (mean, not normalised) vectors of side a, `[N, D]`, when
    /// asked for.
    pub pooled_a: Option<Vec<f32>>,
    /// The pooled vectors of side b, `[N, D]`, when asked for.
    pub pooled_b: Option<Vec<f32>>,
}

/// Options of the fused pair op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairOptions {
    /// The per-norm clamp (default [`COSINE_EPS`]).
    pub eps: f32,
    /// Also return the pooled vectors (off by default: the fused path never
    /// writes them unless asked).
    pub keep_pooled: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            eps: COSINE_EPS,
            keep_pooled: false,
        }
    }
}

/// Bytes the fused pair op reads and writes: the set positions of both
/// sides (`set_a`, `set_b` positions in all), the masks, and one f32 per
/// pair; the roofline numerator of the benches.
pub fn pairs_traffic_bytes(
    dtype: DType,
    dim: usize,
    set_a: usize,
    set_b: usize,
    mask_bytes: usize,
    pairs: usize,
) -> usize {
    (set_a + set_b) * dim * dtype.size() + mask_bytes + 4 * pairs
}

/// Flops of an `n × m` cosine matrix at width `dim` (2 per multiply-add).
pub fn matrix_flops(n: usize, m: usize, dim: usize) -> f64 {
    2.0 * n as f64 * m as f64 * dim as f64
}

/// Validate the two sides of a pair op: each view, equal batch and dim,
/// the masks, and `eps`.
pub(crate) fn check_pair_args<T>(
    op: &'static str,
    a: &Hidden<'_, T>,
    mask_a: Option<&[u8]>,
    b: &Hidden<'_, T>,
    mask_b: Option<&[u8]>,
    eps: f32,
) -> Result<()> {
    a.validate(op, "a")?;
    b.validate(op, "b")?;
    if a.batch != b.batch {
        return Err(Error::shape(op, "rows of b", a.batch, b.batch));
    }
    if a.dim != b.dim {
        return Err(Error::shape(op, "width of b", a.dim, b.dim));
    }
    check_mask(op, "a", a, mask_a)?;
    check_mask(op, "b", b, mask_b)?;
    check_eps(op, eps)
}

/// Validate the operands of a cosine matrix: matrix views of equal width.
pub(crate) fn check_matrix_args<T>(
    op: &'static str,
    a: &Hidden<'_, T>,
    b: &Hidden<'_, T>,
    eps: f32,
) -> Result<()> {
    a.validate(op, "a")?;
    b.validate(op, "b")?;
    a.require_rows(op, "a")?;
    b.require_rows(op, "b")?;
    if a.dim != b.dim {
        return Err(Error::shape(op, "width of b", a.dim, b.dim));
    }
    check_eps(op, eps)
}
