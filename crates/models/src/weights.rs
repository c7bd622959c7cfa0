//! The tensors of one source (an HF directory or a GGUF file) under Hugging Face names, checked against the
//! shapes a model's config implies. The model files build themselves from [`Weights`]; which representation a
//! Linear's tensors hold is for [`whittle_core::codec`] to read.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use whittle_core::codec::{self, LinearReader};
use whittle_core::Linear;
use whittle_formats::TensorSource;

use crate::{Error, Result};

/// Tensors of one source, checked against the shapes the config implies.
pub struct Weights<'a> {
    pub src: &'a dyn TensorSource,
    pub path: PathBuf,
    /// Maps a Hugging Face name to the source's name.
    pub rename: &'a dyn Fn(&str) -> Option<String>,
    /// Load block-quantized Linears as dense f32.
    pub dequantize: bool,
    /// The dtype dense weights (and LLaMA's embedding table) are kept in: `None` keeps f16 and bf16 as
    /// stored and widens everything else to f32 (`--dtype`).
    pub dtype: Option<DType>,
}

impl Weights<'_> {
    fn source_name(&self, name: &str) -> String {
        (self.rename)(name).unwrap_or_else(|| name.to_string())
    }

    /// Whether `name` will load as a block-quantized Linear.
    pub fn is_block(&self, name: &str) -> bool {
        !self.dequantize
            && self
                .src
                .raw_block(&self.source_name(name))
                .is_some_and(|(t, _, _)| whittle_kernels::ggml::type_info(t).is_some())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.source_name(name))
    }

    pub fn shape_err(&self, name: &str, expected: &[usize], got: &[usize]) -> Error {
        Error::Shape {
            path: self.path.clone(),
            tensor: self.source_name(name),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    /// Loads `name` as f32 and checks its shape; `0` in `shape` accepts any size.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.src.load_f32(&self.source_name(name))?;
        let ok = t.dims().len() == shape.len() && t.dims().iter().zip(shape).all(|(a, b)| *b == 0 || a == b);
        if !ok {
            return Err(self.shape_err(name, shape, t.dims()));
        }
        Ok(t)
    }

    /// A dense weight `name` in the dtype the load keeps dense weights in ([`Weights::dtype`]), shape
    /// checked as [`Weights::get`] does.
    pub fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let src = self.source_name(name);
        let native = |want: Option<DType>| -> Result<Tensor> {
            let t = self.src.load_native(&src)?;
            Ok(match (t.dtype(), want) {
                // Not a float (an error load_f32 words), or nothing to keep: as f32.
                (d, _) if !d.is_float() => self.src.load_f32(&src)?,
                (DType::F16 | DType::BF16, None) => t,
                (_, None) => t.to_dtype(DType::F32)?,
                (d, Some(w)) if d == w => t,
                (_, Some(w)) => t.to_dtype(w)?,
            })
        };
        let t = match self.dtype {
            None | Some(DType::F16) | Some(DType::BF16) => native(self.dtype)?,
            Some(_) => self.src.load_f32(&src)?,
        };
        let ok = t.dims().len() == shape.len() && t.dims().iter().zip(shape).all(|(a, b)| *b == 0 || a == b);
        if !ok {
            return Err(self.shape_err(name, shape, t.dims()));
        }
        Ok(t)
    }

    /// A Linear `name.weight` (out, in) with `name.bias` when `bias` is true (or present).
    pub fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.linear_any(name, Some(out), Some(inp), bias)
    }

    /// Like [`Weights::linear`], accepting any size where `None` is given (widths pruning may change). The
    /// codec of whatever representation is stored reads it ([`codec::read`]).
    pub fn linear_any(&self, name: &str, out: Option<usize>, inp: Option<usize>, bias: bool) -> Result<Linear> {
        codec::read(self, name, out, inp, bias)
    }
}

impl LinearReader for Weights<'_> {
    type Error = Error;

    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
    fn dtype_of(&self, name: &str) -> Option<String> {
        self.src.dtype_of(&self.source_name(name))
    }
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Weights::get(self, name, shape)
    }
    fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Weights::get_weight(self, name, shape)
    }
    fn load_f32(&self, name: &str) -> Result<Tensor> {
        Ok(self.src.load_f32(&self.source_name(name))?)
    }
    fn load_native(&self, name: &str) -> Result<Tensor> {
        Ok(self.src.load_native(&self.source_name(name))?)
    }
    fn load_i8(&self, name: &str) -> Result<(Vec<usize>, Vec<i8>)> {
        Ok(self.src.load_i8(&self.source_name(name))?)
    }
    fn raw_block(&self, name: &str) -> Option<(u32, Vec<usize>, &[u8])> {
        if self.dequantize {
            return None;
        }
        self.src.raw_block(&self.source_name(name))
    }
    fn bad(&self, name: &str, msg: String) -> Error {
        Error::Config { path: self.path.clone(), field: self.source_name(name), msg }
    }
    fn shape_err(&self, name: &str, expected: &[usize], got: &[usize]) -> Error {
        Weights::shape_err(self, name, expected, got)
    }
}
