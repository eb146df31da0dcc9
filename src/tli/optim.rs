//! AdamW with state that can be saved and restored, so a resumed run takes
//! exactly the steps an uninterrupted one would.
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor path), written
//! in the same order of operations, on each parameter's own dtype (f32 for
//! LoRA factors):
//!
//! ```text
//! t ← t + 1                                  (per parameter)
//! θ ← θ · (1 − lr·λ)                         (decoupled weight decay)
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! A parameter with no gradient in a step is left alone and its step count
//! does not advance (torch skips parameters whose `grad` is `None`).
//!
//! [`AdamW::save`] writes the state as a safetensors file: for every
//! parameter name `k`, `k.exp_avg` (`m`) and `k.exp_avg_sq` (`v`) as f32
//! tensors of the parameter's shape and `k.step` as a one-element i64
//! tensor; a parameter that has never stepped has no entries. torch's own
//! names for the two moments are used so the file reads naturally beside a
//! PyTorch optimizer state.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType as CDType, Tensor, Var};

use crate::io::write_atomic;
use crate::model::Checkpoint;
use crate::model::weights::safetensors_bytes;
use crate::nf4::checkpoint::TensorBuf;
use crate::{Error, Result};

const OP: &str = "AdamW";

/// AdamW hyper-parameters other than the learning rate (which changes every
/// step and is passed to [`AdamW::step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// `beta1` (0.9).
    pub beta1: f64,
    /// `beta2` (0.999).
    pub beta2: f64,
    /// `eps` (1e-8).
    pub eps: f64,
    /// Decoupled weight decay `λ` (0.01).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, except weight decay 0.01 (torch's AdamW default
    /// is also 0.01).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The moments and step count of one parameter.
#[derive(Debug, Clone)]
struct Moments {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// AdamW over named parameters, with saveable state.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    state: Vec<Option<Moments>>,
    cfg: AdamWConfig,
}

impl AdamW {
    /// An optimizer over `params` (name, variable); names must be unique
    /// (they key the saved state).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a repeated name or a hyper-parameter
    /// out of range (`beta`s outside `[0, 1)`, negative or non-finite `eps`
    /// or weight decay).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        for (name, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(OP, format!("{name} {b} is not in [0, 1)")));
            }
        }
        for (name, x) in [("eps", cfg.eps), ("weight decay", cfg.weight_decay)] {
            if !x.is_finite() || x < 0.0 {
                return Err(Error::invalid(
                    OP,
                    format!("{name} {x} must be finite and not negative"),
                ));
            }
        }
        let mut names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(
                OP,
                format!("parameter name {:?} appears twice", w[0]),
            ));
        }
        let state = vec![None; params.len()];
        Ok(Self { params, state, cfg })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// Steps taken by the parameter called `name` (0 if it never had a
    /// gradient, `None` if there is no such parameter).
    pub fn steps_of(&self, name: &str) -> Option<u64> {
        let i = self.params.iter().position(|(n, _)| n == name)?;
        Some(self.state[i].as_ref().map_or(0, |s| s.step))
    }

    /// One AdamW step at learning rate `lr` with the gradients in `grads`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a negative or non-finite `lr`;
    /// [`Error::Candle`] if a tensor operation fails.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::invalid(
                OP,
                format!("learning rate {lr} must be finite and not negative"),
            ));
        }
        let AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
        } = self.cfg;
        for ((_, var), slot) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let theta = var.as_tensor();
            let st = match slot {
                Some(s) => s,
                None => slot.insert(Moments {
                    m: theta.zeros_like().map_err(Error::candle(OP))?,
                    v: theta.zeros_like().map_err(Error::candle(OP))?,
                    step: 0,
                }),
            };
            st.step += 1;
            let t = st.step as f64;
            let (m, v, next) = (|| {
                let g = g.to_dtype(theta.dtype())?;
                let decayed = theta.affine(1.0 - lr * wd, 0.0)?;
                let m = ((&st.m * b1)? + (&g * (1.0 - b1))?)?;
                let v = ((&st.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let bc1 = 1.0 - b1.powf(t);
                let bc2 = 1.0 - b2.powf(t);
                let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
                let next = (decayed - ((&m / &denom)? * (lr / bc1))?)?;
                candle_core::Result::Ok((m, v, next))
            })()
            .map_err(Error::candle(OP))?;
            var.set(&next).map_err(Error::candle(OP))?;
            st.m = m;
            st.v = v;
        }
        Ok(())
    }

    /// Write the state to `path` (atomically; format in the module docs).
    ///
    /// # Errors
    /// [`Error::Candle`] if the moments cannot be read back; [`Error::Io`]
    /// if writing fails.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for ((name, _), st) in self.params.iter().zip(&self.state) {
            let Some(st) = st else { continue };
            for (suffix, t) in [("exp_avg", &st.m), ("exp_avg_sq", &st.v)] {
                let values: Vec<f32> = t
                    .to_dtype(CDType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .map_err(Error::candle(OP))?;
                tensors.push((
                    format!("{name}.{suffix}"),
                    TensorBuf {
                        dtype: safetensors::Dtype::F32,
                        shape: t.dims().to_vec(),
                        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    },
                ));
            }
            let step = i64::try_from(st.step).unwrap_or(i64::MAX);
            tensors.push((
                format!("{name}.step"),
                TensorBuf {
                    dtype: safetensors::Dtype::I64,
                    shape: vec![1],
                    data: step.to_le_bytes().to_vec(),
                },
            ));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes = safetensors_bytes(&tensors)?;
        write_atomic(path, |w| {
            w.write_all(&bytes).map_err(|e| Error::io(path, e))
        })
    }

    /// Replace the state with the one saved at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::Format`] naming the file
    /// and tensor for a moment of the wrong shape or dtype, a step count
    /// that is not a positive i64, one moment without the other, or a
    /// tensor that names no parameter of this optimizer.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        // Two f32 moments per parameter and a step count: far below the
        // text limit for any adapter this crate trains.
        let bytes = crate::io::read_input(path, crate::io::max_text_bytes())?;
        let ckpt = Checkpoint::from_bytes(path, bytes);
        let t = ckpt.tensors()?;
        let mut state = vec![None; self.params.len()];
        let mut used = std::collections::HashSet::new();
        for ((name, var), slot) in self.params.iter().zip(state.iter_mut()) {
            let (km, kv, ks) = (
                format!("{name}.exp_avg"),
                format!("{name}.exp_avg_sq"),
                format!("{name}.step"),
            );
            let present = [&km, &kv, &ks].map(|k| t.contains(k));
            match present {
                [false, false, false] => continue,
                [true, true, true] => {}
                _ => {
                    return Err(Error::format(
                        path,
                        format!("parameter `{name}` has only some of exp_avg, exp_avg_sq and step"),
                    ));
                }
            }
            let theta = var.as_tensor();
            let m = t.dense(&km, theta.dims(), theta.dtype(), theta.device())?;
            let v = t.dense(&kv, theta.dims(), theta.dtype(), theta.device())?;
            let step = read_step(&t, path, &ks)?;
            *slot = Some(Moments { m, v, step });
            used.extend([km, kv, ks]);
        }
        if let Some(extra) = t.names().into_iter().find(|n| !used.contains(*n)) {
            return Err(Error::format(
                path,
                format!("tensor `{extra}` is not the state of a parameter being trained"),
            ));
        }
        self.state = state;
        Ok(())
    }
}

/// A `.step` entry: one positive i64.
fn read_step(t: &crate::model::Tensors<'_>, path: &Path, key: &str) -> Result<u64> {
    let raw = t.raw(key)?;
    let bad = || {
        Error::format(
            path,
            format!("`{key}` must be one positive i64 (the parameter's step count)"),
        )
    };
    if raw.0 != safetensors::Dtype::I64 || raw.1 != [1] || raw.2.len() != 8 {
        return Err(bad());
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(raw.2);
    u64::try_from(i64::from_le_bytes(b))
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(bad)
}
