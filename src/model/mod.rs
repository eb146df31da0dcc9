//! A thin Llama that loads real checkpoints and returns every hidden state.
//!
//! * [`config`]: `config.json` (transformers 4 and 5 spellings, llama3 rope
//!   scaling, bitsandbytes `quantization_config`); settings that change the
//!   Llama math and are not implemented are errors, other unknown keys are
//!   accepted and named.
//! * [`hub`]: `--model org/name[@revision]` resolved in the local Hugging
//!   Face cache ([`resolve_model_path`]), offline.
//! * [`weights`]: memory-mapped `model.safetensors` or sharded checkpoints;
//!   f32/bf16/f16 tensors and bitsandbytes NF4 weights.
//! * [`projection`]: [`Projection`], the one linear layer of the model, the
//!   place the fused NF4 + LoRA op plugs in.
//! * [`llama`]: loading and the forward pass ([`Llama::hidden_states`]).
//! * [`rope`]: rotary embeddings as transformers computes them.
//! * [`gguf`]: llama.cpp's GGUF files (weights, config and tokenizer).

pub mod config;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod lora;
pub mod projection;
pub mod rope;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::{Bnb4bitConfig, LlamaConfig, RopeScaling};
pub use hub::{ResolvedModel, resolve_model_path};
pub use llama::{Block, ForwardOptions, Llama, LoadOptions, PROJECTION_NAMES};
pub use lora::{LoraConfig, TargetModules};
pub use projection::{LoraAdapter, Projection, ProjectionWeight};
pub use tokenizer::{BosMode, BosOutcome, EncodedBatch, LlamaTokenizer, SpecialTokens};
pub use weights::{Checkpoint, Tensors};

/// The candle device for the model: the CPU, or (feature `candle-cuda`)
/// CUDA device `ordinal`.
///
/// # Errors
/// [`crate::Error::NoCudaDevice`] when CUDA is asked for and the crate was
/// built without `candle-cuda`, or no driver or device is usable.
pub fn candle_device(cuda: Option<usize>) -> crate::Result<candle_core::Device> {
    match cuda {
        None => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "candle-cuda")]
        Some(ordinal) => {
            candle_core::Device::new_cuda(ordinal).map_err(|e| crate::Error::NoCudaDevice {
                reason: format!("candle could not open CUDA device {ordinal}: {e}"),
            })
        }
        #[cfg(not(feature = "candle-cuda"))]
        Some(ordinal) => Err(crate::Error::NoCudaDevice {
            reason: format!(
                "CUDA device {ordinal} asked for, but this build has no candle CUDA backend (build with --features candle-cuda)"
            ),
        }),
    }
}
