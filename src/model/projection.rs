//! [`Projection`]: the one linear layer every `q/k/v/o_proj` and
//! `gate/up/down_proj` goes through.

use std::sync::Arc;

use candle_core::{DType as CDType, Tensor, Var};

use crate::lora::{Dropout, dropout_keep};
use crate::nf4::Nf4Tensor;
use crate::{DType, Error, Result};

/// The frozen base weight of a [`Projection`], `[out, in]` row-major.
#[derive(Debug, Clone)]
pub enum ProjectionWeight {
    /// Full precision, in the model's compute dtype.
    Dense(Tensor),
    /// NF4 (bitsandbytes layout). Kept packed; dequantized inside each
    /// forward pass into a temporary.
    Nf4(Arc<Nf4Tensor>),
}

/// A LoRA adapter on a [`Projection`]: `Δy = scale · (dropout(x) · Aᵀ) · Bᵀ`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `A`, `[rank, in]`, f32 (PEFT's `lora_A.weight`).
    pub a: Var,
    /// `B`, `[out, rank]`, f32 (PEFT's `lora_B.weight`).
    pub b: Var,
    /// `scale = alpha / rank` (or `alpha / √rank` with rsLoRA).
    pub scale: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f32,
}

impl LoraAdapter {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.as_tensor().dims().first().copied().unwrap_or(0)
    }
}

/// A linear layer `y = x · Wᵀ (+ LoRA) (+ bias)` with a dense or NF4 base
/// weight.
///
/// This type is the model's single contact point with the fused NF4 + LoRA
/// op ([`crate::lora`] describes its contract): its fields are that op's
/// operands (the weight, the optional [`LoraAdapter`] with its dropout,
/// the bias) and [`Projection::forward`] takes `x` and the dropout seed.
///
/// **Until the fused op is merged**, `forward` is written with plain candle
/// ops that follow the op's numerics: `x`, the weight (dequantized to the
/// compute dtype `T` first, when NF4, exactly as
/// [`crate::nf4::dequant`] writes it) and the factors are widened to f32, the
/// base product and the LoRA branch (with `x·Aᵀ` kept in f32) are
/// accumulated in f32, the bias added, and the sum rounded to `T` once.
/// The dequantized weight is a temporary of the call, never stored. The
/// dropout mask is [`crate::lora::dropout_keep`], the fused op's own. The
/// merge replaces the body of `forward` with a call to the fused op's candle
/// custom op (`Nf4LoraLinear`, which has its own autograd); nothing else in
/// the model changes.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Base weight.
    pub weight: ProjectionWeight,
    /// Bias, `[out]`, in the compute dtype.
    pub bias: Option<Tensor>,
    /// LoRA adapter, if attached.
    pub lora: Option<LoraAdapter>,
    /// Input features `K`.
    pub in_features: usize,
    /// Output features `N`.
    pub out_features: usize,
}

impl Projection {
    /// The base weight in `dtype` (dequantized if NF4: each element is
    /// `dtype(NF4[q] · scale)`), `[out, in]`, on the device of `like`.
    ///
    /// # Errors
    /// A candle error for unsupported dtypes or device transfer failures.
    pub fn base_weight(&self, dtype: CDType, like: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            ProjectionWeight::Dense(w) => w.to_dtype(dtype),
            ProjectionWeight::Nf4(q) => {
                let view = q.view();
                let shape = (self.out_features, self.in_features);
                let t = match dtype {
                    CDType::F32 => {
                        let v: Vec<f32> = crate::nf4::dequant::dequantize(&view).map_err(wrap)?;
                        Tensor::from_vec(v, shape, like.device())?
                    }
                    CDType::BF16 => {
                        let v: Vec<half::bf16> =
                            crate::nf4::dequant::dequantize(&view).map_err(wrap)?;
                        Tensor::from_vec(v, shape, like.device())?
                    }
                    CDType::F16 => {
                        let v: Vec<half::f16> =
                            crate::nf4::dequant::dequantize(&view).map_err(wrap)?;
                        Tensor::from_vec(v, shape, like.device())?
                    }
                    other => {
                        return Err(candle_core::Error::Msg(format!(
                            "NF4 projection: cannot dequantize to {other:?} (supported: f32, bf16, f16)"
                        )));
                    }
                };
                Ok(t)
            }
        }
    }

    /// `y = x · Wᵀ + scale · (dropout(x) · Aᵀ) · Bᵀ + bias` for `x` of shape
    /// `[..., in]`; `y` has shape `[..., out]` and `x`'s dtype.
    ///
    /// `train_seed` turns on the adapter's dropout with that seed (mask
    /// [`crate::lora::dropout_keep`] over the flattened `[M, in]` input);
    /// `None` is inference.
    ///
    /// # Errors
    /// A candle error when `x`'s last dimension is not `in` or a tensor
    /// operation fails.
    pub fn forward(&self, x: &Tensor, train_seed: Option<u64>) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            return Err(candle_core::Error::Msg(
                "projection input is a scalar".into(),
            ));
        };
        if k != self.in_features {
            return Err(candle_core::Error::Msg(format!(
                "projection input has {k} features, the weight [{}, {}] expects {}",
                self.out_features, self.in_features, self.in_features
            )));
        }
        let m: usize = lead.iter().product();
        let dtype = x.dtype();
        let x2 = x.reshape((m, k))?.to_dtype(CDType::F32)?;
        let w = self.base_weight(dtype, x)?.to_dtype(CDType::F32)?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(l) = &self.lora {
            let xl = match train_seed {
                Some(seed) if l.dropout > 0.0 => {
                    let d = Dropout { p: l.dropout, seed };
                    let (thr, keep) = (d.threshold(), d.keep_scale());
                    let mask: Vec<f32> = (0..(m * k) as u64)
                        .map(|i| {
                            if dropout_keep(seed, i, thr) {
                                keep
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, (m, k), x.device())?;
                    x2.mul(&mask)?
                }
                _ => x2.clone(),
            };
            let u = xl.matmul(&l.a.as_tensor().t()?)?;
            y = y.add(&(u.matmul(&l.b.as_tensor().t()?)? * l.scale)?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(CDType::F32)?)?;
        }
        let mut out_shape = lead.to_vec();
        out_shape.push(self.out_features);
        y.to_dtype(dtype)?.reshape(out_shape)
    }

    /// `W + scale · B · A` in f32, `[out, in]`: the weight with the adapter
    /// merged (the base weight alone when there is no adapter). The base
    /// enters as it does in [`forward`](Self::forward) for compute dtype
    /// `dtype`.
    ///
    /// # Errors
    /// [`Error::Candle`] if a tensor operation fails.
    pub fn merged_weight(&self, dtype: CDType, like: &Tensor) -> Result<Tensor> {
        let op = "merge LoRA";
        let w = self
            .base_weight(dtype, like)
            .and_then(|w| w.to_dtype(CDType::F32))
            .map_err(Error::candle(op))?;
        match &self.lora {
            None => Ok(w),
            Some(l) => {
                let delta =
                    l.b.as_tensor()
                        .matmul(l.a.as_tensor())
                        .and_then(|d| d * l.scale)
                        .map_err(Error::candle(op))?;
                w.add(&delta).map_err(Error::candle(op))
            }
        }
    }

    /// The dtype an NF4 base weight was quantized from, if NF4.
    pub fn nf4_source_dtype(&self) -> Option<DType> {
        match &self.weight {
            ProjectionWeight::Nf4(q) => Some(q.dtype),
            ProjectionWeight::Dense(_) => None,
        }
    }
}

fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}
