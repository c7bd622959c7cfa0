//! Importance matrices in llama.cpp's GGUF imatrix format (`llama-imatrix -o imatrix.gguf`): per Linear
//! `<tensor>.in_sum2` (Σ x² per input channel, f32, ne = [in, 1]) and `<tensor>.counts` (rows summed, f32,
//! ne = [1, 1]), tensor names as in the model's GGUF, with `general.type = imatrix`,
//! `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`.

use std::collections::BTreeMap;
use std::path::Path;

use whittle_core::observe::ActStats;
use whittle_formats::gguf::{write, Value};

use crate::{Error, Result};

/// Writes the Σx² statistics of every block Linear of a LLaMA model (HF names in `stats`) to `out`.
pub fn write_imatrix(
    stats: &BTreeMap<String, ActStats>,
    out: &Path,
    dataset: &str,
    chunks: usize,
    chunk_size: usize,
) -> Result<usize> {
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    for (name, s) in stats {
        if s.rows == 0 {
            continue;
        }
        // llama-imatrix collects the block weights (`blk.*`), not the output head.
        let Some(g) = whittle_models::names::hf_to_gguf(&format!("{name}.weight")).filter(|g| g.starts_with("blk."))
        else {
            continue;
        };
        let sum2: Vec<u8> = s.sumsq.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        tensors.push((format!("{g}.in_sum2"), vec![s.k as u64, 1], 0, sum2));
        tensors.push((format!("{g}.counts"), vec![1, 1], 0, (s.rows as f32).to_le_bytes().to_vec()));
    }
    if tensors.is_empty() {
        return Err(Error::Unsupported("imatrix: no Linear with a GGUF tensor name was observed".into()));
    }
    let meta = vec![
        ("general.type", Value::String("imatrix".into())),
        ("imatrix.datasets", Value::Array(vec![Value::String(dataset.into())])),
        ("imatrix.chunk_count", Value::U32(chunks as u32)),
        ("imatrix.chunk_size", Value::U32(chunk_size as u32)),
    ];
    let refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        tensors.iter().map(|(n, ne, t, b)| (n.as_str(), ne.clone(), *t, b.clone())).collect();
    write::write_file(out, &meta, &refs)?;
    Ok(tensors.len() / 2)
}
