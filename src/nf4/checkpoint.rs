//! bitsandbytes safetensors checkpoints (being written).
