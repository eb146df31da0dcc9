//! The candle ops: forward passes equal the plain ops, and backward passes
//! equal closed-form gradients computed here in f64, which in turn equal
//! central finite differences of an f64 forward.
//!
//! Tolerances:
//! * closed form vs finite differences, both f64: step δ = 1e-5 gives a
//!   truncation error of order δ²·|f'''| ≈ 1e-10 for these O(1) functions
//!   and a rounding error of order 2^-53/δ ≈ 1e-11; held to 1e-7 of the
//!   gradient's scale.
//! * candle (f32) vs closed form (f64): every gradient element is a product
//!   of at most four factors (mask weight, upstream weight, 1/‖p‖, and a
//!   difference of unit-vector components), each with the relative error of
//!   the forward's bound `ε = 1.6·γ_{S+1}·(ρ_a + ρ_b) + 2γ_D + 8u`
//!   (tests/cosine.rs); the difference is taken of components of size ≤ 1, so
//!   its absolute error is ≤ 2ε. Held to 8ε times the largest gradient
//!   magnitude.

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tli_kernels::cosine::{COSINE_EPS, Hidden, PairOptions};
use tli_kernels::{candle_ops::cosine as cops, ops::cosine as ops};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

fn randn(r: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// f64 masked mean pool of `[B, T, D]`.
fn pool64(h: &[f64], mask: &[u8], b: usize, t: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * d];
    for i in 0..b {
        let c = (0..t).filter(|&s| mask[i * t + s] != 0).count();
        for s in 0..t {
            if mask[i * t + s] != 0 {
                for k in 0..d {
                    out[i * d + k] += h[(i * t + s) * d + k] / c as f64;
                }
            }
        }
    }
    out
}

fn cos_rows64(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    a.chunks(d)
        .zip(b.chunks(d))
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let nx = x.iter().map(|p| p * p).sum::<f64>().sqrt().max(1e-8);
            let ny = y.iter().map(|p| p * p).sum::<f64>().sqrt().max(1e-8);
            dot / (nx * ny)
        })
        .collect()
}

/// Central differences of `f` at `x`.
fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5;
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(&x);
            x[i] = x0 - h;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn assert_close(label: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{label}[{i}]: {g} vs {w} (tol {tol:e})"
        );
    }
}

fn to64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Closed-form gradient of L = Σ w_i cos(p_a,i, p_b,i) w.r.t. p_a (swap the
/// arguments for p_b): w_i (û_b − cos·û_a) / ‖p_a‖ for ‖p_a‖ > eps.
fn dcos_dpa(pa: &[f64], pb: &[f64], w: &[f64], d: usize) -> Vec<f64> {
    let mut g = vec![0.0; pa.len()];
    for i in 0..w.len() {
        let (x, y) = (&pa[i * d..(i + 1) * d], &pb[i * d..(i + 1) * d]);
        let nx = x.iter().map(|p| p * p).sum::<f64>().sqrt();
        let ny = y.iter().map(|p| p * p).sum::<f64>().sqrt();
        if nx <= 1e-8 || ny == 0.0 {
            continue; // an empty row: pooled to 0, the test's weights there are 0
        }
        let c: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>() / (nx * ny);
        for k in 0..d {
            g[i * d + k] = w[i] * (y[k] / ny - c * x[k] / nx) / nx;
        }
    }
    g
}

/// Pool backward in f64: m/c · g.
fn dpool(gp: &[f64], mask: &[u8], b: usize, t: usize, d: usize) -> Vec<f64> {
    let mut g = vec![0.0; b * t * d];
    for i in 0..b {
        let c = (0..t).filter(|&s| mask[i * t + s] != 0).count();
        for s in 0..t {
            if mask[i * t + s] != 0 {
                for k in 0..d {
                    g[(i * t + s) * d + k] = gp[i * d + k] / c as f64;
                }
            }
        }
    }
    g
}

#[test]
fn forward_passes_equal_the_plain_ops() {
    let mut r = ChaCha8Rng::seed_from_u64(31);
    let (b, t, d) = (6, 5, 40);
    let ha = randn(&mut r, b * t * d);
    let hb = randn(&mut r, b * t * d);
    let mask: Vec<u8> = (0..b * t)
        .map(|i| u8::from(i % t == 0 || r.random_bool(0.5)))
        .collect();
    let dev = Device::Cpu;
    let ta = Tensor::from_slice(&ha, (b, t, d), &dev).unwrap();
    let tb = Tensor::from_slice(&hb, (b, t, d), &dev).unwrap();
    let tm = Tensor::from_slice(&mask, (b, t), &dev).unwrap();
    let (va, vb) = (
        Hidden::contiguous(&ha, b, t, d),
        Hidden::contiguous(&hb, b, t, d),
    );
    let want = ops::pooled_cosine(
        tli_kernels::Device::Cpu,
        &va,
        Some(&mask),
        &vb,
        Some(&mask),
        PairOptions::default(),
    )
    .unwrap()
    .cos;
    let got = cops::pooled_cosine(&ta, &tm, &tb, &tm)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
    let pooled = cops::masked_mean_pool(&ta, &tm).unwrap();
    assert_eq!(
        pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ops::masked_mean_pool(tli_kernels::Device::Cpu, &va, Some(&mask)).unwrap()
    );
    let m = cops::cosine_matrix(&pooled, &pooled).unwrap();
    assert_eq!(m.dims(), &[b, b]);
    let pv = pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want_m = ops::cosine_matrix(
        tli_kernels::Device::Cpu,
        &Hidden::rows(&pv, b, d),
        &Hidden::rows(&pv, b, d),
        COSINE_EPS,
    )
    .unwrap();
    assert_eq!(m.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want_m);
    // A layer slice: [B, T, L, D] narrowed to one layer is strided.
    let layers = Tensor::from_slice(&randn(&mut r, b * t * 3 * d), (b, t, 3, d), &dev).unwrap();
    let slice = layers.narrow(2, 1, 1).unwrap().squeeze(2).unwrap();
    let via_op = cops::masked_mean_pool(&slice, &tm).unwrap();
    let via_copy = cops::masked_mean_pool(&slice.contiguous().unwrap(), &tm).unwrap();
    assert_eq!(to64(&via_op), to64(&via_copy));
    // Mismatched dtypes are an error, not a panic.
    let e = cops::cosine_pairs(&pooled, &pooled.to_dtype(DType::BF16).unwrap()).unwrap_err();
    assert!(
        e.to_string().contains("F32") && e.to_string().contains("BF16"),
        "{e}"
    );
}

#[test]
fn pooled_cosine_backward_matches_closed_form_and_finite_differences() {
    let mut r = ChaCha8Rng::seed_from_u64(32);
    let (b, t, d) = (4, 5, 7);
    let ha = randn(&mut r, b * t * d);
    let hb = randn(&mut r, b * t * d);
    let mut mask: Vec<u8> = (0..b * t)
        .map(|i| u8::from(i % t == 0 || r.random_bool(0.5)))
        .collect();
    mask[3 * t..4 * t].fill(0); // row 3 empty: zero gradient
    let w: Vec<f64> = (0..b)
        .map(|i| {
            if i == 3 {
                0.0
            } else {
                r.random_range(-1.0..1.0)
            }
        })
        .collect();

    // f64: the forward, its finite differences, the closed form.
    let (a64, b64): (Vec<f64>, Vec<f64>) = (
        ha.iter().map(|&x| f64::from(x)).collect(),
        hb.iter().map(|&x| f64::from(x)).collect(),
    );
    let loss = |x: &[f64], y: &[f64]| -> f64 {
        let c = cos_rows64(&pool64(x, &mask, b, t, d), &pool64(y, &mask, b, t, d), d);
        c.iter().zip(&w).map(|(c, w)| c * w).sum()
    };
    let fd_a = fd_grad(&a64, |x| loss(x, &b64));
    let (pa, pb) = (pool64(&a64, &mask, b, t, d), pool64(&b64, &mask, b, t, d));
    let closed_a = dpool(&dcos_dpa(&pa, &pb, &w, d), &mask, b, t, d);
    let closed_b = dpool(&dcos_dpa(&pb, &pa, &w, d), &mask, b, t, d);
    let scale = max_abs(&closed_a).max(max_abs(&closed_b));
    assert_close(
        "closed form vs finite differences",
        &closed_a,
        &fd_a,
        1e-7 * scale,
    );

    // candle.
    let dev = Device::Cpu;
    let va = Var::from_tensor(&Tensor::from_slice(&ha, (b, t, d), &dev).unwrap()).unwrap();
    let vb = Var::from_tensor(&Tensor::from_slice(&hb, (b, t, d), &dev).unwrap()).unwrap();
    let tm = Tensor::from_slice(&mask, (b, t), &dev).unwrap();
    let tw = Tensor::from_slice(&w.iter().map(|&x| x as f32).collect::<Vec<_>>(), b, &dev).unwrap();
    let c = cops::pooled_cosine(va.as_tensor(), &tm, vb.as_tensor(), &tm).unwrap();
    let grads = (c * tw).unwrap().sum_all().unwrap().backward().unwrap();
    let ga = to64(grads.get(va.as_tensor()).expect("grad a"));
    let gb = to64(grads.get(vb.as_tensor()).expect("grad b"));
    let eps = 1.6 * gamma(t + 1) * 2.0 * 4.0 * (t as f64).sqrt() + 2.0 * gamma(d) + 8.0 * U;
    assert_close("candle d/da", &ga, &closed_a, 8.0 * eps * scale);
    assert_close("candle d/db", &gb, &closed_b, 8.0 * eps * scale);
    assert!(
        ga[3 * t * d..].iter().all(|&x| x == 0.0),
        "empty row has gradient"
    );
}

#[test]
fn normalize_pairs_and_matrix_backward_match_finite_differences() {
    let mut r = ChaCha8Rng::seed_from_u64(33);
    let (n, m, d) = (3, 4, 6);
    let a = randn(&mut r, n * d);
    let b = randn(&mut r, m * d);
    let a64: Vec<f64> = a.iter().map(|&x| f64::from(x)).collect();
    let b64: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
    let wn: Vec<f64> = (0..n * d).map(|_| r.random_range(-1.0..1.0)).collect();
    let wm: Vec<f64> = (0..n * m).map(|_| r.random_range(-1.0..1.0)).collect();
    let dev = Device::Cpu;
    let va = Var::from_tensor(&Tensor::from_slice(&a, (n, d), &dev).unwrap()).unwrap();
    let vb = Var::from_tensor(&Tensor::from_slice(&b, (m, d), &dev).unwrap()).unwrap();
    let t32 = |v: &[f64], s: (usize, usize)| {
        Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>(), s, &dev).unwrap()
    };
    let tol = |scale: f64| 8.0 * (2.0 * gamma(d) + 8.0 * U) * scale;

    // l2_normalize: L = Σ w ⊙ x/‖x‖.
    let norm_loss = |x: &[f64]| -> f64 {
        x.chunks(d)
            .zip(wn.chunks(d))
            .map(|(r, w)| {
                let nr = r.iter().map(|p| p * p).sum::<f64>().sqrt().max(1e-12);
                r.iter().zip(w).map(|(p, q)| p / nr * q).sum::<f64>()
            })
            .sum()
    };
    let fd = fd_grad(&a64, norm_loss);
    let y = cops::l2_normalize(va.as_tensor()).unwrap();
    let g = (y * t32(&wn, (n, d)))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "l2_normalize",
        &to64(g.get(va.as_tensor()).unwrap()),
        &fd,
        tol(max_abs(&fd)),
    );

    // cosine_pairs of a with the first n rows of b.
    let bn = &b64[..n * d];
    let wp = &wn[..n];
    let fd = fd_grad(&a64, |x| {
        cos_rows64(x, bn, d)
            .iter()
            .zip(wp)
            .map(|(c, w)| c * w)
            .sum()
    });
    let tb = vb.as_tensor().narrow(0, 0, n).unwrap();
    let c = cops::cosine_pairs(va.as_tensor(), &tb).unwrap();
    let tw =
        Tensor::from_slice(&wp.iter().map(|&x| x as f32).collect::<Vec<_>>(), n, &dev).unwrap();
    let g = (c * tw).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(
        "cosine_pairs",
        &to64(g.get(va.as_tensor()).unwrap()),
        &fd,
        tol(max_abs(&fd)),
    );

    // cosine_matrix: L = Σ W ⊙ C, with respect to both sides.
    let mat_loss = |x: &[f64], y: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..n {
            for j in 0..m {
                s += wm[i * m + j]
                    * cos_rows64(&x[i * d..(i + 1) * d], &y[j * d..(j + 1) * d], d)[0];
            }
        }
        s
    };
    let fd_a = fd_grad(&a64, |x| mat_loss(x, &b64));
    let fd_b = fd_grad(&b64, |y| mat_loss(&a64, y));
    let cm = cops::cosine_matrix(va.as_tensor(), vb.as_tensor()).unwrap();
    let g = (cm * t32(&wm, (n, m)))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "cosine_matrix d/da",
        &to64(g.get(va.as_tensor()).unwrap()),
        &fd_a,
        tol(max_abs(&fd_a)),
    );
    assert_close(
        "cosine_matrix d/db",
        &to64(g.get(vb.as_tensor()).unwrap()),
        &fd_b,
        tol(max_abs(&fd_b)),
    );
}

#[test]
fn bf16_inputs_get_bf16_gradients() {
    let mut r = ChaCha8Rng::seed_from_u64(34);
    let (b, t, d) = (3, 4, 16);
    let dev = Device::Cpu;
    let h = Tensor::from_slice(&randn(&mut r, b * t * d), (b, t, d), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let v = Var::from_tensor(&h).unwrap();
    let mask = Tensor::from_slice(&[1u32, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1], (b, t), &dev).unwrap();
    let p = cops::masked_mean_pool(v.as_tensor(), &mask).unwrap();
    assert_eq!(p.dtype(), DType::F32);
    let g = p.sum_all().unwrap().backward().unwrap();
    let gh = g.get(v.as_tensor()).unwrap();
    assert_eq!(gh.dtype(), DType::BF16);
    // d(Σ p)/dh = m/c: 1/3 for row 0's set positions (rounded to bf16), 1 for row 1, 1/4 for row 2.
    let gv = to64(gh);
    let third = f64::from(half::bf16::from_f32(1.0 / 3.0).to_f32());
    assert_eq!(gv[0], third);
    assert_eq!(gv[2 * d], 0.0);
    assert_eq!(gv[4 * d], 1.0);
    assert_eq!(gv[5 * d], 0.0);
    assert_eq!(gv[8 * d], 0.25);
}
