//! Importance matrices in llama.cpp's GGUF imatrix format (`llama-imatrix -o imatrix.gguf`): per Linear
//! `<tensor>.in_sum2` (Σ x² per input channel, f32, ne = [in, 1]) and `<tensor>.counts` (rows summed, f32,
//! ne = [1, 1]), tensor names as in the model's GGUF, with `general.type = imatrix`,
//! `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`.

use std::collections::BTreeMap;
use std::path::Path;

use whittle_core::observe::ActStats;
use whittle_formats::gguf::{write, Value};

use crate::{Error, Result};

/// Writes the Σx² statistics of every block Linear of a LLaMA model (HF names in `stats`) to `out`; with
/// `head` (the GGUF tensor of the output head: `output.weight`, or `token_embd.weight` when the embeddings
/// are tied) the head's statistics too, which llama-imatrix leaves out.
pub fn write_imatrix(
    stats: &BTreeMap<String, ActStats>,
    out: &Path,
    dataset: &str,
    chunks: usize,
    chunk_size: usize,
    head: Option<&str>,
) -> Result<usize> {
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    for (name, s) in stats {
        if s.rows == 0 {
            continue;
        }
        // llama-imatrix collects the block weights (`blk.*`), not the output head (unless asked).
        let g = match head {
            Some(h) if name == "lm_head" => h.to_string(),
            _ if !whittle_models::Model::is_block_linear(name) => continue,
            _ => match whittle_models::names::hf_to_gguf(&format!("{name}.weight")) {
                Some(g) => g,
                None => continue,
            },
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

/// Reads an importance matrix in llama.cpp's GGUF imatrix format (written by `llama-imatrix` or
/// `whittle imatrix`): per tensor name (e.g. `blk.0.attn_q.weight`), the mean x² per input channel
/// (`in_sum2 / counts`, as llama-quantize computes it).
pub fn read_imatrix(path: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let g = whittle_formats::gguf::Gguf::open(path)?;
    let shown = path.display();
    if g.get("general.type").and_then(|v| v.as_str()) != Some("imatrix") {
        return Err(Error::Unsupported(format!(
            "{shown}: not an importance matrix (general.type is not `imatrix`; llama.cpp's legacy .dat files are not read: convert them with `llama-imatrix --in-file old.dat -o new.gguf`)"
        )));
    }
    let mut out = BTreeMap::new();
    for t in &g.tensors {
        let Some(base) = t.name.strip_suffix(".in_sum2") else { continue };
        let counts = g
            .tensor(&format!("{base}.counts"))
            .ok_or_else(|| Error::Unsupported(format!("{shown}: `{}` has no `{base}.counts` beside it", t.name)))?;
        let sum2: Vec<f32> = g.dequantize(t)?.flatten_all()?.to_vec1()?;
        let n: Vec<f32> = g.dequantize(counts)?.flatten_all()?.to_vec1()?;
        // One count per expert for MoE tensors; dense models have one.
        if n.len() != 1 {
            return Err(Error::Unsupported(format!(
                "{shown}: `{base}` has {} counts (mixture-of-experts imatrices are not supported)",
                n.len()
            )));
        }
        let c = n[0].max(1.0);
        if sum2.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::Unsupported(format!("{shown}: `{}` holds negative or non-finite sums", t.name)));
        }
        out.insert(base.to_string(), sum2.iter().map(|v| v / c).collect());
    }
    if out.is_empty() {
        return Err(Error::Unsupported(format!("{shown}: no `*.in_sum2` tensors (an empty importance matrix)")));
    }
    Ok(out)
}

/// Checks an importance matrix against a model's GGUF tensors (name → row width): every entry must name a
/// tensor of the model with the same width, and at least one must match.
pub fn check_imatrix(im: &BTreeMap<String, Vec<f32>>, widths: &BTreeMap<String, usize>, file: &str) -> Result<()> {
    for (name, v) in im {
        match widths.get(name) {
            None => {
                return Err(Error::Unsupported(format!(
                    "imatrix {file}: tensor `{name}` is not in this model (an importance matrix of another model?)"
                )))
            }
            Some(&w) if w != v.len() => {
                return Err(Error::Unsupported(format!(
                    "imatrix {file}: `{name}` has {} channels but the model's tensor has rows of {w} (an importance matrix of another model?)",
                    v.len()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write_imatrix` writes, `read_imatrix` reads back as means; a width or name from another model is
    /// an error naming the tensor.
    #[test]
    fn imatrix_round_trip_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("im.gguf");
        let mut st = ActStats::new(4);
        st.observe(&[1.0, 2.0, 0.0, -1.0, 3.0, 0.0, 0.0, 1.0]);
        let mut stats = BTreeMap::new();
        stats.insert("model.layers.0.self_attn.q_proj".to_string(), st);
        assert_eq!(write_imatrix(&stats, &f, "t", 1, 2, None).unwrap(), 1);
        let im = read_imatrix(&f).unwrap();
        assert_eq!(im["blk.0.attn_q.weight"], vec![5.0, 2.0, 0.0, 1.0]);
        let mut widths = BTreeMap::from([("blk.0.attn_q.weight".to_string(), 4usize)]);
        check_imatrix(&im, &widths, "im.gguf").unwrap();
        widths.insert("blk.0.attn_q.weight".into(), 8);
        let e = check_imatrix(&im, &widths, "im.gguf").unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_q.weight") && e.contains("another model"), "{e}");
        let e = check_imatrix(&im, &BTreeMap::new(), "im.gguf").unwrap_err().to_string();
        assert!(e.contains("not in this model"), "{e}");
        // A GGUF that is not an imatrix.
        let g = dir.path().join("m.gguf");
        write::write_file(&g, &[("general.type", Value::String("model".into()))], &[]).unwrap();
        assert!(read_imatrix(&g).unwrap_err().to_string().contains("not an importance matrix"));
    }
}
