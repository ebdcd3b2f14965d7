//! The one error type of the kernels crate: every shape, range and argument check a kernel makes
//! up front, plus the CUDA compile/load failures.
//!
//! Every variant names the kernel (`kernel`) that rejected its input, so a log line or a metric
//! label ([`KernelError::kind`]) says where a bad batch was caught. The CUDA variants exist even
//! without the `cuda` feature so that an exhaustive `match` downstream does not change shape when
//! another crate turns the feature on.

/// Why a kernel refused its input (or, for the CUDA variants, could not be built).
///
/// Kernels validate everything before they write anything: on `Err`, no output buffer has been
/// modified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A buffer does not have the exact length its shape requires.
    #[error("{kernel}: `{what}` has {actual} elements, expected {expected}")]
    ShapeMismatch {
        kernel: &'static str,
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A buffer whose row count is inferred from its length is not a whole number of rows.
    #[error("{kernel}: `{what}` has {len} elements, not a multiple of the row width {width}")]
    RaggedRows {
        kernel: &'static str,
        what: &'static str,
        len: usize,
        width: usize,
    },
    /// A scalar argument or a layout field is outside its domain (zero sizes, indivisible head
    /// counts, a `top_p` outside `(0, 1]`, ...).
    #[error("{kernel}: invalid `{what}`: {reason}")]
    InvalidArgument {
        kernel: &'static str,
        what: &'static str,
        reason: String,
    },
    /// Shape arithmetic (`a * b`) does not fit in `usize`.
    #[error("{kernel}: size of `{what}` overflows usize")]
    SizeOverflow {
        kernel: &'static str,
        what: &'static str,
    },
    /// A page id is not below the number of pages in the pool.
    #[error("{kernel}: page {page} out of range for a pool of {num_pages} pages")]
    PageOutOfRange {
        kernel: &'static str,
        page: usize,
        num_pages: usize,
    },
    /// A KV slot (`page * block_size + slot_in_page`) is not below `num_pages * block_size`.
    #[error("{kernel}: KV slot {slot} out of range for a pool of {num_slots} slots")]
    SlotOutOfRange {
        kernel: &'static str,
        slot: usize,
        num_slots: usize,
    },
    /// A sequence's block table does not cover the positions it must read.
    #[error("{kernel}: sequence {seq} has {blocks} blocks in its table, needs block {needed}")]
    BlockTableTooShort {
        kernel: &'static str,
        seq: usize,
        blocks: usize,
        needed: usize,
    },
    /// A sequence or segment names rows outside the batch (or a reversed range).
    #[error("{kernel}: rows {start}..{end} out of range for a batch of {rows} rows")]
    RowsOutOfRange {
        kernel: &'static str,
        start: usize,
        end: usize,
        rows: usize,
    },
    /// Two sequences or segments claim the same batch row.
    #[error("{kernel}: row {row} is claimed by more than one sequence or segment")]
    RowsOverlap { kernel: &'static str, row: usize },
    /// A weight row `[offset, offset + len)` does not lie inside the pool.
    #[error(
        "{kernel}: pool range {offset}..{offset}+{len} exceeds the pool of {pool_len} elements"
    )]
    PoolOffsetOutOfRange {
        kernel: &'static str,
        offset: usize,
        len: usize,
        pool_len: usize,
    },
    /// A LoRA segment's rank exceeds the batch's `max_rank`, or its A and Bᵀ row lists differ.
    #[error("{kernel}: segment {segment} has rank {rank} (A) / {b_rank} (Bᵀ), max rank {max_rank}")]
    BadRank {
        kernel: &'static str,
        segment: usize,
        rank: usize,
        b_rank: usize,
        max_rank: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("{kernel}: token id {id} out of range for a vocabulary of {vocab}")]
    TokenOutOfRange {
        kernel: &'static str,
        id: u32,
        vocab: usize,
    },
    /// A position is not below the rotary table's `max_positions`.
    #[error("{kernel}: position {position} out of range for a table of {max_positions} positions")]
    PositionOutOfRange {
        kernel: &'static str,
        position: usize,
        max_positions: usize,
    },
    /// A logit is NaN or `+inf`: the distribution is undefined (a broken forward pass).
    #[error("{kernel}: logit {index} is {value}")]
    InvalidLogit {
        kernel: &'static str,
        index: usize,
        value: f32,
    },
    /// There is nothing to sample from: no logits, or every logit is `-inf`.
    #[error("{kernel}: no token has non-zero probability among {len} logits")]
    EmptyDistribution { kernel: &'static str, len: usize },
    /// NVRTC rejected a kernel source; `log` is the compiler's own output.
    #[error("NVRTC failed to compile `{kernel}` with {options:?}: {message}\n{log}")]
    Compile {
        kernel: String,
        options: Vec<String>,
        message: String,
        log: String,
    },
    /// A CUDA library (driver, NVRTC, cuBLAS) could not be loaded on this machine.
    #[error("CUDA library `{library}` is not available on this machine")]
    CudaUnavailable { library: &'static str },
    /// A CUDA driver or cuBLAS call failed (allocation, copy, module load, launch, GEMM).
    #[error("{kernel}: CUDA call failed: {message}")]
    Cuda {
        kernel: &'static str,
        message: String,
    },
}

impl KernelError {
    /// A stable, bounded label for metrics and logs (never carries payload data).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ShapeMismatch { .. } => "shape_mismatch",
            Self::RaggedRows { .. } => "ragged_rows",
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::SizeOverflow { .. } => "size_overflow",
            Self::PageOutOfRange { .. } => "page_out_of_range",
            Self::SlotOutOfRange { .. } => "slot_out_of_range",
            Self::BlockTableTooShort { .. } => "block_table_too_short",
            Self::RowsOutOfRange { .. } => "rows_out_of_range",
            Self::RowsOverlap { .. } => "rows_overlap",
            Self::PoolOffsetOutOfRange { .. } => "pool_offset_out_of_range",
            Self::BadRank { .. } => "bad_rank",
            Self::TokenOutOfRange { .. } => "token_out_of_range",
            Self::PositionOutOfRange { .. } => "position_out_of_range",
            Self::InvalidLogit { .. } => "invalid_logit",
            Self::EmptyDistribution { .. } => "empty_distribution",
            Self::Compile { .. } => "compile",
            Self::CudaUnavailable { .. } => "cuda_unavailable",
            Self::Cuda { .. } => "cuda",
        }
    }

    /// The kernel that raised the error, when it is one of ours.
    pub fn kernel(&self) -> &str {
        match self {
            Self::ShapeMismatch { kernel, .. }
            | Self::RaggedRows { kernel, .. }
            | Self::InvalidArgument { kernel, .. }
            | Self::SizeOverflow { kernel, .. }
            | Self::PageOutOfRange { kernel, .. }
            | Self::SlotOutOfRange { kernel, .. }
            | Self::BlockTableTooShort { kernel, .. }
            | Self::RowsOutOfRange { kernel, .. }
            | Self::RowsOverlap { kernel, .. }
            | Self::PoolOffsetOutOfRange { kernel, .. }
            | Self::BadRank { kernel, .. }
            | Self::TokenOutOfRange { kernel, .. }
            | Self::PositionOutOfRange { kernel, .. }
            | Self::InvalidLogit { kernel, .. }
            | Self::EmptyDistribution { kernel, .. }
            | Self::Cuda { kernel, .. } => kernel,
            Self::Compile { kernel, .. } => kernel,
            Self::CudaUnavailable { library } => library,
        }
    }

    pub(crate) fn invalid(
        kernel: &'static str,
        what: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument {
            kernel,
            what,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_and_message_carry_the_structured_fields() {
        let e = KernelError::PageOutOfRange {
            kernel: "write_kv",
            page: 9,
            num_pages: 4,
        };
        assert_eq!(e.kind(), "page_out_of_range");
        assert_eq!(e.kernel(), "write_kv");
        assert_eq!(
            e.to_string(),
            "write_kv: page 9 out of range for a pool of 4 pages"
        );
    }

    #[test]
    fn compile_error_message_includes_the_nvrtc_log() {
        let e = KernelError::Compile {
            kernel: "rms_norm".into(),
            options: vec!["--gpu-architecture=sm_90".into()],
            message: "NVRTC_ERROR_COMPILATION".into(),
            log: "rms_norm.cu(3): error: identifier \"x\" is undefined".into(),
        };
        assert_eq!(e.kind(), "compile");
        assert!(e.to_string().contains("identifier \"x\" is undefined"));
    }
}
