use std::path::PathBuf;

use thiserror::Error;

/// Errors building or running a model. Variants name the file, tensor, layer or field at fault.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] whittle_formats::Error),
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: unsupported model_type `{model_type}` (whittle runs: {supported})")]
    UnsupportedModelType { path: PathBuf, model_type: String, supported: &'static str },
    #[error("{path}: config field `{field}`: {msg}")]
    Config { path: PathBuf, field: String, msg: String },
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: tokenizer has {tokenizer} tokens but the model's embedding table has {model} rows")]
    VocabMismatch { path: PathBuf, tokenizer: usize, model: usize },
    #[error("model `{spec}` not found: not a file, a directory, or an `org/name` hub id")]
    NotFound { spec: String },
    #[error("{0}")]
    Usage(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

pub type Result<T> = std::result::Result<T, Error>;
