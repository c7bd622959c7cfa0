//! ONNX export: an Optimum-style directory (`model.onnx`, `config.json`, `tokenizer.json`) that ONNX Runtime,
//! Optimum's `ORTModelFor…` classes and sentence-transformers' ONNX backend load.
//!
//! Encoders: [`bert`]; decoders with a KV cache: [`llama`]; one Linear per representation: [`linear`].

pub mod bert;
pub mod graph;
pub mod linear;
pub mod llama;
pub mod proto;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use whittle_models::{Loaded, Model};

use crate::{Error, Result};

/// The opset written: 17 (LayerNormalization; every ONNX Runtime ≥ 1.13 runs it).
pub const OPSET: i64 = 17;

/// The model file inside the export directory (Optimum's name).
pub const MODEL_FILE: &str = "model.onnx";

/// protobuf's 2 GiB message limit: larger models would need ONNX external data, which this exporter does
/// not write yet.
const MAX_PROTO_BYTES: usize = (2usize << 30) - (16 << 20);

/// Choices of the ONNX export.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnnxOptions {
    pub linear: linear::LinearOptions,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub output: PathBuf,
    pub model_file: PathBuf,
    pub format: String,
    pub opset: i64,
    pub bytes: u64,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// Linears per representation (`f32`, `w8a8-dynamic`, …) and the ONNX form each took.
    pub linears: BTreeMap<String, usize>,
}

/// The ONNX form a representation takes (for the report).
fn form(l: &whittle_core::Linear, o: &OnnxOptions) -> String {
    let s = l.storage_name();
    let f = match &l.weight {
        whittle_core::LinearWeight::Int8Dynamic(_) if o.linear.per_tensor_dynamic => {
            "DynamicQuantizeLinear+MatMulInteger"
        }
        whittle_core::LinearWeight::Int8Dynamic(_) => "per-token u8+MatMulInteger",
        whittle_core::LinearWeight::Int8Static { .. } => "QuantizeLinear/DequantizeLinear+MatMul",
        whittle_core::LinearWeight::LowRank(_) => "MatMul×2",
        whittle_core::LinearWeight::Block(_) if l.dispatch().float_activations => {
            "com.microsoft.MatMulNBits (f32 activations)"
        }
        whittle_core::LinearWeight::Block(_) => "int8-rounded activations+com.microsoft.MatMulNBits",
        _ => "MatMul",
    };
    format!("{s} → {f}")
}

/// Metadata key naming the activations the graph's block (4-bit) layers take: [`F32_ACTS`] or [`INT8_ACTS`].
pub const BLOCK_ACTIVATIONS_KEY: &str = "whittle.block_activations";
/// Block layers take f32 activations (the model ran with `float_activations`).
pub const F32_ACTS: &str = "f32";
/// Block layers take activations rounded to int8 per block of 32, as whittle's block kernels.
pub const INT8_ACTS: &str = "int8/32";

/// How `l`'s block layers take their activations (`None`: it has none).
pub fn block_activations(l: &Loaded) -> Option<&'static str> {
    let lins = l.model.linears();
    let (_, b) = lins.iter().find(|(_, lin)| matches!(lin.weight, whittle_core::LinearWeight::Block(_)))?;
    Some(if b.dispatch().float_activations { F32_ACTS } else { INT8_ACTS })
}

/// Builds the ONNX model of `l` in memory: the serialised `ModelProto`, its input and output names.
pub fn model_bytes(l: &Loaded, o: &OnnxOptions) -> Result<(Vec<u8>, Vec<String>, Vec<String>)> {
    let mut g = graph::Graph::new(OPSET);
    g.options = o.linear;
    let (name, ins, outs) = match &l.model {
        Model::Bert(m) => {
            bert::build(&mut g, m)?;
            (
                "whittle_bert",
                vec!["input_ids".into(), "attention_mask".into(), "token_type_ids".into()],
                vec!["last_hidden_state".into(), "sentence_embedding".into()],
            )
        }
        Model::Llama(m) => {
            let (ins, outs) = llama::build(&mut g, m)?;
            ("whittle_llama", ins, outs)
        }
    };
    if g.initializer_bytes() > MAX_PROTO_BYTES {
        return Err(Error::Usage(format!(
            "the model's weights take {} MB, over protobuf's 2 GB limit for one ONNX file; ONNX external data \
             is not written yet",
            g.initializer_bytes() >> 20
        )));
    }
    let doc = format!("exported by whittle from {}", l.source.path.display());
    let mut meta = vec![("source", l.source.path.display().to_string()), ("family", l.model.family().to_string())];
    if let Some(a) = block_activations(l) {
        meta.push((BLOCK_ACTIVATIONS_KEY, a.into()));
    }
    Ok((g.finish(name, &doc, &meta), ins, outs))
}

/// Writes the ONNX export of `l` to the directory `out` (atomically: a temporary sibling, moved into place
/// at the end). The caller has claimed `out` (`pipeline::output::check_exclusive`).
pub fn export(l: &Loaded, out: &Path, o: &OnnxOptions) -> Result<ExportReport> {
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(&l.source.path).ok() {
        return Err(Error::Usage(format!("{}: output would overwrite the input model", out.display())));
    }
    let (bytes, inputs, outputs) = model_bytes(l, o)?;
    let config = match &l.model {
        Model::Bert(m) => m.config.to_hf_json(&m.blocks),
        Model::Llama(m) => {
            let mut c = m.config.to_hf_json(&m.blocks, l.bos_token_id, &l.eos_token_ids);
            // Per-layer widths (structured pruning) are in the graph; say so for readers of config.json.
            let dims: Vec<_> = l.model.block_dims();
            if dims.windows(2).any(|w| w[0] != w[1]) {
                c["whittle_block_dims"] = serde_json::to_value(&dims).unwrap_or_default();
            }
            c
        }
    };
    let tmp = whittle_formats::out::temp_path(out);
    let write = || -> std::io::Result<()> {
        let _ = whittle_formats::out::remove_any(&tmp);
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join(MODEL_FILE), &bytes)?;
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
        std::fs::write(tmp.join("tokenizer.json"), serde_json::to_string(&l.tokenizer_json)?)?;
        for f in ["model.onnx", "config.json", "tokenizer.json"] {
            std::fs::File::open(tmp.join(f))?.sync_all()?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = whittle_formats::out::remove_any(&tmp);
        return Err(Error::File { path: tmp, msg: format!("writing: {e}") });
    }
    whittle_formats::out::commit(&tmp, out).inspect_err(|_| {
        let _ = whittle_formats::out::remove_any(&tmp);
    })?;
    let mut linears = BTreeMap::new();
    // BERT's pooler is not part of the export (its outputs are the hidden states and the sentence embedding).
    for (_, lin) in l.model.linears().into_iter().filter(|(n, _)| !n.starts_with("pooler.")) {
        *linears.entry(form(lin, o)).or_insert(0) += 1;
    }
    Ok(ExportReport {
        output: out.to_path_buf(),
        model_file: out.join(MODEL_FILE),
        format: "onnx".into(),
        opset: OPSET,
        bytes: bytes.len() as u64,
        inputs,
        outputs,
        linears,
    })
}

/// The ONNX file of an export: `PATH/model.onnx` for an export directory, else `PATH` itself.
pub fn model_file(path: &Path) -> Result<PathBuf> {
    let f = if path.is_dir() { path.join(MODEL_FILE) } else { path.to_path_buf() };
    if !f.is_file() {
        return Err(Error::File {
            path: f,
            msg: "no such ONNX file (pass the directory `whittle export` wrote, or a .onnx file)".into(),
        });
    }
    Ok(f)
}
