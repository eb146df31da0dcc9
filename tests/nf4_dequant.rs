//! NF4 dequantization on every host device (`cpu`, `sim`) against an
//! independent reference, bit for bit.
//!
//! The reference computes each output from the format's definition with f64
//! arithmetic: `T(f32(code[q] · scale))`. An f64 product of two f32 values is
//! exact (24 + 24 significant bits < 53), so rounding it to f32 gives exactly
//! the correctly rounded f32 product the kernels compute. The double-quant
//! scale `f32(f32(code2[q] · absmax2) + offset)` is likewise computed in f64
//! and rounded after each step; rounding an f64 sum of two f32 values to f32
//! is the correctly rounded f32 sum (53 ≥ 2·24 + 2, so double rounding is
//! innocuous). Nothing in the reference shares code with the library.

mod common;

use common::{assert_bits_eq, host_devices, poison, rng, wide_f32};
use half::{bf16, f16};
use rand::Rng;
use tli_kernels::nf4::{DoubleQuant, Nf4Tensor, Scales};
use tli_kernels::ops::nf4_dequant::dequantize_into;
use tli_kernels::{DType, Element, Error};

/// The code table as the reference document prints it (not the crate's).
const CODE: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

fn reference_scale(t: &Nf4Tensor, b: usize) -> f32 {
    match &t.scales {
        Scales::Plain(a) => a[b],
        Scales::Double(d) => {
            let prod = (f64::from(d.code2[usize::from(d.qabsmax[b])])
                * f64::from(d.absmax2[b / d.nested_blocksize])) as f32;
            (f64::from(prod) + f64::from(d.offset)) as f32
        }
    }
}

fn reference<T: Element>(t: &Nf4Tensor) -> Vec<T> {
    let n = t.numel();
    (0..n)
        .map(|i| {
            let byte = t.packed[i / 2];
            let q = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
            let code = CODE[usize::from(q)] as f32; // the f32 nearest the literal
            let s = reference_scale(t, i / t.blocksize);
            T::from_f32((f64::from(code) * f64::from(s)) as f32)
        })
        .collect()
}

/// A random NF4 tensor (random codes and scales, not the output of the
/// quantizer: dequantization must be right for any stored bits).
fn random_tensor(seed: u64, n: usize, blocksize: usize, double: bool) -> Nf4Tensor {
    let mut r = rng(seed);
    let packed: Vec<u8> = (0..n.div_ceil(2)).map(|_| r.random()).collect();
    let nb = n.div_ceil(blocksize);
    let scales = if double {
        let nested = 256;
        Scales::Double(DoubleQuant {
            qabsmax: (0..nb).map(|_| r.random()).collect(),
            absmax2: (0..nb.div_ceil(nested))
                .map(|_| wide_f32(&mut r).abs())
                .collect(),
            code2: (0..256).map(|_| r.random_range(-1.0f32..1.0)).collect(),
            offset: wide_f32(&mut r).abs(),
            nested_blocksize: nested,
        })
    } else {
        Scales::Plain((0..nb).map(|_| wide_f32(&mut r).abs()).collect())
    };
    Nf4Tensor {
        packed,
        scales,
        blocksize,
        shape: vec![n],
        dtype: DType::BF16,
    }
}

fn check_all_devices<T: Element>(label: &str, t: &Nf4Tensor) {
    let want = reference::<T>(t);
    for dev in host_devices() {
        let mut out = vec![poison::<T>(); t.numel()];
        dequantize_into(dev, &t.view(), &mut out)
            .unwrap_or_else(|e| panic!("{label} on {dev}: {e}"));
        assert_bits_eq(&format!("{label} {} on {dev}", T::DTYPE), &out, &want);
    }
}

fn check_all_dtypes(label: &str, t: &Nf4Tensor) {
    check_all_devices::<f32>(label, t);
    check_all_devices::<bf16>(label, t);
    check_all_devices::<f16>(label, t);
}

#[test]
fn every_blocksize_both_scale_modes_with_tails() {
    // Sizes: n = 1, odd, just below/above a chunk (32) and a block, several
    // blocks plus a tail, and enough chunks to need the grid-stride loop.
    let mut seed = 1;
    for log2 in 5..=12 {
        let bs = 1usize << log2;
        for n in [
            1,
            7,
            31,
            33,
            bs - 1,
            bs,
            bs + 1,
            3 * bs + 17,
            2 * 4096 * 32 + 5,
        ] {
            for double in [false, true] {
                seed += 1;
                let t = random_tensor(seed, n, bs, double);
                check_all_dtypes(&format!("bs={bs} n={n} double={double}"), &t);
            }
        }
    }
}

#[test]
// The literals are the published table values (as bitsandbytes prints them)
// doubled; they carry more digits than f32 holds on purpose.
#[allow(clippy::excessive_precision)]
fn hand_computed_block() {
    // Codes 0..15 twice with absmax 2 (every code in both nibble positions).
    // Doubling is exact in f32, so each value is twice the table literal.
    let packed: Vec<u8> = (0..16u8)
        .map(|j| ((2 * j) % 16) << 4 | ((2 * j + 1) % 16))
        .collect();
    let t = Nf4Tensor {
        packed,
        scales: Scales::Plain(vec![2.0]),
        blocksize: 32,
        shape: vec![32],
        dtype: DType::F32,
    };
    let want: Vec<f32> = [
        -2.0,
        -1.3923856019973755,
        -1.0501461029052734,
        -0.7898349761962891,
        -0.5688827633857727,
        -0.3695468604564667,
        -0.1821000725030899,
        0.0,
        0.15916059911251068,
        0.3218604028224945,
        0.4922246038913727,
        0.6758304834365845,
        0.8814196586608887,
        1.1252340078353882,
        1.4459136724472046,
        2.0,
    ]
    .repeat(2);
    for dev in host_devices() {
        let mut out = vec![f32::NAN; 32];
        dequantize_into(dev, &t.view(), &mut out).unwrap();
        assert_bits_eq(&format!("hand block on {dev}"), &out, &want);
    }
    // bf16: 0.1591606 lies between bf16 0.158203125 and 0.159179688; the
    // nearer is 0.159179688 (0x3E23).
    let mut out = vec![bf16::ZERO; 32];
    dequantize_into(tli_kernels::Device::Cpu, &t.view(), &mut out).unwrap();
    assert_eq!(out[8].to_bits(), 0x3e23);
    assert_eq!(out[0].to_bits(), 0xc000); // -2.0
}

#[test]
fn zero_and_extreme_scales() {
    // absmax 0 gives signed zeros (code 0..6 → -0.0, 7.. → +0.0); huge scales
    // overflow to inf in f16/bf16 exactly as the rounding rules say; tiny
    // scales give subnormals.
    for (label, s) in [
        ("zero", 0.0f32),
        ("huge", 3.0e38),
        ("f16 overflow", 70000.0),
        ("tiny", 1.0e-40),
        ("f16 subnormal", 3.0e-6),
    ] {
        let mut r = rng(99);
        let n: usize = 200;
        let t = Nf4Tensor {
            packed: (0..n / 2).map(|_| r.random()).collect(),
            scales: Scales::Plain(vec![s; n.div_ceil(64)]),
            blocksize: 64,
            shape: vec![n],
            dtype: DType::F32,
        };
        check_all_dtypes(label, &t);
    }
    // All-zero quantized block (the bitsandbytes CUDA rule gives code 0):
    // -1.0 * 0 = -0.0.
    let t = Nf4Tensor {
        packed: vec![0; 16],
        scales: Scales::Plain(vec![0.0]),
        blocksize: 32,
        shape: vec![32],
        dtype: DType::F32,
    };
    for dev in host_devices() {
        let mut out = vec![1.0f32; 32];
        dequantize_into(dev, &t.view(), &mut out).unwrap();
        assert!(
            out.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()),
            "{dev}: {out:?}"
        );
    }
}

#[test]
fn quantized_matrices_crossing_rows() {
    // Real use: a [rows, cols] weight whose row width is not a multiple of
    // the block, so blocks cross rows (the format's blocks are flat).
    let mut r = rng(7);
    for (rows, cols, bs) in [(300, 64, 128), (17, 45, 32), (3, 1000, 4096), (1, 1, 64)] {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| r.random_range(-0.1f32..0.1))
            .collect();
        let opts = tli_kernels::nf4::quantize::QuantizeOptions {
            blocksize: bs,
            double_quant: false,
        };
        let t =
            tli_kernels::nf4::quantize::quantize(&data, &[rows, cols], DType::BF16, opts).unwrap();
        check_all_dtypes(&format!("[{rows},{cols}] bs={bs}"), &t);
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let good = random_tensor(5, 100, 64, false);
    for dev in host_devices() {
        // Output too short.
        let mut out = vec![0f32; 99];
        let err = dequantize_into(dev, &good.view(), &mut out).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("100") && err.to_string().contains("99"),
            "{err}"
        );

        // Block size not a power of two.
        let mut bad = good.clone();
        bad.blocksize = 48;
        let mut out = vec![0f32; 100];
        let err = dequantize_into(dev, &bad.view(), &mut out).unwrap_err();
        assert!(
            matches!(err, Error::InvalidBlockSize { blocksize: 48, .. }),
            "{err}"
        );

        // Wrong number of absmax values.
        let mut bad = good.clone();
        bad.scales = Scales::Plain(vec![1.0; 3]);
        let err = dequantize_into(dev, &bad.view(), &mut out).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("absmax") && msg.contains('2') && msg.contains('3'),
            "{msg}"
        );

        // Packed codes too short.
        let mut bad = good.clone();
        bad.packed.pop();
        let err = dequantize_into(dev, &bad.view(), &mut out).unwrap_err();
        assert!(
            err.to_string().contains("50 bytes") && err.to_string().contains("49 bytes"),
            "{err}"
        );

        // Nested map of the wrong length.
        let mut bad = random_tensor(6, 100, 64, true);
        if let Scales::Double(d) = &mut bad.scales {
            d.code2.truncate(255);
        }
        let err = dequantize_into(dev, &bad.view(), &mut out).unwrap_err();
        assert!(
            err.to_string().contains("256") && err.to_string().contains("255"),
            "{err}"
        );
    }
}
