//! The fused NF4 + LoRA linear on the CPU: forward and backward, with the
//! large products on the `gemm` crate (the one candle's CPU backend uses).
//!
//! Forward, one task per panel of `PANEL` rows of `W` (output columns):
//!
//! ```text
//!   x (f32, [M,K], read by every panel)     u = s·ks·x̃·Aᵀ  (f32 [M,r], once)
//!           │                                        │
//!   W rows n0..n1 ─ decode ─► Wp (f32 [nb,K], in cache, T-rounded values)
//!           │                                        │
//!   y_p[M,nb] = x·Wpᵀ  ──►  y_p += u·B[n0..n1]ᵀ  ──►  + bias ──► T
//! ```
//!
//! `W` is decoded one panel at a time (64 rows × K f32 is 1 MiB at
//! K = 4096, an L2's worth; 256 rows when `M ≥ 256`, up to 64 M weights from
//! `M = 512`) and
//! used while it is hot; the dequantized matrix
//! never exists whole. The unfused composite ([`forward_unfused`], kept as
//! the bench's baseline) materialises `deq(W)` in `T`, widens it, and runs the
//! three products and the sum as separate passes.
//!
//! Backward, one task per strip of `PANEL` columns of `W` (columns of `dx`):
//! `dx[:, k0..k1] = dy · W[:, k0..k1] + mask ⊙ (s·ks·g · A[:, k0..k1])` with
//! `g = dy·B`, so no transposed `W` is stored either; `dA` and `dB` are two
//! small products (rank ≤ 64).
//!
//! Numerics are the contract's ([`crate::lora`]): weights `T(NF4[q]·scale)`,
//! f32 accumulation (in the GEMM's own order), f32 intermediates, one
//! rounding to `T`. Dropout zeroes `x` where [`dropout_keep`] says so and
//! scales the f32 LoRA sum by `ks = 1/(1−p)`, as the kernels do.

use std::sync::Mutex;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    BackwardArgs, BaseWeight, Dropout, ForwardArgs, Grads, LinearDims, LoraFactors, dropout_keep,
};
use crate::nf4::dequant::{dequantize_into, dequantize_range_widened};
use crate::{Element, Error, Result};

/// Rows of `W` per forward task, columns of `W` per backward task, for
/// small `M`: 64 × K f32 is 1 MiB at K = 4096, about an L2, so the decoded
/// panel is still hot when the product reads it.
const PANEL: usize = 64;

/// The panel width for large `M`. Each panel's product packs all of `x`
/// (forward) or `dy` (backward) again, `M·K` values per panel, so with many
/// rows that repacking, not the decode, becomes the overhead; wider panels
/// divide it by four, and the GEMM blocks the wider panel for its caches
/// itself.
const WIDE_PANEL: usize = 256;

/// The panel width for `m` rows of `x`.
fn panel_width(m: usize) -> usize {
    if m >= WIDE_PANEL { WIDE_PANEL } else { PANEL }
}

/// From this many rows of `x` on, the product is GEMM-bound (2·M flops per
/// decoded weight, against a decode that costs a few): panels are then taken
/// one after another, each decoded by all threads and multiplied by the
/// GEMM's own parallel driver straight into the f32 output, instead of one
/// single-threaded product per panel. Per-panel products on two threads
/// lagged the unfused composite's one parallel GEMM here (v_proj at
/// M = 4096: 531 against 495 ms) although they decode nothing twice.
const GEMM_BOUND_M: usize = 512;

/// Weights per panel (forward) or strip (backward) in the GEMM-bound path:
/// 64 M (256 MiB as f32, the size of the widened `dy` of an MLP backward at
/// M = 4096). Every Llama-3-8B projection is then one panel, so the GEMM
/// sees the whole problem in one call, as in the unfused composite, after a
/// decode straight to f32 that is cheaper than the composite's
/// dequantize-then-widen; larger layers go in several panels and never need
/// their whole f32 copy. Narrower panels cost a GEMM call each, and each
/// call repacks all of `x` (forward) or `dy` (backward): 1024-row panels
/// were level with the composite within noise, 16 M-weight strips still
/// lost 3 % in every interleaved pair on the MLP backward at M = 4096
/// (four strips of 1170 columns).
const PANEL_WEIGHTS: usize = 1 << 26;

/// Rows of `W` per panel (forward, `other = K`) or columns per strip
/// (backward, `other = N`) for a budget of `budget` weights: at least one,
/// at most `len`.
fn big_panel(budget: usize, other: usize, len: usize) -> usize {
    (budget / other.max(1)).clamp(1, len.max(1))
}

/// Rows of `W` per decode task in the GEMM-bound path.
const DECODE_ROWS: usize = 16;

/// Bytes of f32 scratch kept between calls (see [`Scratch`]): the forward's
/// buffers for a v_proj at M = 512 (the widened `x`, the decoded panel, the
/// f32 output) come to 26 MB, at M = 4096 to 96 MB; a q_proj at M = 4096
/// needs 192 MB. An MLP at M = 4096 (534 MB) keeps what fits.
/// [`release_scratch`] frees it.
const SCRATCH_KEEP_BYTES: usize = 256 << 20;

/// Buffers given back by finished calls, for the next call to reuse.
static SCRATCH_POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// An f32 buffer of `len` elements whose contents are left over from an
/// earlier call (callers overwrite every element they read), taken from a
/// small pool and returned to it on drop.
///
/// Why: a fresh multi-megabyte buffer costs a page fault per 4 KiB on its
/// first touch, or a memset when the allocator reuses memory it must zero;
/// at M = 512 on a v_proj that is about 1 ms of a 25 ms forward, as much as
/// the fused path saves over the composite by decoding straight to f32.
/// The pool keeps at most [`SCRATCH_KEEP_BYTES`], only ever buffers that a
/// call needed at once; the rest is freed as usual.
struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
        // A panic elsewhere cannot leave a Vec<Vec<f32>> inconsistent.
        SCRATCH_POOL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(len: usize) -> Self {
        let mut pool = Self::pool();
        let fits = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        let buf = fits.map(|i| pool.swap_remove(i));
        drop(pool);
        Self {
            buf: buf.unwrap_or_else(|| vec![0.0; len]),
            len,
        }
    }
}

/// Free the f32 scratch the CPU paths keep between calls (up to 256 MB after
/// large products); the next call allocates afresh.
pub fn release_scratch() {
    Scratch::pool().clear();
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut pool = Self::pool();
        let kept: usize = pool.iter().map(|b| b.len() * 4).sum();
        if kept + buf.len() * 4 <= SCRATCH_KEEP_BYTES {
            pool.push(buf);
        }
    }
}

/// A strided f32 matrix: element `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m,n] = (accumulate ? dst : 0) + beta · lhs[m,k] · rhs[k,n]`, `dst`
/// row-major with row stride `dst_rs`.
fn gemm_f32(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    beta: f32,
    par: Parallelism,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len();
    if rhs.rows != k || !lhs.fits() || !rhs.fits() || !dst_fits {
        return Err(Error::invalid(
            "lora (cpu)",
            format!(
                "internal: product [{m}x{k}]·[{}x{n}] does not fit its buffers",
                rhs.rows
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: every element the product reads, `lhs[i·rs + l·cs]` for i < m,
    // l < k, and `rhs[...]` likewise, is inside its slice (`fits`), and every
    // element it writes, `dst[i·dst_rs + j]` for i < m, j < n, is inside
    // `dst`, which is exclusively borrowed; the strides are below isize::MAX
    // because they index into live allocations. With `accumulate` false,
    // `dst` is only written (gemm does not read it), so its prior contents
    // do not matter.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

fn widen_into<T: Element>(v: &[T], out: &mut [f32]) {
    out.par_iter_mut()
        .with_min_len(4096)
        .zip(v)
        .for_each(|(o, x)| *o = x.to_f32());
}

fn widen<T: Element>(v: &[T]) -> Vec<f32> {
    v.par_iter()
        .with_min_len(4096)
        .map(|x| x.to_f32())
        .collect()
}

/// Rows `n0..n1` of `W` as f32 (`T`-rounded values), into `out`.
fn weight_rows<T: Element>(
    w: &BaseWeight<'_, T>,
    k: usize,
    n0: usize,
    out: &mut [f32],
) -> Result<()> {
    match w {
        BaseWeight::Nf4(v) => dequantize_range_widened::<T>(v, n0 * k, out),
        BaseWeight::Dense(d) => {
            for (o, x) in out.iter_mut().zip(&d[n0 * k..]) {
                *o = x.to_f32();
            }
            Ok(())
        }
    }
}

/// Columns `k0 .. k0 + kb` of every row of `W` as f32, into `out`
/// (`[N, kb]`), one row segment at a time (no transposed copy of `W`).
fn weight_cols<T: Element>(
    w: &BaseWeight<'_, T>,
    k: usize,
    row0: usize,
    k0: usize,
    kb: usize,
    out: &mut [f32],
) -> Result<()> {
    for (i, seg) in out.chunks_mut(kb).enumerate() {
        let start = (row0 + i) * k + k0;
        match w {
            BaseWeight::Nf4(v) => dequantize_range_widened::<T>(v, start, seg)?,
            BaseWeight::Dense(d) => {
                for (o, x) in seg.iter_mut().zip(&d[start..start + kb]) {
                    *o = x.to_f32();
                }
            }
        }
    }
    Ok(())
}

/// `x̃` (dropout applied, not yet scaled by `ks`) as f32, or `None` when no
/// element is dropped.
fn dropped_x(x: &[f32], k: usize, dropout: Option<Dropout>) -> Option<Vec<f32>> {
    let d = dropout.filter(|d| d.p > 0.0)?;
    let t = d.threshold();
    Some(
        x.par_chunks(k)
            .enumerate()
            .flat_map_iter(|(m, row)| {
                row.iter().enumerate().map(move |(j, &v)| {
                    if dropout_keep(d.seed, (m * k + j) as u64, t) {
                        v
                    } else {
                        0.0
                    }
                })
            })
            .collect(),
    )
}

fn keep_scale(dropout: Option<Dropout>) -> f32 {
    dropout
        .filter(|d| d.p > 0.0)
        .map_or(1.0, |d| d.keep_scale())
}

/// The LoRA factors widened, with `s·ks` folded into one f32 factor.
struct WideLora {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

fn wide_lora<T: Element>(l: &LoraFactors<'_, T>) -> WideLora {
    WideLora {
        a: widen(l.a),
        b: widen(l.b),
        rank: l.rank,
        scale: l.scale,
    }
}

/// Forward: `out = T(x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ + bias)`.
///
/// # Errors
/// Whatever [`ForwardArgs::validate`] reports; [`Error::ShapeMismatch`] if
/// `out` is not `M·N` long.
pub fn forward<T: Element>(args: &ForwardArgs<'_, T>, out: &mut [T]) -> Result<()> {
    forward_budget(args, out, PANEL_WEIGHTS)
}

/// [`forward`] with the GEMM-bound path's panel budget as a parameter (the
/// unit tests shrink it to cut small problems into many panels).
fn forward_budget<T: Element>(
    args: &ForwardArgs<'_, T>,
    out: &mut [T],
    budget: usize,
) -> Result<()> {
    const OP: &str = "lora forward (cpu)";
    args.validate(OP)?;
    if out.len() != args.out_len() {
        return Err(Error::shape(OP, "output [M, N]", args.out_len(), out.len()));
    }
    let LinearDims { m, n, k } = args.dims;
    let mut x = Scratch::take(m * k);
    widen_into(args.x, &mut x);
    // u = s·ks·x̃·Aᵀ, once for all panels.
    let lora = args.lora.as_ref().map(wide_lora);
    let u = match &lora {
        Some(l) => {
            let xd = dropped_x(&x, k, args.dropout);
            let src = xd.as_deref().unwrap_or(&x);
            let mut u = vec![0.0f32; m * l.rank];
            let beta = l.scale * keep_scale(args.dropout);
            gemm_f32(
                &mut u,
                l.rank,
                Mat::rows(src, m, k),
                Mat::rows(&l.a, l.rank, k).t(),
                false,
                beta,
                Parallelism::Rayon(0),
            )?;
            Some(u)
        }
        None => None,
    };
    let bias = args.bias.map(widen);
    if m >= GEMM_BOUND_M {
        return forward_gemm_bound(
            args,
            &x,
            lora.as_ref().zip(u.as_deref()),
            bias.as_deref(),
            out,
            budget,
        );
    }

    let width = panel_width(m);
    let panels: Vec<(usize, usize)> = (0..n)
        .step_by(width)
        .map(|n0| (n0, (n0 + width).min(n)))
        .collect();
    let results: Vec<Vec<f32>> = panels
        .par_iter()
        .map(|&(n0, n1)| -> Result<Vec<f32>> {
            let nb = n1 - n0;
            let mut wp = vec![0.0f32; nb * k];
            weight_rows(&args.weight, k, n0, &mut wp)?;
            let mut yp = vec![0.0f32; m * nb];
            gemm_f32(
                &mut yp,
                nb,
                Mat::rows(&x, m, k),
                Mat::rows(&wp, nb, k).t(),
                false,
                1.0,
                Parallelism::None,
            )?;
            if let (Some(l), Some(u)) = (&lora, &u) {
                let r = l.rank;
                gemm_f32(
                    &mut yp,
                    nb,
                    Mat::rows(u, m, r),
                    Mat::rows(&l.b[n0 * r..n1 * r], nb, r).t(),
                    true,
                    1.0,
                    Parallelism::None,
                )?;
            }
            if let Some(b) = &bias {
                for row in yp.chunks_mut(nb) {
                    for (y, &bv) in row.iter_mut().zip(&b[n0..n1]) {
                        *y += bv;
                    }
                }
            }
            Ok(yp)
        })
        .collect::<Result<_>>()?;

    // Rows of `out` gather their pieces from every panel, rounding once.
    out.par_chunks_mut(n).enumerate().for_each(|(row, o)| {
        for (&(n0, n1), yp) in panels.iter().zip(&results) {
            let nb = n1 - n0;
            for (dst, &v) in o[n0..n1].iter_mut().zip(&yp[row * nb..(row + 1) * nb]) {
                *dst = T::from_f32(v);
            }
        }
    });
    Ok(())
}

/// The forward for `M ≥ GEMM_BOUND_M`: panels of `budget / K` rows of `W`
/// in turn, each decoded by every thread and multiplied by the parallel GEMM
/// straight into its columns of the f32 output; then the LoRA product over
/// the whole output, the bias and the one rounding. `lora` carries `u`.
fn forward_gemm_bound<T: Element>(
    args: &ForwardArgs<'_, T>,
    x: &[f32],
    lora: Option<(&WideLora, &[f32])>,
    bias: Option<&[f32]>,
    out: &mut [T],
    budget: usize,
) -> Result<()> {
    let LinearDims { m, n, k } = args.dims;
    // Every element of `y` is written by the panels' products (they do not
    // read it), every element of `panel` a product reads by the decode.
    let mut y = Scratch::take(m * n);
    let rows = big_panel(budget, k, n);
    let mut panel = Scratch::take(rows * k);
    for n0 in (0..n).step_by(rows) {
        let nb = (n - n0).min(rows);
        let wp = &mut panel[..nb * k];
        wp.par_chunks_mut(DECODE_ROWS * k)
            .enumerate()
            .try_for_each(|(i, rows)| weight_rows(&args.weight, k, n0 + i * DECODE_ROWS, rows))?;
        gemm_f32(
            &mut y[n0..],
            n,
            Mat::rows(x, m, k),
            Mat::rows(wp, nb, k).t(),
            false,
            1.0,
            Parallelism::Rayon(0),
        )?;
    }
    if let Some((l, u)) = lora {
        gemm_f32(
            &mut y,
            n,
            Mat::rows(u, m, l.rank),
            Mat::rows(&l.b, n, l.rank).t(),
            true,
            1.0,
            Parallelism::Rayon(0),
        )?;
    }
    out.par_chunks_mut(n)
        .zip(y.par_chunks(n))
        .for_each(|(o, yr)| match bias {
            Some(b) => {
                for ((o, &v), &bv) in o.iter_mut().zip(yr).zip(b) {
                    *o = T::from_f32(v + bv);
                }
            }
            None => {
                for (o, &v) in o.iter_mut().zip(yr) {
                    *o = T::from_f32(v);
                }
            }
        });
    Ok(())
}

/// The unfused composite the fused path replaces (the bench's baseline):
/// dequantize all of `W` to `T`, widen it, then `x·Wᵀ`, `x̃·Aᵀ`, `(·)·Bᵀ`
/// and the sum as separate whole-matrix passes. Same numerics as
/// [`forward`] up to the order of f32 additions.
///
/// # Errors
/// As [`forward`].
pub fn forward_unfused<T: Element>(args: &ForwardArgs<'_, T>, out: &mut [T]) -> Result<()> {
    const OP: &str = "lora forward unfused (cpu)";
    args.validate(OP)?;
    if out.len() != args.out_len() {
        return Err(Error::shape(OP, "output [M, N]", args.out_len(), out.len()));
    }
    let LinearDims { m, n, k } = args.dims;
    let w: Vec<f32> = match &args.weight {
        BaseWeight::Nf4(v) => {
            let mut wt = vec![T::from_f32(0.0); n * k];
            dequantize_into(v, &mut wt)?;
            widen(&wt)
        }
        BaseWeight::Dense(d) => widen(d),
    };
    let x = widen(args.x);
    let mut y = vec![0.0f32; m * n];
    gemm_f32(
        &mut y,
        n,
        Mat::rows(&x, m, k),
        Mat::rows(&w, n, k).t(),
        false,
        1.0,
        Parallelism::Rayon(0),
    )?;
    if let Some(l) = args.lora.as_ref().map(wide_lora) {
        let xd = dropped_x(&x, k, args.dropout);
        let src = xd.as_deref().unwrap_or(&x);
        let mut u = vec![0.0f32; m * l.rank];
        gemm_f32(
            &mut u,
            l.rank,
            Mat::rows(src, m, k),
            Mat::rows(&l.a, l.rank, k).t(),
            false,
            1.0,
            Parallelism::Rayon(0),
        )?;
        let mut v = vec![0.0f32; m * n];
        gemm_f32(
            &mut v,
            n,
            Mat::rows(&u, m, l.rank),
            Mat::rows(&l.b, n, l.rank).t(),
            false,
            1.0,
            Parallelism::Rayon(0),
        )?;
        let s = l.scale * keep_scale(args.dropout);
        y.par_iter_mut().zip(&v).for_each(|(y, &v)| *y += s * v);
    }
    if let Some(b) = args.bias.map(widen) {
        y.par_chunks_mut(n).for_each(|row| {
            for (y, &bv) in row.iter_mut().zip(&b) {
                *y += bv;
            }
        });
    }
    out.par_iter_mut()
        .zip(&y)
        .for_each(|(o, &v)| *o = T::from_f32(v));
    Ok(())
}

/// Backward: `dx`, `dA`, `dB` (whichever `grads` asks for); see
/// [`crate::lora`] for the formulas.
///
/// # Errors
/// Whatever [`BackwardArgs::validate`] reports.
pub fn backward<T: Element>(args: &BackwardArgs<'_, T>, grads: Grads<'_, T>) -> Result<()> {
    backward_budget(args, grads, PANEL_WEIGHTS)
}

/// [`backward`] with the GEMM-bound path's strip budget as a parameter.
fn backward_budget<T: Element>(
    args: &BackwardArgs<'_, T>,
    grads: Grads<'_, T>,
    budget: usize,
) -> Result<()> {
    const OP: &str = "lora backward (cpu)";
    args.validate(OP, &grads)?;
    let fwd = &args.fwd;
    let LinearDims { m, n, k } = fwd.dims;
    let mut dy = Scratch::take(m * n);
    widen_into(args.dy, &mut dy);
    let lora = fwd.lora.as_ref().map(wide_lora);
    let ks = keep_scale(fwd.dropout);
    let drop = fwd.dropout.filter(|d| d.p > 0.0);

    // g = dy·B [M, r], scaled by s (the factor every use of g carries).
    let g = match &lora {
        Some(l) => {
            let mut g = vec![0.0f32; m * l.rank];
            gemm_f32(
                &mut g,
                l.rank,
                Mat::rows(&dy, m, n),
                Mat::rows(&l.b, n, l.rank),
                false,
                l.scale,
                Parallelism::Rayon(0),
            )?;
            Some(g)
        }
        None => None,
    };

    match grads.dx {
        Some(dx_out) if m >= GEMM_BOUND_M => {
            dx_gemm_bound(fwd, &dy, lora.as_ref().zip(g.as_deref()), dx_out, budget)?
        }
        Some(dx_out) => {
            let width = panel_width(m);
            let strips: Vec<(usize, usize)> = (0..k)
                .step_by(width)
                .map(|k0| (k0, (k0 + width).min(k)))
                .collect();
            let results: Vec<Vec<f32>> = strips
                .par_iter()
                .map(|&(k0, k1)| -> Result<Vec<f32>> {
                    let kb = k1 - k0;
                    // W[:, k0..k1] as [N, kb].
                    let mut ws = vec![0.0f32; n * kb];
                    weight_cols(&fwd.weight, k, 0, k0, kb, &mut ws)?;
                    let mut dxs = vec![0.0f32; m * kb];
                    gemm_f32(
                        &mut dxs,
                        kb,
                        Mat::rows(&dy, m, n),
                        Mat::rows(&ws, n, kb),
                        false,
                        1.0,
                        Parallelism::None,
                    )?;
                    if let (Some(l), Some(g)) = (&lora, &g) {
                        let r = l.rank;
                        // h = (s·g)·A[:, k0..k1], then masked and scaled by ks.
                        let mut h = vec![0.0f32; m * kb];
                        let a_strip = Mat {
                            data: &l.a[k0..],
                            rows: r,
                            cols: kb,
                            rs: k,
                            cs: 1,
                        };
                        gemm_f32(
                            &mut h,
                            kb,
                            Mat::rows(g, m, r),
                            a_strip,
                            false,
                            1.0,
                            Parallelism::None,
                        )?;
                        for (i, (d, hv)) in dxs.iter_mut().zip(&h).enumerate() {
                            let (row, j) = (i / kb, i % kb);
                            let keep = drop.is_none_or(|dr| {
                                dropout_keep(dr.seed, (row * k + k0 + j) as u64, dr.threshold())
                            });
                            if keep {
                                *d += ks * hv;
                            }
                        }
                    }
                    Ok(dxs)
                })
                .collect::<Result<_>>()?;
            dx_out.par_chunks_mut(k).enumerate().for_each(|(row, o)| {
                for (&(k0, k1), s) in strips.iter().zip(&results) {
                    let kb = k1 - k0;
                    for (dst, &v) in o[k0..k1].iter_mut().zip(&s[row * kb..(row + 1) * kb]) {
                        *dst = T::from_f32(v);
                    }
                }
            });
        }
        None => {}
    }

    if let (Some(l), Some(g)) = (&lora, &g) {
        factor_grads(fwd, l, g, &dy, grads.da, grads.db)?;
    }
    Ok(())
}

/// `dx` for `M ≥ GEMM_BOUND_M`: strips of `budget / N` columns of `W` in
/// turn, each decoded by every thread (row segments) and multiplied by the
/// parallel GEMM straight into its columns of the f32 `dx`; then the LoRA
/// term over the whole of `dx` and the one rounding. `lora` carries `s·g`.
fn dx_gemm_bound<T: Element>(
    fwd: &ForwardArgs<'_, T>,
    dy: &[f32],
    lora: Option<(&WideLora, &[f32])>,
    dx_out: &mut [T],
    budget: usize,
) -> Result<()> {
    let LinearDims { m, n, k } = fwd.dims;
    // Every element of `dx` is written by the strips' products, every
    // element of `strip` a product reads by the decode.
    let mut dx = Scratch::take(m * k);
    let width = big_panel(budget, n, k);
    let mut strip = Scratch::take(n * width);
    for k0 in (0..k).step_by(width) {
        let kb = (k - k0).min(width);
        let ws = &mut strip[..n * kb];
        ws.par_chunks_mut(DECODE_ROWS * kb)
            .enumerate()
            .try_for_each(|(i, rows)| weight_cols(&fwd.weight, k, i * DECODE_ROWS, k0, kb, rows))?;
        gemm_f32(
            &mut dx[k0..],
            k,
            Mat::rows(dy, m, n),
            Mat::rows(ws, n, kb),
            false,
            1.0,
            Parallelism::Rayon(0),
        )?;
    }
    if let Some((l, g)) = lora {
        add_lora_dx(fwd, l, g, &mut dx)?;
    }
    dx_out
        .par_iter_mut()
        .zip(&dx[..])
        .for_each(|(o, &v)| *o = T::from_f32(v));
    Ok(())
}

/// `dx += mask ⊙ ks·(s·g)·A` over the whole `[M, K]` f32 `dx`.
fn add_lora_dx<T: Element>(
    fwd: &ForwardArgs<'_, T>,
    l: &WideLora,
    g: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    let LinearDims { m, k, .. } = fwd.dims;
    // Written whole by the product (it does not read it).
    let mut h = Scratch::take(m * k);
    gemm_f32(
        &mut h,
        k,
        Mat::rows(g, m, l.rank),
        Mat::rows(&l.a, l.rank, k),
        false,
        1.0,
        Parallelism::Rayon(0),
    )?;
    let ks = keep_scale(fwd.dropout);
    let drop = fwd.dropout.filter(|d| d.p > 0.0);
    dx.par_iter_mut()
        .zip(&h[..])
        .enumerate()
        .for_each(|(i, (d, &hv))| {
            if drop.is_none_or(|dr| dropout_keep(dr.seed, i as u64, dr.threshold())) {
                *d += ks * hv;
            }
        });
    Ok(())
}

/// `dA = ks·(s·g)ᵀ·x̃` and `dB = s·dyᵀ·(ks·x̃·Aᵀ)`, the two small products
/// both backward paths share (`g` = `s·dy·B`, already scaled).
fn factor_grads<T: Element>(
    fwd: &ForwardArgs<'_, T>,
    l: &WideLora,
    g: &[f32],
    dy: &[f32],
    da: Option<&mut [T]>,
    db: Option<&mut [T]>,
) -> Result<()> {
    let LinearDims { m, n, k } = fwd.dims;
    let ks = keep_scale(fwd.dropout);
    let r = l.rank;
    let x = widen(fwd.x);
    let xd = dropped_x(&x, k, fwd.dropout);
    let xt = xd.as_deref().unwrap_or(&x);
    if let Some(da) = da {
        // dA = ks · (s·g)ᵀ · x̃   [r, K]
        let mut acc = vec![0.0f32; r * k];
        gemm_f32(
            &mut acc,
            k,
            Mat::rows(g, m, r).t(),
            Mat::rows(xt, m, k),
            false,
            ks,
            Parallelism::Rayon(0),
        )?;
        da.par_iter_mut()
            .zip(&acc)
            .for_each(|(o, &v)| *o = T::from_f32(v));
    }
    if let Some(db) = db {
        // u = ks·x̃·Aᵀ [M, r];  dB = s · dyᵀ · u   [N, r]
        let mut u = vec![0.0f32; m * r];
        gemm_f32(
            &mut u,
            r,
            Mat::rows(xt, m, k),
            Mat::rows(&l.a, r, k).t(),
            false,
            ks,
            Parallelism::Rayon(0),
        )?;
        let mut acc = vec![0.0f32; n * r];
        gemm_f32(
            &mut acc,
            r,
            Mat::rows(dy, m, n).t(),
            Mat::rows(&u, m, r),
            false,
            l.scale,
            Parallelism::Rayon(0),
        )?;
        db.par_iter_mut()
            .zip(&acc)
            .for_each(|(o, &v)| *o = T::from_f32(v));
    }
    Ok(())
}

/// The unfused backward composite (the bench's baseline, as
/// [`forward_unfused`] is for the forward): dequantize all of `W`, widen it,
/// then `dx = dy·W`, `h = (s·g)·A` and the masked sum as whole-matrix
/// passes; `dA`, `dB` as in [`backward`]. Same numerics up to the order of
/// f32 additions.
///
/// # Errors
/// As [`backward`].
pub fn backward_unfused<T: Element>(args: &BackwardArgs<'_, T>, grads: Grads<'_, T>) -> Result<()> {
    const OP: &str = "lora backward unfused (cpu)";
    args.validate(OP, &grads)?;
    let fwd = &args.fwd;
    let LinearDims { m, n, k } = fwd.dims;
    let dy = widen(args.dy);
    let lora = fwd.lora.as_ref().map(wide_lora);
    let g = match &lora {
        Some(l) => {
            let mut g = vec![0.0f32; m * l.rank];
            gemm_f32(
                &mut g,
                l.rank,
                Mat::rows(&dy, m, n),
                Mat::rows(&l.b, n, l.rank),
                false,
                l.scale,
                Parallelism::Rayon(0),
            )?;
            Some(g)
        }
        None => None,
    };
    if let Some(dx_out) = grads.dx {
        let w: Vec<f32> = match &fwd.weight {
            BaseWeight::Nf4(v) => {
                let mut wt = vec![T::from_f32(0.0); n * k];
                dequantize_into(v, &mut wt)?;
                widen(&wt)
            }
            BaseWeight::Dense(d) => widen(d),
        };
        let mut dx = vec![0.0f32; m * k];
        gemm_f32(
            &mut dx,
            k,
            Mat::rows(&dy, m, n),
            Mat::rows(&w, n, k),
            false,
            1.0,
            Parallelism::Rayon(0),
        )?;
        if let (Some(l), Some(g)) = (&lora, &g) {
            add_lora_dx(fwd, l, g, &mut dx)?;
        }
        dx_out
            .par_iter_mut()
            .zip(&dx)
            .for_each(|(o, &v)| *o = T::from_f32(v));
    }
    if let (Some(l), Some(g)) = (&lora, &g) {
        factor_grads(fwd, l, g, &dy, grads.da, grads.db)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The GEMM-bound path cut into many panels and strips (a tiny budget),
    //! against an f64 computation with the first-order bound of
    //! `tests/common/lora_ref.rs`: `|got − exact| ≤ (L + r + 8)·2⁻²³·S +
    //! 2⁻²⁴·(|exact| + that)` with `S` the sum of the absolute values of the
    //! terms and `L` the reduction length. (The integration tests cover the
    //! default budget, where these shapes are one panel.)
    use super::*;
    use crate::DType;
    use crate::nf4::quantize::{QuantizeOptions, quantize};

    const M: usize = GEMM_BOUND_M;
    const N: usize = 40;
    const K: usize = 30;
    const R: usize = 4;

    /// A deterministic value in [-1, 1) for element `i` of stream `s`.
    fn val(s: u64, i: usize) -> f32 {
        let z = (s.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64))
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn check(label: &str, got: &[f32], exact: &[f64], abs: &[f64], len: usize) {
        let u = 2f64.powi(-23);
        for (i, ((&g, &e), &a)) in got.iter().zip(exact).zip(abs).enumerate() {
            let bound = (len + R + 8) as f64 * u * a;
            let bound = bound + 0.5 * u * (e.abs() + bound);
            assert!(
                (f64::from(g) - e).abs() <= bound,
                "{label}[{i}]: got {g}, exact {e}, bound {bound:e}"
            );
        }
    }

    #[test]
    fn many_panels_and_strips_match_f64() {
        let x: Vec<f32> = (0..M * K).map(|i| val(1, i)).collect();
        let wsrc: Vec<f32> = (0..N * K).map(|i| 0.1 * val(2, i)).collect();
        let q = quantize(&wsrc, &[N, K], DType::F32, QuantizeOptions::default()).unwrap();
        let w: Vec<f32> = crate::nf4::dequant::dequantize(&q.view()).unwrap();
        let a: Vec<f32> = (0..R * K).map(|i| 0.5 * val(3, i)).collect();
        let b: Vec<f32> = (0..N * R).map(|i| 0.5 * val(4, i)).collect();
        let bias: Vec<f32> = (0..N).map(|i| val(5, i)).collect();
        let dy: Vec<f32> = (0..M * N).map(|i| val(6, i)).collect();
        let drop = Dropout { p: 0.25, seed: 9 };
        let (s, ks) = (2.0f32, drop.keep_scale());
        let args = ForwardArgs {
            dims: LinearDims { m: M, n: N, k: K },
            x: &x,
            weight: BaseWeight::Nf4(q.view()),
            lora: Some(LoraFactors {
                a: &a,
                b: &b,
                rank: R,
                scale: s,
            }),
            bias: Some(&bias),
            dropout: Some(drop),
        };
        let kept = |i: usize| dropout_keep(drop.seed, i as u64, drop.threshold());
        let f = |v: f32| f64::from(v);
        let sk = f(s) * f(ks);

        // Leftover scratch holds NaN: an element a product read before
        // anything wrote it would show in the output.
        for len in [M * K, M * N, 8 * K] {
            Scratch::pool().push(vec![f32::NAN; len]);
        }
        // Forward, 8 rows of W per panel: five panels.
        let mut y = vec![f32::NAN; M * N];
        forward_budget(&args, &mut y, 8 * K).unwrap();
        let (mut exact, mut abs) = (vec![0.0f64; M * N], vec![0.0f64; M * N]);
        for i in 0..M {
            let xt = |l: usize| {
                if kept(i * K + l) {
                    f(x[i * K + l])
                } else {
                    0.0
                }
            };
            let u: Vec<(f64, f64)> = (0..R)
                .map(|q| {
                    (0..K).fold((0.0, 0.0), |(e, t), l| {
                        let p = xt(l) * f(a[q * K + l]);
                        (e + p, t + p.abs())
                    })
                })
                .collect();
            for j in 0..N {
                let (mut e, mut t) = (f(bias[j]), f(bias[j]).abs());
                for l in 0..K {
                    let p = f(x[i * K + l]) * f(w[j * K + l]);
                    (e, t) = (e + p, t + p.abs());
                }
                for (q, &(ue, ut)) in u.iter().enumerate() {
                    e += sk * ue * f(b[j * R + q]);
                    t += sk * ut * f(b[j * R + q]).abs();
                }
                (exact[i * N + j], abs[i * N + j]) = (e, t);
            }
        }
        check("y", &y, &exact, &abs, K);

        // Backward dx, 8 columns of W per strip: four strips, the last of 6;
        // leftover scratch again NaN.
        for len in [M * N, M * K, M * K, 8 * N] {
            Scratch::pool().push(vec![f32::NAN; len]);
        }
        let mut dx = vec![f32::NAN; M * K];
        let bw = BackwardArgs { fwd: args, dy: &dy };
        let grads = Grads {
            dx: Some(&mut dx),
            da: None,
            db: None,
        };
        backward_budget(&bw, grads, 8 * N).unwrap();
        let (mut exact, mut abs) = (vec![0.0f64; M * K], vec![0.0f64; M * K]);
        for i in 0..M {
            let g: Vec<(f64, f64)> = (0..R)
                .map(|q| {
                    (0..N).fold((0.0, 0.0), |(e, t), j| {
                        let p = f(dy[i * N + j]) * f(b[j * R + q]);
                        (e + p, t + p.abs())
                    })
                })
                .collect();
            for l in 0..K {
                let (mut e, mut t) = (0.0, 0.0);
                for j in 0..N {
                    let p = f(dy[i * N + j]) * f(w[j * K + l]);
                    (e, t) = (e + p, t + p.abs());
                }
                if kept(i * K + l) {
                    for (q, &(ge, gt)) in g.iter().enumerate() {
                        e += sk * ge * f(a[q * K + l]);
                        t += sk * gt * f(a[q * K + l]).abs();
                    }
                }
                (exact[i * K + l], abs[i * K + l]) = (e, t);
            }
        }
        check("dx", &dx, &exact, &abs, N);
    }

    #[test]
    fn panel_sizes() {
        // Llama-3-8B: every projection one panel (forward) or strip.
        assert_eq!(big_panel(PANEL_WEIGHTS, 4096, 4096), 4096);
        assert_eq!(big_panel(PANEL_WEIGHTS, 4096, 14336), 14336);
        assert_eq!(big_panel(PANEL_WEIGHTS, 14336, 4096), 4096);
        // Llama-3-70B's MLP (28672 × 8192): 8192 of 28672 rows a panel.
        assert_eq!(big_panel(PANEL_WEIGHTS, 8192, 28672), 8192);
        assert_eq!(big_panel(10, 30, 40), 1);
        assert_eq!(big_panel(240, 30, 40), 8);
    }
}
