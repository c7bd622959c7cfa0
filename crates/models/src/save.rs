//! Writing a model as a Hugging Face directory that transformers loads: `config.json`,
//! `model.safetensors`, `tokenizer.json` (+ `tokenizer_config.json`). Written atomically.

use std::path::Path;

use candle_core::DType;
use whittle_core::Stored;
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
            Stored::Tensor(t)
                if ![".weight_scale", ".input_scale", ".input_zero_point"].iter().any(|s| n.ends_with(s))
                    && t.dtype().is_float() =>
            {
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
        let layers: serde_json::Map<String, serde_json::Value> = l
            .model
            .linears()
            .into_iter()
            .filter(|(_, l)| l.is_quantized())
            .map(|(n, l)| (n, l.storage_name().into()))
            .collect();
        config["quantization_config"] = serde_json::json!({
            "quant_method": "whittle",
            "formats": {
                "w8a8-dynamic": "`.weight` int8 (out, in), symmetric per output channel, `.weight_scale` f32 (out); activations quantized per token (asymmetric u8) at run time",
                "w8a8-static": "as w8a8-dynamic, plus `.input_scale` f32 [1] and `.input_zero_point` f32 [1]: activations x_u = clamp(round(x / scale) + zero, 0, 255) with the calibrated values",
                "wNa16-gG[-asym]": "`.weight_packed` u8 (out, in·N/8): N-bit codes, lowest bits first; `.weight_scale` f32 (out, in/G); `.weight_zero_point` u8 (out, in/G) when asymmetric (w = s·(q − z)), else w = s·(q − 2^(N−1)); `.weight_shape` i64 [out, in]",
            },
            "layers": layers,
        });
    }
    let sparse: serde_json::Map<String, serde_json::Value> = l
        .model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.is_sparse())
        .map(|(n, l)| (n, l.storage_name().into()))
        .collect();
    if !sparse.is_empty() {
        config["sparsity_config"] = serde_json::json!({
            "format": "whittle",
            "layouts": {
                "N:M-sparse": "`.weight_nm` i64 [n, m]; `.weight_values` float (out, in·n/m), the kept weights of each group of m inputs in order; `.weight_indices` u8 (out, ⌈in·n/m·b/8⌉), each value's position in its group as a b = ⌈log2 m⌉-bit code, lowest bits first; `.weight_shape` i64 [out, in]",
                "sparse-bitmap": "`.weight_bitmap` u8 (out, ⌈in/8⌉), bit j%8 of byte j/8 set where input j is kept; `.weight_values` float (nnz), row-major; `.weight_shape` i64 [out, in]",
                "sparse-csr": "`.weight_values` float (nnz); `.weight_col_indices` u8 (nnz, 2), little-endian u16 columns; `.weight_row_ptr` i64 (out + 1); `.weight_shape` i64 [out, in]",
            },
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
    write_dir_atomic(out, |dir| {
        write_json(&dir.join("config.json"), &config)?;
        write_stored(
            &dir.join("model.safetensors"),
            &tensors,
            Some([("format".to_string(), "pt".to_string())].into()),
        )?;
        write_json(&dir.join("tokenizer.json"), &l.tokenizer_json)?;
        // An HF source keeps its own tokenizer and sentence-transformers files; a GGUF gets a minimal config.
        let mut copied_tok_cfg = false;
        if let Some(src) = &src_dir {
            for f in ["tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json"] {
                if src.join(f).exists() {
                    std::fs::copy(src.join(f), dir.join(f))
                        .map_err(|e| whittle_formats::Error::Io { path: src.join(f), source: e })?;
                    copied_tok_cfg |= f == "tokenizer_config.json";
                }
            }
        }
        if !copied_tok_cfg {
            write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;
        }
        Ok(())
    })?;
    Ok(())
}
