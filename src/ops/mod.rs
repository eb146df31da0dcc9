//! The operations, each with one signature over every [`Device`](crate::Device).

pub mod cosine;
pub mod lora_matmul;
pub mod nf4_dequant;
