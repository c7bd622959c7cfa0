//! GGUF output: a LLaMA model written as llama.cpp's `Q8_0` file type (`LLAMA_FTYPE_MOSTLY_Q8_0`): every 2-D
//! weight whose rows are whole 32-blocks as Q8_0 (per 32 weights: an f16 scale `d = max|w|/127` and 32
//! int8 `round(w/d)`, 8.5 bits per weight, ggml's reference quantizer via candle), norms in F32. Metadata
//! and tokenizer come from the source GGUF; Q and K rows get llama.cpp's RoPE permutation back.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use whittle_core::Stored;
use whittle_formats::gguf::{write, Gguf, Value};
use whittle_models::llama::permute_rows;
use whittle_models::{names, Loaded, Model};

use crate::{Error, LayerReport, Report, Result};

/// ggml type ids.
const GGML_F32: u32 = 0;
const GGML_Q8_0: u32 = 8;
/// `LLAMA_FTYPE_MOSTLY_Q8_0`.
const FTYPE_Q8_0: u32 = 7;

/// Writes `l` (loaded from the GGUF `src`) to `out` as a Q8_0 GGUF.
pub fn write_q8_0(l: &Loaded, src: &Gguf, out: &Path) -> Result<Report> {
    let t0 = std::time::Instant::now();
    let Model::Llama(m) = &l.model else {
        return Err(Error::Unsupported("GGUF output is implemented for LLaMA decoders only".into()));
    };
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    for (n, t) in l.model.named_tensors()? {
        match t {
            Stored::Tensor(t) => {
                by_name.insert(n, t);
            }
            Stored::I8 { .. } => {
                return Err(Error::Unsupported(format!("`{n}` is int8 (w8a8): GGUF output needs a float model")));
            }
        }
    }
    let hd = m.config.head_dim;
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    let mut layers = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    for info in &src.tensors {
        let Some(hf) = names::gguf_to_hf(&info.name) else {
            // Tensors with no HF twin (rope_freqs, ...) are copied as they are.
            tensors.push((
                info.name.clone(),
                info.ne.iter().map(|&d| d as u64).collect(),
                info.type_id,
                src.raw(info).to_vec(),
            ));
            continue;
        };
        let w = by_name
            .get(&hf)
            .ok_or_else(|| Error::Unsupported(format!("no tensor `{hf}` in the model for GGUF `{}`", info.name)))?;
        let w = if hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight") {
            permute_rows(w, w.dim(0)? / hd)?
        } else {
            w.clone()
        };
        let shape = w.dims().to_vec();
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let t = std::time::Instant::now();
        let vals: Vec<f32> = w.flatten_all()?.to_vec1()?;
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("{hf} (element {i})")));
        }
        before += 4 * vals.len();
        if shape.len() == 2 && shape[1] % 32 == 0 {
            let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            let bytes = q.data()?.to_vec();
            drop(q);
            let rmse = q8_0_rmse(&vals, &bytes);
            layers.push(LayerReport {
                name: hf.trim_end_matches(".weight").to_string(),
                scheme: "q8_0".into(),
                params: vals.len(),
                bpw: 8.0 * bytes.len() as f64 / vals.len() as f64,
                weight_rmse: rmse,
                seconds: t.elapsed().as_secs_f64(),
            });
            after += bytes.len();
            tensors.push((info.name.clone(), ne, GGML_Q8_0, bytes));
        } else {
            after += 4 * vals.len();
            tensors.push((info.name.clone(), ne, GGML_F32, vals.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
    }
    let mut meta: Vec<(&str, Value)> = src
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    meta.push(("general.file_type", Value::U32(FTYPE_Q8_0)));
    let refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        tensors.into_iter().map(|(n, ne, ty, b)| (leak_free(&n, src), ne, ty, b)).collect();
    write::write_file(out, &meta, &refs)?;
    Ok(Report { layers, linear_bytes_before: before, linear_bytes_after: after, seconds: t0.elapsed().as_secs_f64() })
}

/// RMSE of Q8_0 blocks (`f16 d`, 32 × `i8 q`: w ≈ d·q) against the original values, without materialising
/// the dequantized tensor (the embedding table alone is 113 MB in f32).
fn q8_0_rmse(vals: &[f32], blocks: &[u8]) -> f64 {
    let mut se = 0f64;
    for (blk, x) in blocks.chunks_exact(34).zip(vals.chunks_exact(32)) {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        for (&q, &v) in blk[2..].iter().zip(x) {
            se += ((v - d * q as i8 as f32) as f64).powi(2);
        }
    }
    (se / vals.len().max(1) as f64).sqrt()
}

/// The `&str` of a source tensor name, borrowed from `src` (names are the source's own).
fn leak_free<'a>(n: &str, src: &'a Gguf) -> &'a str {
    src.tensors.iter().find(|t| t.name == n).map(|t| t.name.as_str()).expect("name taken from src")
}
