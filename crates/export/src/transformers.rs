//! transformers as `verify`'s runtime for compressed-tensors exports: the committed script
//! `scripts/transformers_verify.py` (embedded in the binary) loads the directory with
//! `AutoModelForCausalLM.from_pretrained` — the `compressed-tensors` package decompresses the packed Linears —
//! in the peers' venv, and answers on the protocol of [`crate::llamacpp`] ([`PyRuntime::Transformers`]).

use std::path::Path;

use serde::Serialize;

pub use crate::llamacpp::PyRuntime;

/// The script, as committed: run with `python -c`, so the binary needs no file beside it.
pub const SCRIPT: &str = include_str!("../../../scripts/transformers_verify.py");

/// What transformers is asked to run: [`crate::llamacpp::Request`] and the dtype it loads the model in.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    #[serde(flatten)]
    pub base: crate::llamacpp::Request,
    /// `float32` (default: activations in f32, the dequantized weights exactly), `float16`, `bfloat16`.
    pub dtype: String,
}

/// The torch dtypes the script loads a model in.
pub const DTYPES: [&str; 3] = ["float32", "float16", "bfloat16"];

/// Whether `dir` is a compressed-tensors export: a directory whose `config.json` has
/// `quantization_config.quant_method` `compressed-tensors`.
pub fn is_compressed_tensors(dir: &Path) -> bool {
    dir.is_dir()
        && whittle_formats::hf::read_json(&dir.join("config.json")).is_ok_and(|c| {
            c.pointer("/quantization_config/quant_method").and_then(|v| v.as_str())
                == Some(crate::compressed_tensors::QUANT_METHOD)
        })
}
