//! The fused NF4 + LoRA kernels on a CUDA device, through the device-buffer
//! API (`Cuda::lora_forward` / `lora_backward`, both forward variants forced
//! on every M) and the host-slice conveniences, against the f64 reference
//! and bounds of `tests/common/lora_ref.rs` (the same checks as
//! `tests/lora_sim.rs`). Outputs are poisoned on the device first. Without
//! a GPU each test prints `<test>: skipped: <reason>` and returns.
#![cfg(tli_cuda)]

mod common;
#[path = "common/lora_ref.rs"]
mod lora_ref;

use std::io::Write as _;

use common::{poison, rng};
use half::{bf16, f16};
use lora_ref::{Problem, assert_within};
use rand::Rng;
use tli_kernels::backend::cuda::{
    Cuda, DeviceForwardArgs, DeviceGrads, DeviceLora, DeviceRepr, DeviceWeight,
};
use tli_kernels::lora::kernel::ForwardVariant;
use tli_kernels::lora::{
    BackwardArgs, BaseWeight, Dropout, ForwardArgs, Grads, LinearDims, LoraFactors,
};
use tli_kernels::nf4::{DoubleQuant, Nf4Tensor, Scales};
use tli_kernels::{Element, Error};

fn report(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

fn gpu(test: &str) -> Option<&'static Cuda> {
    match Cuda::global() {
        Ok(g) => Some(g),
        Err(e) => {
            report(&format!("{test}: skipped: {e}"));
            None
        }
    }
}

fn uniform<T: Element>(r: &mut impl Rng, len: usize, amp: f32) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f32(r.random_range(-amp..amp)))
        .collect()
}

/// A random NF4 weight `[n, k]` (any codes, scales in [0.5, 2)), plain or
/// double-quant with nested block size 4.
fn nf4(r: &mut impl Rng, n: usize, k: usize, bs: usize, dq: bool) -> Nf4Tensor {
    let nb = (n * k).div_ceil(bs);
    let scales = if dq {
        Scales::Double(DoubleQuant {
            qabsmax: (0..nb).map(|_| r.random()).collect(),
            absmax2: (0..nb.div_ceil(4))
                .map(|_| r.random_range(0.5f32..2.0))
                .collect(),
            code2: (0..256).map(|_| r.random_range(-1.0f32..1.0)).collect(),
            offset: 0.5,
            nested_blocksize: 4,
        })
    } else {
        Scales::Plain((0..nb).map(|_| r.random_range(0.5f32..2.0)).collect())
    };
    Nf4Tensor {
        packed: (0..(n * k).div_ceil(2)).map(|_| r.random()).collect(),
        scales,
        blocksize: bs,
        shape: vec![n, k],
        dtype: tli_kernels::DType::BF16,
    }
}

/// One case through the device API (both variants, backward) and the host
/// API, every output checked against the reference.
#[allow(clippy::too_many_arguments)]
fn check<T: Element + DeviceRepr>(
    g: &Cuda,
    seed: u64,
    (m, n, k): (usize, usize, usize),
    rank: Option<usize>,
    dense: bool,
    dq: bool,
    bias: bool,
    dropout: Option<f32>,
) {
    let label = format!(
        "{} M={m} N={n} K={k} r={rank:?} dense={dense} dq={dq}",
        T::DTYPE
    );
    let mut r = rng(seed);
    let dims = LinearDims { m, n, k };
    let x: Vec<T> = uniform(&mut r, m * k, 1.0);
    let wt = nf4(&mut r, n, k, 64, dq);
    let wd: Vec<T> = uniform(&mut r, n * k, 1.0);
    let rk = rank.unwrap_or(0);
    let a: Vec<T> = uniform(&mut r, rk * k, 0.5);
    let b: Vec<T> = uniform(&mut r, n * rk, 0.5);
    let bias_v: Vec<T> = uniform(&mut r, n, 1.0);
    let dy: Vec<T> = uniform(&mut r, m * n, 1.0);
    let scale = 0.75f32;
    let drop = dropout.map(|p| Dropout { p, seed: seed ^ 7 });
    let weight = if dense {
        BaseWeight::Dense(&wd[..])
    } else {
        BaseWeight::Nf4(wt.view())
    };
    let args = ForwardArgs {
        dims,
        x: &x,
        weight,
        lora: rank.map(|rank| LoraFactors {
            a: &a,
            b: &b,
            rank,
            scale,
        }),
        bias: bias.then_some(&bias_v[..]),
        dropout: drop,
    };
    let p = Problem::new(
        dims,
        &x,
        &weight,
        rank.map(|r| (&a[..], &b[..], r, scale)),
        args.bias,
        drop,
    );
    let want = p.forward();
    let dyf: Vec<f64> = dy.iter().map(|v| f64::from(v.to_f32())).collect();

    // Device buffers.
    let up = |v: &[T]| {
        g.to_device(v)
            .unwrap_or_else(|e| panic!("{label}: upload: {e}"))
    };
    let dx_ = up(&x);
    let dwt = g.upload_nf4(&wt.view()).unwrap();
    let dwd = up(&wd);
    let (da_, db_) = if rk > 0 {
        (Some(up(&a)), Some(up(&b)))
    } else {
        (None, None)
    };
    let dbias = up(&bias_v);
    let ddy = up(&dy);
    let dargs = DeviceForwardArgs {
        dims,
        x: &dx_,
        weight: if dense {
            DeviceWeight::Dense(&dwd)
        } else {
            DeviceWeight::Nf4(&dwt)
        },
        lora: rank.map(|rank| DeviceLora {
            a: da_.as_ref().unwrap(),
            b: db_.as_ref().unwrap(),
            rank,
            scale,
        }),
        bias: bias.then_some(&dbias),
        dropout: drop,
    };
    for v in [ForwardVariant::Tiled, ForwardVariant::Gemv] {
        let mut out = up(&vec![poison::<T>(); m * n]);
        g.lora_forward(&dargs, &mut out, v)
            .unwrap_or_else(|e| panic!("{label} {v:?}: {e}"));
        assert_within(&format!("{label} {v:?}"), &g.to_host(&out).unwrap(), &want);
    }
    let mut gx = up(&vec![poison::<T>(); m * k]);
    let mut ga = up(&vec![poison::<T>(); rk.max(1) * k]);
    let mut gb = up(&vec![poison::<T>(); n * rk.max(1)]);
    g.lora_backward(
        &dargs,
        &ddy,
        DeviceGrads {
            dx: Some(&mut gx),
            da: rank.map(|_| &mut ga),
            db: rank.map(|_| &mut gb),
        },
    )
    .unwrap_or_else(|e| panic!("{label} backward: {e}"));
    assert_within(
        &format!("{label} dx"),
        &g.to_host(&gx).unwrap(),
        &p.dx(&dyf),
    );
    if rank.is_some() {
        assert_within(
            &format!("{label} dA"),
            &g.to_host(&ga).unwrap(),
            &p.da(&dyf),
        );
        assert_within(
            &format!("{label} dB"),
            &g.to_host(&gb).unwrap(),
            &p.db(&dyf),
        );
    }

    // Host slices.
    let mut out = vec![poison::<T>(); m * n];
    g.lora_forward_host(&args, &mut out).unwrap();
    assert_within(&format!("{label} host"), &out, &want);
    let mut hx = vec![poison::<T>(); m * k];
    g.lora_backward_host(
        &BackwardArgs { fwd: args, dy: &dy },
        Grads {
            dx: Some(&mut hx),
            da: None,
            db: None,
        },
    )
    .unwrap();
    assert_within(&format!("{label} host dx"), &hx, &p.dx(&dyf));
}

fn sweep<T: Element + DeviceRepr>(g: &Cuda, seed: u64) {
    let cases = [
        ((1, 45, 77), Some(1), false, false, true, None),
        ((7, 70, 45), Some(8), true, false, false, Some(0.4)),
        ((16, 33, 96), Some(64), false, true, true, Some(0.25)),
        ((100, 130, 200), Some(16), false, false, true, Some(0.1)),
        ((37, 66, 4096), None, false, true, true, None),
    ];
    for (i, &(dims, rank, dense, dq, bias, dropout)) in cases.iter().enumerate() {
        check::<T>(g, seed + i as u64, dims, rank, dense, dq, bias, dropout);
    }
}

#[test]
fn forward_and_backward_every_dtype_against_the_reference() {
    let Some(g) = gpu("forward_and_backward_every_dtype_against_the_reference") else {
        return;
    };
    sweep::<f32>(g, 10);
    sweep::<bf16>(g, 20);
    sweep::<f16>(g, 30);
}

#[test]
fn bad_device_arguments_are_errors() {
    let Some(g) = gpu("bad_device_arguments_are_errors") else {
        return;
    };
    let x = g.to_device(&[bf16::ZERO; 64]).unwrap();
    let w = g.to_device(&[bf16::ZERO; 8 * 16]).unwrap();
    let a = g.to_device(&[bf16::ZERO; 65 * 16]).unwrap();
    let b = g.to_device(&[bf16::ZERO; 8 * 65]).unwrap();
    let args = DeviceForwardArgs {
        dims: LinearDims { m: 4, n: 8, k: 16 },
        x: &x,
        weight: DeviceWeight::Dense(&w),
        lora: Some(DeviceLora {
            a: &a,
            b: &b,
            rank: 65,
            scale: 1.0,
        }),
        bias: None,
        dropout: None,
    };
    let mut out = g.alloc_zeros::<bf16>(32).unwrap();
    let e = g
        .lora_forward(&args, &mut out, ForwardVariant::Auto)
        .unwrap_err();
    assert!(e.to_string().contains("rank 65"), "{e}");
    let mut short = g.alloc_zeros::<bf16>(31).unwrap();
    let args = DeviceForwardArgs { lora: None, ..args };
    assert!(matches!(
        g.lora_forward(&args, &mut short, ForwardVariant::Auto),
        Err(Error::ShapeMismatch { .. })
    ));
}
