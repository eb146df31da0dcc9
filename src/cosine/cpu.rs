//! The CPU implementation: fused, multi-threaded, and written so the
//! compiler vectorises the inner loops.
//!
//! **Fused pairs** ([`pairs_into`]). One rayon task takes a run of pairs; per
//! pair it walks the embedding in column blocks of [`COL_BLOCK`] floats
//! (4 KiB, so both pooled blocks stay in L1): sum the set positions of each
//! side into a block accumulator, scale by `1/c`, and fold the two blocks
//! straight into 16-lane partial sums of `⟨p_a,p_b⟩`, `‖p_a‖²`, `‖p_b‖²`.
//! The hidden states are read once and the pooled vectors are never written
//! unless asked for. The unfused composite — [`pool_into`], then
//! [`normalize_rows`], then [`dot_rows`] — writes and re-reads two `[N, D]`
//! f32 intermediates; the bench compares the two.
//!
//! **Matrix** ([`matrix_into`]). Rows are scaled to unit length on the way
//! into f32 copies (`x · 2^-e · r`, exactly as the kernel loads its tiles),
//! then the `gemm` crate multiplies them (runtime-selected SIMD kernels,
//! rayon threads) and the result is clamped.

use half::{bf16, f16};
use rayon::prelude::*;

use super::Hidden;
use crate::{DType, Element};

/// Columns per block of the fused loops: 1024 f32 = 4 KiB per side.
pub const COL_BLOCK: usize = 1024;
/// Independent accumulator lanes: enough for the compiler to use full SIMD
/// registers without reassociating a float sum (which it may not do).
const LANES: usize = 16;
/// Elements of hidden state one rayon task should read at least.
const TASK_ELEMS: usize = 1 << 16;

/// `acc[i] += f32(src[i])`, exactly widened.
#[inline]
fn add_widened<T: Element>(src: &[T], acc: &mut [f32]) {
    debug_assert_eq!(src.len(), acc.len());
    match T::DTYPE {
        DType::F32 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, f32>(src) {
                for (a, &x) in acc.iter_mut().zip(s) {
                    *a += x;
                }
                return;
            }
        }
        DType::BF16 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, bf16>(src) {
                // bf16 -> f32 is the 16 bits moved to the top: vectorises.
                for (a, &x) in acc.iter_mut().zip(s) {
                    *a += f32::from_bits(u32::from(x.to_bits()) << 16);
                }
                return;
            }
        }
        DType::F16 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, f16>(src) {
                let mut tmp = [0.0f32; COL_BLOCK];
                for (chunk, acc) in s.chunks(COL_BLOCK).zip(acc.chunks_mut(COL_BLOCK)) {
                    let t = &mut tmp[..chunk.len()];
                    half::slice::HalfFloatSliceExt::convert_to_f32_slice(chunk, t);
                    for (a, &x) in acc.iter_mut().zip(t.iter()) {
                        *a += x;
                    }
                }
                return;
            }
        }
    }
    // A foreign Element whose size disagrees with its dtype (the public
    // entry points reject it first); the generic conversion is still right.
    for (a, &x) in acc.iter_mut().zip(src) {
        *a += x.to_f32();
    }
}

/// `1 / c` for the positions a mask row selects (0 when none).
#[inline]
fn inv_count(mask: Option<&[u8]>, seq: usize) -> f32 {
    let c = mask.map_or(seq, |m| m.iter().filter(|&&x| x != 0).count());
    if c == 0 { 0.0 } else { 1.0 / c as f32 }
}

/// Mean of the set positions of row `b` over columns `d0..d0 + out.len()`.
#[inline]
fn pool_block<T: Element>(
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
    b: usize,
    d0: usize,
    inv: f32,
    out: &mut [f32],
) {
    out.fill(0.0);
    for t in 0..h.seq {
        if mask.is_some_and(|m| m[t] == 0) {
            continue;
        }
        let o = h.offset(b, t) + d0;
        add_widened(&h.data[o..o + out.len()], out);
    }
    for x in out.iter_mut() {
        *x *= inv;
    }
}

/// The kernel's `scale_for`: a power of two `s` with `m · s < 4`, clamped to
/// the normal range; 1 for `m = 0` or a non-finite `m`.
pub(crate) fn scale_for(m: f32) -> f32 {
    if m.is_nan() || m <= 0.0 || !m.is_finite() {
        return 1.0;
    }
    let biased = ((m.to_bits() >> 23) & 0xff) as i32;
    let se = (253 - biased).clamp(1, 253) as u32;
    f32::from_bits(se << 23)
}

/// Clamp to [-1, 1], keeping NaN (`f32::clamp` returns NaN for NaN).
#[inline]
pub(crate) fn clamp_unit(c: f32) -> f32 {
    c.clamp(-1.0, 1.0)
}

/// Sum of lanes, in lane order.
#[inline]
fn lane_sum(l: &[f32; LANES]) -> f32 {
    l.iter().fold(0.0, |s, &x| s + x)
}

/// `acc += Σ (a·s)²` over a slice, in LANES lanes.
#[inline]
fn fold_sq(a: &[f32], s: f32, acc: &mut [f32; LANES]) {
    let (chunks, rest) = a.as_chunks::<LANES>();
    for c in chunks {
        for k in 0..LANES {
            let x = c[k] * s;
            acc[k] += x * x;
        }
    }
    for (k, &v) in rest.iter().enumerate() {
        let x = v * s;
        acc[k] += x * x;
    }
}

/// `(dot, na, nb) += (⟨a·sa, b·sb⟩, ‖a·sa‖², ‖b·sb‖²)` in LANES lanes.
#[inline]
fn fold3(a: &[f32], b: &[f32], sa: f32, sb: f32, acc: &mut [[f32; LANES]; 3]) {
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for k in 0..LANES {
            let xa = x[k] * sa;
            let xb = y[k] * sb;
            acc[0][k] += xa * xb;
            acc[1][k] += xa * xa;
            acc[2][k] += xb * xb;
        }
    }
    for (k, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        let xa = x * sa;
        let xb = y * sb;
        acc[0][k] += xa * xb;
        acc[1][k] += xa * xa;
        acc[2][k] += xb * xb;
    }
}

fn mask_row(mask: Option<&[u8]>, b: usize, seq: usize) -> Option<&[u8]> {
    mask.map(|m| &m[b * seq..(b + 1) * seq])
}

/// Rows per rayon task for rows that each read `per_row` elements.
fn min_rows(per_row: usize) -> usize {
    (TASK_ELEMS / per_row.max(1)).max(1)
}

/// The sum of squares of one pooled row held in `p`, overflow-safe:
/// returns `(Σ (p·s)², s)`.
fn safe_sumsq(p: &[f32]) -> (f32, f32) {
    let mut acc = [0.0f32; LANES];
    fold_sq(p, 1.0, &mut acc);
    let ss = lane_sum(&acc);
    if ss.is_finite() {
        return (ss, 1.0);
    }
    let s = scale_for(p.iter().fold(0.0f32, |m, &x| m.max(x.abs())));
    let mut acc = [0.0f32; LANES];
    fold_sq(p, s, &mut acc);
    (lane_sum(&acc), s)
}

/// Masked mean pooling of every row of `h` into `out` (`[batch, dim]`),
/// normalised to unit length (`x / max(‖x‖, eps)`) when `normalize` is
/// `Some(eps)`. Inputs have been validated by the caller.
pub fn pool_into<T: Element>(
    h: &Hidden<'_, T>,
    mask: Option<&[u8]>,
    normalize: Option<f32>,
    out: &mut [f32],
) {
    let dim = h.dim;
    out.par_chunks_mut(dim)
        .enumerate()
        .with_min_len(min_rows(h.seq * dim))
        .for_each(|(b, row)| {
            let m = mask_row(mask, b, h.seq);
            let inv = inv_count(m, h.seq);
            for (j, blk) in row.chunks_mut(COL_BLOCK).enumerate() {
                pool_block(h, m, b, j * COL_BLOCK, inv, blk);
            }
            if let Some(eps) = normalize {
                normalize_row(row, eps);
            }
        });
}

/// `row ← (row · s) · (1 / max(‖row · s‖, eps · s))`, the kernel's order.
fn normalize_row(row: &mut [f32], eps: f32) {
    let (ss, s) = safe_sumsq(row);
    let inv = 1.0 / ss.sqrt().max(eps * s);
    for x in row.iter_mut() {
        *x = (*x * s) * inv;
    }
}

/// L2-normalise every `dim`-wide row of `v` in place
/// (`x / max(‖x‖, eps)`): the second pass of the unfused composite.
pub fn normalize_rows(v: &mut [f32], dim: usize, eps: f32) {
    v.par_chunks_mut(dim)
        .with_min_len(min_rows(dim))
        .for_each(|row| normalize_row(row, eps));
}

/// `out[i] = ⟨a_i, b_i⟩` for contiguous `[n, dim]` f32 rows: the last pass of
/// the unfused composite (on normalised rows it is their cosine).
pub fn dot_rows(a: &[f32], b: &[f32], dim: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(a.par_chunks(dim).zip(b.par_chunks(dim)))
        .with_min_len(min_rows(2 * dim))
        .for_each(|(o, (x, y))| {
            let mut acc = [[0.0f32; LANES]; 3];
            fold3(x, y, 1.0, 1.0, &mut acc);
            *o = lane_sum(&acc[0]);
        });
}

/// The cosine of pair `i` from the two pooled sums, with the slow,
/// power-of-two-scaled recomputation when a sum overflowed.
#[allow(clippy::too_many_arguments)]
fn pair_cosine<T: Element>(
    a: &Hidden<'_, T>,
    ma: Option<&[u8]>,
    b: &Hidden<'_, T>,
    mb: Option<&[u8]>,
    i: usize,
    eps: f32,
    mut keep_a: Option<&mut [f32]>,
    mut keep_b: Option<&mut [f32]>,
) -> f32 {
    let dim = a.dim;
    let (ra, rb) = (mask_row(ma, i, a.seq), mask_row(mb, i, b.seq));
    let (ia, ib) = (inv_count(ra, a.seq), inv_count(rb, b.seq));
    let mut pa = [0.0f32; COL_BLOCK];
    let mut pb = [0.0f32; COL_BLOCK];
    let mut acc = [[0.0f32; LANES]; 3];
    let mut d0 = 0;
    while d0 < dim {
        let len = COL_BLOCK.min(dim - d0);
        let (xa, xb) = (&mut pa[..len], &mut pb[..len]);
        pool_block(a, ra, i, d0, ia, xa);
        pool_block(b, rb, i, d0, ib, xb);
        if let Some(k) = keep_a.as_deref_mut() {
            k[d0..d0 + len].copy_from_slice(xa);
        }
        if let Some(k) = keep_b.as_deref_mut() {
            k[d0..d0 + len].copy_from_slice(xb);
        }
        fold3(xa, xb, 1.0, 1.0, &mut acc);
        d0 += len;
    }
    let mut sums = [lane_sum(&acc[0]), lane_sum(&acc[1]), lane_sum(&acc[2])];
    let (mut sa, mut sb) = (1.0f32, 1.0f32);
    if !sums.iter().all(|x| x.is_finite()) {
        // Rare: recompute the whole pooled vectors, scaled by powers of two.
        let mut fa = vec![0.0f32; dim];
        let mut fb = vec![0.0f32; dim];
        for (j, (x, y)) in fa
            .chunks_mut(COL_BLOCK)
            .zip(fb.chunks_mut(COL_BLOCK))
            .enumerate()
        {
            pool_block(a, ra, i, j * COL_BLOCK, ia, x);
            pool_block(b, rb, i, j * COL_BLOCK, ib, y);
        }
        let absmax = |v: &[f32]| v.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        sa = scale_for(absmax(&fa));
        sb = scale_for(absmax(&fb));
        let mut acc = [[0.0f32; LANES]; 3];
        fold3(&fa, &fb, sa, sb, &mut acc);
        sums = [lane_sum(&acc[0]), lane_sum(&acc[1]), lane_sum(&acc[2])];
    }
    finish_cosine(sums, sa, sb, eps)
}

/// `dot · (1/max(‖a‖, eps·sa)) · (1/max(‖b‖, eps·sb))`, clamped: the
/// kernel's epilogue (which computes the square root to within an ulp).
pub(crate) fn finish_cosine(sums: [f32; 3], sa: f32, sb: f32, eps: f32) -> f32 {
    let da = sums[1].sqrt().max(eps * sa);
    let db = sums[2].sqrt().max(eps * sb);
    clamp_unit(sums[0] * (1.0 / da) * (1.0 / db))
}

/// The fused pair op: `cos[i]` for pair `i` of `a` and `b` (each pooled
/// under its mask), and the pooled vectors when `pooled` is given.
/// Inputs have been validated by the caller (equal batch and dim; masks and
/// outputs of the right lengths).
pub fn pairs_into<T: Element>(
    a: &Hidden<'_, T>,
    ma: Option<&[u8]>,
    b: &Hidden<'_, T>,
    mb: Option<&[u8]>,
    eps: f32,
    cos: &mut [f32],
    pooled: Option<(&mut [f32], &mut [f32])>,
) {
    let dim = a.dim;
    let per_pair = (a.seq + b.seq) * dim;
    match pooled {
        None => cos
            .par_iter_mut()
            .enumerate()
            .with_min_len(min_rows(per_pair))
            .for_each(|(i, c)| *c = pair_cosine(a, ma, b, mb, i, eps, None, None)),
        Some((pa, pb)) => cos
            .par_iter_mut()
            .zip(pa.par_chunks_mut(dim).zip(pb.par_chunks_mut(dim)))
            .enumerate()
            .with_min_len(min_rows(per_pair))
            .for_each(|(i, (c, (ka, kb)))| {
                *c = pair_cosine(a, ma, b, mb, i, eps, Some(ka), Some(kb));
            }),
    }
}

/// Rows of `v` (a matrix view, `seq == 1`) scaled to unit length as f32:
/// `x · s · r` with the kernel's `(s, r)`.
fn unit_rows<T: Element>(v: &Hidden<'_, T>, eps: f32) -> Vec<f32> {
    let dim = v.dim;
    let mut out = vec![0.0f32; v.batch * dim];
    out.par_chunks_mut(dim)
        .enumerate()
        .with_min_len(min_rows(dim))
        .for_each(|(i, row)| {
            for (j, blk) in row.chunks_mut(COL_BLOCK).enumerate() {
                pool_block(v, None, i, j * COL_BLOCK, 1.0, blk);
            }
            let (ss, s) = safe_sumsq(row);
            let r = 1.0 / ss.sqrt().max(eps * s);
            for x in row.iter_mut() {
                *x = (*x * s) * r;
            }
        });
    out
}

/// `out[i·m + j] = clamp(⟨â_i, b̂_j⟩)` for unit rows `â`, `b̂` of the matrix
/// views `a` (`[n, dim]`) and `b` (`[m, dim]`). Validated by the caller.
pub fn matrix_into<T: Element>(a: &Hidden<'_, T>, b: &Hidden<'_, T>, eps: f32, out: &mut [f32]) {
    let (n, m, k) = (a.batch, b.batch, a.dim);
    let ua = unit_rows(a, eps);
    let ub = unit_rows(b, eps);
    let threads = rayon::current_num_threads().max(1);
    let parallelism = if n * m * k >= 1 << 20 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // dst [n, m] row-major; lhs = ua [n, k] row-major; rhs = ubᵀ [k, m]:
    // element (kk, j) is ub[j·k + kk], so its row stride is 1 and its column
    // stride k.
    //
    // SAFETY: `out` holds n·m f32 (checked by the caller), `ua` n·k and `ub`
    // m·k (built above); every index gemm forms from these sizes and strides
    // stays inside them; read_dst = false, so `out`'s prior contents are
    // never read (alpha is ignored), and no other reference to the three
    // buffers is alive during the call.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            out.as_mut_ptr(),
            1,
            m as isize,
            false,
            ua.as_ptr(),
            1,
            k as isize,
            ub.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    out.par_iter_mut()
        .with_min_len(1 << 14)
        .for_each(|c| *c = clamp_unit(*c));
}
