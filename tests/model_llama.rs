//! The Llama forward pass against an independent f64 implementation, batched
//! against one-at-a-time, early stopping, and the synthetic tokenizer.

mod common;
#[path = "common/fd.rs"]
mod fd;

use std::collections::HashMap;

use candle_core::{DType as CDType, Device as CDevice, Tensor};
use tli_kernels::model::synthetic::{self, random_weights, tiny_config};
use tli_kernels::model::{ForwardOptions, LlamaConfig, LoadOptions, RopeScaling, rope};

/// Weights of the synthetic model as f64 arrays by name.
fn weights_f64(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Vec<f64>> {
    random_weights(cfg, seed)
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data
                .as_chunks::<4>()
                .0
                .iter()
                .map(|c| f64::from(f32::from_le_bytes(*c)))
                .collect();
            (n, v)
        })
        .collect()
}

/// y[m][n] = Σ_k x[m][k] · w[n][k]
fn linear(x: &[Vec<f64>], w: &[f64], n: usize) -> Vec<Vec<f64>> {
    let k = x[0].len();
    x.iter()
        .map(|row| {
            (0..n)
                .map(|j| (0..k).map(|i| row[i] * w[j * k + i]).sum())
                .collect()
        })
        .collect()
}

fn rms(x: &[Vec<f64>], w: &[f64], eps: f64) -> Vec<Vec<f64>> {
    x.iter()
        .map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(|(v, g)| v * inv * g).collect()
        })
        .collect()
}

/// Inverse frequencies in f64, from the llama3 formula as written in the
/// Llama 3.1 reference (no f32 steps).
fn inv_freq_f64(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    (0..d / 2)
        .map(|i| {
            let f = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64);
            match cfg.rope_scaling {
                RopeScaling::Default => f,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    original_max_position_embeddings: old,
                } => {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < old / hi {
                        f
                    } else if wl > old / lo {
                        f / factor
                    } else {
                        let s = (old / wl - lo) / (hi - lo);
                        (1.0 - s) * f / factor + s * f
                    }
                }
            }
        })
        .collect()
}

/// Every hidden state of one unpadded sequence, in f64.
fn reference(cfg: &LlamaConfig, w: &HashMap<String, Vec<f64>>, ids: &[u32]) -> Vec<Vec<Vec<f64>>> {
    let (h, hd, nh, nkv) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    );
    let s = ids.len();
    let emb = &w["model.embed_tokens.weight"];
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| emb[t as usize * h..][..h].to_vec())
        .collect();
    let mut states = vec![x.clone()];
    let inv = inv_freq_f64(cfg);
    let rot = |v: &mut [f64], pos: usize| {
        let half = hd / 2;
        for i in 0..half {
            let (c, sn) = ((pos as f64 * inv[i]).cos(), (pos as f64 * inv[i]).sin());
            let (a, b) = (v[i], v[i + half]);
            v[i] = a * c - b * sn;
            v[i + half] = b * c + a * sn;
        }
    };
    for l in 0..cfg.num_hidden_layers {
        let p = |n: &str| &w[&format!("model.layers.{l}.{n}.weight")];
        let n1 = rms(&x, p("input_layernorm"), cfg.rms_norm_eps);
        let mut q = linear(&n1, p("self_attn.q_proj"), nh * hd);
        let mut k = linear(&n1, p("self_attn.k_proj"), nkv * hd);
        let v = linear(&n1, p("self_attn.v_proj"), nkv * hd);
        for t in 0..s {
            for hh in 0..nh {
                rot(&mut q[t][hh * hd..(hh + 1) * hd], t);
            }
            for hh in 0..nkv {
                rot(&mut k[t][hh * hd..(hh + 1) * hd], t);
            }
        }
        let mut attn = vec![vec![0.0; nh * hd]; s];
        for hh in 0..nh {
            let kv = hh / (nh / nkv);
            for i in 0..s {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| q[i][hh * hd + d] * k[j][kv * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    attn[i][hh * hd + d] = (0..=i).map(|j| e[j] / z * v[j][kv * hd + d]).sum();
                }
            }
        }
        let o = linear(&attn, p("self_attn.o_proj"), h);
        let a: Vec<Vec<f64>> = x
            .iter()
            .zip(&o)
            .map(|(r, o)| r.iter().zip(o).map(|(a, b)| a + b).collect())
            .collect();
        let n2 = rms(&a, p("post_attention_layernorm"), cfg.rms_norm_eps);
        let g = linear(&n2, p("mlp.gate_proj"), cfg.intermediate_size);
        let u = linear(&n2, p("mlp.up_proj"), cfg.intermediate_size);
        let gu: Vec<Vec<f64>> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| {
                g.iter()
                    .zip(u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect()
            })
            .collect();
        let dn = linear(&gu, p("mlp.down_proj"), h);
        x = a
            .iter()
            .zip(&dn)
            .map(|(r, o)| r.iter().zip(o).map(|(a, b)| a + b).collect())
            .collect();
        if l + 1 == cfg.num_hidden_layers {
            states.push(rms(&x, &w["model.norm.weight"], cfg.rms_norm_eps));
        } else {
            states.push(x.clone());
        }
    }
    states
}

fn to_f64(t: &Tensor) -> Vec<Vec<Vec<f64>>> {
    t.to_dtype(CDType::F64).unwrap().to_vec3::<f64>().unwrap()
}

const SEED: u64 = 7;

#[test]
fn f32_forward_matches_f64_reference() {
    let (model, tok) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let cfg = model.config.clone();
    let w = weights_f64(&cfg, SEED);
    let batch = tok
        .encode_batch(&[
            "maji ya kunywa",
            "water",
            "the children read a book in school today",
        ])
        .unwrap();
    let (ids, mask) = batch.tensors(&CDevice::Cpu).unwrap();
    let states = model
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    assert_eq!(states.len(), cfg.num_hidden_layers + 1);
    for (r, row_ids) in batch.ids.iter().enumerate() {
        let n = batch.lengths[r];
        let want = reference(&cfg, &w, &row_ids[..n]);
        for (idx, st) in states.iter().enumerate() {
            let got = &to_f64(st)[r];
            // Error bound, relative to the RMS of the reference state. An f32
            // dot product of K ≤ 128 terms errs by at most K·2⁻²⁴ ≈ 7.6e-6 of
            // Σ|aᵢbᵢ| (the worst case); independent roundings add like a
            // random walk, √K·2⁻²⁴ ≈ 7e-7. RMSNorm, softmax and SiLU are well
            // conditioned here (random N(0, 1/K) weights), and the residual
            // stream sums the errors of about 7 such steps per block over 4
            // blocks: √28·7e-7 ≈ 4e-6 typical. The bound, 2e-5, is 5x that;
            // the largest measured value is 1.7e-6.
            let scale = (want[idx].iter().flatten().map(|v| v * v).sum::<f64>()
                / (n * cfg.hidden_size) as f64)
                .sqrt();
            let mut worst = 0.0f64;
            for t in 0..n {
                for d in 0..cfg.hidden_size {
                    worst = worst.max((got[t][d] - want[idx][t][d]).abs() / scale);
                }
            }
            assert!(
                worst < 2e-5,
                "row {r} state {idx}: max error / rms = {worst:e}"
            );
        }
    }
}

#[test]
fn batched_equals_one_at_a_time_and_stops_early() {
    let (model, tok) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let texts = [
        "habari ya asubuhi",
        "fire",
        "the old man and the sea",
        "ng'ombe",
    ];
    let batch = tok.encode_batch(&texts).unwrap();
    let (ids, mask) = batch.tensors(&CDevice::Cpu).unwrap();
    let all = model
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let early = model
        .hidden_states(
            &ids,
            &mask,
            &ForwardOptions {
                up_to: Some(2),
                train_seed: None,
            },
        )
        .unwrap();
    assert_eq!(early.len(), 3);
    for i in 0..3 {
        assert_eq!(to_f64(&early[i]), to_f64(&all[i]), "state {i}");
    }
    for (r, text) in texts.iter().enumerate() {
        let one = tok.encode_batch(&[text]).unwrap();
        let (i1, m1) = one.tensors(&CDevice::Cpu).unwrap();
        let single = model
            .hidden_states(&i1, &m1, &ForwardOptions::default())
            .unwrap();
        let n = batch.lengths[r];
        for (idx, (s, b)) in single.iter().zip(&all).enumerate() {
            let (s, b) = (to_f64(s), to_f64(b));
            for t in 0..n {
                for d in 0..model.config.hidden_size {
                    // Padding changes only which masked keys (exact zeros
                    // after softmax) take part and the matmul blocking, so
                    // results agree to a few f32 ulps of the state.
                    let (x, y) = (s[0][t][d], b[r][t][d]);
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "text {r} state {idx} [{t},{d}]: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_forward_tracks_f32() {
    let (m32, tok) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let (m16, _) = synthetic::build(
        SEED,
        &LoadOptions {
            dtype: CDType::BF16,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let batch = tok
        .encode_batch(&["mwalimu na mwanafunzi", "teacher"])
        .unwrap();
    let (ids, mask) = batch.tensors(&CDevice::Cpu).unwrap();
    let a = m32
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    let b = m16
        .hidden_states(&ids, &mask, &ForwardOptions::default())
        .unwrap();
    for (idx, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(b.dtype(), CDType::BF16);
        let (a, b) = (to_f64(a), to_f64(b));
        let mut num = 0.0;
        let mut den = 0.0;
        for r in 0..2 {
            for t in 0..batch.lengths[r] {
                for d in 0..64 {
                    num += (a[r][t][d] - b[r][t][d]).powi(2);
                    den += a[r][t][d].powi(2);
                }
            }
        }
        // bf16 keeps 8 bits: each rounding errs by ≤ 2⁻⁹ ≈ 0.2 %; a few dozen
        // roundings per block accumulate like a random walk to ~1-2 %.
        let rel = (num / den).sqrt();
        assert!(rel < 0.05, "state {idx}: relative rms difference {rel}");
        if idx == 0 {
            assert!(
                rel < 2f64.powi(-8),
                "embeddings are only rounded once: {rel}"
            );
        }
    }
}

#[test]
fn rope_inv_freq_matches_f64_formula_and_covers_every_band() {
    let cfg = tiny_config(100, None, None);
    let got = rope::inv_freq(&cfg);
    let want = inv_freq_f64(&cfg);
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (f64::from(*g) - w).abs() <= 4.0 * f64::from(f32::EPSILON) * w,
            "{g} vs {w}"
        );
    }
    // Bands: kept (wavelength < 16), smoothed (16..=64), divided (> 64).
    let wl: Vec<f64> = want
        .iter()
        .map(|f| 2.0 * std::f64::consts::PI / f)
        .collect();
    assert!(wl.iter().any(|&w| w < 16.0));
    assert!(
        wl.iter()
            .any(|&w| (16.0..=64.0 * 8.0).contains(&w) && w > 16.0 && w < 64.0 * 8.0)
    );
    assert!(wl.iter().any(|&w| w > 64.0 * 8.0));
}

#[test]
fn forward_rejects_bad_inputs() {
    let (model, _) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    let dev = CDevice::Cpu;
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1]], &dev).unwrap();
    let e = model
        .hidden_states(
            &ids,
            &mask,
            &ForwardOptions {
                up_to: Some(9),
                train_seed: None,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("index 9") && e.contains("0..=4"), "{e}");
    let big = Tensor::new(&[[1u32, 100_000, 3]], &dev).unwrap();
    let e = model
        .hidden_states(&big, &mask, &ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("token id 100000 at [0, 1]"), "{e}");
    let zero = Tensor::new(&[[0u32, 0, 0]], &dev).unwrap();
    let e = model
        .hidden_states(&ids, &zero, &ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 0 of attention_mask has no tokens"), "{e}");
    let short = Tensor::new(&[[1u32, 1]], &dev).unwrap();
    let e = model
        .hidden_states(&ids, &short, &ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_mask"), "{e}");
    // Only two blocks loaded: index 2 works, 3 and the final index do not.
    let (two, tok) = synthetic::build(
        SEED,
        &LoadOptions {
            num_layers: Some(2),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let b = tok.encode_batch(&["kuku"]).unwrap();
    let (i, m) = b.tensors(&dev).unwrap();
    assert_eq!(
        two.hidden_states(
            &i,
            &m,
            &ForwardOptions {
                up_to: Some(2),
                train_seed: None
            }
        )
        .unwrap()
        .len(),
        3
    );
    let e = two
        .hidden_states(&i, &m, &ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 were loaded"), "{e}");
}

#[test]
fn synthetic_tokenizer_covers_both_languages() {
    let tok = synthetic::tokenizer().unwrap();
    let again = synthetic::tokenizer().unwrap();
    assert_eq!(
        tok.inner().to_string(false).unwrap(),
        again.inner().to_string(false).unwrap(),
        "deterministic"
    );
    let bos = tok.bos_id.unwrap();
    let eos = tok.eos_id.unwrap();
    assert_eq!(tok.pad_id, eos, "pad = EOS when there is no pad token");
    let batch = tok
        .encode_batch(&["maji", "water", "ng'ombe mkubwa", "😀 ünïcödé"])
        .unwrap();
    for r in 0..4 {
        assert_eq!(batch.ids[r][0], bos, "BOS first");
        assert!(batch.special_mask[r][0]);
        assert!(batch.lengths[r] >= 2);
        for t in 1..batch.lengths[r] {
            assert!(!batch.special_mask[r][t], "row {r} token {t}");
        }
        for t in batch.lengths[r]..batch.ids[r].len() {
            assert_eq!(batch.ids[r][t], eos);
            assert_eq!(batch.attention_mask[r][t], 0);
            assert!(batch.special_mask[r][t]);
        }
    }
    // Whole words are single tokens.
    assert_eq!(batch.lengths[0], 2);
    assert_eq!(batch.lengths[1], 2);
    let wm = batch.word_mask();
    assert_eq!(
        wm[0],
        [0, 1]
            .iter()
            .copied()
            .chain(std::iter::repeat_n(0, batch.ids[0].len() - 2))
            .collect::<Vec<_>>()
    );
    // Any text tokenizes and decodes back.
    let enc = tok.inner().encode("😀 ünïcödé", false).unwrap();
    assert_eq!(
        tok.inner().decode(enc.get_ids(), true).unwrap(),
        "😀 ünïcödé"
    );
}

#[test]
fn lora_training_path_has_gradients_only_where_the_loss_reaches() {
    use tli_kernels::model::lora::{self, LoraConfig};
    let (mut model, tok) = synthetic::build(SEED, &LoadOptions::default()).unwrap();
    lora::attach(&mut model, &LoraConfig::default(), 11).unwrap();
    // Non-zero B (seeded) so that A gets gradient too.
    common::randomize_lora_b(&model, 41, 0.1);
    // The element checked by finite differences below, put on a grid of
    // 2⁻¹² so that every step taken from it is exact in f32.
    let (b, at_b) = (lora::trainable_vars(&model)[3].clone(), 5);
    let grid = 2f32.powi(-12);
    let mut orig = b
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    orig[at_b] = fd::on_grid(orig[at_b], grid);
    b.set(&Tensor::from_vec(orig.clone(), b.as_tensor().dims(), &CDevice::Cpu).unwrap())
        .unwrap();
    let batch = tok.encode_batch(&["maji", "water"]).unwrap();
    let (ids, mask) = batch.tensors(&CDevice::Cpu).unwrap();
    let train = |seed| ForwardOptions {
        up_to: Some(2),
        train_seed: Some(seed),
    };
    let loss_of = |m: &tli_kernels::model::Llama, o: ForwardOptions| {
        let h = m.hidden_states(&ids, &mask, &o).unwrap();
        // The mean of squares in f64, so that its only rounding is that of
        // the f32 hidden states (see ε below).
        h[2].to_dtype(CDType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    // Dropout is seeded: same seed, same loss; another seed, another.
    let l1 = loss_of(&model, train(1)).to_scalar::<f64>().unwrap();
    assert_eq!(l1, loss_of(&model, train(1)).to_scalar::<f64>().unwrap());
    assert_ne!(l1, loss_of(&model, train(2)).to_scalar::<f64>().unwrap());

    let eval = ForwardOptions {
        up_to: Some(2),
        train_seed: None,
    };
    let loss = loss_of(&model, eval);
    let grads = loss.backward().unwrap();
    let vars = lora::trainable_vars(&model);
    assert_eq!(
        vars.len(),
        4 * 2 * 2,
        "q_proj and v_proj of 4 blocks, A and B"
    );
    for (i, v) in vars.iter().enumerate() {
        let layer = i / 4;
        let g = grads.get(v.as_tensor());
        if layer < 2 {
            let g = g.unwrap_or_else(|| panic!("var {i} (layer {layer}) has no gradient"));
            assert!(
                g.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        } else {
            assert!(
                g.is_none(),
                "block {layer} is past index 2 and must get no gradient"
            );
        }
    }
    // Finite-difference check of that element of layer 0's v_proj B.
    let g = grads
        .get(b.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[at_b];
    let l0 = loss.to_scalar::<f64>().unwrap();
    let at = |delta: f64| {
        let mut v = orig.clone();
        v[at_b] += delta as f32; // exact: on the grid
        b.set(&Tensor::from_vec(v, b.as_tensor().dims(), &CDevice::Cpu).unwrap())
            .unwrap();
        loss_of(&model, eval).to_scalar::<f64>().unwrap()
    };
    // ε, the error of one evaluation of the loss: L = mean(h²) over the
    // block-2 states, in f64, so ε ≤ 2ρL with ρ the relative error of the
    // f32 states (exact squares and sum aside). The states of a two-block
    // forward agree with an f64 forward to a few ulps (the parity test
    // above holds them to 1e-5 ≈ 84 ulps absolute, the worst case over
    // every element); ρ = 8 ulps for the typical state, which is what the
    // mean sees, gives ε = 16 ulps of L. Steps h = 2⁻³, 2⁻⁴ and 2⁻⁵ are
    // multiples of the grid; fd::richardson derives the bound from ε, the
    // steps and its own truncation estimate.
    let eps = 16.0 * f64::from(f32::EPSILON) * l0.abs();
    let d = fd::richardson(at, 2f64.powi(-3), eps);
    // autograd's own rounding: a few ulps of each of its terms, far below
    // the bound.
    assert!(
        d.agrees(f64::from(g), 1e-6 * f64::from(g).abs()),
        "autograd {g} vs finite differences {d:?}"
    );
    assert!(
        d.bound < 0.05 * f64::from(g).abs(),
        "the bound {d:?} must be tight enough to catch a 5 % error in {g}"
    );
}
