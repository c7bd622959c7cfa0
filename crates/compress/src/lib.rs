//! whittle-compress: the techniques that remove or restructure weights — unstructured and N:M pruning,
//! structured removal of heads, neurons and blocks, low-rank factorisation and cross-layer sharing. The pruning
//! solvers are pure functions over row-major weights; the passes apply them to a model.
//!
//! - [`prune::magnitude`]: the smallest |w| per output row (or per N:M group); [`prune::global_threshold`]
//!   for one magnitude threshold over many layers.
//! - [`prune::wanda`] (Sun et al. 2023): |w|·‖X_j‖₂ per output row.
//! - [`prune::sparsegpt`] (Frantar & Alistarh 2023): OBS mask selection with weight reconstruction through
//!   the layer Hessian, optionally quantizing the kept weights in the same pass.
//! - [`pass`]: those solvers over a whole model (layer by layer on calibration text for Wanda and SparseGPT,
//!   through the sequential mode of the calibration engine, `whittle_calib::sequential`).
//! - [`structured`]: removal of whole heads, FFN neurons and blocks.
//! - [`lowrank`], [`attention`]: low-rank factorisation of Linears, and of the attention scores (Q and K jointly).
//! - [`share`]: cross-layer parameter sharing.

pub mod attention;
pub mod lowrank;
pub mod pass;
pub mod prune;
pub mod schedule;
pub mod share;
pub mod structured;

use whittle_core::InvalidOption;

pub use prune::{global_threshold, magnitude, parse_pattern, sparsegpt, threshold, wanda, Pattern};

/// Errors of the pruning solvers, naming the option or layer at fault (options as configs spell them, see
/// [`whittle_core::InvalidOption`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Option `sparsity` outside [0, 1).
    #[error(transparent)]
    BadSparsity(InvalidOption),
    /// Option `damp` negative or not finite.
    #[error(transparent)]
    BadDamp(InvalidOption),
    #[error(transparent)]
    Option(#[from] InvalidOption),
    #[error("invalid sparsity pattern `{0}`: expected N:M with 0 < N < M (2:4, 4:8) or `unstructured`")]
    BadPattern(String),
    #[error("layer `{layer}`: {n}:{m} sparsity needs the input features k = {k} to be a multiple of M = {m}")]
    PatternMismatch { layer: String, k: usize, n: usize, m: usize },
    #[error("layer `{layer}`: {what} has {got} values, expected {want}")]
    Shape { layer: String, what: &'static str, got: usize, want: usize },
    #[error("layer `{layer}`: {what} holds a negative, NaN or infinite value")]
    BadStats { layer: String, what: &'static str },
    #[error("layer `{layer}`: quantization {format} needs 2–8 bits and a group dividing k = {k}")]
    BadQuant { layer: String, format: String, k: usize },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Quant(#[from] whittle_quant::Error),
    #[error(transparent)]
    Calib(#[from] whittle_calib::Error),
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Option `sparsity` outside [0, 1).
    pub fn bad_sparsity(sparsity: f64) -> Self {
        Error::BadSparsity(InvalidOption::new("sparsity", sparsity, "must be in [0, 1)"))
    }

    /// Option `damp` negative or not finite.
    pub fn bad_damp(damp: f64) -> Self {
        Error::BadDamp(InvalidOption::new("damp", damp, "must be finite and ≥ 0"))
    }
}
