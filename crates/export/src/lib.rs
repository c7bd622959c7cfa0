//! whittle-export: a compressed model leaves the tool, and `verify` proves it runs the same elsewhere.
//!
//! - [`onnx`]: ONNX graphs written with prost from a minimal message set of `onnx.proto` (no `protoc`):
//!   BERT encoders with sentence-transformers' pooling in the graph, LLaMA decoders with a KV cache, named as
//!   Optimum's exports are; each Linear in the ONNX form of its representation ([`onnx::linear`]).
//! - [`runtime`]: ONNX Runtime through the `ort` crate, loaded at run time from a `libonnxruntime` the user
//!   has (the `onnxruntime` Python wheel ships one); nothing is downloaded.
//! - [`gguf`]: LLaMA-family models as llama.cpp's GGUF (tokenizer from `tokenizer.json`, per-layer widths,
//!   weight-only grids copied code for code into the ggml block type that holds them).
//! - [`llamacpp`]: llama.cpp through llama-cpp-python (a committed script run by the peers' Python).
//! - [`compressed_tensors`]: LLaMA-family models as the HF directory llm-compressor writes
//!   (`quant_method: compressed-tensors`, `pack-quantized` / `int-quantized`), which transformers and vLLM load.
//! - [`transformers`]: transformers (with `compressed-tensors`) through a committed script run by the peers'
//!   Python.
//! - [`verify`]: runs an export in its runtime (ONNX Runtime, llama.cpp, transformers) and compares it with
//!   whittle's own run of the source model on real data, with `whittle_eval`'s instruments.

pub mod compressed_tensors;
pub mod gguf;
pub mod llamacpp;
pub mod onnx;
pub mod runtime;
pub mod transformers;
pub mod verify;

use std::path::PathBuf;

/// Errors of exporting and verifying; each names the file, tensor or option concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Linear whose representation has no faithful form in the target format.
    #[error("`{tensor}` ({repr}): {reason}")]
    Unsupported { tensor: String, repr: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// ONNX Runtime could not be loaded or refused the model.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// llama.cpp (llama-cpp-python) could not be run or refused the model.
    #[error("llama.cpp: {0}")]
    LlamaCpp(String),
    /// transformers (with compressed-tensors) could not be run or refused the model.
    #[error("transformers: {0}")]
    Transformers(String),
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Formats(#[from] whittle_formats::Error),
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Option(#[from] whittle_core::InvalidOption),
    #[error(transparent)]
    Eval(#[from] whittle_eval::Error),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
