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
        "default" | "gpt2" | "gpt-2" => byte_level(true),
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

/// llama.cpp's token type for padding ids beyond the tokenizer's vocabulary (`LLAMA_TOKEN_TYPE_UNUSED`).
const TOKEN_TYPE_UNUSED: i32 = 5;
const TOKEN_TYPE_NORMAL: i32 = 1;

/// The pre-tokenizer name llama.cpp gives a byte-level BPE `pre_tokenizer` (the inverse of the table in
/// [`gguf_tokenizer_json`]); `None` for one it has no name for here.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let is_byte_level = |v: &Json, regex: bool| {
        v.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && v.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == regex
    };
    let split_regex = |v: &Json| -> Option<String> {
        (v.get("type").and_then(Json::as_str) == Some("Split"))
            .then(|| v.get("pattern")?.get("Regex")?.as_str().map(String::from))?
    };
    if is_byte_level(pre, true) {
        // llama.cpp's name for GPT-2's split regex (its `default` is another regex set).
        return Some("gpt-2");
    }
    let seq = pre.get("pretokenizers").and_then(Json::as_array)?;
    match seq.as_slice() {
        [d, b]
            if d.get("type").and_then(Json::as_str) == Some("Digits")
                && d.get("individual_digits").and_then(Json::as_bool) == Some(true)
                && is_byte_level(b, true) =>
        {
            Some("smollm")
        }
        [s, b] if is_byte_level(b, false) => match split_regex(s)?.as_str() {
            LLAMA3_REGEX => Some("llama-bpe"),
            QWEN2_REGEX => Some("qwen2"),
            _ => None,
        },
        _ => None,
    }
}

/// llama.cpp's tokenizer metadata (`tokenizer.ggml.model`, `pre`, `tokens`, `token_type`, `merges`) for a
/// byte-level BPE `tokenizer.json` (read from `path`, named in errors), as `convert_hf_to_gguf.py` writes it:
/// added tokens marked special are control tokens (type 3), other added tokens user-defined (4), and ids
/// between the tokenizer's last and `vocab_size` are padded with `[PAD{id}]` (type 5, unused). The inverse
/// of [`gguf_tokenizer_json`]. Special token ids and the chat template are the model's, added by the writer.
pub fn gguf_tokenizer_metadata(
    json: &Json,
    path: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, crate::gguf::Value)>> {
    use crate::gguf::Value;
    let err = |msg: String| Error::Tokenizer { path: path.to_path_buf(), msg };
    let model = json.get("model").ok_or_else(|| err("no `model`".into()))?;
    let ty = model.get("type").and_then(Json::as_str).unwrap_or("?");
    if ty != "BPE" || model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(err(format!(
            "model type `{ty}`{}: only byte-level BPE tokenizers (llama.cpp's `gpt2` model) can be written to GGUF yet",
            if ty == "BPE" { " with byte_fallback (SentencePiece-style)" } else { "" }
        )));
    }
    let pre_json = json.get("pre_tokenizer").unwrap_or(&Json::Null);
    let pre = pre_tokenizer_name(pre_json).ok_or_else(|| {
        err(format!(
            "pre_tokenizer {pre_json} has no llama.cpp name here (known: ByteLevel = gpt-2, Digits + ByteLevel = smollm, the Llama 3 and Qwen2 regex splits)"
        ))
    })?;
    let vocab = model.get("vocab").and_then(Json::as_object).ok_or_else(|| err("no `model.vocab` object".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TOKEN_TYPE_NORMAL; vocab_size];
    let mut put = |tok: &str, id: Option<u64>, ty: Option<i32>| -> Result<()> {
        let id = id.ok_or_else(|| err(format!("token {tok:?} has no integer id")))? as usize;
        let slot = tokens
            .get_mut(id)
            .ok_or_else(|| err(format!("token {tok:?} has id {id}, outside the model's vocabulary of {vocab_size}")))?;
        *slot = Some(tok.to_string());
        if let Some(t) = ty {
            types[id] = t;
        }
        Ok(())
    };
    for (tok, id) in vocab {
        put(tok, id.as_u64(), None)?;
    }
    for a in json.get("added_tokens").and_then(Json::as_array).map_or(&[][..], |v| v.as_slice()) {
        let tok =
            a.get("content").and_then(Json::as_str).ok_or_else(|| err("an added token has no `content`".into()))?;
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        let ty = (if special { TOKEN_TYPE_CONTROL } else { TOKEN_TYPE_USER_DEFINED }) as i32;
        put(tok, a.get("id").and_then(Json::as_u64), Some(ty))?;
    }
    let mut merges = Vec::new();
    for (i, m) in model.get("merges").and_then(Json::as_array).map_or(&[][..], |v| v.as_slice()).iter().enumerate() {
        let s = match m {
            Json::String(s) => s.clone(),
            Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => {
                format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())
            }
            other => return Err(err(format!("merge {i} is {other}, not \"a b\" or [\"a\", \"b\"]"))),
        };
        merges.push(Value::String(s));
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[id] = TOKEN_TYPE_UNUSED;
                format!("[PAD{id}]")
            }))
        })
        .collect();
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write, Value};

    /// A GGUF tokenizer (smollm pre-tokenizer, two control tokens, one merge) → tokenizer.json → the same
    /// metadata back, padded to the model's vocabulary.
    #[test]
    fn tokenizer_json_to_gguf_metadata_inverts_the_reader() {
        let tokens = ["<|endoftext|>", "<|im_start|>", "a", "b", "ab", "Ġ"];
        let types = [3, 3, 1, 1, 1, 1];
        let meta = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::String(t.to_string())).collect())),
            ("tokenizer.ggml.token_type", Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
            ("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())])),
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        std::fs::write(&p, write::to_bytes(&meta, &[])).unwrap();
        let json = gguf_tokenizer_json(&Gguf::open(&p).unwrap()).unwrap();
        let back = gguf_tokenizer_metadata(&json, Path::new("tokenizer.json"), 8).unwrap();
        let get = |k: &str| back.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("tokenizer.ggml.pre"), Value::String("smollm".into()));
        let toks = get("tokenizer.ggml.tokens");
        let toks: Vec<&str> = toks.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(toks, [&tokens[..], &["[PAD6]", "[PAD7]"]].concat());
        let tys: Vec<i64> =
            get("tokenizer.ggml.token_type").as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(tys, [3, 3, 1, 1, 1, 1, 5, 5]);
        assert_eq!(get("tokenizer.ggml.merges"), Value::Array(vec![Value::String("a b".into())]));
        // A vocabulary larger than the model's is an error naming the token and the file.
        let e = gguf_tokenizer_metadata(&json, Path::new("tokenizer.json"), 4).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("outside the model's vocabulary of 4"), "{e}");
        // A WordPiece / Unigram model is refused by name.
        let mut wp = json.clone();
        wp["model"]["type"] = "WordPiece".into();
        let e = gguf_tokenizer_metadata(&wp, Path::new("tokenizer.json"), 8).unwrap_err().to_string();
        assert!(e.contains("WordPiece"), "{e}");
    }
}
