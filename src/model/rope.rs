//! Rotary position embeddings, computed as transformers computes them.
//!
//! The inverse frequencies are f32 throughout, operation by operation as
//! torch evaluates `1.0 / (base ** (arange(0, dim, 2) / dim))` and the llama3
//! smoothing. Two torch details matter for the last bit: `scalar / tensor` is
//! evaluated as `reciprocal(tensor) * scalar`, and Python-float scalars enter
//! f32 arithmetic rounded to f32. `tests/model_parity.rs` compares the result
//! with the `inv_freq` buffer transformers built for the same config.
//!
//! The embedding is the "rotate half" form: for a head `x = [x1, x2]` (two
//! halves of `head_dim / 2`), `x·cos + [−x2, x1]·sin`, with
//! `cos = cos([f, f])`, `f = position · inv_freq`.

use candle_core::{D, DType, Device, Tensor};

use super::config::{LlamaConfig, RopeScaling};

/// The `head_dim / 2` inverse frequencies of `cfg`, bit for bit as
/// transformers computes them in f32.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let plain: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => plain,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = (old_ctx / low_freq_factor) as f32;
            let high_wavelen = (old_ctx / high_freq_factor) as f32;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let (factor_f, low_f, old_ctx_f) =
                (factor as f32, low_freq_factor as f32, old_ctx as f32);
            let span = (high_freq_factor - low_freq_factor) as f32;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = (1.0f32 / f) * two_pi;
                    let scaled = if wavelen > low_wavelen {
                        f / factor_f
                    } else {
                        f
                    };
                    // transformers: `~(w < high) * ~(w > low)`; the same for
                    // the finite wavelengths here.
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = ((1.0f32 / wavelen) * old_ctx_f - low_f) / span;
                        (1.0f32 - smooth) * scaled / factor_f + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// `cos` and `sin` tables for positions `0..seq_len`, each `[seq_len,
/// head_dim]` in `dtype` (computed in f32, then cast, as transformers does).
///
/// # Errors
/// A candle error if the tensors cannot be created on `device`.
pub fn cos_sin(
    inv_freq: &[f32],
    seq_len: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(seq_len * 2 * half);
    let mut sin = Vec::with_capacity(seq_len * 2 * half);
    for p in 0..seq_len {
        for _ in 0..2 {
            for &f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (seq_len, 2 * half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (seq_len, 2 * half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Apply rotary embeddings to `x` `[batch, heads, seq, head_dim]` with tables
/// from [`cos_sin`] (broadcast over batch and heads).
///
/// # Errors
/// A candle error on mismatched shapes.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}
