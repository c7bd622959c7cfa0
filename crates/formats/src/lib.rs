//! whittle-formats: reading and writing the files models come in.
//!
//! - [`gguf`]: GGUF v2/v3 reader (llama.cpp), bounds-checked so a lying length field is an error, never
//!   an allocation; tensors dequantized to f32 on request.
//! - [`hf`]: Hugging Face directories (`config.json`, single or sharded safetensors, `tokenizer.json`),
//!   hub ids resolved from the local cache, and atomic safetensors writing.
//! - [`tokenizer`]: a `tokenizers::Tokenizer` built from GGUF metadata.

pub mod error;
pub mod gguf;
pub mod hf;
pub mod out;
pub mod tokenizer;

pub use error::{Error, Result};

use candle_core::Tensor;

/// What a source file says about one stored tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name in the source file's own convention.
    pub name: String,
    /// Storage type as the file names it (`f32`, `bf16`, `q4_1`, ...).
    pub dtype: String,
    /// Row-major shape (outermost first), as PyTorch would show it.
    pub shape: Vec<usize>,
    /// Bytes the tensor occupies in the file.
    pub bytes: usize,
}

/// A file (or set of files) of named tensors.
pub trait TensorSource {
    /// Every stored tensor, in file order.
    fn infos(&self) -> Vec<TensorInfo>;
    /// Loads one tensor as f32 on the CPU (quantized types are dequantized).
    fn load_f32(&self, name: &str) -> Result<Tensor>;
    /// Loads one tensor in its stored dtype (integer tensors stay integer).
    fn load_native(&self, name: &str) -> Result<Tensor> {
        self.load_f32(name)
    }
    /// The path shown in errors.
    fn describe(&self) -> String;
    fn contains(&self, name: &str) -> bool {
        self.infos().iter().any(|i| i.name == name)
    }
    /// Loads an int8 tensor: (shape, values). Formats without int8 tensors refuse.
    fn load_i8(&self, name: &str) -> Result<(Vec<usize>, Vec<i8>)> {
        Err(Error::UnknownDtype {
            path: self.describe().into(),
            tensor: name.into(),
            dtype: "i8 (not in this format)".into(),
        })
    }
    /// A tensor stored in one of ggml's block types: (ggml type id, row-major shape, raw bytes). `None` for
    /// float tensors and formats without block types.
    fn raw_block(&self, _name: &str) -> Option<(u32, Vec<usize>, &[u8])> {
        None
    }
    /// The stored dtype of a tensor, if present.
    fn dtype_of(&self, name: &str) -> Option<String> {
        self.infos().into_iter().find(|i| i.name == name).map(|i| i.dtype)
    }
}
