//! Writing a model as a Hugging Face directory that transformers loads: `config.json`,
//! `model.safetensors`, `tokenizer.json` (+ `tokenizer_config.json`). Written atomically. Each Linear's
//! tensors, and the description of their formats in `config.json`, come from its codec
//! ([`whittle_core::codec`]).

use std::path::Path;

use candle_core::DType;
use whittle_core::{Linear, Stored};
use whittle_formats::hf::{write_dir_atomic, write_json, write_stored};

use crate::{Error, Loaded, Model, Result};

/// Saves `l` to `out` with weights in `dtype` (f32, f16 or bf16).
pub fn save_hf_dir(l: &Loaded, out: &Path, dtype: DType) -> Result<()> {
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(&l.source.path).ok() {
        return Err(Error::Usage(format!("{}: output would overwrite the input model", out.display())));
    }
    // Float tensors take `dtype`; quantized ones (int8 and their f32 scales) keep their own.
    let quantized: Vec<String> =
        l.model.linears().into_iter().filter(|(_, l)| l.is_quantized()).map(|(n, _)| n).collect();
    // Blocks sharing another block's weights are stored once, under the leader's names.
    let alias_block = |n: &str| {
        l.shared_blocks
            .keys()
            .any(|b| n.starts_with(&format!("encoder.layer.{b}.")) || n.starts_with(&format!("model.layers.{b}.")))
    };
    let tensors: Vec<(String, Stored)> = l
        .model
        .named_tensors()?
        .into_iter()
        .filter(|(n, _)| !alias_block(n))
        .map(|(n, t)| match t {
            Stored::Tensor(t) if !whittle_core::codec::keeps_f32(&n) && t.dtype().is_float() => {
                Ok((n, Stored::Tensor(t.to_dtype(dtype)?)))
            }
            other => Ok((n, other)),
        })
        .collect::<Result<_>>()?;
    let config = match &l.model {
        Model::Bert(m) => m.config.to_hf_json(&m.blocks),
        Model::Llama(m) => m.config.to_hf_json(&m.blocks, l.bos_token_id, &l.eos_token_ids),
    };
    let mut config = config;
    if !quantized.is_empty() {
        let layers = storage_names(l, Linear::is_quantized);
        config["quantization_config"] = serde_json::json!({
            "quant_method": "whittle",
            "formats": described(whittle_core::codec::quantization_formats()),
            "layers": layers,
        });
    }
    let sparse = storage_names(l, Linear::is_sparse);
    if !sparse.is_empty() {
        config["sparsity_config"] = serde_json::json!({
            "format": "whittle",
            "layouts": described(whittle_core::codec::sparse_layouts()),
            "layers": sparse,
        });
    }
    if !l.shared_blocks.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> =
            l.shared_blocks.iter().map(|(b, leader)| (b.to_string(), (*leader).into())).collect();
        config["whittle_shared_blocks"] = m.into();
    }
    config["torch_dtype"] = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
    .into();
    write_dir_atomic(out, |dir| {
        write_json(&dir.join("config.json"), &config)?;
        write_stored(
            &dir.join("model.safetensors"),
            &tensors,
            Some([("format".to_string(), "pt".to_string())].into()),
        )?;
        write_tokenizer_files(l, dir)
    })?;
    Ok(())
}

/// Writes `l`'s tokenizer into the directory `dir`: `tokenizer.json`, and an HF source's own
/// `tokenizer_config.json`, `special_tokens_map.json`, `vocab.txt` and `sentence_bert_config.json` (a GGUF
/// source gets a minimal `tokenizer_config.json`).
pub fn write_tokenizer_files(l: &Loaded, dir: &Path) -> whittle_formats::Result<()> {
    let token = |id: Option<u32>| id.and_then(|i| l.tokenizer.id_to_token(i));
    let mut tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": l.add_bos,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(b) = token(l.bos_token_id) {
        tok_cfg["bos_token"] = b.into();
    }
    if let Some(e) = token(l.eos_token_ids.first().copied()) {
        tok_cfg["eos_token"] = e.clone().into();
        tok_cfg["pad_token"] = e.into();
    }
    let src_dir = if l.source.path.is_dir() { Some(l.source.path.clone()) } else { None };
    write_json(&dir.join("tokenizer.json"), &l.tokenizer_json)?;
    // An HF source keeps its own tokenizer and sentence-transformers files; a GGUF gets a minimal config.
    let mut copied_tok_cfg = false;
    if let Some(src) = &src_dir {
        for f in ["tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json"] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f))
                    .map_err(|e| whittle_formats::Error::Io { path: src.join(f), err: e })?;
                copied_tok_cfg |= f == "tokenizer_config.json";
            }
        }
    }
    if !copied_tok_cfg {
        write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;
    }
    Ok(())
}

/// `{name: description}` of the formats a codec writes ([`whittle_core::codec`]).
fn described(formats: Vec<(&str, &str)>) -> serde_json::Value {
    formats
        .into_iter()
        .map(|(n, d)| (n.to_string(), serde_json::Value::from(d)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The Linears for which `keep` holds, by name, with their storage names (for the manifests in `config.json`).
fn storage_names(l: &Loaded, keep: impl Fn(&Linear) -> bool) -> serde_json::Map<String, serde_json::Value> {
    l.model.linears().into_iter().filter(|(_, lin)| keep(lin)).map(|(n, lin)| (n, lin.storage_name().into())).collect()
}
