//! The NF4 format and its double quantization, bit for bit.
//!
//! Everything the library computes is checked here against references
//! written out in this file, from the rules read off bitsandbytes' CUDA
//! kernels (`kQuantizeBlockwise`, `dQuantizeNF4`, `dQuantize`) and torch's
//! `linspace`, without calling any library helper:
//!
//! * hand-computed blocks with every byte written out;
//! * a plain per-element reference quantizer using f64 arithmetic, compared
//!   byte for byte on seeded random data at every block size;
//! * an independent double-quant reference (exact integer sum for the
//!   mean, linear-scan nearest code with the kernel's tie rule);
//! * the dynamic 8-bit map against its construction, hand-derived literals
//!   and the maps torch itself built (`tests/data/bnb/`);
//! * bitsandbytes' own output (its CPU backend) from `tests/data/bnb/`, equal
//!   everywhere except where that backend is known to differ from CUDA.
//!
//! Two facts make f64 a faithful stand-in for f32 arithmetic here: the
//! product of two f32 values is exact in f64 (24 + 24 < 53 bits), so
//! rounding it to f32 gives the f32 product; and rounding an f64 quotient
//! to f32 gives the correctly rounded f32 quotient (53 ≥ 2·24 + 2, so the
//! double rounding is innocuous).

mod common;

use common::{rng, wide_f32};
use half::bf16;
use rand::Rng;
use rand_distr::{Distribution, Normal};
use tli_kernels::nf4::double_quant::{
    dequantize_absmax, dynamic_map_signed, dynamic_map_signed_unfused, mean_f32, quantize_absmax,
    quantize_blockwise_dynamic,
};
use tli_kernels::nf4::quantize::{QuantizeOptions, quantize, quantize_blocks};
use tli_kernels::nf4::{DoubleQuant, NF4_CODE, NF4_MIDPOINTS, Nf4Tensor, Scales, dequant};
use tli_kernels::{DType, Error};

// ---------------------------------------------------------------------------
// The format's constants, as bitsandbytes'
// `get_4bit_type("nf4")` / `dQuantizeNF4` print them.

const CODE_LITERALS: [&str; 16] = [
    "-1.0",
    "-0.6961928009986877",
    "-0.5250730514526367",
    "-0.39491748809814453",
    "-0.28444138169288635",
    "-0.18477343022823334",
    "-0.09105003625154495",
    "0.0",
    "0.07958029955625534",
    "0.16093020141124725",
    "0.24611230194568634",
    "0.33791524171829224",
    "0.44070982933044434",
    "0.5626170039176941",
    "0.7229568362236023",
    "1.0",
];

const MIDPOINT_LITERALS: [&str; 15] = [
    "-0.8480964004993439",
    "-0.6106329262256622",
    "-0.4599952697753906",
    "-0.33967943489551544",
    "-0.23460740596055984",
    "-0.13791173323988914",
    "-0.045525018125772476",
    "0.03979014977812767",
    "0.1202552504837513",
    "0.2035212516784668",
    "0.2920137718319893",
    "0.3893125355243683",
    "0.5016634166240692",
    "0.6427869200706482",
    "0.8614784181118011",
];

/// The f32 nearest a decimal literal, as a C++ compiler reads `1.5f` (Rust's
/// parser rounds decimal to f32 directly, correctly).
fn lit(s: &str) -> f32 {
    s.parse().expect("literal")
}

fn code_ref() -> [f32; 16] {
    CODE_LITERALS.map(lit)
}

fn mids_ref() -> [f32; 15] {
    MIDPOINT_LITERALS.map(lit)
}

#[test]
fn tables_equal_the_reference_literals() {
    for (i, s) in CODE_LITERALS.iter().enumerate() {
        assert_eq!(
            NF4_CODE[i].to_bits(),
            lit(s).to_bits(),
            "NF4_CODE[{i}] vs {s}"
        );
    }
    for (i, s) in MIDPOINT_LITERALS.iter().enumerate() {
        assert_eq!(
            NF4_MIDPOINTS[i].to_bits(),
            lit(s).to_bits(),
            "NF4_MIDPOINTS[{i}] vs {s}"
        );
    }
}

#[test]
fn midpoints_sit_between_codes_and_four_are_an_ulp_off_the_f32_means() {
    let (c, m) = (code_ref(), mids_ref());
    let mut off = Vec::new();
    for i in 0..15 {
        assert!(c[i] < m[i] && m[i] < c[i + 1], "midpoint {i} out of order");
        let mean = (c[i] + c[i + 1]) / 2.0;
        let ulps = (m[i].to_bits() as i64 - mean.to_bits() as i64).abs();
        assert!(ulps <= 1, "midpoint {i} is {ulps} ulps from the f32 mean");
        if ulps == 1 {
            off.push(i);
        }
    }
    // The four the reference document speaks of; bitsandbytes' CPU backend
    // buckets against the f32 means, the CUDA kernel against the literals.
    assert_eq!(off, vec![0, 8, 12, 14]);
}

// ---------------------------------------------------------------------------
// The reference quantizer: one element at a time, written from the rules.

/// A subnormal as the device's flush-to-zero arithmetic sees it.
fn flush(x: f32) -> f32 {
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        if x < 0.0 { -0.0 } else { 0.0 }
    } else {
        x
    }
}

/// The value the CUDA kernel loads for flat index `i`: the element, or the
/// zero padding past the end.
fn loaded(data: &[f32], i: usize) -> f32 {
    if i < data.len() { data[i] } else { 0.0 }
}

/// Block absmax: the kernel's fmaxf fold from -FLT_MAX over the zero-padded
/// block, NaN skipped, subnormals flushed.
fn ref_absmax(data: &[f32], b: usize, bs: usize) -> f32 {
    let mut m = -f32::MAX;
    for i in b * bs..(b + 1) * bs {
        let a = flush(loaded(data, i)).abs();
        if !a.is_nan() && a > m {
            m = a;
        }
    }
    m
}

/// `1.0f / absmax` (correctly rounded) with a subnormal result flushed.
fn ref_reciprocal(absmax: f32) -> f32 {
    flush((1.0f64 / f64::from(absmax)) as f32)
}

/// The f32 product `x * inv` the kernel feeds to its decision tree.
fn ref_scaled(x: f32, inv: f32) -> f32 {
    (f64::from(flush(x)) * f64::from(inv)) as f32
}

/// Number of midpoints strictly below `s` (NaN: none).
fn ref_code4(s: f32) -> u8 {
    let mids = mids_ref();
    let mut q = 0u8;
    for m in mids {
        if f64::from(s) > f64::from(m) {
            q += 1;
        }
    }
    q
}

/// Whole-tensor reference: packed bytes (high nibble first) and absmax.
fn ref_quantize(data: &[f32], bs: usize) -> (Vec<u8>, Vec<f32>) {
    let n = data.len();
    let nblocks = n.div_ceil(bs);
    let absmax: Vec<f32> = (0..nblocks).map(|b| ref_absmax(data, b, bs)).collect();
    let inv: Vec<f32> = absmax.iter().map(|&a| ref_reciprocal(a)).collect();
    // Codes for every loaded position up to an even count.
    let codes: Vec<u8> = (0..n.div_ceil(2) * 2)
        .map(|i| ref_code4(ref_scaled(loaded(data, i), inv[i / bs])))
        .collect();
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

fn assert_same_quant(label: &str, data: &[f32], bs: usize) {
    let (packed, absmax) = quantize_blocks(data, bs).expect("quantize");
    let (rp, ra) = ref_quantize(data, bs);
    assert_eq!(absmax.len(), ra.len(), "{label}: absmax count");
    for (b, (got, want)) in absmax.iter().zip(&ra).enumerate() {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{label}: absmax[{b}] {got} vs {want}"
        );
    }
    assert_eq!(packed.len(), rp.len(), "{label}: packed length");
    if let Some(j) = (0..rp.len()).find(|&j| packed[j] != rp[j]) {
        panic!(
            "{label}: byte {j} is {:#04x}, reference {:#04x} (elements {:?})",
            packed[j],
            rp[j],
            &data[2 * j..(2 * j + 2).min(data.len())]
        );
    }
}

// ---------------------------------------------------------------------------
// Hand-computed blocks.

#[test]
fn hand_block_exact_codes_and_nibble_order() {
    // absmax 2.0, reciprocal exactly 0.5: scaled = x / 2 exactly.
    // x:      2.0   -2.0   0.0   1.0   -0.5  0.3  -1.2   1.6
    // scaled: 1.0   -1.0   0.0   0.5  -0.25  0.15 -0.6   0.8
    // code:   15     0     7     12     4     9     2    14
    // (0.5: > 0.3893, not > 0.5017 → 12; -0.25: > -0.3397, not > -0.2346
    //  → 4; 0.15: > 0.1203, not > 0.2035 → 9; -0.6: > -0.6106, not >
    //  -0.4600 → 2; 0.8: > 0.6428, not > 0.8615 → 14.) 24 more zeros → 7.
    let mut x = vec![2.0f32, -2.0, 0.0, 1.0, -0.5, 0.3, -1.2, 1.6];
    x.resize(32, 0.0);
    let (packed, absmax) = quantize_blocks(&x, 32).unwrap();
    assert_eq!(absmax, vec![2.0]);
    let mut want = vec![0xF0, 0x7C, 0x49, 0x2E];
    want.resize(16, 0x77);
    assert_eq!(packed, want);
}

#[test]
fn hand_value_on_a_midpoint_takes_the_lower_code() {
    // absmax 1.0 (the first element), so scaled = x exactly. Element 2i+2
    // sits exactly on midpoint i → code i; element 2i+3 one ulp above → i+1.
    let m = mids_ref();
    let mut x = vec![1.0f32, 0.0];
    for &mi in &m {
        x.push(mi);
        x.push(f32::from_bits(if mi > 0.0 {
            mi.to_bits() + 1
        } else {
            mi.to_bits() - 1
        }));
    }
    assert_eq!(x.len(), 32);
    let (packed, _) = quantize_blocks(&x, 32).unwrap();
    assert_eq!(packed[0], 0xF7);
    for i in 0..15u8 {
        assert_eq!(
            packed[usize::from(i) + 1],
            (i << 4) | (i + 1),
            "midpoint {i}"
        );
    }
    // The same with absmax 2^-40: the reciprocal 2^40 is exact again.
    let scale = 2f32.powi(-40);
    let y: Vec<f32> = x.iter().map(|v| v * scale).collect();
    let (packed2, absmax2) = quantize_blocks(&y, 32).unwrap();
    assert_eq!(absmax2, vec![scale]);
    assert_eq!(packed2, packed);
}

#[test]
fn hand_zero_block_gives_code_0_and_dequantizes_to_negative_zero() {
    // 1/0 = inf, 0 * inf = NaN, NaN passes no threshold: code 0 (-1.0).
    let mut x = vec![0.0f32; 64];
    x[3] = -0.0;
    let t = quantize(&x, &[2, 32], DType::F32, QuantizeOptions::default()).unwrap();
    assert_eq!(t.packed, vec![0u8; 32]);
    assert_eq!(t.scales, Scales::Plain(vec![0.0]));
    let out: Vec<f32> = dequant::dequantize(&t.view()).unwrap();
    assert!(
        out.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()),
        "{out:?}"
    );
}

#[test]
fn hand_odd_count_pads_the_last_low_nibble_with_the_code_of_zero() {
    // n = 5, one tail block of 64: absmax 4, reciprocal 0.25.
    // 4 → 1.0 → 15; -1 → -0.25 → 4; 2 → 0.5 → 12; 0.25 → 0.0625 → 8;
    // -4 → -1 → 0; padding 0 → 0 → 7.
    let x = [4.0f32, -1.0, 2.0, 0.25, -4.0];
    let (packed, absmax) = quantize_blocks(&x, 64).unwrap();
    assert_eq!(absmax, vec![4.0]);
    assert_eq!(packed, vec![0xF4, 0xC8, 0x07]);
    // n = 1.
    assert_eq!(
        quantize_blocks(&[-3.0], 32).unwrap(),
        (vec![0x07], vec![3.0])
    );
    // A tail block that is all zeros: absmax 0, so even the padding is
    // 0 · inf = NaN → code 0.
    let mut y = vec![1.0f32; 33];
    y[32] = 0.0;
    let (packed, absmax) = quantize_blocks(&y, 32).unwrap();
    assert_eq!(absmax, vec![1.0, 0.0]);
    assert_eq!(packed[16], 0x00);
}

#[test]
fn hand_nan_inputs() {
    // NaN is skipped by the absmax (fmaxf) and takes code 0.
    let mut x = vec![0.5f32; 32];
    x[0] = f32::NAN;
    x[1] = -1.0;
    let (packed, absmax) = quantize_blocks(&x, 32).unwrap();
    assert_eq!(absmax, vec![1.0]);
    // 0.5 → 12.
    assert_eq!(packed[0], 0x00);
    assert!(packed[1..].iter().all(|&b| b == 0xCC));
    // A full block of NaN keeps the fold's start, -FLT_MAX; its reciprocal
    // is subnormal and flushed to -0; NaN · -0 = NaN → 0.
    let (packed, absmax) = quantize_blocks(&[f32::NAN; 32], 32).unwrap();
    assert_eq!(absmax, vec![-f32::MAX]);
    assert_eq!(packed, vec![0u8; 16]);
    // A tail block of NaN: the zero padding makes the absmax 0.
    let mut y = vec![1.0f32; 34];
    y[32] = f32::NAN;
    y[33] = f32::NAN;
    let (packed, absmax) = quantize_blocks(&y, 32).unwrap();
    assert_eq!(absmax, vec![1.0, 0.0]);
    assert_eq!(packed[16], 0x00);
}

#[test]
fn hand_infinities_and_huge_absmax() {
    // absmax inf → reciprocal 0: finite · 0 = ±0 → 7; ±inf · 0 = NaN → 0.
    let mut x = vec![3.0f32; 32];
    x[0] = f32::INFINITY;
    x[1] = -5.0;
    x[2] = f32::NEG_INFINITY;
    let (packed, absmax) = quantize_blocks(&x, 32).unwrap();
    assert_eq!(absmax, vec![f32::INFINITY]);
    assert_eq!(&packed[..2], &[0x07, 0x07]);
    assert!(packed[2..].iter().all(|&b| b == 0x77));
    // absmax 2^127: 1/absmax = 2^-127 is subnormal and the device flushes
    // it to 0, so every finite value lands on code 7, even ±absmax.
    let big = 2f32.powi(127);
    let (packed, _) = quantize_blocks(&[big, -big, 1.0, 0.0], 32).unwrap();
    assert_eq!(packed, vec![0x77, 0x77]);
    // absmax 2^125: the reciprocal 2^-125 is normal and exact.
    let big = 2f32.powi(125);
    let (packed, _) = quantize_blocks(&[big, -big, 0.0, 0.0], 32).unwrap();
    assert_eq!(packed, vec![0xF0, 0x77]);
}

#[test]
fn scaling_multiplies_by_the_reciprocal_rather_than_dividing() {
    // Values whose f32 product x · fl(1/a) and f32 quotient x / a fall on
    // opposite sides of a threshold: search just around midpoint · absmax
    // for several absmax values that are not powers of two.
    let mids = mids_ref();
    let mut found = 0;
    for a in [3.0f32, 5.0, 0.7, 1.1, 6.25e-3, 1234.5, 0.3, 9.9] {
        let mut block = vec![a];
        for &m in &mids {
            let centre = m * a;
            for d in -8i32..=8 {
                let x = f32::from_bits((centre.to_bits() as i32 + d) as u32);
                let by_mul = ref_code4(ref_scaled(x, ref_reciprocal(a)));
                let by_div = ref_code4((f64::from(x) / f64::from(a)) as f32);
                if by_mul != by_div && block.len() < 32 {
                    block.push(x);
                }
            }
        }
        found += block.len() - 1;
        assert_same_quant(&format!("absmax {a}"), &block, 32);
    }
    assert!(found >= 10, "only {found} values tell the two apart");
}

#[test]
fn hand_subnormals_are_flushed() {
    let tiny = f32::from_bits(5); // 5 · 2^-149
    // A block of subnormals only has absmax 0 on the device; the flushed
    // values times inf are NaN → code 0.
    let (packed, absmax) = quantize_blocks(&[tiny, -tiny, tiny, 0.0], 32).unwrap();
    assert_eq!(absmax, vec![0.0]);
    assert_eq!(packed, vec![0x00, 0x00]);
    // Beside a normal absmax a subnormal is a zero: code 7.
    let (packed, absmax) = quantize_blocks(&[f32::MIN_POSITIVE, tiny, -tiny, 0.0], 32).unwrap();
    assert_eq!(absmax, vec![f32::MIN_POSITIVE]);
    assert_eq!(packed, vec![0xF7, 0x77]);
}

#[test]
fn invalid_arguments_are_errors() {
    for bs in [0, 16, 48, 100, 8192] {
        assert!(
            matches!(
                quantize_blocks(&[1.0; 64], bs),
                Err(Error::InvalidBlockSize { .. })
            ),
            "{bs}"
        );
    }
    assert!(matches!(
        quantize_blocks(&[], 64),
        Err(Error::InvalidArgument { .. })
    ));
    let opts = QuantizeOptions::default();
    assert!(matches!(
        quantize(&[1.0; 10], &[3, 4], DType::F32, opts),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        quantize_absmax(&[]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(mean_f32(&[]), Err(Error::InvalidArgument { .. })));
    for bs in [32, 100, 8192] {
        assert!(matches!(
            quantize_blockwise_dynamic(&[1.0; 300], bs),
            Err(Error::InvalidBlockSize { .. })
        ));
    }
    let dq = quantize_absmax(&[1.0, 2.0, 3.0]).unwrap();
    let mut bad = dq.clone();
    bad.code2.pop();
    assert!(dequantize_absmax(&bad).is_err());
    let mut bad = dq.clone();
    bad.absmax2.push(1.0);
    assert!(matches!(
        dequantize_absmax(&bad),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut bad = dq;
    bad.nested_blocksize = 0;
    assert!(dequantize_absmax(&bad).is_err());
}

// ---------------------------------------------------------------------------
// Seeded random data against the reference.

/// A mix that reaches every rule: normal weights, wide magnitudes, exact
/// zeros, values placed exactly on a midpoint (and one ulp either side)
/// under a power-of-two absmax, the occasional NaN/inf/subnormal, and now
/// and then an all-zero run as long as a block.
fn random_data(seed: u64, n: usize, specials: bool) -> Vec<f32> {
    let mut r = rng(seed);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let mids = mids_ref();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let kind = r.random_range(0..100);
        let x = match kind {
            0..=59 => normal.sample(&mut r),
            60..=74 => wide_f32(&mut r),
            75..=79 => 0.0,
            80..=91 => {
                // Power-of-two scale s; ±s itself keeps the absmax at s when
                // no bigger value shares the block.
                let s = 2f32.powi(r.random_range(-8..4));
                let m = mids[r.random_range(0..15)];
                let m = match r.random_range(0..3) {
                    0 => m,
                    1 => f32::from_bits(m.to_bits() + 1),
                    _ => f32::from_bits(m.to_bits() - 1),
                };
                if r.random_range(0..8) == 0 { s } else { m * s }
            }
            92..=93 if specials => {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][r.random_range(0..3)]
            }
            94..=95 if specials => {
                f32::from_bits(r.random_range(1..0x80_0000))
                    * if r.random::<bool>() { 1.0 } else { -1.0 }
            }
            96 => {
                let len = r.random_range(32..300);
                v.extend(std::iter::repeat_n(0.0, len.min(n - v.len())));
                continue;
            }
            _ => r.random_range(-1.0f32..1.0),
        };
        v.push(x);
    }
    v
}

#[test]
fn every_blocksize_matches_the_reference() {
    for (k, bs) in [32usize, 64, 128, 256, 512, 1024, 2048, 4096]
        .into_iter()
        .enumerate()
    {
        // Several full blocks, a tail, an odd count.
        let n = 3 * bs + 17 + 2 * k;
        let data = random_data(100 + k as u64, n, true);
        assert_same_quant(&format!("bs {bs}, n {n}"), &data, bs);
        // Exact multiples, and a single short block.
        assert_same_quant(&format!("bs {bs}, n {}", 2 * bs), &data[..2 * bs], bs);
        assert_same_quant(&format!("bs {bs}, n 7"), &data[..7], bs);
    }
}

#[test]
fn random_tensors_match_the_reference_byte_for_byte() {
    let mut r = rng(7);
    for case in 0..40u64 {
        let bs = 32 << r.random_range(0..8);
        let n = r.random_range(1..20_000);
        let data = random_data(1000 + case, n, case % 2 == 0);
        assert_same_quant(&format!("case {case}: bs {bs}, n {n}"), &data, bs);
    }
}

#[test]
fn blocks_run_over_the_flattened_tensor() {
    // [300, 64] at block size 128: block b is rows 2b and 2b+1 together.
    let data = random_data(11, 300 * 64, false);
    let t = quantize(
        &data,
        &[300, 64],
        DType::F32,
        QuantizeOptions {
            blocksize: 128,
            double_quant: false,
        },
    )
    .unwrap();
    let Scales::Plain(absmax) = &t.scales else {
        panic!("plain scales expected")
    };
    assert_eq!(absmax.len(), 150);
    for (b, &a) in absmax.iter().enumerate() {
        let row = |r: usize| &data[r * 64..(r + 1) * 64];
        let want = row(2 * b)
            .iter()
            .chain(row(2 * b + 1))
            .fold(0.0f32, |m, &x| m.max(x.abs()));
        assert_eq!(a, want, "block {b}");
    }
    assert_same_quant("[300, 64] bs 128", &data, 128);
    // Rows that do not divide the block at all: [300, 100] at 128, and an
    // odd total: [77, 33] at 64.
    let data = random_data(12, 300 * 100, true);
    assert_same_quant("[300, 100] bs 128", &data, 128);
    let t = quantize(
        &data[..77 * 33],
        &[77, 33],
        DType::BF16,
        QuantizeOptions::default(),
    )
    .unwrap();
    let (rp, ra) = ref_quantize(&data[..77 * 33], 64);
    assert_eq!(t.packed, rp);
    assert_eq!(t.scales, Scales::Plain(ra));
    assert_eq!(t.shape, vec![77, 33]);
}

// ---------------------------------------------------------------------------
// Round trip.

/// |x - deq(q(x))| ≤ absmax · (h + 2^-20) for finite, normal x, where h is
/// the largest half-gap between neighbouring codes ((c1 - c0)/2 ≈ 0.152).
///
/// Derivation: with a = absmax and s = fl(x · fl(1/a)), s = (x/a)(1+δ)² with
/// |δ| ≤ 2^-24, so |s - x/a| ≤ 2^-22.9 since |x/a| ≤ 1. The code c is the
/// one whose (literal) midpoints bracket s; each literal is within 2^-24 of
/// the exact midpoint, so |s - c| ≤ h + 2^-24. The output fl(c · a) is
/// within 2^-24 · a of c · a. Altogether |x - out| ≤ a (h + 2^-24 + 2^-22.9
/// + 2^-24) < a (h + 2^-20).
#[test]
fn round_trip_error_is_within_half_the_widest_code_gap() {
    let c = code_ref();
    let h = (0..15)
        .map(|i| f64::from(c[i + 1] - c[i]) / 2.0)
        .fold(0.0, f64::max);
    assert!((h - 0.1519).abs() < 1e-4, "widest half-gap {h}");
    for (seed, bs) in [(21u64, 64usize), (22, 32), (23, 4096), (24, 256)] {
        let data = random_data(seed, 10_001, false);
        let data: Vec<f32> = data
            .into_iter()
            .filter(|x| x.is_normal() || *x == 0.0)
            .collect();
        let t = quantize(
            &data,
            &[data.len()],
            DType::F32,
            QuantizeOptions {
                blocksize: bs,
                double_quant: false,
            },
        )
        .unwrap();
        let out: Vec<f32> = dequant::dequantize(&t.view()).unwrap();
        let Scales::Plain(absmax) = &t.scales else {
            panic!()
        };
        for (i, (&x, &y)) in data.iter().zip(&out).enumerate() {
            let a = f64::from(absmax[i / bs]);
            let err = (f64::from(x) - f64::from(y)).abs();
            assert!(
                err <= a * (h + 2f64.powi(-20)),
                "bs {bs} [{i}]: {x} → {y}, absmax {a}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The dynamic 8-bit map.

/// `create_dynamic_map(signed=True)` rebuilt in f64: torch's f32 linspace
/// (first half `start + step·i`, second half `end - step·(n-1-i)`), the f32
/// means of neighbouring points, times the decade rounded to f32.
///
/// With `fused`, each linspace point is one rounding of the exact value:
/// `step·i` is exact in f64 (24-bit × 7-bit) and so is its sum with 0.1f or
/// 1.0 (all terms are multiples of 2^-33 below 2, fewer than 53 bits), so
/// one cast to f32 is the fused multiply-add. Without, the product is
/// rounded to f32 first.
fn ref_dynamic_map(fused: bool) -> Vec<f32> {
    let start = 0.1f64 as f32;
    let end = 1.0f32;
    let mut data = Vec::new();
    for i in 0..7 {
        let steps = (1usize << i) + 1;
        let step = (end - start) / (steps - 1) as f32;
        let point = |base: f32, sign: f64, k: usize| -> f32 {
            let prod = f64::from(step) * k as f64;
            let prod = if fused { prod } else { f64::from(prod as f32) };
            (f64::from(base) + sign * prod) as f32
        };
        let pts: Vec<f32> = (0..steps)
            .map(|idx| {
                if idx < steps / 2 {
                    point(start, 1.0, idx)
                } else {
                    point(end, -1.0, steps - idx - 1)
                }
            })
            .collect();
        let decade: f64 = format!("1e{}", i - 6).parse().unwrap();
        let decade = decade as f32;
        for w in pts.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(decade * mean);
            data.push(-decade * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    data
}

#[test]
fn dynamic_map_equals_its_construction_and_hand_values() {
    let map = dynamic_map_signed();
    let unfused = dynamic_map_signed_unfused();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&map), bits(&ref_dynamic_map(true)));
    assert_eq!(bits(&unfused), bits(&ref_dynamic_map(false)));
    let differ: Vec<usize> = (0..256).filter(|&i| map[i] != unfused[i]).collect();
    assert_eq!(differ.len(), 42, "{differ:?}");
    for &i in &differ {
        let ulps = (map[i].to_bits() as i64 - unfused[i].to_bits() as i64).abs();
        assert!((1..=2).contains(&ulps), "entry {i}: {ulps} ulps");
    }

    // Hand-checkable properties.
    assert!(map.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
    assert_eq!(map[127].to_bits(), 0);
    assert_eq!(map[255], 1.0);
    for i in 0..127 {
        assert_eq!(map[i], -map[254 - i], "symmetry at {i}");
    }
    // Decade i (scale 10^(i-6)) holds 2^i positive values inside
    // (0.1, 1) · 10^(i-6): 1, 2, 4, ..., 64 from the smallest up.
    let mut idx = 128;
    for i in 0..7 {
        let lo = 0.1 * 10f64.powi(i - 6);
        let hi = 10f64.powi(i - 6);
        for _ in 0..1 << i {
            let v = f64::from(map[idx]);
            assert!(lo < v && v < hi, "entry {idx} = {v} outside decade {i}");
            idx += 1;
        }
    }
    assert_eq!(idx, 255);

    // Literals derived by hand (bit patterns):
    //   0.1f = 0x3DCCCCCD; (0.1f + 1.0f) = 0x3F8CCCCD, halved 0x3F0CCCCD
    //   (0.55000001); 1e-6 as f32 = 0x358637BD; their product rounds to
    //   0x3513A3B7 (5.5000004e-7): the smallest positive entry, index 128.
    //   Decade 6: step = fl(fl(1 - 0.1f) / 64) = 0x3C666666; the last
    //   interior point 1 - step = 0x3F7C6666; the last mean
    //   (0x3F7C6666 + 1) / 2 = 0x3F7E3333 (0.99296875): index 254.
    assert_eq!(map[128].to_bits(), 0x3513_A3B7);
    assert_eq!(map[254].to_bits(), 0x3F7E_3333);
    assert_eq!(map[0].to_bits(), 0xBF7E_3333);
    assert_eq!(map[126].to_bits(), 0xB513_A3B7);
}

// ---------------------------------------------------------------------------
// Double quantization against an independent reference.

/// Exact sum of values that are 0 or have magnitude in [2^-40, 2^40) (so
/// all are integer multiples of 2^-64), as an i128 count of 2^-64 units,
/// rounded to the nearest f32, ties to even.
fn ref_exact_sum(values: &[f32]) -> f32 {
    let unit = f32::from_bits((127 - 64) << 23); // 2^-64
    let mut total: i128 = 0;
    for &x in values {
        let a = x.abs();
        assert!(
            a == 0.0 || (2f32.powi(-40) <= a && a < 2f32.powi(40)),
            "reference sum range: {x}"
        );
        // x / 2^-64 is an integer below 2^104 with at most 24 significant
        // bits: exact in f64 and in i128.
        total += (f64::from(x) / f64::from(unit)) as i128;
    }
    let neg = total < 0;
    let mag = total.unsigned_abs();
    if mag == 0 {
        return 0.0;
    }
    let top = 127 - mag.leading_zeros();
    let v = if top <= 23 {
        mag as f32 * unit
    } else {
        let shift = top - 23;
        let mut mant = mag >> shift;
        let rem = mag & ((1u128 << shift) - 1);
        let half = 1u128 << (shift - 1);
        if rem > half || (rem == half && mant & 1 == 1) {
            mant += 1;
        }
        // mant ≤ 2^24 is exact in f32; so is the power of two 2^(shift-64).
        mant as f32 * f32::from_bits((shift + 127 - 64) << 23)
    };
    if neg { -v } else { v }
}

/// The CUDA 8-bit code: nearest map entry to `x` measured against the f32
/// midpoints `(a + b) * 0.5f`, a tie going to the even index; NaN → 0.
fn ref_code8(map: &[f32], x: f32) -> u8 {
    if x.is_nan() || x <= map[0] {
        return 0;
    }
    if x > map[255] {
        return 255;
    }
    let k = (0..255).find(|&k| map[k] < x && x <= map[k + 1]).unwrap();
    let mid = (map[k] + map[k + 1]) * 0.5;
    // Strictly beyond the midpoint, or on it with k odd: the upper entry.
    let q = if x > mid || (x == mid && k % 2 == 1) {
        k + 1
    } else {
        k
    };
    q as u8
}

fn ref_double_quant(absmax: &[f32]) -> DoubleQuant {
    let offset = ref_exact_sum(absmax) * (1.0f32 / absmax.len() as f32);
    let v: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let map = ref_dynamic_map(true);
    let nb = v.len().div_ceil(256);
    let absmax2: Vec<f32> = (0..nb).map(|b| ref_absmax(&v, b, 256)).collect();
    let qabsmax = (0..v.len())
        .map(|i| ref_code8(&map, ref_scaled(v[i], ref_reciprocal(absmax2[i / 256]))))
        .collect();
    DoubleQuant {
        qabsmax,
        absmax2,
        code2: map,
        offset,
        nested_blocksize: 256,
    }
}

fn assert_dq_eq(label: &str, got: &DoubleQuant, want: &DoubleQuant) {
    assert_eq!(
        got.offset.to_bits(),
        want.offset.to_bits(),
        "{label}: offset {} vs {}",
        got.offset,
        want.offset
    );
    assert_eq!(got.nested_blocksize, want.nested_blocksize, "{label}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.absmax2), bits(&want.absmax2), "{label}: absmax2");
    assert_eq!(bits(&got.code2), bits(&want.code2), "{label}: code2");
    if let Some(i) = (0..want.qabsmax.len()).find(|&i| got.qabsmax[i] != want.qabsmax[i]) {
        panic!(
            "{label}: qabsmax[{i}] {} vs {}",
            got.qabsmax[i], want.qabsmax[i]
        );
    }
    assert_eq!(got.qabsmax.len(), want.qabsmax.len(), "{label}");
}

#[test]
fn mean_is_the_exact_sum_rounded_once_times_the_f32_factor() {
    // 1 + 2^-24 is a tie between 1 and 1 + 2^-23; the 2^-140 breaks it
    // upwards. Any f32 or f64 running sum drops the 2^-140 and rounds the
    // tie to even, 1.0. Four values: the factor 1/4 is exact.
    let v = [1.0f32, 2f32.powi(-24), 2f32.powi(-140), 0.0];
    assert_eq!(mean_f32(&v).unwrap(), (1.0 + 2f32.powi(-23)) / 4.0);
    // Cancellation is exact, and -FLT_MAX (an all-NaN block's absmax) does
    // not overflow anything.
    assert_eq!(mean_f32(&[f32::MAX, -f32::MAX, 3.0, 5.0]).unwrap(), 2.0);
    assert_eq!(mean_f32(&[-f32::MAX, 0.0]).unwrap(), -f32::MAX * 0.5);
    // Above the f32 range the sum is infinite, as an f32 sum would be.
    assert_eq!(mean_f32(&[f32::MAX, f32::MAX]).unwrap(), f32::INFINITY);
    assert!(mean_f32(&[1.0, f32::NAN]).unwrap().is_nan());
    assert!(
        mean_f32(&[f32::INFINITY, f32::NEG_INFINITY])
            .unwrap()
            .is_nan()
    );
    assert_eq!(mean_f32(&[f32::INFINITY, 1.0]).unwrap(), f32::INFINITY);
    // Subnormals add exactly.
    let t = f32::from_bits(3);
    assert_eq!(mean_f32(&[t, t, t, t]).unwrap(), t);
    // n = 3: factor fl(1/3), product rounded: the rule, not sum / 3.
    let v = [1.0f32, 1.0, 2f32.powi(-20)];
    assert_eq!(
        mean_f32(&v).unwrap(),
        (2.0f32 + 2f32.powi(-20)) * (1.0 / 3.0)
    );
    // Random sums against the integer reference.
    let mut r = rng(31);
    for case in 0..50 {
        let n = r.random_range(1..5000);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let x = r.random_range(1.0f32..2.0) * 2f32.powi(r.random_range(-29..29));
                if case % 3 == 0 && r.random::<bool>() {
                    -x
                } else {
                    x
                }
            })
            .collect();
        let want = ref_exact_sum(&v) * (1.0f32 / n as f32);
        assert_eq!(
            mean_f32(&v).unwrap().to_bits(),
            want.to_bits(),
            "case {case}, n {n}"
        );
    }
}

#[test]
fn double_quant_matches_the_reference() {
    // Real absmax values: from quantizing weights, several tensors' worth,
    // crossing one or more nested blocks with a tail.
    for (seed, n, bs) in [
        (41u64, 64 * 300, 64usize),
        (42, 64 * 1000 + 5, 64),
        (43, 32 * 513, 32),
        (44, 4096 * 3, 4096),
    ] {
        let data = random_data(seed, n, false);
        let (_, absmax) = quantize_blocks(&data, bs).unwrap();
        let absmax: Vec<f32> = absmax
            .into_iter()
            .map(|a| if a == 0.0 { 1.0 } else { a })
            .collect();
        let got = quantize_absmax(&absmax).unwrap();
        assert_dq_eq(&format!("seed {seed}"), &got, &ref_double_quant(&absmax));
    }
    // Hand-made: values on the 8-bit midpoints, in ± pairs with ±1 so the
    // exact sum is 0: offset 0, absmax2 1, scaled value = value. Each
    // midpoint is a tie that goes to the even index.
    let map = ref_dynamic_map(true);
    let mut v: Vec<f32> = vec![1.0, -1.0];
    let mut ties = Vec::new();
    for k in 64..191 {
        let mid = (map[k] + map[k + 1]) * 0.5;
        v.push(mid);
        v.push(-mid);
        ties.push((v.len() - 2, k));
    }
    assert_eq!(v.len(), 256);
    let got = quantize_absmax(&v).unwrap();
    assert_dq_eq("midpoints", &got, &ref_double_quant(&v));
    assert_eq!((got.offset, got.absmax2.clone()), (0.0, vec![1.0]));
    for (i, k) in ties {
        assert_eq!(
            usize::from(got.qabsmax[i]),
            k + k % 2,
            "tie between {k} and {}",
            k + 1
        );
    }
}

#[test]
fn blockwise_8bit_ties_go_to_the_even_index() {
    // absmax 1.0 so scaled = value. A value exactly on the f32 midpoint of
    // entries k, k+1 gets whichever of k, k+1 is even.
    let map = dynamic_map_signed();
    for k in 0..255 {
        let mid = (map[k] + map[k + 1]) * 0.5;
        if mid == map[k] || mid == map[k + 1] {
            continue;
        }
        let (q, a) = quantize_blockwise_dynamic(&[1.0, mid, map[k], map[k + 1]], 64).unwrap();
        assert_eq!(a, vec![1.0]);
        let even = (if k % 2 == 0 { k } else { k + 1 }) as u8;
        assert_eq!(q, vec![255, even, k as u8, (k + 1) as u8], "pair {k}");
    }
    // NaN → 0; beyond the ends → 0 / 255.
    let (q, _) = quantize_blockwise_dynamic(&[1.0, f32::NAN, -1.0, 0.0], 64).unwrap();
    assert_eq!(q, vec![255, 0, 0, 127]);
}

#[test]
fn dequantize_absmax_is_two_f32_roundings() {
    let data = random_data(51, 64 * 700, false);
    let (_, absmax) = quantize_blocks(&data, 64).unwrap();
    let dq = quantize_absmax(&absmax).unwrap();
    let restored = dequantize_absmax(&dq).unwrap();
    assert_eq!(restored.len(), absmax.len());
    // Bound: s = fl(v/a2) is within 2^-23 of v/a2, the nearest code within
    // h2 of s (h2: the widest half-gap, or the distance from -1 to the
    // lowest entry), and each of the three roundings (v = a - offset,
    // code·a2, + offset) adds at most half an ulp of its result.
    let map = dynamic_map_signed();
    let h2 = (0..255)
        .map(|k| f64::from(map[k + 1] - map[k]) / 2.0)
        .fold(1.0 + f64::from(map[0]), f64::max);
    let eps = f64::from(f32::EPSILON);
    for (b, (&a, &r)) in absmax.iter().zip(&restored).enumerate() {
        let a2 = f64::from(dq.absmax2[b / 256]);
        let (code, off) = (
            f64::from(dq.code2[usize::from(dq.qabsmax[b])]),
            f64::from(dq.offset),
        );
        // Two separate f32 roundings, computed here in f64.
        let prod = (code * a2) as f32;
        let want = (f64::from(prod) + off) as f32;
        assert_eq!(r.to_bits(), want.to_bits(), "block {b}");
        let bound = a2 * (h2 + 2.0 * eps) + eps * (f64::from(a).abs() + off.abs() + a2);
        assert!(
            (f64::from(a) - f64::from(r)).abs() <= bound,
            "block {b}: {a} → {r}"
        );
    }
}

#[test]
fn double_quant_dequant_equals_the_restored_scale_path() {
    let data = random_data(61, 37 * 1111, false);
    let opts = QuantizeOptions {
        blocksize: 64,
        double_quant: true,
    };
    let t = quantize(&data, &[37, 1111], DType::F32, opts).unwrap();
    let Scales::Double(dq) = &t.scales else {
        panic!("double scales expected")
    };
    let (packed, _) = quantize_blocks(&data, 64).unwrap();
    assert_eq!(t.packed, packed, "double quant does not touch the codes");
    let plain = Nf4Tensor {
        scales: Scales::Plain(dequantize_absmax(dq).unwrap()),
        ..t.clone()
    };
    let a: Vec<f32> = dequant::dequantize(&t.view()).unwrap();
    let b: Vec<f32> = dequant::dequantize(&plain.view()).unwrap();
    assert_eq!(
        a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let c: Vec<bf16> = dequant::dequantize(&t.view()).unwrap();
    let d: Vec<bf16> = dequant::dequantize(&plain.view()).unwrap();
    assert_eq!(c, d);
}

// ---------------------------------------------------------------------------
// bitsandbytes' own output (tests/data/bnb/, see its README.md).

mod bnb_fixture {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    const FILE: &[u8] = include_bytes!("data/bnb/nf4_cpu.safetensors");

    /// The generator of `generate.py`: 64-bit LCG, 24 bits → [-1, 1), scaled
    /// by 2^((i / row_len) % 7 - 3). Every value is an exact f32.
    fn lcg_values(n: usize, seed: u64, row_len: usize) -> Vec<f32> {
        let mut h = seed;
        (0..n)
            .map(|i| {
                h = h
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((h >> 40) as i64 - (1 << 23)) as f64 / f64::from(1u32 << 23);
                (u * 2f64.powi(((i / row_len) % 7) as i32 - 3)) as f32
            })
            .collect()
    }

    fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn bytes<'a>(st: &'a SafeTensors<'a>, name: &str) -> Vec<u8> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        t.data().to_vec()
    }

    fn json(st: &SafeTensors<'_>, case: &str) -> serde_json::Value {
        let raw = bytes(st, &format!("{case}.weight.quant_state.bitsandbytes__nf4"));
        serde_json::from_slice(&raw).expect("quant state JSON")
    }

    /// The code bitsandbytes' CPU (pure torch) backend gives a full-block
    /// element: `x * (1.0 / max(absmax, 1e-38))`, clamped to [-1, 1],
    /// bucketed against the f32 means of neighbouring codes (number of
    /// means strictly below).
    fn cpu_backend_code(x: f32, absmax: f32) -> u8 {
        let c = code_ref();
        let inv = (1.0f64 / f64::from(absmax.max(1e-38))) as f32;
        let s = ((f64::from(x) * f64::from(inv)) as f32).clamp(-1.0, 1.0);
        (0..15).filter(|&i| (c[i] + c[i + 1]) / 2.0 < s).count() as u8
    }

    fn nibbles(packed: &[u8], n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    packed[i / 2] >> 4
                } else {
                    packed[i / 2] & 15
                }
            })
            .collect()
    }

    /// Our quantization of `data` against the fixture's case; returns the
    /// indices where the codes differ (all other bytes and every absmax bit
    /// must agree).
    fn compare(
        st: &SafeTensors<'_>,
        case: &str,
        data: &[f32],
        shape: &[usize],
        dtype: DType,
        bs: usize,
    ) -> Vec<usize> {
        let head = f32s(st, &format!("{case}.input_head"));
        assert_eq!(
            head.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            data[..16].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{case}: the generator reimplementation disagrees with generate.py"
        );
        let meta = json(st, case);
        assert_eq!(meta["quant_type"], "nf4");
        assert_eq!(meta["blocksize"], bs);
        assert_eq!(meta["dtype"], dtype.torch_name());
        assert_eq!(meta["shape"], serde_json::json!(shape));
        let qm = f32s(st, &format!("{case}.weight.quant_map"));
        assert_eq!(
            qm.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            NF4_CODE.map(f32::to_bits).to_vec()
        );

        let t = quantize(
            data,
            shape,
            dtype,
            QuantizeOptions {
                blocksize: bs,
                double_quant: false,
            },
        )
        .unwrap();
        let fixture = bytes(st, &format!("{case}.weight"));
        assert_eq!(
            st.tensor(&format!("{case}.weight")).unwrap().shape(),
            &[data.len().div_ceil(2), 1]
        );
        assert_eq!(fixture.len(), t.packed.len(), "{case}: packed length");
        let n = data.len();
        let (ours, theirs) = (nibbles(&t.packed, n), nibbles(&fixture, n));
        (0..n).filter(|&i| ours[i] != theirs[i]).collect()
    }

    #[test]
    fn plain_case_equals_bitsandbytes_except_the_documented_cpu_differences() {
        let st = SafeTensors::deserialize(FILE).unwrap();
        let mut data = lcg_values(37 * 64, 1, 64);
        // generate.py: block 0 zeros, block 1 the midpoint probes.
        data[..64].fill(0.0);
        let c = code_ref();
        let mut probe = vec![1.0f32];
        probe.extend(mids_ref());
        probe.extend((0..15).map(|i| (c[i] + c[i + 1]) / 2.0));
        probe.extend(
            (0..64 - probe.len()).map(|k| (if k % 2 == 0 { 1.0 } else { -1.0 }) * k as f32 / 40.0),
        );
        data[64..128].copy_from_slice(&probe);

        let diff = compare(&st, "plain64", &data, &[37, 64], DType::F32, 64);
        let (packed, absmax) = quantize_blocks(&data, 64).unwrap();
        let fixture_absmax = f32s(&st, "plain64.weight.absmax");
        assert_eq!(
            fixture_absmax
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            absmax.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let fixture = bytes(&st, "plain64.weight");
        // The zero block: CUDA code 0 (NaN), the CPU backend code 7.
        assert!(packed[..32].iter().all(|&b| b == 0x00));
        assert!(fixture[..32].iter().all(|&b| b == 0x77));
        // The probes: the CPU backend's f32-mean bounds are an ulp off four
        // CUDA thresholds. On the literal of threshold 8 (above its mean)
        // the CPU gives 9 where CUDA gives 8; on the means of thresholds 0,
        // 12, 14 (above their literals) CUDA gives the upper code.
        let probe_diffs: Vec<usize> = diff.iter().copied().filter(|&i| i >= 64).collect();
        assert_eq!(
            probe_diffs,
            vec![64 + 1 + 8, 64 + 16, 64 + 16 + 12, 64 + 16 + 14]
        );
        for &i in &probe_diffs {
            let theirs = if i % 2 == 0 {
                fixture[i / 2] >> 4
            } else {
                fixture[i / 2] & 15
            };
            assert_eq!(
                theirs,
                cpu_backend_code(data[i], absmax[i / 64]),
                "element {i}"
            );
        }
        assert_eq!(diff.len(), 64 + 4);
    }

    #[test]
    fn tail_and_bf16_cases_equal_bitsandbytes() {
        let st = SafeTensors::deserialize(FILE).unwrap();
        let data = lcg_values(3 * 789, 2, 789);
        assert_eq!(
            compare(&st, "tail64", &data, &[3, 789], DType::F32, 64),
            Vec::<usize>::new()
        );
        let (_, absmax) = quantize_blocks(&data, 64).unwrap();
        assert_eq!(f32s(&st, "tail64.weight.absmax"), absmax);

        let data: Vec<f32> = lcg_values(24 * 96, 3, 96)
            .into_iter()
            .map(|x| bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(
            compare(&st, "bf16_128", &data, &[24, 96], DType::BF16, 128),
            Vec::<usize>::new()
        );
        let (_, absmax) = quantize_blocks(&data, 128).unwrap();
        assert_eq!(f32s(&st, "bf16_128.weight.absmax"), absmax);
    }

    #[test]
    fn torch_built_the_same_dynamic_maps() {
        let st = SafeTensors::deserialize(FILE).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Without FMA (torch's baseline kernels) and with (AVX2; AVX512 is
        // what the double-quant case below was built under).
        assert_eq!(
            bits(&f32s(&st, "dynamic_map.default")),
            bits(&dynamic_map_signed_unfused())
        );
        assert_eq!(
            bits(&f32s(&st, "dynamic_map.avx2")),
            bits(&dynamic_map_signed())
        );
        assert_eq!(
            bits(&f32s(&st, "dq64.weight.nested_quant_map")),
            bits(&dynamic_map_signed())
        );
    }

    #[test]
    fn double_quant_case_against_bitsandbytes() {
        let st = SafeTensors::deserialize(FILE).unwrap();
        let data = lcg_values(130 * 128, 4, 128);
        assert_eq!(
            compare(&st, "dq64", &data, &[130, 128], DType::F32, 64),
            Vec::<usize>::new()
        );
        let meta = json(&st, "dq64");
        assert_eq!(meta["nested_blocksize"], 256);
        assert_eq!(meta["nested_dtype"], "float32");
        let (_, absmax) = quantize_blocks(&data, 64).unwrap();
        let ours = quantize_absmax(&absmax).unwrap();
        let offset = meta["nested_offset"].as_f64().unwrap() as f32;
        let nested_absmax = f32s(&st, "dq64.weight.nested_absmax");
        let q = bytes(&st, "dq64.weight.absmax");
        // The CPU backend's mean (an f32 cascade sum divided by n) and ours
        // agree here, and so do the nested absmax values.
        assert_eq!(ours.offset.to_bits(), offset.to_bits());
        assert_eq!(ours.absmax2, nested_absmax);
        // Its 8-bit quantizer is a 65536-bin lookup table, not the CUDA
        // nearest-code search: every code it wrote is what that table
        // gives, and where the two rules part the CUDA one is the nearest.
        let map = dynamic_map_signed();
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let mut parted = Vec::new();
        for (i, (&a, &b)) in ours.qabsmax.iter().zip(&q).enumerate() {
            let s = centred[i] * (1.0 / nested_absmax[i / 256]);
            assert_eq!(
                b,
                cpu_lut_code(&map, s),
                "qabsmax[{i}]: bitsandbytes' table"
            );
            if a != b {
                let dist = |k: u8| (f64::from(map[usize::from(k)]) - f64::from(s)).abs();
                assert!(dist(a) < dist(b), "qabsmax[{i}]: {s}: ours {a}, table {b}");
                parted.push(i);
            }
        }
        assert_eq!(parted.len(), 1, "{parted:?}");
    }

    /// bitsandbytes' CPU 8-bit code (`csrc/cpu_ops.cpp`): bin
    /// `(s + 1) · 0.5 · 65535 + 0.5` (truncated) of a table whose bin `i`
    /// holds the first code whose f32 midpoint `0.5 (c[k] + c[k+1])` is at
    /// least `-1 + 2i / 65535`.
    fn cpu_lut_code(map: &[f32; 256], s: f32) -> u8 {
        let s = s.clamp(-1.0, 1.0);
        let bin = ((s + 1.0) * 0.5 * 65535.0 + 0.5) as u32;
        let val = -1.0f32 + (2.0 * bin as f32) / 65535.0;
        (0..255)
            .find(|&k| 0.5 * (map[k] + map[k + 1]) >= val)
            .unwrap_or(255) as u8
    }
}
