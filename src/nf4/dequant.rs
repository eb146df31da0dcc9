//! The CPU dequantizer: multi-threaded, table-driven, bit-exact.
//!
//! Per scale block it builds a 16-entry table of already converted outputs,
//! `T(NF4[q] * scale)`: the same value the per-element formula gives (the
//! table entry *is* that formula for each of the 16 codes), at the cost of 16
//! multiplies and conversions per block instead of one per element. What is
//! left per element is a table lookup, done in one of two ways:
//!
//! * **SSSE3** (x86-64 when the CPU has it, detected at run time): the table
//!   is split into byte planes (plane `b` holds byte `b` of each of the 16
//!   entries, 16 bytes, one XMM register), and `pshufb` looks up 16 nibbles
//!   in one instruction per plane. Per 16 packed bytes = 32 outputs:
//!
//!   ```text
//!   packed   [b0 b1 .. b15]                       one 16-byte load
//!   nibbles  hi = b >> 4, lo = b & 15             and, shift
//!   indices  [hi0 lo0 hi1 lo1 .. hi7 lo7]         unpack lo  (outputs 0..16)
//!            [hi8 lo8 .. hi15 lo15]               unpack hi  (outputs 16..32)
//!   lookup   plane_b[index]  for each byte b      pshufb per plane
//!   interleave planes back into 2- or 4-byte values, 16-byte stores
//!   ```
//!
//! * **scalar** elsewhere and for the last partial chunk: two table reads
//!   per packed byte.
//!
//! Both paths give the same bits (a NaN scale gives NaN outputs whose sign
//! and payload are unspecified, as on the GPU).
//!
//! Threads take runs of whole blocks (at least 64 KiB of output each) so
//! every thread writes a contiguous region and no two share a cache line.

use rayon::prelude::*;

use super::{NF4_CODE, Nf4View};
use crate::{Element, Error, Result};

/// Outputs at least this large are written with non-temporal stores: they
/// cannot stay in cache anyway, and streaming them saves the read of every
/// destination line a normal store costs (a third of the traffic at bf16).
/// Smaller outputs are likely read again soon, from cache.
const STREAM_BYTES: usize = 32 << 20;

/// Output bytes each rayon task should write at least (keeps task overhead
/// far below the work while leaving enough tasks to balance).
const TASK_BYTES: usize = 64 * 1024;

/// Scalar expansion of `packed` through `lut` into `out` (`out.len()` is
/// `2·packed.len()` or one less, when the last low nibble is padding).
#[inline]
fn expand_scalar<T: Element>(packed: &[u8], lut: &[T; 16], out: &mut [T]) {
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

#[cfg(target_arch = "x86_64")]
mod ssse3 {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi32, _mm_and_si128, _mm_castps_si128, _mm_cmpgt_epi32, _mm_loadu_ps,
        _mm_loadu_si128, _mm_mul_ps, _mm_or_si128, _mm_set1_epi8, _mm_set1_epi32, _mm_set1_ps,
        _mm_setr_epi8, _mm_sfence, _mm_shuffle_epi8, _mm_slli_epi32, _mm_srli_epi16,
        _mm_srli_epi32, _mm_storeu_si128, _mm_stream_si128, _mm_unpackhi_epi8, _mm_unpackhi_epi16,
        _mm_unpackhi_epi32, _mm_unpackhi_epi64, _mm_unpacklo_epi8, _mm_unpacklo_epi16,
        _mm_unpacklo_epi32, _mm_unpacklo_epi64,
    };

    use super::NF4_CODE;
    use crate::{DType, Element};

    /// Whether this CPU can run [`expand`].
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("ssse3")
    }

    /// Byte planes of the block's table, `plane[b]` byte `q` = byte `b` of
    /// `T(NF4[q] · scale)`, built without leaving the vector registers for
    /// f32 and bf16 (the table is rebuilt every block, 64 elements at the
    /// default block size, so its cost is not negligible).
    ///
    /// With `WIDEN`, the planes hold the f32 bits of those values instead
    /// (`T(NF4[q] · scale)` widened back to f32, exactly).
    #[target_feature(enable = "ssse3")]
    fn planes<T: Element, const WIDEN: bool>(scale: f32) -> [__m128i; 4] {
        // Four entries per register: lanes[i] lane j is entry 4i + j as the
        // raw bits of the output (f32 bits, or bf16 bits in the low half).
        let lanes: [__m128i; 4] = match T::DTYPE {
            DType::F32 | DType::BF16 => std::array::from_fn(|i| {
                // SAFETY: NF4_CODE has 16 entries, so 4i..4i+4 is in bounds.
                let code = unsafe { _mm_loadu_ps(NF4_CODE[4 * i..].as_ptr()) };
                // IEEE multiply, round to nearest even: the scalar formula.
                let x = _mm_castps_si128(_mm_mul_ps(code, _mm_set1_ps(scale)));
                if T::DTYPE == DType::F32 {
                    x
                } else {
                    // bf16, round to nearest even: (x + 0x7fff + lsb) >> 16;
                    // NaN: the top half with the quiet bit set (as `half`).
                    let lsb = _mm_and_si128(_mm_srli_epi32::<16>(x), _mm_set1_epi32(1));
                    let rounded = _mm_srli_epi32::<16>(_mm_add_epi32(
                        _mm_add_epi32(x, _mm_set1_epi32(0x7fff)),
                        lsb,
                    ));
                    let quiet = _mm_or_si128(_mm_srli_epi32::<16>(x), _mm_set1_epi32(0x40));
                    let abs = _mm_and_si128(x, _mm_set1_epi32(0x7fff_ffff));
                    let nan = _mm_cmpgt_epi32(abs, _mm_set1_epi32(0x7f80_0000));
                    let bits = _mm_or_si128(
                        _mm_and_si128(nan, quiet),
                        std::arch::x86_64::_mm_andnot_si128(nan, rounded),
                    );
                    if WIDEN {
                        // bf16 → f32 is the same bits in the top half.
                        _mm_slli_epi32::<16>(bits)
                    } else {
                        bits
                    }
                }
            }),
            DType::F16 => {
                // No f16 conversion without F16C; 16 scalar conversions.
                let lut: [u32; 16] = std::array::from_fn(|q| {
                    let v = T::from_f32(NF4_CODE[q] * scale);
                    if WIDEN {
                        v.to_f32().to_bits()
                    } else {
                        v.to_bits_u32()
                    }
                });
                // SAFETY: `lut` has 16 u32 = 64 bytes; each load reads 16.
                std::array::from_fn(|i| unsafe { _mm_loadu_si128(lut[4 * i..].as_ptr().cast()) })
            }
        };
        // Within each register gather byte b of its four lanes into dword b,
        // then transpose the 4×4 dwords so dword i of plane b comes from
        // register i: plane b = byte b of entries 0..16 in order.
        let gather = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let t = lanes.map(|l| _mm_shuffle_epi8(l, gather));
        let a = _mm_unpacklo_epi32(t[0], t[1]);
        let b = _mm_unpacklo_epi32(t[2], t[3]);
        let c = _mm_unpackhi_epi32(t[0], t[1]);
        let d = _mm_unpackhi_epi32(t[2], t[3]);
        [
            _mm_unpacklo_epi64(a, b),
            _mm_unpackhi_epi64(a, b),
            _mm_unpacklo_epi64(c, d),
            _mm_unpackhi_epi64(c, d),
        ]
    }

    /// The 16 nibble indices of outputs `0..16` and `16..32` of one chunk of
    /// 16 packed bytes, high nibble first.
    #[target_feature(enable = "ssse3")]
    fn indices(chunk: &[u8; 16]) -> [__m128i; 2] {
        // SAFETY: `chunk` is 16 readable bytes; loadu has no alignment need.
        let v = unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) };
        let m = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m);
        let lo = _mm_and_si128(v, m);
        [_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)]
    }

    /// Store 16 bytes at `out[at..at + 16]`; with `STREAM`, a non-temporal
    /// store (`out` must then start 16-byte aligned and `at` be a multiple
    /// of 16).
    #[inline(always)]
    fn store<const STREAM: bool>(out: &mut [u8], at: usize, v: __m128i) {
        let dst = &mut out[at..at + 16];
        if STREAM {
            // SAFETY: `dst` is 16 writable bytes, 16-byte aligned: `expand`
            // only streams into an aligned `out`, and `at` is a multiple of 16.
            unsafe { _mm_stream_si128(dst.as_mut_ptr().cast(), v) }
        } else {
            // SAFETY: `dst` is 16 writable bytes; storeu has no alignment need.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), v) }
        }
    }

    /// Order this thread's non-temporal stores before whatever follows
    /// (they are weakly ordered; the thread pool's join is not enough).
    pub(super) fn fence() {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { _mm_sfence() }
    }

    /// Expand every whole 16-byte chunk of `packed` (one scale block) into
    /// 32 outputs each. Returns how many packed bytes it consumed.
    /// With `stream`, outputs bypass the cache (`movntdq`) when `out` is
    /// 16-byte aligned.
    #[target_feature(enable = "ssse3")]
    pub(super) fn expand<T: Element>(
        packed: &[u8],
        scale: f32,
        out: &mut [T],
        stream: bool,
    ) -> usize {
        let chunks = (out.len() / 32).min(packed.len() / 16);
        if chunks == 0 {
            return 0;
        }
        let p = planes::<T, false>(scale);
        if stream && out.as_ptr().cast::<u8>().align_offset(16) == 0 {
            expand_with::<T, true>(packed, &p, out)
        } else {
            expand_with::<T, false>(packed, &p, out)
        }
    }

    /// [`expand`] for a weight panel: outputs are `T(NF4[q] · scale)`
    /// widened to f32, what a matmul over T-rounded weights multiplies.
    #[target_feature(enable = "ssse3")]
    pub(super) fn expand_widened<T: Element>(packed: &[u8], scale: f32, out: &mut [f32]) -> usize {
        let p = planes::<T, true>(scale);
        expand_with::<f32, false>(packed, &p, out)
    }

    #[target_feature(enable = "ssse3")]
    fn expand_with<U: Element, const STREAM: bool>(
        packed: &[u8],
        p: &[__m128i; 4],
        out: &mut [U],
    ) -> usize {
        let chunks = (out.len() / 32).min(packed.len() / 16);
        if chunks == 0 {
            return 0;
        }
        let width = std::mem::size_of::<U>();
        let out: &mut [u8] = bytemuck::cast_slice_mut(&mut out[..chunks * 32]);
        let (packed, _) = packed[..chunks * 16].as_chunks::<16>();
        for (c, chunk) in packed.iter().enumerate() {
            let base = c * 32 * width;
            for (half, idx) in indices(chunk).into_iter().enumerate() {
                let at = base + half * 16 * width;
                let b0 = _mm_shuffle_epi8(p[0], idx);
                let b1 = _mm_shuffle_epi8(p[1], idx);
                let lo16 = _mm_unpacklo_epi8(b0, b1);
                let hi16 = _mm_unpackhi_epi8(b0, b1);
                if width == 2 {
                    store::<STREAM>(out, at, lo16);
                    store::<STREAM>(out, at + 16, hi16);
                } else {
                    let b2 = _mm_shuffle_epi8(p[2], idx);
                    let b3 = _mm_shuffle_epi8(p[3], idx);
                    let lo32 = _mm_unpacklo_epi8(b2, b3);
                    let hi32 = _mm_unpackhi_epi8(b2, b3);
                    store::<STREAM>(out, at, _mm_unpacklo_epi16(lo16, lo32));
                    store::<STREAM>(out, at + 16, _mm_unpackhi_epi16(lo16, lo32));
                    store::<STREAM>(out, at + 32, _mm_unpacklo_epi16(hi16, hi32));
                    store::<STREAM>(out, at + 48, _mm_unpackhi_epi16(hi16, hi32));
                }
            }
        }
        chunks * 16
    }
}

/// How a block's table lookups are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Scalar,
    /// `stream`: non-temporal stores.
    #[cfg(target_arch = "x86_64")]
    Ssse3 {
        stream: bool,
    },
}

impl Path {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if ssse3::available() {
            return Path::Ssse3 { stream: false };
        }
        Path::Scalar
    }
}

#[inline]
fn expand_block<T: Element>(path: Path, packed: &[u8], scale: f32, out: &mut [T]) {
    let done = match path {
        Path::Scalar => 0,
        // SAFETY: `Path::Ssse3` is only chosen after run-time detection.
        #[cfg(target_arch = "x86_64")]
        Path::Ssse3 { stream } => unsafe { ssse3::expand(packed, scale, out, stream) },
    };
    if 2 * done < out.len() {
        let lut: [T; 16] = std::array::from_fn(|q| T::from_f32(NF4_CODE[q] * scale));
        expand_scalar(&packed[done..], &lut, &mut out[2 * done..]);
    }
}

/// Dequantize `src` into `out` (`src.numel` elements) on the CPU.
///
/// # Errors
/// Whatever [`Nf4View::validate`] reports, and [`Error::ShapeMismatch`] if
/// `out` has the wrong length.
pub fn dequantize_into<T: Element>(src: &Nf4View<'_>, out: &mut [T]) -> Result<()> {
    let path = match Path::best() {
        #[cfg(target_arch = "x86_64")]
        Path::Ssse3 { .. } => Path::Ssse3 {
            stream: std::mem::size_of_val(out) >= STREAM_BYTES,
        },
        p => p,
    };
    dequantize_with(path, src, out)
}

fn dequantize_with<T: Element>(path: Path, src: &Nf4View<'_>, out: &mut [T]) -> Result<()> {
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
                expand_block(path, packed, src.scale(first_block + i), out);
            }
            #[cfg(target_arch = "x86_64")]
            if let Path::Ssse3 { stream: true } = path {
                ssse3::fence();
            }
        });
    Ok(())
}

/// Elements `start .. start + out.len()` of `src`, each as `T(NF4[q] · scale)`
/// widened back to f32: the weights a matmul over `T`-rounded weights
/// multiplies, for a panel of rows or a strip of columns of a weight matrix.
/// Single-threaded (callers run one panel per task).
///
/// Whole 32-element chunks that start on an even element go through the
/// SIMD lookup where the CPU has it; the rest element by element.
///
/// # Errors
/// Whatever [`Nf4View::validate`] reports; [`Error::InvalidArgument`] if the
/// range runs past the tensor.
pub fn dequantize_range_widened<T: Element>(
    src: &Nf4View<'_>,
    start: usize,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "nf4 dequantize range (cpu)";
    src.validate(OP)?;
    let end = start.checked_add(out.len()).filter(|&e| e <= src.numel);
    let Some(end) = end else {
        return Err(Error::invalid(
            OP,
            format!(
                "range {start}..{start}+{} runs past the tensor's {} elements",
                out.len(),
                src.numel
            ),
        ));
    };
    let path = Path::best();
    let bs = src.blocksize;
    let mut i = start;
    while i < end {
        let block = i / bs;
        let stop = ((block + 1) * bs).min(end);
        let scale = src.scale(block);
        let seg = &mut out[i - start..stop - start];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if let Path::Ssse3 { .. } = path
            && i.is_multiple_of(2)
        {
            // SAFETY: `Path::Ssse3` is only chosen after run-time detection.
            done = 2 * unsafe { ssse3::expand_widened::<T>(&src.packed[i / 2..], scale, seg) };
        }
        if done < seg.len() {
            let lut: [f32; 16] = std::array::from_fn(|q| T::from_f32(NF4_CODE[q] * scale).to_f32());
            for (j, v) in seg[done..].iter_mut().enumerate() {
                let e = i + done + j;
                let byte = src.packed[e / 2];
                let q = if e.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                };
                *v = lut[usize::from(q)];
            }
        }
        i = stop;
    }
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

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::nf4::ScalesView;

    /// Every lookup path gives the same bits as the scalar one (which
    /// `tests/nf4_dequant.rs` holds to an f64 reference through the public
    /// API, on whichever path this CPU picks).
    fn paths_agree<T: Element>() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for bs in [32usize, 64, 128, 4096] {
            for n in [1, 31, 32, 33, bs - 1, bs + 17, 3 * bs + 5, 70_001] {
                let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.random()).collect();
                // Ordinary scales, and the ones where conversions get
                // interesting: NaN (quieting), ±inf (0·inf = NaN), values
                // that round to inf in bf16/f16, subnormal products.
                let special = [
                    f32::NAN,
                    f32::from_bits(0x7fa0_0001), // signalling NaN with payload
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::MAX,
                    -3.3e38,
                    65504.0,
                    1e-40,
                    -2e-45,
                    0.0,
                    -0.0,
                ];
                let absmax: Vec<f32> = (0..n.div_ceil(bs))
                    .map(|_| {
                        if rng.random_bool(0.3) {
                            special[rng.random_range(0..special.len())]
                        } else {
                            rng.random_range(-3.0f32..3.0)
                        }
                    })
                    .collect();
                let v = Nf4View {
                    packed: &packed,
                    scales: ScalesView::Plain(&absmax),
                    blocksize: bs,
                    numel: n,
                };
                let mut want = vec![T::from_f32(f32::NAN); n];
                dequantize_with(Path::Scalar, &v, &mut want).unwrap();
                let mut paths = vec![Path::best()];
                #[cfg(target_arch = "x86_64")]
                if ssse3::available() {
                    paths = vec![Path::Ssse3 { stream: false }, Path::Ssse3 { stream: true }];
                }
                // Offset 0: the allocation's (16-byte) alignment; offset 1:
                // misaligned, where streaming must fall back to plain stores.
                for (path, offset) in paths.into_iter().flat_map(|p| [(p, 0), (p, 1)]) {
                    let mut buf = vec![T::from_f32(f32::NAN); n + 1];
                    let got = &mut buf[offset..offset + n];
                    dequantize_with(path, &v, got).unwrap();
                    let first = want.iter().zip(got.iter()).position(|(a, b)| {
                        // NaN stays NaN; its sign and payload are not part
                        // of the contract (the compiler may turn `-1.0 * s`
                        // into `-s`, the GPU returns a canonical NaN).
                        let both_nan = a.to_f32().is_nan() && b.to_f32().is_nan();
                        !both_nan && a.to_bits_u32() != b.to_bits_u32()
                    });
                    assert_eq!(
                        first,
                        None,
                        "{:?} bs={bs} n={n} {path:?} offset {offset}: want {:#x} got {:#x} scale {:?}",
                        T::DTYPE,
                        first.map_or(0, |i| want[i].to_bits_u32()),
                        first.map_or(0, |i| got[i].to_bits_u32()),
                        first.map(|i| absmax[i / bs]),
                    );
                }
            }
        }
    }

    /// Every range, at every offset parity, equals the widened whole-tensor
    /// dequantization.
    fn ranges_agree<T: Element>() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (bs, n) in [(32usize, 1000usize), (64, 4097), (256, 3000)] {
            let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| rng.random()).collect();
            let absmax: Vec<f32> = (0..n.div_ceil(bs))
                .map(|_| rng.random_range(-3.0f32..3.0))
                .collect();
            let v = Nf4View {
                packed: &packed,
                scales: ScalesView::Plain(&absmax),
                blocksize: bs,
                numel: n,
            };
            let whole: Vec<f32> = dequantize::<T>(&v)
                .unwrap()
                .iter()
                .map(|x| x.to_f32())
                .collect();
            for (start, len) in [(0, n), (1, 100), (31, 97), (64, 64), (n - 33, 33), (5, 0)] {
                let mut got = vec![f32::NAN; len];
                dequantize_range_widened::<T>(&v, start, &mut got).unwrap();
                assert_eq!(
                    got,
                    whole[start..start + len],
                    "{:?} bs={bs} {start}+{len}",
                    T::DTYPE
                );
            }
            let mut too_long = vec![0.0; 2];
            let e = dequantize_range_widened::<T>(&v, n - 1, &mut too_long).unwrap_err();
            assert!(e.to_string().contains("runs past"), "{e}");
        }
    }

    #[test]
    fn ranges_agree_all_dtypes() {
        ranges_agree::<f32>();
        ranges_agree::<bf16>();
        ranges_agree::<f16>();
    }

    #[test]
    fn lookup_paths_agree_f32() {
        paths_agree::<f32>();
    }

    #[test]
    fn lookup_paths_agree_bf16() {
        paths_agree::<bf16>();
    }

    #[test]
    fn lookup_paths_agree_f16() {
        paths_agree::<f16>();
    }
}
