//! The operations, each with one signature over every [`Device`](crate::Device).

pub mod nf4_dequant;
