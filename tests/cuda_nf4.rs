//! NF4 dequantization on a CUDA device, bit for bit against the CPU
//! dequantizer (`tli_kernels::nf4::dequant`), which `tests/nf4_dequant.rs`
//! holds to an independent reference.
//!
//! With a GPU these run for real: every block size, both scale modes, all
//! three output dtypes, tails and odd element counts, a grid larger than one
//! resident wave, through both the device-buffer API and the host-slice op.
//! Outputs are poisoned first, so an element the kernel never wrote fails.
//! Without a GPU each prints `<test>: skipped: <reason>` and returns; the
//! tests of how a missing device is reported run on both kinds of machine.
#![cfg(tli_cuda)]

mod common;

use std::io::Write as _;

use common::{assert_bits_eq, poison, rng, wide_f32};
use half::{bf16, f16};
use rand::Rng;
use tli_kernels::backend::cuda::{
    Cuda, DeviceRepr, DeviceScales, Nf4Device, driver_library_present,
};
use tli_kernels::nf4::{self, DoubleQuant, Nf4Tensor, Scales};
use tli_kernels::{DType, Device, Element, Error, ops};

/// Print past the harness's output capture so a skip shows in the log of a
/// passing run.
fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The GPU, or `None` after printing why this test skips.
fn gpu(test: &str) -> Option<&'static Cuda> {
    match Cuda::global() {
        Ok(g) => Some(g),
        Err(e) => {
            report(&format!("{test}: skipped: {e}"));
            None
        }
    }
}

/// Random stored bits: any code, scales across many magnitudes, and (double
/// quant) a random code map and nested block size. Dequantization has to be
/// exact for whatever a file holds, not only for what the quantizer writes.
fn random_nf4(seed: u64, n: usize, blocksize: usize, nested: Option<usize>) -> Nf4Tensor {
    let mut r = rng(seed);
    let nb = n.div_ceil(blocksize);
    let scales = match nested {
        None => Scales::Plain((0..nb).map(|_| wide_f32(&mut r).abs()).collect()),
        Some(nested_blocksize) => Scales::Double(DoubleQuant {
            qabsmax: (0..nb).map(|_| r.random()).collect(),
            absmax2: (0..nb.div_ceil(nested_blocksize))
                .map(|_| wide_f32(&mut r).abs())
                .collect(),
            code2: (0..256).map(|_| r.random_range(-1.0f32..1.0)).collect(),
            offset: wide_f32(&mut r).abs(),
            nested_blocksize,
        }),
    };
    Nf4Tensor {
        packed: (0..n.div_ceil(2)).map(|_| r.random()).collect(),
        scales,
        blocksize,
        shape: vec![n],
        dtype: DType::BF16,
    }
}

/// Run `t` through both CUDA paths in dtype `T` and compare with the CPU.
fn check<T: Element + DeviceRepr>(g: &Cuda, label: &str, t: &Nf4Tensor) {
    let n = t.numel();
    let label = format!("{label} {}", T::DTYPE);
    let mut want = vec![T::zeroed(); n];
    nf4::dequant::dequantize_into(&t.view(), &mut want)
        .unwrap_or_else(|e| panic!("{label}: cpu: {e}"));

    // Device buffers: the output starts as poison on the device.
    let dev = g
        .upload_nf4(&t.view())
        .unwrap_or_else(|e| panic!("{label}: upload: {e}"));
    let mut out = g
        .to_device(&vec![poison::<T>(); n])
        .unwrap_or_else(|e| panic!("{label}: alloc: {e}"));
    g.nf4_dequant(&dev, &mut out)
        .unwrap_or_else(|e| panic!("{label}: launch: {e}"));
    let got = g
        .to_host(&out)
        .unwrap_or_else(|e| panic!("{label}: download: {e}"));
    assert_bits_eq(&format!("{label} (device buffers)"), &got, &want);

    // Host slices through the op, poisoned on the host.
    let mut got = vec![poison::<T>(); n];
    ops::nf4_dequant::dequantize_into(Device::Cuda, &t.view(), &mut got)
        .unwrap_or_else(|e| panic!("{label}: op: {e}"));
    assert_bits_eq(&format!("{label} (host op)"), &got, &want);
}

fn check_dtypes(g: &Cuda, label: &str, t: &Nf4Tensor) {
    check::<f32>(g, label, t);
    check::<bf16>(g, label, t);
    check::<f16>(g, label, t);
}

#[test]
fn every_blocksize_both_scale_modes_tails_and_odd_sizes() {
    let Some(g) = gpu("every_blocksize_both_scale_modes_tails_and_odd_sizes") else {
        return;
    };
    let mut seed = 1000;
    for log2 in 5..=12 {
        let bs = 1usize << log2;
        // n = 1, odd, around one 32-element chunk, around one block, and
        // several blocks plus a tail that is not a whole chunk.
        for n in [
            1,
            2,
            7,
            31,
            32,
            33,
            63,
            bs - 1,
            bs,
            bs + 1,
            3 * bs + 17,
            40 * bs + 33,
        ] {
            for nested in [None, Some(256)] {
                seed += 1;
                let t = random_nf4(seed, n, bs, nested);
                check_dtypes(g, &format!("bs={bs} n={n} nested={nested:?}"), &t);
            }
        }
    }
}

#[test]
fn random_shapes_and_nested_block_sizes() {
    let Some(g) = gpu("random_shapes_and_nested_block_sizes") else {
        return;
    };
    let mut r = rng(77);
    for case in 0..40 {
        let bs = 1usize << r.random_range(5..=12);
        let n = r.random_range(1..300_000usize);
        let nested = match r.random_range(0..4) {
            0 => None,
            1 => Some(1),
            2 => Some(1usize << r.random_range(1..=10)),
            _ => Some(256),
        };
        let t = random_nf4(5000 + case, n, bs, nested);
        check_dtypes(
            g,
            &format!("case {case}: bs={bs} n={n} nested={nested:?}"),
            &t,
        );
    }
}

#[test]
fn grid_stride_loop_covers_more_than_one_resident_wave() {
    let Some(g) = gpu("grid_stride_loop_covers_more_than_one_resident_wave") else {
        return;
    };
    // The launch caps the grid at the blocks the device holds at once (at
    // most 2048 threads per SM, 32 elements per thread); 2.5 such waves plus
    // a ragged tail make every thread take the stride loop at least twice.
    let wave = g.sm_count() as usize * 2048 * 32;
    let n = wave * 5 / 2 + 45;
    for (i, nested) in [None, Some(256)].into_iter().enumerate() {
        let t = random_nf4(9000 + i as u64, n, 64, nested);
        check::<bf16>(g, &format!("n={n} nested={nested:?}"), &t);
    }
}

#[test]
fn quantized_weight_matrix() {
    let Some(g) = gpu("quantized_weight_matrix") else {
        return;
    };
    // What the quantizer produces for a weight whose rows cross blocks.
    let mut r = rng(3);
    let (rows, cols) = (257, 300);
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| r.random_range(-0.2f32..0.2))
        .collect();
    for bs in [64, 128] {
        let opts = nf4::quantize::QuantizeOptions {
            blocksize: bs,
            double_quant: false,
        };
        let t = nf4::quantize::quantize(&data, &[rows, cols], DType::BF16, opts).expect("quantize");
        check_dtypes(g, &format!("[{rows},{cols}] bs={bs}"), &t);
    }
}

#[test]
fn bad_arguments_are_errors_before_any_launch() {
    let Some(g) = gpu("bad_arguments_are_errors_before_any_launch") else {
        return;
    };
    let t = random_nf4(11, 100, 64, None);
    let dev = g.upload_nf4(&t.view()).expect("upload");

    // Output of the wrong length.
    let mut short = g.alloc_zeros::<f32>(99).expect("alloc");
    let err = g.nf4_dequant(&dev, &mut short).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("100") && msg.contains("99"), "{msg}");

    // Device tensors assembled from parts are checked like host views.
    let packed = || g.to_device(&[0u8; 50]).expect("alloc");
    let absmax = |k: usize| g.to_device(&vec![1.0f32; k]).expect("alloc");
    let err = Nf4Device::from_parts(packed(), DeviceScales::Plain(absmax(2)), 48, 100).unwrap_err();
    assert!(
        matches!(err, Error::InvalidBlockSize { blocksize: 48, .. }),
        "{err}"
    );
    let err = Nf4Device::from_parts(packed(), DeviceScales::Plain(absmax(3)), 64, 100).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("absmax") && msg.contains('2') && msg.contains('3'),
        "{msg}"
    );
    let err = Nf4Device::from_parts(
        g.to_device(&[0u8; 49]).expect("alloc"),
        DeviceScales::Plain(absmax(2)),
        64,
        100,
    )
    .unwrap_err();
    assert!(msg_has(&err, &["50 bytes", "49 bytes"]), "{err}");
    let double = |code2_len: usize, nested_blocksize: usize| DeviceScales::Double {
        qabsmax: g.to_device(&[0u8; 2]).expect("alloc"),
        absmax2: absmax(1),
        code2: absmax(code2_len),
        offset: 0.0,
        nested_blocksize,
    };
    let err = Nf4Device::from_parts(packed(), double(255, 256), 64, 100).unwrap_err();
    assert!(msg_has(&err, &["256", "255"]), "{err}");
    let err = Nf4Device::from_parts(packed(), double(256, 3), 64, 100).unwrap_err();
    assert!(msg_has(&err, &["nested block size 3"]), "{err}");
    let ok = Nf4Device::from_parts(packed(), double(256, 256), 64, 100).expect("valid parts");
    assert!(ok.is_double_quant() && ok.numel() == 100 && ok.blocksize() == 64);

    // The host op reports bad views before it touches the device.
    let mut bad = t.clone();
    bad.packed.pop();
    let mut out = vec![0f32; 100];
    let err = ops::nf4_dequant::dequantize_into(Device::Cuda, &bad.view(), &mut out).unwrap_err();
    assert!(msg_has(&err, &["50 bytes", "49 bytes"]), "{err}");
}

fn msg_has(err: &Error, parts: &[&str]) -> bool {
    let msg = err.to_string();
    parts.iter().all(|p| msg.contains(p))
}

#[test]
fn a_missing_device_is_an_error_not_a_panic() {
    // Correct on both kinds of machine: with a GPU the device must be usable;
    // without one, every entry point must say why, as NoCudaDevice (or as a
    // Driver error when a driver is installed but fails).
    let t = random_nf4(21, 100, 64, None);
    let mut out = vec![0f32; 100];
    match Device::Cuda.check_available() {
        Ok(()) => {
            let g = Cuda::global().expect("check_available said yes");
            assert!(g.sm_count() > 0, "{g:?}");
            let (major, _) = g.compute_capability();
            assert!(major >= 7, "{g:?}");
            ops::nf4_dequant::dequantize_into(Device::Cuda, &t.view(), &mut out)
                .expect("dequantize on the GPU");
        }
        Err(Error::NoCudaDevice { reason }) => {
            report(&format!(
                "a_missing_device_is_an_error_not_a_panic: no device here: {reason}"
            ));
            assert!(!reason.trim().is_empty());
            if !driver_library_present() {
                assert!(reason.contains("driver library"), "{reason}");
            }
            let err =
                ops::nf4_dequant::dequantize_into(Device::Cuda, &t.view(), &mut out).unwrap_err();
            assert!(matches!(err, Error::NoCudaDevice { .. }), "{err}");
            assert!(Cuda::global().is_err());
        }
        Err(e @ Error::Driver { .. }) => {
            assert!(
                driver_library_present(),
                "a driver error without a driver library: {e}"
            );
            report(&format!(
                "a_missing_device_is_an_error_not_a_panic: driver present but failing: {e}"
            ));
        }
        Err(e) => panic!("unexpected error kind from check_available: {e}"),
    }
}

#[test]
fn an_absent_ordinal_is_no_device() {
    let ordinal = 1 << 20;
    match Cuda::new(ordinal) {
        Err(Error::NoCudaDevice { reason }) => {
            if !driver_library_present() {
                assert!(reason.contains("driver library"), "{reason}");
            } else if Cuda::global().is_ok() {
                assert!(reason.contains(&ordinal.to_string()), "{reason}");
            }
        }
        Err(e @ Error::Driver { .. }) => assert!(driver_library_present(), "{e}"),
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(c) => panic!("device {ordinal} should not exist: {c:?}"),
    }
}
