//! Masked mean pooling, L2 normalisation and cosine similarity on the `cpu`
//! and `sim` devices, against an f64 reference computed here from the same
//! (already rounded) inputs.
//!
//! Tolerances (u = 2^-24, γ_n = n·u / (1 − n·u), Higham's bound for any
//! summation order of n terms):
//!
//! * Pooling: each pooled element is a sum of at most S terms, a correctly
//!   rounded 1/c and a multiply, so `|p̂_d − p_d| ≤ γ_{S+1} · q_d` with
//!   `q_d` the mean of `|h|` over the pooled positions.
//! * A perturbation e of a vector p turns it by at most arcsin(‖e‖/‖p‖) ≤
//!   (π/2)·‖e‖/‖p‖ and |Δcos| ≤ |Δangle|; so pooling errors move a cosine by
//!   at most `1.6 · γ_{S+1} · (ρ_a + ρ_b)`, `ρ = ‖q‖ / ‖p‖`.
//! * From the pooled vectors: the dot product errs by ≤ γ_D·‖a‖‖b‖ (Cauchy–
//!   Schwarz bounds Σ|a_k b_k|), each squared norm by a relative γ_D, so each
//!   norm by γ_D/2 + u (sqrt within an ulp on the device); the epilogue's
//!   reciprocals and two multiplies add 4u. In all
//!   `|Δcos| ≤ 1.6·γ_{S+1}·(ρ_a + ρ_b) + 2·γ_D + 8u`.
//! * The matrix path scales rows to unit length first (exact power-of-two
//!   scale, one multiply by the reciprocal norm), then dots: the same bound
//!   with ρ = 0.
//!
//! The f64 reference's own error (≈ D·2^-53) is far below these bounds.
//! Integer-valued data with power-of-two counts makes every pooled value and
//! every sum exact in f32, and then only the epilogue rounds: those tests
//! hold the result to 5u.
//!
//! The pooled vectors themselves are bit-identical between cpu and sim (the
//! same operations in the same order per column), which the tests check
//! exactly.

#![allow(clippy::needless_range_loop)] // indices name pairs and columns in messages

mod common;

use common::{host_devices, rng};
use half::{bf16, f16};
use rand::Rng;
use tli_kernels::cosine::{COSINE_EPS, Hidden, NORMALIZE_EPS, PairOptions};
use tli_kernels::ops::cosine::{
    cosine_matrix, cosine_pairs, l2_normalize, masked_mean_pool, pool_normalize, pooled_cosine,
};
use tli_kernels::{Device, Element, Error};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    nu / (1.0 - nu)
}

/// The bound derived in the header for one cosine.
fn cos_tol(seq: usize, dim: usize, rho_a: f64, rho_b: f64) -> f64 {
    1.6 * gamma(seq + 1) * (rho_a + rho_b) + 2.0 * gamma(dim) + 8.0 * U
}

/// A batch of hidden states in f64 terms, plus the dtype-rounded storage.
struct Batch<T> {
    data: Vec<T>,
    batch: usize,
    seq: usize,
    dim: usize,
    stride_b: usize,
    stride_t: usize,
    offset: usize,
}

impl<T: Element> Batch<T> {
    fn view(&self) -> Hidden<'_, T> {
        Hidden::strided(
            &self.data[self.offset..],
            self.batch,
            self.seq,
            self.dim,
            self.stride_b,
            self.stride_t,
        )
    }
    fn at(&self, b: usize, t: usize, d: usize) -> f64 {
        f64::from(self.data[self.offset + b * self.stride_b + t * self.stride_t + d].to_f32())
    }
    /// (mean, mean of |h|) over the pooled positions of row b, in f64.
    fn pool64(&self, mask: Option<&[u8]>, b: usize) -> (Vec<f64>, Vec<f64>) {
        let set: Vec<usize> = (0..self.seq)
            .filter(|&t| mask.is_none_or(|m| m[b * self.seq + t] != 0))
            .collect();
        let c = set.len().max(1) as f64;
        let mut p = vec![0.0; self.dim];
        let mut q = vec![0.0; self.dim];
        for &t in &set {
            for d in 0..self.dim {
                let x = self.at(b, t, d);
                p[d] += x;
                q[d] += x.abs();
            }
        }
        if set.is_empty() {
            return (p, q);
        }
        (
            p.iter().map(|x| x / c).collect(),
            q.iter().map(|x| x / c).collect(),
        )
    }
}

/// Hidden states `[batch, seq, dim]` stored as a layer slice of
/// `[batch, seq, layers, dim]` (stride_t = layers·dim) starting at `offset`
/// elements (an odd offset misaligns every row for the vector loads).
fn make_batch<T: Element>(
    values: impl FnMut() -> f32,
    batch: usize,
    seq: usize,
    dim: usize,
    layers: usize,
    offset: usize,
) -> Batch<T> {
    let mut values = values;
    let (stride_t, stride_b) = (layers * dim, seq * layers * dim);
    let len = offset + batch * stride_b;
    let data: Vec<T> = (0..len).map(|_| T::from_f32(values())).collect();
    Batch {
        data,
        batch,
        seq,
        dim,
        stride_b,
        stride_t,
        offset: offset + (layers - 1) * dim, // the last layer
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// F.cosine_similarity with per-norm clamp and the [-1, 1] clamp, in f64.
fn cos64(a: &[f64], b: &[f64], eps: f64) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    (dot / (norm(a).max(eps) * norm(b).max(eps))).clamp(-1.0, 1.0)
}

fn rho(p: &[f64], q: &[f64]) -> f64 {
    let np = norm(p);
    if np == 0.0 { 0.0 } else { norm(q) / np }
}

/// A mask with gaps: random bits, with row 0 fully set and (when there are
/// at least 3 rows) row 2 empty.
fn gappy_mask(r: &mut impl Rng, batch: usize, seq: usize) -> Vec<u8> {
    let mut m: Vec<u8> = (0..batch * seq)
        .map(|_| {
            if r.random_bool(0.6) {
                r.random_range(1..=255)
            } else {
                0
            }
        })
        .collect();
    m[..seq].fill(1);
    if batch >= 3 {
        m[2 * seq..3 * seq].fill(0);
    }
    m
}

/// Run the fused pair op on every host device and hold each cosine to the
/// derived bound; pooled vectors must agree bit for bit between devices.
fn check_pairs<T: Element>(
    label: &str,
    a: &Batch<T>,
    ma: Option<&[u8]>,
    b: &Batch<T>,
    mb: Option<&[u8]>,
) {
    let opts = PairOptions {
        eps: COSINE_EPS,
        keep_pooled: true,
    };
    let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
    for dev in host_devices() {
        let r = pooled_cosine(dev, &a.view(), ma, &b.view(), mb, opts)
            .unwrap_or_else(|e| panic!("{label} {dev}: {e}"));
        assert_eq!(r.cos.len(), a.batch);
        for i in 0..a.batch {
            let (pa, qa) = a.pool64(ma, i);
            let (pb, qb) = b.pool64(mb, i);
            let want = cos64(&pa, &pb, f64::from(COSINE_EPS));
            let tol = cos_tol(a.seq.max(b.seq), a.dim, rho(&pa, &qa), rho(&pb, &qb));
            let got = f64::from(r.cos[i]);
            assert!(
                (got - want).abs() <= tol,
                "{label} {dev} {}: pair {i}: got {got}, want {want}, |diff| {:e} > tol {tol:e}",
                T::DTYPE,
                (got - want).abs()
            );
            // Pooled values against f64: γ_{S+1}·q per element.
            let kept = r.pooled_a.as_ref().expect("asked for pooled a");
            for d in 0..a.dim {
                let e = (f64::from(kept[i * a.dim + d]) - pa[d]).abs();
                assert!(
                    e <= gamma(a.seq + 1) * qa[d],
                    "{label} {dev}: pooled a[{i}][{d}] off by {e:e}"
                );
            }
        }
        let pooled = (r.pooled_a.unwrap(), r.pooled_b.unwrap());
        match &first {
            None => first = Some(pooled),
            Some(f) => {
                let same =
                    |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(
                    same(&f.0, &pooled.0) && same(&f.1, &pooled.1),
                    "{label} {dev}: pooled vectors differ from cpu"
                );
            }
        }
    }
}

fn random_pairs<T: Element>(seed: u64) {
    // (batch, seq, dim, layers, offset): D = 1, tails (D not a multiple of
    // the 8-element chunk), the vector path (D multiple of 8, aligned
    // offsets), misaligned rows, more pairs than simulated blocks (grid
    // stride), and D = 8192.
    let shapes = [
        (5, 3, 1, 1, 0),
        (13, 7, 100, 1, 0),
        (11, 4, 264, 2, 0),
        (9, 4, 264, 3, 1),
        (3, 2, 8192, 1, 0),
    ];
    let mut r = rng(seed);
    for &(batch, seq, dim, layers, offset) in &shapes {
        let a = make_batch::<T>(
            || r.random_range(-1.0f32..1.0),
            batch,
            seq,
            dim,
            layers,
            offset,
        );
        let b = make_batch::<T>(
            || r.random_range(-1.0f32..1.0),
            batch,
            seq + 1,
            dim,
            layers,
            0,
        );
        let ma = gappy_mask(&mut r, batch, seq);
        let mb = gappy_mask(&mut r, batch, seq + 1);
        let label = format!("[{batch},{seq},{dim}] layers {layers} offset {offset}");
        check_pairs(&label, &a, Some(&ma), &b, Some(&mb));
        check_pairs(&format!("{label} no masks"), &a, None, &b, None);
    }
}

#[test]
fn fused_pairs_match_the_f64_reference_f32() {
    random_pairs::<f32>(1);
}

#[test]
fn fused_pairs_match_the_f64_reference_bf16() {
    random_pairs::<bf16>(2);
}

#[test]
fn fused_pairs_match_the_f64_reference_f16() {
    random_pairs::<f16>(3);
}

#[test]
fn empty_mask_rows_pool_to_zero_and_give_cosine_zero() {
    let mut r = rng(4);
    let a = make_batch::<f32>(|| r.random_range(-1.0f32..1.0), 4, 3, 24, 1, 0);
    let b = make_batch::<f32>(|| r.random_range(-1.0f32..1.0), 4, 3, 24, 1, 0);
    let mut mask = vec![1u8; 12];
    mask[3..6].fill(0); // row 1 empty
    for dev in host_devices() {
        let p = masked_mean_pool(dev, &a.view(), Some(&mask)).unwrap();
        assert!(
            p[24..48].iter().all(|&x| x == 0.0),
            "{dev}: empty row not zero"
        );
        let n = pool_normalize(dev, &a.view(), Some(&mask), NORMALIZE_EPS).unwrap();
        assert!(
            n[24..48].iter().all(|&x| x == 0.0),
            "{dev}: normalised empty row not zero"
        );
        let c = pooled_cosine(
            dev,
            &a.view(),
            Some(&mask),
            &b.view(),
            None,
            PairOptions::default(),
        )
        .unwrap();
        assert_eq!(c.cos[1], 0.0, "{dev}");
        assert!(c.cos[0] != 0.0, "{dev}");
    }
}

/// Integer data with power-of-two counts: every pooled value, product and
/// sum is exact in f32, so only the epilogue rounds (≤ 5u relative).
fn exact_case<T: Element>(seed: u64) {
    let mut r = rng(seed);
    let (batch, seq, dim) = (10, 4, 136);
    let a = make_batch::<T>(|| r.random_range(-4i32..=4) as f32, batch, seq, dim, 1, 0);
    let b = make_batch::<T>(|| r.random_range(-4i32..=4) as f32, batch, seq, dim, 1, 0);
    // 1, 2 or 4 set positions per row.
    let mut mask = vec![0u8; batch * seq];
    for i in 0..batch {
        let c = [1, 2, 4][i % 3];
        mask[i * seq..i * seq + c].fill(1);
    }
    for dev in host_devices() {
        let got = pooled_cosine(
            dev,
            &a.view(),
            Some(&mask),
            &b.view(),
            Some(&mask),
            PairOptions::default(),
        )
        .unwrap()
        .cos;
        for i in 0..batch {
            let want = cos64(
                &a.pool64(Some(&mask), i).0,
                &b.pool64(Some(&mask), i).0,
                1e-8,
            );
            let g = f64::from(got[i]);
            assert!(
                (g - want).abs() <= 5.0 * U * want.abs().max(U),
                "{dev} {}: pair {i}: {g} vs {want}",
                T::DTYPE
            );
        }
    }
}

#[test]
fn exact_integer_data_rounds_only_in_the_epilogue() {
    exact_case::<f32>(5);
    exact_case::<bf16>(6);
    exact_case::<f16>(7);
}

#[test]
fn special_vectors_zero_parallel_opposite_orthogonal_near_parallel() {
    let dim = 40;
    let base: Vec<f32> = (0..dim)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
        .collect();
    let mut rows_a: Vec<f32> = Vec::new();
    let mut rows_b: Vec<f32> = Vec::new();
    let mut push = |a: &[f32], b: &[f32]| {
        rows_a.extend_from_slice(a);
        rows_b.extend_from_slice(b);
    };
    let zero = vec![0.0f32; dim];
    push(&zero, &base); // zero vector: 0
    push(&zero, &zero); // both zero: 0
    push(&base, &base.iter().map(|x| 3.0 * x).collect::<Vec<_>>()); // parallel: 1
    push(&base, &base.iter().map(|x| -0.5 * x).collect::<Vec<_>>()); // opposite: -1
    let mut e0 = vec![0.0f32; dim];
    e0[0] = 2.0;
    let mut e1 = vec![0.0f32; dim];
    e1[1] = 5.0;
    push(&e0, &e1); // orthogonal: exactly 0
    let mut near = base.clone();
    near[3] += 1e-3;
    push(&base, &near); // near parallel
    let tiny: Vec<f32> = base.iter().map(|x| x * 1e-20).collect();
    push(&tiny, &base); // below the eps clamp
    let n = rows_a.len() / dim;
    let ha = Hidden::rows(&rows_a, n, dim);
    let hb = Hidden::rows(&rows_b, n, dim);
    for dev in host_devices() {
        let c = cosine_pairs(dev, &ha, &hb).unwrap();
        let tol = cos_tol(1, dim, 1.0, 1.0);
        assert_eq!(c[0], 0.0, "{dev}: zero vector");
        assert_eq!(c[1], 0.0, "{dev}: two zero vectors");
        assert!(
            (f64::from(c[2]) - 1.0).abs() <= tol && c[2] <= 1.0,
            "{dev}: parallel {}",
            c[2]
        );
        assert!(
            (f64::from(c[3]) + 1.0).abs() <= tol && c[3] >= -1.0,
            "{dev}: opposite {}",
            c[3]
        );
        assert_eq!(c[4], 0.0, "{dev}: orthogonal");
        for i in 5..n {
            let a64: Vec<f64> = rows_a[i * dim..(i + 1) * dim]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let b64: Vec<f64> = rows_b[i * dim..(i + 1) * dim]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let want = cos64(&a64, &b64, 1e-8);
            assert!(
                (f64::from(c[i]) - want).abs() <= tol,
                "{dev}: row {i}: {} vs {want}",
                c[i]
            );
        }
    }
}

#[test]
fn huge_magnitudes_take_the_scaled_path_and_nan_propagates() {
    let dim = 300;
    let mut r = rng(8);
    // Elements ~1e30: squares overflow f32, the pooled values do not.
    let mut a: Vec<f32> = (0..3 * dim)
        .map(|_| r.random_range(-1.0f32..1.0) * 1e30)
        .collect();
    let b: Vec<f32> = (0..3 * dim)
        .map(|i| {
            if i < dim {
                r.random_range(-1.0f32..1.0)
            } else {
                r.random_range(-1.0f32..1.0) * 3e37
            }
        })
        .collect();
    a[2 * dim + 5] = f32::NAN;
    let (ha, hb) = (Hidden::rows(&a, 3, dim), Hidden::rows(&b, 3, dim));
    let want: Vec<f64> = (0..2)
        .map(|i| {
            let x: Vec<f64> = a[i * dim..(i + 1) * dim]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let y: Vec<f64> = b[i * dim..(i + 1) * dim]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            cos64(&x, &y, 1e-8)
        })
        .collect();
    let tol = cos_tol(1, dim, 1.0, 1.0);
    for dev in host_devices() {
        let c = cosine_pairs(dev, &ha, &hb).unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(c[i]) - want[i]).abs() <= tol,
                "{dev}: huge pair {i}: {} vs {}",
                c[i],
                want[i]
            );
        }
        assert!(
            c[2].is_nan(),
            "{dev}: NaN input must give NaN, got {}",
            c[2]
        );
        // Normalising huge rows: unit length, right direction.
        let nrm = l2_normalize(dev, &ha).unwrap();
        let len: f64 = nrm[..dim]
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        assert!(
            (len - 1.0).abs() <= 2.0 * gamma(dim) + 8.0 * U,
            "{dev}: normalised length {len}"
        );
        let m = cosine_matrix(
            dev,
            &Hidden::rows(&a, 2, dim),
            &Hidden::rows(&b, 2, dim),
            COSINE_EPS,
        )
        .unwrap();
        assert!(
            (f64::from(m[0]) - want[0]).abs() <= tol,
            "{dev}: matrix huge"
        );
        assert!(
            (f64::from(m[3]) - want[1]).abs() <= tol,
            "{dev}: matrix huge"
        );
    }
}

fn pool_and_normalize<T: Element>(seed: u64) {
    let mut r = rng(seed);
    for &(batch, seq, dim, layers, offset) in
        &[(7, 5, 1, 1, 0), (10, 6, 77, 2, 3), (9, 3, 512, 1, 0)]
    {
        let h = make_batch::<T>(
            || r.random_range(-2.0f32..2.0),
            batch,
            seq,
            dim,
            layers,
            offset,
        );
        let mask = gappy_mask(&mut r, batch, seq);
        let mut outs = Vec::new();
        for dev in host_devices() {
            let p = masked_mean_pool(dev, &h.view(), Some(&mask)).unwrap();
            let n = pool_normalize(dev, &h.view(), Some(&mask), NORMALIZE_EPS).unwrap();
            for b in 0..batch {
                let (p64, q64) = h.pool64(Some(&mask), b);
                let nn = norm(&p64);
                let rho_b = rho(&p64, &q64);
                for d in 0..dim {
                    let e = (f64::from(p[b * dim + d]) - p64[d]).abs();
                    assert!(
                        e <= gamma(seq + 1) * q64[d],
                        "{dev} {}: pool [{b}][{d}] off by {e:e}",
                        T::DTYPE
                    );
                    // Normalised: a direction error of 1.6·γ·ρ plus the
                    // norm's relative error γ_D/2 + 3u, times |unit| ≤ 1.
                    let want = p64[d] / nn.max(1e-12);
                    let tol = 1.6 * gamma(seq + 1) * rho_b + gamma(dim) + 8.0 * U;
                    let e = (f64::from(n[b * dim + d]) - want).abs();
                    assert!(
                        e <= tol,
                        "{dev} {}: normalised [{b}][{d}] off by {e:e} > {tol:e}",
                        T::DTYPE
                    );
                }
            }
            outs.push(p);
        }
        for o in &outs[1..] {
            assert!(
                o.iter()
                    .zip(&outs[0])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "pooled vectors differ between devices"
            );
        }
    }
}

#[test]
fn pooling_and_normalisation_match_the_reference() {
    pool_and_normalize::<f32>(9);
    pool_and_normalize::<bf16>(10);
    pool_and_normalize::<f16>(11);
}

fn matrix_case<T: Element>(seed: u64) {
    let mut r = rng(seed);
    // Tails in every direction of the 64x64x16 tiling; D = 1; strided rows.
    for &(n, m, dim, ld) in &[(70, 67, 40, 40), (5, 3, 1, 1), (9, 66, 33, 50)] {
        let a: Vec<T> = (0..n * ld)
            .map(|_| T::from_f32(r.random_range(-1.0f32..1.0)))
            .collect();
        let mut b: Vec<T> = (0..m * dim)
            .map(|_| T::from_f32(r.random_range(-1.0f32..1.0)))
            .collect();
        b[..dim].fill(T::from_f32(0.0)); // a zero row: its column is 0
        let (ha, hb) = (
            Hidden::rows_strided(&a, n, dim, ld),
            Hidden::rows(&b, m, dim),
        );
        let tol = cos_tol(1, dim, 0.0, 0.0);
        let mut first: Option<Vec<f32>> = None;
        for dev in host_devices() {
            let c = cosine_matrix(dev, &ha, &hb, COSINE_EPS).unwrap();
            for i in 0..n {
                let x: Vec<f64> = (0..dim)
                    .map(|k| f64::from(a[i * ld + k].to_f32()))
                    .collect();
                for j in 0..m {
                    let y: Vec<f64> = (0..dim)
                        .map(|k| f64::from(b[j * dim + k].to_f32()))
                        .collect();
                    let want = cos64(&x, &y, 1e-8);
                    let got = f64::from(c[i * m + j]);
                    assert!(
                        (got - want).abs() <= tol,
                        "{dev} {} [{n}x{m}x{dim}] ({i},{j}): {got} vs {want}",
                        T::DTYPE
                    );
                }
            }
            match &first {
                None => first = Some(c),
                Some(f) => {
                    let worst = f
                        .iter()
                        .zip(&c)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0f32, f32::max);
                    assert!(
                        f64::from(worst) <= 2.0 * tol,
                        "{dev}: differs from cpu by {worst}"
                    );
                }
            }
        }
    }
}

#[test]
fn cosine_matrix_matches_the_reference() {
    matrix_case::<f32>(12);
    matrix_case::<bf16>(13);
    matrix_case::<f16>(14);
}

#[test]
fn vector_pairs_equal_the_fused_op_on_single_positions() {
    let mut r = rng(15);
    let (n, dim) = (17, 72);
    let a: Vec<bf16> = (0..n * dim)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
        .collect();
    let b: Vec<bf16> = (0..n * dim)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)))
        .collect();
    for dev in host_devices() {
        let c = cosine_pairs(dev, &Hidden::rows(&a, n, dim), &Hidden::rows(&b, n, dim)).unwrap();
        let f = pooled_cosine(
            dev,
            &Hidden::contiguous(&a, n, 1, dim),
            None,
            &Hidden::contiguous(&b, n, 1, dim),
            None,
            PairOptions::default(),
        )
        .unwrap();
        assert_eq!(c, f.cos, "{dev}");
        assert!(
            f.pooled_a.is_none() && f.pooled_b.is_none(),
            "{dev}: pooled written unasked"
        );
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_values() {
    let data = vec![0.5f32; 2 * 3 * 4];
    let h = Hidden::contiguous(&data, 2, 3, 4);
    let short = Hidden::contiguous(&data[..20], 2, 3, 4);
    let other = Hidden::contiguous(&data, 3, 2, 4);
    let narrow = Hidden::contiguous(&data, 2, 4, 3);
    let msg = |r: Result<Vec<f32>, Error>| r.expect_err("must fail").to_string();
    for dev in [Device::Cpu, Device::Sim, Device::Cuda] {
        let e = msg(masked_mean_pool(dev, &short, None));
        assert!(
            e.contains("at least 24 elements") && e.contains("20 elements"),
            "{dev}: {e}"
        );
        let e = msg(masked_mean_pool(dev, &h, Some(&[1u8; 5])));
        assert!(e.contains("6 bytes") && e.contains("5 bytes"), "{dev}: {e}");
        let e = msg(masked_mean_pool(
            dev,
            &Hidden::contiguous(&data, 0, 3, 4),
            None,
        ));
        assert!(e.contains("[0, 3, 4]"), "{dev}: {e}");
        let e = msg(pool_normalize(dev, &h, None, 0.0));
        assert!(e.contains("eps 0"), "{dev}: {e}");
        let e = pooled_cosine(dev, &h, None, &other, None, PairOptions::default())
            .expect_err("batch mismatch")
            .to_string();
        assert!(
            e.contains("rows of b") && e.contains("expected 2, got 3"),
            "{dev}: {e}"
        );
        let e = pooled_cosine(dev, &h, None, &narrow, None, PairOptions::default())
            .expect_err("dim mismatch")
            .to_string();
        assert!(
            e.contains("width of b") && e.contains("expected 4, got 3"),
            "{dev}: {e}"
        );
        let e = msg(cosine_pairs(dev, &h, &h));
        assert!(e.contains("seq 3"), "{dev}: {e}");
        let e = msg(cosine_matrix(dev, &h, &h, COSINE_EPS));
        assert!(e.contains("seq 3"), "{dev}: {e}");
        let e = msg(l2_normalize(dev, &h));
        assert!(e.contains("seq 3"), "{dev}: {e}");
        let e = msg(cosine_matrix(
            dev,
            &Hidden::rows(&data, 6, 4),
            &Hidden::rows(&data, 4, 6),
            f32::NAN,
        ));
        assert!(e.contains("width of b"), "{dev}: {e}");
        let e = msg(cosine_matrix(
            dev,
            &Hidden::rows(&data, 6, 4),
            &Hidden::rows(&data, 6, 4),
            f32::NAN,
        ));
        assert!(e.contains("eps NaN"), "{dev}: {e}");
        let e = msg(masked_mean_pool(
            dev,
            &Hidden::strided(&data, 2, 3, 4, 100, 4),
            None,
        ));
        assert!(
            e.contains("strides (100, 4, 1)") && e.contains("at least 112"),
            "{dev}: {e}"
        );
    }
}
