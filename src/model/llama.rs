//! The Llama decoder: loading from a checkpoint and the forward pass that
//! returns every hidden state.
//!
//! The computation follows transformers' `LlamaModel` (eager attention):
//!
//! ```text
//! h₀ = embed[ids]
//! for each block:  a = h + o_proj(attn(rope(q_proj(n₁)), rope(k_proj(n₁)), v_proj(n₁)))   n₁ = rms₁(h)
//!                  h = a + down_proj(silu(gate_proj(n₂)) ⊙ up_proj(n₂))                      n₂ = rms₂(a)
//! out = rms_final(h)
//! ```
//!
//! * RMSNorm: in f32, `x · 1/√(mean(x²) + ε)`, cast back to the compute
//!   dtype, then times the weight (transformers' `LlamaRMSNorm` order).
//! * Attention: scores `q·kᵀ · head_dim^-½` in the compute dtype, plus the
//!   causal and padding mask, softmax in f32, cast back, times `v`. Key/value
//!   head `h` serves query heads `h·g .. (h+1)·g` (`g` = groups). A query
//!   attends to key `j` when `j ≤ i` and `attention_mask[j] = 1`.
//! * Positions are `0..seq_len` for every row (right padding).
//!
//! Hidden states follow transformers' `output_hidden_states`: index 0 is the
//! embedding output, index `i` the output of block `i − 1`, and index `L`
//! (the number of blocks) the last block's output after the final norm.

use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType as CDType, Device as CDevice, Tensor};

use super::config::LlamaConfig;
use super::projection::{Projection, ProjectionWeight};
use super::rope;
use super::weights::{Checkpoint, Tensors};
use crate::nf4::quantize::{QuantizeOptions, quantize};
use crate::{Error, Result};

/// The attention and MLP projections of a block, by PEFT/transformers name.
pub const PROJECTION_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The submodule (`self_attn` or `mlp`) a projection lives in.
pub fn projection_parent(name: &str) -> &'static str {
    match name {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        _ => "mlp",
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of the forward pass (F32 or BF16; F16 works too).
    pub dtype: CDType,
    /// Where the tensors live.
    pub device: CDevice,
    /// Quantize full-precision projections to NF4 while loading, as
    /// transformers' `load_in_4bit` does (projections already stored in NF4
    /// are kept as stored).
    pub quantize: Option<QuantizeOptions>,
    /// Load only the first `n` blocks (hidden states up to index `n`).
    pub num_layers: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: CDType::F32,
            device: CDevice::Cpu,
            quantize: None,
            num_layers: None,
        }
    }
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Stop after hidden-state index `up_to` (run `up_to` blocks); `None`
    /// runs them all.
    pub up_to: Option<usize>,
    /// Training: turns on LoRA dropout, seeded (each projection derives its
    /// own seed from this one, its layer and its name).
    pub train_seed: Option<u64>,
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    /// `input_layernorm.weight`.
    pub input_norm: Tensor,
    /// `post_attention_layernorm.weight`.
    pub post_attention_norm: Tensor,
    /// The seven projections, in [`PROJECTION_NAMES`] order.
    pub projections: [Projection; 7],
}

impl Block {
    /// The projection called `name` (one of [`PROJECTION_NAMES`]).
    pub fn projection(&self, name: &str) -> Option<&Projection> {
        let i = PROJECTION_NAMES.iter().position(|n| *n == name)?;
        Some(&self.projections[i])
    }

    /// Mutable access to the projection called `name`.
    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Projection> {
        let i = PROJECTION_NAMES.iter().position(|n| *n == name)?;
        Some(&mut self.projections[i])
    }
}

/// A Llama model: embeddings, blocks, final norm.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The architecture.
    pub config: LlamaConfig,
    /// Compute dtype.
    pub dtype: CDType,
    /// Device of every tensor.
    pub device: CDevice,
    /// `embed_tokens.weight`, `[vocab, hidden]`.
    pub embed: Tensor,
    /// The loaded blocks (all of them unless [`LoadOptions::num_layers`]).
    pub blocks: Vec<Block>,
    /// `norm.weight`.
    pub final_norm: Tensor,
    /// RoPE inverse frequencies (f32, as transformers computes them).
    pub inv_freq: Vec<f32>,
}

/// RMSNorm as transformers' `LlamaRMSNorm`: f32 statistics, cast back, then
/// times the weight.
///
/// # Errors
/// A candle error on mismatched shapes.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(CDType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    let normed = x32.broadcast_mul(&inv)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// Softmax over the last dimension (max-shifted; the shift carries no
/// gradient, so it is detached).
///
/// # Errors
/// A candle error on unsupported dtypes.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mix a seed with a layer and projection index (SplitMix64 finaliser), so
/// every projection draws its own dropout mask.
fn derive_seed(seed: u64, layer: usize, proj: usize) -> u64 {
    let mut z = seed ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Llama {
    /// Load the model in `dir` (`config.json` and `model.safetensors` or a
    /// sharded index).
    ///
    /// # Errors
    /// As [`LlamaConfig::from_file`], [`Checkpoint::open`] and
    /// [`Llama::from_tensors`].
    pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_file(dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let tensors = ckpt.tensors()?;
        Self::from_tensors(config, &tensors, opts)
    }

    /// Build the model from parsed checkpoint tensors.
    ///
    /// Tensor names are transformers' (`model.layers.0.self_attn.q_proj.weight`,
    /// ...); a checkpoint of the bare `LlamaModel` (no `model.` prefix) is
    /// accepted too. A projection stored as bitsandbytes 4-bit stays NF4;
    /// one stored in full precision is quantized when
    /// [`LoadOptions::quantize`] says so, else kept in the compute dtype.
    /// `lm_head.weight` is not loaded (hidden states do not need it).
    ///
    /// # Errors
    /// [`Error::Format`] naming the file and tensor when one is missing, has
    /// the wrong shape or an unsupported dtype, or a 4-bit tensor is
    /// malformed or not NF4; [`Error::InvalidArgument`] for a bad
    /// `num_layers` or compute dtype; [`Error::Candle`] if the device cannot
    /// hold a tensor.
    pub fn from_tensors(config: LlamaConfig, t: &Tensors<'_>, opts: &LoadOptions) -> Result<Self> {
        const OP: &str = "load llama";
        if !matches!(opts.dtype, CDType::F32 | CDType::BF16 | CDType::F16) {
            return Err(Error::invalid(
                OP,
                format!(
                    "compute dtype {:?} is not supported (f32, bf16, f16)",
                    opts.dtype
                ),
            ));
        }
        let n_layers = match opts.num_layers {
            None => config.num_hidden_layers,
            Some(n) if n <= config.num_hidden_layers => n,
            Some(n) => {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "num_layers {n} is more than the model's {} blocks",
                        config.num_hidden_layers
                    ),
                ));
            }
        };
        let prefix =
            if !t.contains("model.embed_tokens.weight") && t.contains("embed_tokens.weight") {
                ""
            } else {
                "model."
            };
        let (dt, dev) = (opts.dtype, &opts.device);
        let h = config.hidden_size;
        let embed = t.dense(
            &format!("{prefix}embed_tokens.weight"),
            &[config.vocab_size, h],
            dt,
            dev,
        )?;
        let final_norm = t.dense(&format!("{prefix}norm.weight"), &[h], dt, dev)?;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let lp = format!("{prefix}layers.{i}");
            let dims = |name: &str| -> (usize, usize) {
                match name {
                    "q_proj" => (config.q_dim(), h),
                    "k_proj" | "v_proj" => (config.kv_dim(), h),
                    "o_proj" => (h, config.q_dim()),
                    "gate_proj" | "up_proj" => (config.intermediate_size, h),
                    _ => (h, config.intermediate_size),
                }
            };
            let mut projections = Vec::with_capacity(7);
            for name in PROJECTION_NAMES {
                let (n, k) = dims(name);
                let base = format!("{lp}.{}.{name}", projection_parent(name));
                let has_bias = if projection_parent(name) == "self_attn" {
                    config.attention_bias
                } else {
                    config.mlp_bias
                };
                projections.push(load_projection(t, &base, n, k, has_bias, opts)?);
            }
            let projections: [Projection; 7] = projections
                .try_into()
                .map_err(|_| Error::invalid(OP, "internal: projection count"))?;
            blocks.push(Block {
                input_norm: t.dense(&format!("{lp}.input_layernorm.weight"), &[h], dt, dev)?,
                post_attention_norm: t.dense(
                    &format!("{lp}.post_attention_layernorm.weight"),
                    &[h],
                    dt,
                    dev,
                )?,
                projections,
            });
        }
        let inv_freq = rope::inv_freq(&config);
        Ok(Self {
            config,
            dtype: dt,
            device: dev.clone(),
            embed,
            blocks,
            final_norm,
            inv_freq,
        })
    }

    /// The number of hidden states a full forward pass returns
    /// (`num_hidden_layers + 1`).
    pub fn num_hidden_states(&self) -> usize {
        self.config.num_hidden_layers + 1
    }

    /// Hidden states for a right-padded batch.
    ///
    /// `input_ids` and `attention_mask` are `[batch, seq]` (ids as `u32`,
    /// the mask any integer or float dtype, 1 for a token, 0 for padding).
    /// Returns hidden states `0..=up_to`, each `[batch, seq, hidden]` in the
    /// compute dtype (see the module docs for the indexing). Rows that are
    /// padding hold whatever the computation gives them; pool with the mask.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for mismatched or empty inputs, a token id
    /// outside the vocabulary, a row with no tokens, or `up_to` beyond the
    /// model (or beyond the loaded blocks); [`Error::Candle`] if a tensor
    /// operation fails.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<Vec<Tensor>> {
        const OP: &str = "llama forward";
        let c = Error::candle(OP);
        let (b, s) = input_ids.dims2().map_err(|_| {
            Error::invalid(
                OP,
                format!(
                    "input_ids has shape {:?}, expected [batch, seq]",
                    input_ids.dims()
                ),
            )
        })?;
        if attention_mask.dims() != [b, s] {
            return Err(Error::shape(
                OP,
                "attention_mask",
                format!("[{b}, {s}] (as input_ids)"),
                format!("{:?}", attention_mask.dims()),
            ));
        }
        if b == 0 || s == 0 {
            return Err(Error::invalid(
                OP,
                format!("empty batch: input_ids has shape [{b}, {s}]"),
            ));
        }
        let l = self.config.num_hidden_layers;
        let up_to = opts.up_to.unwrap_or(l);
        if up_to > l {
            return Err(Error::invalid(
                OP,
                format!("hidden-state index {up_to} asked for, the model has indices 0..={l}"),
            ));
        }
        if up_to > self.blocks.len() || (up_to == l && self.blocks.len() < l) {
            return Err(Error::invalid(
                OP,
                format!(
                    "hidden-state index {up_to} needs {} blocks, {} were loaded",
                    up_to.max(1).min(l),
                    self.blocks.len()
                ),
            ));
        }
        let ids = input_ids.to_dtype(CDType::U32).map_err(Error::candle(OP))?;
        let ids_host = ids.to_vec2::<u32>().map_err(Error::candle(OP))?;
        for (r, row) in ids_host.iter().enumerate() {
            if let Some((p, &id)) = row
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= self.config.vocab_size)
            {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "token id {id} at [{r}, {p}] is outside the vocabulary of {}",
                        self.config.vocab_size
                    ),
                ));
            }
        }
        let mask_host = attention_mask
            .to_dtype(CDType::F32)
            .and_then(|m| m.to_vec2::<f32>())
            .map_err(Error::candle(OP))?;
        if let Some(r) = mask_host
            .iter()
            .position(|row| row.iter().all(|&m| m == 0.0))
        {
            return Err(Error::invalid(
                OP,
                format!("row {r} of attention_mask has no tokens"),
            ));
        }
        // Additive mask [b, 1, s, s]: 0 where query i may see key j.
        let mut add = vec![0f32; b * s * s];
        for (r, row) in mask_host.iter().enumerate() {
            for i in 0..s {
                for j in 0..s {
                    if j > i || row[j] == 0.0 {
                        add[(r * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(add, (b, 1, s, s), &self.device).map_err(Error::candle(OP))?;
        let (cos, sin) = rope::cos_sin(&self.inv_freq, s, self.dtype, &self.device)
            .map_err(Error::candle(OP))?;
        let ids = ids.to_device(&self.device).map_err(Error::candle(OP))?;

        let mut x = self
            .embed
            .index_select(&ids.flatten_all().map_err(Error::candle(OP))?, 0)
            .and_then(|e| e.reshape((b, s, self.config.hidden_size)))
            .map_err(c)?;
        let mut states = Vec::with_capacity(up_to + 1);
        states.push(x.clone());
        for (i, block) in self.blocks.iter().enumerate().take(up_to) {
            x = self
                .block_forward(block, i, &x, &mask, &cos, &sin, opts.train_seed)
                .map_err(Error::candle(OP))?;
            if i + 1 == l {
                let normed = rms_norm(&x, &self.final_norm, self.config.rms_norm_eps)
                    .map_err(Error::candle(OP))?;
                states.push(normed);
            } else {
                states.push(x.clone());
            }
        }
        Ok(states)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        train_seed: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let seed = |p: usize| train_seed.map(|t| derive_seed(t, layer, p));
        let [q_proj, k_proj, v_proj, o_proj, gate, up, down] = &block.projections;

        let h = rms_norm(x, &block.input_norm, cfg.rms_norm_eps)?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(q_proj.forward(&h, seed(0))?, nh)?;
        let k = heads(k_proj.forward(&h, seed(1))?, nkv)?;
        let v = heads(v_proj.forward(&h, seed(2))?, nkv)?;
        let q = rope::apply(&q, cos, sin)?;
        let k = rope::apply(&k, cos, sin)?;
        let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
            let g = nh / nkv;
            if g == 1 {
                return Ok(t);
            }
            t.unsqueeze(2)?
                .broadcast_as((b, nkv, g, s, hd))?
                .reshape((b, nh, s, hd))
        };
        let k = repeat(k)?;
        let v = repeat(v)?;
        let scale = (hd as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores = scores.to_dtype(CDType::F32)?.broadcast_add(mask)?;
        let probs = softmax_last(&scores)?.to_dtype(self.dtype)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, nh * hd))?;
        let x = x.add(&o_proj.forward(&attn, seed(3))?)?;

        let h = rms_norm(&x, &block.post_attention_norm, cfg.rms_norm_eps)?;
        let g = gate.forward(&h, seed(4))?.silu()?;
        let u = up.forward(&h, seed(5))?;
        x.add(&down.forward(&g.mul(&u)?, seed(6))?)
    }

    /// Replace every LoRA adapter by its merge into the base weight: each
    /// projection with an adapter becomes a dense projection holding
    /// `W + scale · B · A` in the compute dtype (an NF4 base is dequantized
    /// first, so the merged model is full precision there).
    ///
    /// # Errors
    /// [`Error::Candle`] if a tensor operation fails.
    pub fn merge_adapters(&mut self) -> Result<()> {
        let like = self.embed.clone();
        for block in &mut self.blocks {
            for p in &mut block.projections {
                if p.lora.is_some() {
                    let w = p
                        .merged_weight(self.dtype, &like)?
                        .to_dtype(self.dtype)
                        .map_err(Error::candle("merge LoRA"))?;
                    p.weight = ProjectionWeight::Dense(w);
                    p.lora = None;
                }
            }
        }
        Ok(())
    }
}

fn load_projection(
    t: &Tensors<'_>,
    base: &str,
    n: usize,
    k: usize,
    has_bias: bool,
    opts: &LoadOptions,
) -> Result<Projection> {
    let wname = format!("{base}.weight");
    let weight = if t.is_4bit(&wname) {
        ProjectionWeight::Nf4(Arc::new(t.nf4(&wname, &[n, k])?))
    } else if let Some(q) = opts.quantize {
        let stored = t.dense_dtype(&wname)?;
        let values = t.dense_f32(&wname, &[n, k])?;
        let nf4 = quantize(&values, &[n, k], stored, q)
            .map_err(|e| Error::format(t.first_path(), format!("quantizing `{wname}`: {e}")))?;
        ProjectionWeight::Nf4(Arc::new(nf4))
    } else {
        ProjectionWeight::Dense(t.dense(&wname, &[n, k], opts.dtype, &opts.device)?)
    };
    let bias = if has_bias {
        Some(t.dense(&format!("{base}.bias"), &[n], opts.dtype, &opts.device)?)
    } else {
        None
    };
    Ok(Projection {
        weight,
        bias,
        lora: None,
        in_features: k,
        out_features: n,
        cache: Default::default(),
    })
}
