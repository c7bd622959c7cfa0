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
    #[error("{path}: tokenizer has token ids up to {max_id} but the model's embedding table has {model} rows (ids 0..{model})")]
    VocabMismatch { path: PathBuf, max_id: usize, model: usize },
    #[error("{path}: tokenizer does not belong to this model: {msg}")]
    TokenizerMismatch { path: PathBuf, msg: String },
    #[error("model `{spec}` not found: not a file, a directory, or an `org/name` hub id")]
    NotFound { spec: String },
    #[error("the prompt is {prompt} tokens and {new} more are asked for: {} positions, past the model's context of {context} (max_position_embeddings / context_length); shorten the prompt, ask for fewer tokens, or set option `truncate` to keep the prompt's last tokens", .prompt + .new)]
    ContextTooLong { prompt: usize, new: usize, context: usize },
    #[error("{0}")]
    Usage(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

pub type Result<T> = std::result::Result<T, Error>;
