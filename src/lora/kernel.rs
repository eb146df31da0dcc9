//! What the `sim` and `cuda` backends share about the kernels of
//! `kernels/lora_matmul.cu`: the choice of forward variant, the launch
//! geometry, and the one parameter block every entry point takes.
#![cfg_attr(not(any(feature = "sim", tli_cuda)), allow(dead_code))]

use crate::lora::{Dropout, LinearDims, MAX_RANK};
use crate::{DType, Error, Result};

/// Largest `M` the automatic choice sends to the GEMV forward kernel.
pub const GEMV_MAX_M: usize = 8;

/// Which forward kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardVariant {
    /// [`ForwardVariant::Gemv`] for `M ≤ 8`, else [`ForwardVariant::Tiled`].
    #[default]
    Auto,
    /// 64×64 output tiles: tensor cores (`mma.sync` m16n8k16) for bf16/f16,
    /// SIMT FMAs on the same tiling for f32; LoRA fused, `x·Aᵀ` on chip.
    Tiled,
    /// One warp per weight row, 16-byte weight loads; any `M`, 8 rows of
    /// `x` per pass over the weights.
    Gemv,
}

impl ForwardVariant {
    /// The variant that runs for `m` rows: `Auto` resolved, others as given.
    pub fn resolve(self, m: usize) -> ForwardVariant {
        match self {
            ForwardVariant::Auto if m <= GEMV_MAX_M => ForwardVariant::Gemv,
            ForwardVariant::Auto => ForwardVariant::Tiled,
            v => v,
        }
    }
}

/// Threads per block of the tile kernels (forward and dx).
pub(crate) const TILE_THREADS: u32 = 128;
/// Output tile edge of the tile kernels.
pub(crate) const TILE: usize = 64;
/// Threads per block of the GEMV (8 warps, one weight row each).
pub(crate) const GEMV_THREADS: u32 = 256;
/// Weight rows one GEMV block handles per grid-stride step.
pub(crate) const GEMV_ROWS_PER_BLOCK: usize = 8;
/// Threads per block of `lora_proj` and `lora_bwd_dadb`.
pub(crate) const AUX_THREADS: u32 = 256;
/// Ranks one `lora_bwd_dadb` thread accumulates.
pub(crate) const DADB_RANKS: usize = 8;

/// The largest grid y the tile kernels may use (CUDA's limit).
const MAX_GRID_Y: usize = 65535;

/// How the weight is stored, as the entry-point names spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightKind {
    Dense,
    Nf4,
    Nf4Dq,
}

/// A kernel family of `lora_matmul.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    FwdTile,
    FwdGemv,
    BwdDx,
    Proj,
    Dadb,
}

/// The entry-point name of `family` for `weight` and `dtype`
/// (`weight` is ignored by the weight-less families).
pub(crate) fn entry_name(family: Family, weight: WeightKind, dtype: DType) -> &'static str {
    const NAMES: [[[&str; 3]; 3]; 3] = [
        [
            [
                "lora_fwd_tile_dense_f32",
                "lora_fwd_tile_dense_bf16",
                "lora_fwd_tile_dense_f16",
            ],
            [
                "lora_fwd_tile_nf4_f32",
                "lora_fwd_tile_nf4_bf16",
                "lora_fwd_tile_nf4_f16",
            ],
            [
                "lora_fwd_tile_nf4dq_f32",
                "lora_fwd_tile_nf4dq_bf16",
                "lora_fwd_tile_nf4dq_f16",
            ],
        ],
        [
            [
                "lora_fwd_gemv_dense_f32",
                "lora_fwd_gemv_dense_bf16",
                "lora_fwd_gemv_dense_f16",
            ],
            [
                "lora_fwd_gemv_nf4_f32",
                "lora_fwd_gemv_nf4_bf16",
                "lora_fwd_gemv_nf4_f16",
            ],
            [
                "lora_fwd_gemv_nf4dq_f32",
                "lora_fwd_gemv_nf4dq_bf16",
                "lora_fwd_gemv_nf4dq_f16",
            ],
        ],
        [
            [
                "lora_bwd_dx_dense_f32",
                "lora_bwd_dx_dense_bf16",
                "lora_bwd_dx_dense_f16",
            ],
            [
                "lora_bwd_dx_nf4_f32",
                "lora_bwd_dx_nf4_bf16",
                "lora_bwd_dx_nf4_f16",
            ],
            [
                "lora_bwd_dx_nf4dq_f32",
                "lora_bwd_dx_nf4dq_bf16",
                "lora_bwd_dx_nf4dq_f16",
            ],
        ],
    ];
    let d = match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    };
    let w = match weight {
        WeightKind::Dense => 0,
        WeightKind::Nf4 => 1,
        WeightKind::Nf4Dq => 2,
    };
    match family {
        Family::FwdTile => NAMES[0][w][d],
        Family::FwdGemv => NAMES[1][w][d],
        Family::BwdDx => NAMES[2][w][d],
        Family::Proj => ["lora_proj_f32", "lora_proj_bf16", "lora_proj_f16"][d],
        Family::Dadb => [
            "lora_bwd_dadb_f32",
            "lora_bwd_dadb_bf16",
            "lora_bwd_dadb_f16",
        ][d],
    }
}

/// `TliLoraParams` of `kernels/lora_matmul.cu`, field for field: addresses
/// (host addresses under the simulator, device addresses on a GPU; 0 for
/// null), sizes, and scalars.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LoraParams {
    pub x: u64,
    pub dy: u64,
    pub lora_a: u64,
    pub lora_b: u64,
    pub bias: u64,
    pub w_dense: u64,
    pub w_packed: u64,
    pub w_absmax: u64,
    pub w_qabsmax: u64,
    pub w_absmax2: u64,
    pub w_code2: u64,
    pub out: u64,
    pub u: u64,
    pub g: u64,
    pub proj_out: u64,
    pub da: u64,
    pub db: u64,
    pub drop_seed: u64,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub rank: i32,
    pub log2_bs: i32,
    pub log2_nested: i32,
    pub drop_threshold: u32,
    pub w_offset: f32,
    pub scale: f32,
    pub keep_scale: f32,
    pub proj_mode: i32,
    pub proj_scale: f32,
    pub reserved: i32,
}

// The C side asserts the same size.
const _: () = assert!(size_of::<LoraParams>() == 208);

impl LoraParams {
    /// The scalar part: sizes, rank (0 without LoRA), scale, dropout.
    /// Addresses stay 0 for the caller to fill in.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a size exceeds what the kernels'
    /// index types and grids hold: `M·K`, `N·K`, `M·N` must fit in `i64`,
    /// `M` at most 65535·64 rows (tile grid y) and 2³¹ − 1 (one projection
    /// block per row).
    pub(crate) fn new(
        op: &'static str,
        dims: LinearDims,
        lora: Option<(usize, f32)>,
        dropout: Option<Dropout>,
    ) -> Result<LoraParams> {
        let LinearDims { m, n, k } = dims;
        let fits = |v: Option<usize>| v.is_some_and(|v| i64::try_from(v).is_ok());
        if !(fits(m.checked_mul(k)) && fits(n.checked_mul(k)) && fits(m.checked_mul(n))) {
            return Err(Error::invalid(
                op,
                format!("M = {m}, N = {n}, K = {k}: a product exceeds the kernels' int64 indices"),
            ));
        }
        if m.div_ceil(TILE) > MAX_GRID_Y || m > i32::MAX as usize {
            return Err(Error::invalid(
                op,
                format!(
                    "M = {m} rows exceed the launch grid (at most {})",
                    MAX_GRID_Y * TILE
                ),
            ));
        }
        let (rank, scale) = match lora {
            Some((r, s)) => {
                if r == 0 || r > MAX_RANK {
                    return Err(Error::invalid(
                        op,
                        format!("LoRA rank {r} is not in 1..={MAX_RANK}"),
                    ));
                }
                (r as i32, s)
            }
            None => (0, 0.0),
        };
        let (seed, threshold, keep_scale) = match dropout {
            Some(d) if d.p > 0.0 && rank > 0 => (d.seed, d.threshold(), d.keep_scale()),
            _ => (0, 0, 1.0),
        };
        // Sizes were checked to fit i64 above (each is at most a product).
        Ok(LoraParams {
            m: m as i64,
            n: n as i64,
            k: k as i64,
            rank,
            scale,
            drop_seed: seed,
            drop_threshold: threshold,
            keep_scale,
            proj_scale: 1.0,
            ..LoraParams::default()
        })
    }

    /// The weight's kind and its scalar fields from an NF4 layout
    /// (`None` for a dense weight).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a block size or nested block size
    /// that is not a power of two (validated tensors never have one).
    pub(crate) fn set_nf4(
        &mut self,
        op: &'static str,
        blocksize: usize,
        nested: Option<(usize, f32)>,
    ) -> Result<WeightKind> {
        let log2 = |what: &str, v: usize| -> Result<i32> {
            if v.is_power_of_two() {
                Ok(v.trailing_zeros() as i32)
            } else {
                Err(Error::invalid(
                    op,
                    format!("{what} {v} is not a power of two"),
                ))
            }
        };
        self.log2_bs = log2("block size", blocksize)?;
        Ok(match nested {
            None => WeightKind::Nf4,
            Some((nb, offset)) => {
                self.log2_nested = log2("nested block size", nb)?;
                self.w_offset = offset;
                WeightKind::Nf4Dq
            }
        })
    }

    /// Grid of the tile kernels for `cols` output columns.
    pub(crate) fn tile_grid(&self, cols: usize) -> [u32; 3] {
        // Both fit: cols/64 < 2^31 since cols·M fits i64 and the y extent
        // was checked in `new`.
        [
            u32::try_from(cols.div_ceil(TILE)).unwrap_or(u32::MAX),
            u32::try_from((self.m as usize).div_ceil(TILE)).unwrap_or(u32::MAX),
            1,
        ]
    }

    /// Blocks of `lora_bwd_dadb` (dA tiles first, then dB tiles).
    pub(crate) fn dadb_blocks(&self, want_da: bool, want_db: bool) -> Result<u32> {
        let groups = (self.rank.max(0) as usize).div_ceil(DADB_RANKS);
        let per = |len: i64| (len as usize).div_ceil(AUX_THREADS as usize) * groups;
        let total = if want_da { per(self.k) } else { 0 } + if want_db { per(self.n) } else { 0 };
        u32::try_from(total)
            .ok()
            .filter(|&t| t <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::invalid(
                    "lora backward",
                    format!("{total} dA/dB blocks exceed the launch grid"),
                )
            })
    }
}
