use std::path::PathBuf;

use thiserror::Error;

/// Errors of the measurements: bad data files and impossible requests, each named.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Data { path: String, msg: String },
    #[error("{path}:{line}: {msg}")]
    Line { path: String, line: usize, msg: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Option(#[from] whittle_core::InvalidOption),
}

pub type Result<T> = std::result::Result<T, Error>;
