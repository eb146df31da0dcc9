//! The cosine kernels on a CUDA device, against the CPU path (which
//! `tests/cosine.rs` holds to an f64 reference).
//!
//! Both sides are within the bound derived in `tests/cosine.rs` of the
//! exact value, `1.6·γ_{S+1}·(ρ_a + ρ_b) + 2γ_D + 8u`; with inputs in
//! [-1, 1), pooled over at most S = 8 positions, ρ ≤ √S·(a few), so the
//! difference of two such results is held to twice the bound computed with
//! ρ = 4√S. Pooled vectors are the same operations in the same order per
//! column on both, so they must agree bit for bit. Without a GPU each test
//! prints `<test>: skipped: <reason>` and returns.
#![cfg(tli_cuda)]

mod common;

use std::io::Write as _;

use common::rng;
use half::bf16;
use rand::Rng;
use tli_kernels::backend::cuda::Cuda;
use tli_kernels::cosine::{COSINE_EPS, Hidden, PairOptions};
use tli_kernels::ops::cosine::{cosine_matrix, masked_mean_pool, pooled_cosine};
use tli_kernels::{Device, Error};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

fn gpu(test: &str) -> Option<&'static Cuda> {
    match Cuda::global() {
        Ok(g) => Some(g),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {e}");
            None
        }
    }
}

#[test]
fn fused_pairs_and_pooling_agree_with_the_cpu() {
    if gpu("fused_pairs_and_pooling_agree_with_the_cpu").is_none() {
        return;
    }
    let mut r = rng(21);
    for &(n, seq, dim) in &[(1000, 8, 4096), (37, 3, 1), (300, 5, 1001)] {
        let a: Vec<bf16> = (0..n * seq * dim)
            .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
            .collect();
        let b: Vec<bf16> = (0..n * seq * dim)
            .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
            .collect();
        let mask: Vec<u8> = (0..n * seq)
            .map(|i| u8::from(i % seq == 0 || r.random_bool(0.7)))
            .collect();
        let (ha, hb) = (
            Hidden::contiguous(&a, n, seq, dim),
            Hidden::contiguous(&b, n, seq, dim),
        );
        let opts = PairOptions {
            eps: COSINE_EPS,
            keep_pooled: true,
        };
        let cpu = pooled_cosine(Device::Cpu, &ha, Some(&mask), &hb, Some(&mask), opts).unwrap();
        let dev = pooled_cosine(Device::Cuda, &ha, Some(&mask), &hb, Some(&mask), opts).unwrap();
        let rho = 4.0 * (seq as f64).sqrt();
        let tol = 2.0 * (1.6 * gamma(seq + 1) * 2.0 * rho + 2.0 * gamma(dim) + 8.0 * U);
        for i in 0..n {
            let d = (f64::from(cpu.cos[i]) - f64::from(dev.cos[i])).abs();
            assert!(
                d <= tol,
                "[{n},{seq},{dim}] pair {i}: cpu {} cuda {} (tol {tol:e})",
                cpu.cos[i],
                dev.cos[i]
            );
        }
        assert_eq!(cpu.pooled_a, dev.pooled_a, "[{n},{seq},{dim}] pooled a");
        assert_eq!(cpu.pooled_b, dev.pooled_b, "[{n},{seq},{dim}] pooled b");
        let p = masked_mean_pool(Device::Cuda, &ha, Some(&mask)).unwrap();
        assert_eq!(Some(p), cpu.pooled_a, "[{n},{seq},{dim}] masked_mean_pool");
    }
}

#[test]
fn cosine_matrix_agrees_with_the_cpu() {
    if gpu("cosine_matrix_agrees_with_the_cpu").is_none() {
        return;
    }
    let mut r = rng(22);
    for &(n, m, dim) in &[(300, 257, 4096), (5, 3, 1)] {
        let a: Vec<f32> = (0..n * dim).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..m * dim).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let (ha, hb) = (Hidden::rows(&a, n, dim), Hidden::rows(&b, m, dim));
        let cpu = cosine_matrix(Device::Cpu, &ha, &hb, COSINE_EPS).unwrap();
        let dev = cosine_matrix(Device::Cuda, &ha, &hb, COSINE_EPS).unwrap();
        let tol = 2.0 * (2.0 * gamma(dim) + 8.0 * U);
        let worst = cpu
            .iter()
            .zip(&dev)
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= tol,
            "[{n}x{m}x{dim}]: worst difference {worst:e} > {tol:e}"
        );
    }
}

#[test]
fn without_a_device_the_ops_report_why() {
    if Cuda::global().is_ok() {
        return;
    }
    let data = [1.0f32; 8];
    let e =
        masked_mean_pool(Device::Cuda, &Hidden::rows(&data, 2, 4), None).expect_err("no device");
    assert!(matches!(e, Error::NoCudaDevice { .. }), "{e}");
}
