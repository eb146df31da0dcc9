//! The crate's one error type.
//!
//! Every variant carries the values that were wrong, so a message can be acted
//! on without a debugger: which op, which argument, what was expected and what
//! arrived. The library never panics on user input and never exits.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `tli-kernels`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer or tensor has the wrong length or shape.
    #[error("{op}: {what} has the wrong size: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation that checked it.
        op: &'static str,
        /// Which argument.
        what: String,
        /// What the other arguments imply.
        expected: String,
        /// What was passed.
        got: String,
    },

    /// An NF4 block size outside the bitsandbytes set {32, 64, ..., 4096}.
    #[error(
        "{op}: block size {blocksize} is not supported (expected a power of two from 32 to 4096)"
    )]
    InvalidBlockSize {
        /// The operation that checked it.
        op: &'static str,
        /// The block size given.
        blocksize: usize,
    },

    /// A pointer does not have the alignment the kernel's vector loads need.
    #[error("{op}: {what} at address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// The operation that checked it.
        op: &'static str,
        /// Which buffer.
        what: String,
        /// Its address.
        addr: usize,
        /// The alignment required.
        align: usize,
    },

    /// A dtype the operation does not handle.
    #[error("{op}: unsupported dtype {dtype} (supported: {supported})")]
    UnsupportedDtype {
        /// The operation that checked it.
        op: &'static str,
        /// The dtype given.
        dtype: String,
        /// The dtypes it handles.
        supported: &'static str,
    },

    /// Any other invalid argument, with the offending values in `reason`.
    #[error("{op}: {reason}")]
    InvalidArgument {
        /// The operation that checked it.
        op: &'static str,
        /// What is wrong, with values.
        reason: String,
    },

    /// The `cuda` backend was asked for but no usable driver or device exists.
    #[error("no CUDA device available: {reason}")]
    NoCudaDevice {
        /// Why (driver library missing, no device, not compiled in, ...).
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed: {message}")]
    Driver {
        /// The driver call or operation.
        call: String,
        /// The driver's message.
        message: String,
    },

    /// A simulated kernel launch failed (barrier timeout, lane missing from
    /// a warp collective, kernel exception).
    #[error("simulated launch of {kernel} failed: {message}")]
    Sim {
        /// The kernel name.
        kernel: String,
        /// What the simulator reported.
        message: String,
    },

    /// A file's contents do not follow the expected format.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file (or a `file:tensor` label).
        path: PathBuf,
        /// What is wrong, naming the tensor and the mismatch.
        reason: String,
    },

    /// A line of a word-pair list (`swahili<TAB>english`, see
    /// [`crate::pairs`]) is malformed or repeats an earlier entry.
    #[error("{source_name}:{line}: {reason}")]
    Pairs {
        /// The file (or label) the list came from.
        source_name: String,
        /// The 1-based line number of the offending line.
        line: usize,
        /// What is wrong, naming the values and quoting the line.
        reason: String,
    },

    /// The training and control word lists share entries.
    #[error("the training and control word lists share {count} Swahili word(s): {shared}")]
    PairsOverlap {
        /// How many control entries repeat a training entry.
        count: usize,
        /// The shared entries with their line numbers in both lists.
        shared: String,
    },

    /// A tensor operation of the model (candle) failed.
    #[error("{op}: {source}")]
    Candle {
        /// What was being computed.
        op: &'static str,
        /// candle's error (it names the shapes or dtypes involved).
        #[source]
        source: candle_core::Error,
    },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::ShapeMismatch`].
    pub(crate) fn shape(
        op: &'static str,
        what: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        Error::ShapeMismatch {
            op,
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`Error::Candle`]: `.map_err(Error::candle("op"))`.
    pub(crate) fn candle(op: &'static str) -> impl FnOnce(candle_core::Error) -> Self {
        move |source| Error::Candle { op, source }
    }

    /// Shorthand for [`Error::Format`].
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
