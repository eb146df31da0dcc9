//! Targeted Lexical Injection: the library behind `tli scan`, `tli train`
//! and `tli eval` (the method and its settings are described in the
//! README and the module docs of each part).
//!
//! * [`embed`]: word embeddings at a layer (two pooling rules) and per-pair
//!   cosines through the fused cosine op; loading a model directory.
//! * [`mod@scan`]: alignment of every layer, both pooling rules side by side.
//! * [`mod@train`]: the TLI step (triplet loss with the hardest in-batch
//!   negative, LoRA on the early blocks, AdamW with linear warm-up and
//!   decay) and its PEFT checkpoints.
//! * [`optim`]: AdamW with saveable state (checkpoints and `--resume`).
//! * [`eval`]: before/after per pair with a paired t-test per set, and the
//!   specificity of each set before and after.
//! * [`mod@specificity`]: non-matching cosines, margin and retrieval ranks of a
//!   set's cosine matrix, and the verdict on whether a gain is specific or
//!   collapse.
//! * [`stats`]: means, standard deviations, the paired t-test.
//! * [`plot`]: SVG plots of scan and eval reports.

pub mod embed;
pub mod eval;
pub mod optim;
pub mod plot;
pub mod scan;
pub mod specificity;
pub mod stats;
pub mod train;

pub use embed::{ModelOptions, PairEmbeddings, Pooling, load_model, pair_cosines, pair_embeddings};
pub use eval::{
    EvalOptions, EvalReport, Measurement, SetReport, evaluate, evaluate_adapter, measure_set,
};
pub use scan::{LayerAlignment, PoolingChoice, ScanOptions, ScanReport, scan};
pub use specificity::{Specificity, SpecificityChange, Verdict, specificity, verdict};
pub use train::{
    LinearSchedule, ResumeOptions, StepInfo, TrainOptions, TrainReport, resume, train,
};
