use thiserror::Error;

/// Errors of the core crate: tensor-engine failures and shape mismatches at the `Linear` seam.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("linear `{name}`: {msg}")]
    Linear { name: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
