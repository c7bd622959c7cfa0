//! Writing a model as a Hugging Face directory that transformers loads: `config.json`,
//! `model.safetensors`, `tokenizer.json` (+ `tokenizer_config.json`). Written atomically.

use std::path::Path;

use candle_core::DType;
use whittle_formats::hf::{write_dir_atomic, write_json, write_safetensors};

use crate::{Error, Loaded, Model, Result};

/// Saves `l` to `out` with weights in `dtype` (f32, f16 or bf16).
pub fn save_hf_dir(l: &Loaded, out: &Path, dtype: DType) -> Result<()> {
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(&l.source.path).ok()
    {
        return Err(Error::Usage(format!(
            "{}: output would overwrite the input model",
            out.display()
        )));
    }
    let tensors: Vec<(String, candle_core::Tensor)> = l
        .model
        .named_tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let config = match &l.model {
        Model::Bert(m) => m.config.to_hf_json(&m.blocks),
        Model::Llama(m) => m
            .config
            .to_hf_json(&m.blocks, l.bos_token_id, &l.eos_token_ids),
    };
    let mut config = config;
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
    let src_dir = if l.source.path.is_dir() {
        Some(l.source.path.clone())
    } else {
        None
    };
    write_dir_atomic(out, |dir| {
        write_json(&dir.join("config.json"), &config)?;
        write_safetensors(
            &dir.join("model.safetensors"),
            &tensors,
            Some([("format".to_string(), "pt".to_string())].into()),
        )?;
        write_json(&dir.join("tokenizer.json"), &l.tokenizer_json)?;
        // An HF source keeps its own tokenizer and sentence-transformers files; a GGUF gets a minimal config.
        let mut copied_tok_cfg = false;
        if let Some(src) = &src_dir {
            for f in [
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
                "sentence_bert_config.json",
            ] {
                if src.join(f).exists() {
                    std::fs::copy(src.join(f), dir.join(f)).map_err(|e| {
                        whittle_formats::Error::Io {
                            path: src.join(f),
                            source: e,
                        }
                    })?;
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
