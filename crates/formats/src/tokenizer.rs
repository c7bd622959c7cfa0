//! Tokenizers built from GGUF metadata (`tokenizer.ggml.*`), as llama.cpp builds them, expressed as an
//! HF `tokenizer.json` so that the same JSON can be written out by `whittle convert`.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers llama.cpp
//! names `default`/`gpt2`, `smollm`, `llama-bpe` and `qwen2`. SentencePiece (`llama`) vocabularies are
//! refused with a hint to pass the model's `tokenizer.json`.

use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::gguf::Gguf;
use crate::{Error, Result};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

/// The `tokenizer.json` equivalent of a GGUF file's tokenizer metadata.
pub fn gguf_tokenizer_json(g: &Gguf) -> Result<Json> {
    let model = g.require("tokenizer.ggml.model")?.as_str().unwrap_or_default().to_string();
    if model != "gpt2" {
        return Err(g.meta_err(
            "tokenizer.ggml.model",
            format!("tokenizer model `{model}` is not supported yet (only byte-level BPE, `gpt2`); pass the model's tokenizer.json with option `tokenizer`"),
        ));
    }
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    let pre_tokenizer = match pre {
        "default" | "gpt2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        other => {
            return Err(g.meta_err(
                "tokenizer.ggml.pre",
                format!(
                "pre-tokenizer `{other}` is not supported yet; pass the model's tokenizer.json with option `tokenizer`"
            ),
            ))
        }
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        let arr = g.require(key)?.as_array().ok_or_else(|| g.meta_err(key, "expected an array".into()))?;
        arr.iter()
            .map(|v| v.as_str().map(String::from).ok_or_else(|| g.meta_err(key, "expected an array of strings".into())))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": ty != TOKEN_TYPE_CONTROL, "special": ty == TOKEN_TYPE_CONTROL}));
        }
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            g.meta_err("tokenizer.ggml.merges", format!("merge {i} `{m}` is not two tokens separated by a space"))
        })?;
        merge_pairs.push(json!([a, b]));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merge_pairs}
    }))
}

/// A tokenizer from a `tokenizer.json` value, naming `path` in errors.
pub fn tokenizer_from_json(json: &Json, path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_str(&json.to_string())
        .map_err(|e| Error::Tokenizer { path: path.to_path_buf(), msg: e.to_string() })
}

/// A tokenizer from a `tokenizer.json` file.
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::Io { path: path.to_path_buf(), err: std::io::ErrorKind::NotFound.into() });
    }
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer { path: path.to_path_buf(), msg: e.to_string() })
}
