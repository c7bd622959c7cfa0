use std::path::PathBuf;

use thiserror::Error;

/// Errors reading or writing model files. Every variant names the file, and the tensor or field when
/// there is one.
#[derive(Debug, Error)]
pub enum Error {
    /// The OS error is part of the message, not a `source`: chained printing (`{:#}`) would say it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// Another process holds the output's claim ([`crate::out::Claim`]).
    #[error("{path}: another whittle process{holder} is writing this output; wait for it to finish, or set option `wait` to queue behind it")]
    Busy { path: PathBuf, holder: String },
    #[error("{path}: not a GGUF file (magic {magic:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (whittle reads v2 and v3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt at byte {offset}: {what}")]
    Corrupt { path: PathBuf, offset: usize, what: String },
    #[error("{path}: tensor `{tensor}`: data [{start}, {end}) lies outside the file's data section ({len} bytes)")]
    TensorOutOfBounds { path: PathBuf, tensor: String, start: usize, end: usize, len: usize },
    #[error("{path}: tensor `{tensor}` has unknown or unsupported type {dtype}")]
    UnknownDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    BadTensor { path: PathBuf, tensor: String, msg: String },
    #[error("{path}: no tensor named `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: metadata `{key}`: {msg}")]
    Metadata { path: PathBuf, key: String, msg: String },
    #[error("{path}: invalid safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: invalid JSON: {err}")]
    Json { path: PathBuf, err: serde_json::Error },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("model `{id}` not found in the local Hugging Face cache (looked in {looked}); whittle never downloads: fetch it with `huggingface-cli download {id}` on a connected machine, or pass a local directory or .gguf file")]
    NotInCache { id: String, looked: String },
    #[error("{path}: {msg}")]
    Other { path: PathBuf, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |err| Error::Io { path, err }
}
