//! whittle-calib: the one calibration engine, below the techniques (quant, compress) that use it, with the
//! three modes they need:
//!
//! - [`observe`]: one float pass over calibration text with an observer on every (or a chosen) Linear's
//!   input — ranges and histograms for static int8, per-channel max |x| for SmoothQuant and AWQ, Σx² for
//!   importance matrices and Wanda, sample rows for output-error reports;
//! - [`sequential`]: block by block and, inside a block, stage by stage in the order the model declares
//!   (`BlockLayout::STAGES`), a solver per Linear (GPTQ, SparseGPT, Wanda), each stage's inputs computed
//!   with the already-solved Linears before it;
//! - measure → [`allocate`] → apply: per-layer measurements (spectra, sensitivities) made by the technique,
//!   one choice per layer under a budget by a Lagrangian price, then the technique applies the choices.
//!
//! [`report`] holds the per-layer report every pass returns.

pub mod allocate;
pub mod observe;
pub mod report;
pub mod sequential;

/// Errors of the engine: non-finite values, calibration text that cannot feed the model, and the layers below.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer `{0}` holds NaN or Inf weights")]
    NonFinite(String),
    #[error("{0}")]
    Text(String),
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
