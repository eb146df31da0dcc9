//! [`Projection`]: the one linear layer every `q/k/v/o_proj` and
//! `gate/up/down_proj` goes through.

use candle_core::{DType as CDType, Tensor, Var};

use crate::candle_ops::lora::{DeviceWeightCache, LinearWeight, LoraBranch, Nf4LoraLinear};
use crate::lora::Dropout;
use crate::{DType, Error, Result};

/// The frozen base weight of a [`Projection`], `[out, in]` row-major: NF4
/// kept packed, or dense in the model's compute dtype.
pub type ProjectionWeight = LinearWeight;

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
/// the bias), and [`Projection::forward`] is one application of the candle
/// op [`Nf4LoraLinear`], which has its own autograd (gradients to `x` and
/// the adapter's `A` and `B`). An NF4 weight stays packed: the op
/// dequantizes it a panel at a time inside the product.
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
    /// Device copies of an NF4 weight (feature `candle-cuda`; empty
    /// otherwise), shared by clones.
    pub cache: DeviceWeightCache,
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
    /// The adapter's f32 factors enter the op cast to `x`'s dtype (the cast
    /// is exact in f32 compute; in bf16/f16 compute the LoRA branch sees
    /// rounded factors, and their gradients flow back to the f32 `Var`s
    /// through candle's cast). `train_seed` turns on the adapter's dropout
    /// with that seed (mask [`crate::lora::dropout_keep`] over the flattened
    /// `[M, in]` input); `None` is inference.
    ///
    /// # Errors
    /// A candle error when `x`'s last dimension is not `in`, its dtype is
    /// not f32/bf16/f16, or a tensor operation fails.
    pub fn forward(&self, x: &Tensor, train_seed: Option<u64>) -> candle_core::Result<Tensor> {
        let layer = Nf4LoraLinear {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            in_features: self.in_features,
            out_features: self.out_features,
            cache: self.cache.clone(),
        };
        let Some(l) = &self.lora else {
            return layer.forward(x, None);
        };
        let dtype = x.dtype();
        let a = l.a.as_tensor().to_dtype(dtype)?;
        let b = l.b.as_tensor().to_dtype(dtype)?;
        let branch = LoraBranch {
            a: &a,
            b: &b,
            scale: l.scale as f32,
            dropout: train_seed.map(|seed| Dropout { p: l.dropout, seed }),
        };
        layer.forward(x, Some(&branch))
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
