//! Turning a MODEL argument (HF directory, `.gguf` file, or hub id) into a [`Loaded`] model.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use whittle_core::RunConfig;
use whittle_formats::gguf::Gguf;
use whittle_formats::hf::{self, HfDir};
use whittle_formats::{tokenizer as tok, TensorInfo, TensorSource};

use crate::bert::{Bert, BertConfig, HfBertConfig};
use crate::llama::{HfLlamaConfig, Llama, LlamaConfig};
pub use crate::weights::Weights;
use crate::{Error, Model, Result};

/// The file formats a model can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    HfDir,
    Gguf,
}

/// Where a model came from and what its file stored.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    pub path: PathBuf,
    pub format: SourceFormat,
    /// Every tensor in the file(s), in the file's own naming.
    pub tensors: Vec<TensorInfo>,
}

/// A model ready to run, with its tokenizer.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The tokenizer as `tokenizer.json`, for writing next to a converted model.
    pub tokenizer_json: serde_json::Value,
    /// Token prepended to decoder inputs (`add_bos_token`); `None` for encoders.
    pub bos_token_id: Option<u32>,
    /// Whether plain text should start with BOS (llama.cpp's `tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    pub eos_token_ids: Vec<u32>,
    pub source: SourceInfo,
    /// Blocks that share another block's weights (block → leader), stored once (`whittle share`).
    pub shared_blocks: std::collections::BTreeMap<usize, usize>,
    /// sentence-transformers' `max_seq_length`, when the directory has one.
    pub max_seq_length: Option<usize>,
    /// The Jinja chat template the model ships (`chat_template` of `tokenizer_config.json`, or GGUF's
    /// `tokenizer.chat_template`); [`crate::text::ChatTemplate`] renders it.
    pub chat_template: Option<String>,
    /// The tokenizer set to truncate at a length, kept because cloning a tokenizer costs milliseconds.
    pub(crate) truncating: std::sync::Mutex<Option<(usize, Tokenizer)>>,
}

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A `tokenizer.json` to use instead of the one the model ships.
    pub tokenizer: Option<PathBuf>,
    /// Dequantize block-quantized (GGUF) Linears to f32 instead of running them in their block format.
    pub dequantize: bool,
    /// How the model runs (kernels, activation blocks, device); every Linear it loads takes it.
    pub run: RunConfig,
}

/// Resolves a MODEL argument to a path: an existing file or directory, else a hub id in the cache.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let looks_like_hub_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\') && !spec.ends_with(".gguf");
    if looks_like_hub_id {
        return Ok(hf::resolve_hub_id(spec)?);
    }
    Err(Error::NotFound { spec: spec.into() })
}

/// Loads a model from a MODEL argument.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<Loaded> {
    let path = resolve(spec)?;
    if path.is_dir() {
        load_hf_dir(&path, opts)
    } else {
        load_gguf(&path, opts)
    }
}

fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let mut src = HfDir::open(dir)?;
    src.device = opts.run.device.clone();
    let cfg_path = src.config_path();
    let model_type = src.config.get("model_type").and_then(|v| v.as_str()).unwrap_or("").to_string();
    // Blocks that share another block's weights (`whittle share`) read the leader's tensors.
    let shared: std::collections::BTreeMap<usize, usize> = match src.config.get("whittle_shared_blocks") {
        Some(v) => serde_json::from_value::<std::collections::BTreeMap<String, usize>>(v.clone())
            .ok()
            .and_then(|m| m.into_iter().map(|(k, v)| k.parse().ok().map(|k| (k, v))).collect())
            .ok_or_else(|| Error::Config {
                path: cfg_path.clone(),
                field: "whittle_shared_blocks".into(),
                msg: "expected {\"block\": leader block, ...}".into(),
            })?,
        None => Default::default(),
    };
    let rename = |name: &str| -> Option<String> {
        let prefix = ["encoder.layer.", "model.layers."].into_iter().find(|p| name.starts_with(p))?;
        let (i, tail) = name[prefix.len()..].split_once('.')?;
        let leader = shared.get(&i.parse::<usize>().ok()?)?;
        Some(format!("{prefix}{leader}.{tail}"))
    };
    let weights = Weights { src: &src, path: dir.to_path_buf(), rename: &rename, dequantize: true };
    let parse_err =
        |e: serde_json::Error| Error::Config { path: cfg_path.clone(), field: "(file)".into(), msg: e.to_string() };
    let model = match model_type.as_str() {
        "bert" => {
            let hf: HfBertConfig = serde_json::from_value(src.config.clone()).map_err(parse_err)?;
            Model::Bert(Bert::load(BertConfig::from_hf(&hf, &cfg_path)?, &weights)?)
        }
        "llama" | "mistral" | "qwen2" => {
            let hf: HfLlamaConfig = serde_json::from_value(src.config.clone()).map_err(parse_err)?;
            let cfg = LlamaConfig::from_hf(&hf, &model_type, &cfg_path)?;
            Model::Llama(Llama::load(cfg, &weights, false)?)
        }
        other => {
            return Err(Error::UnsupportedModelType {
                path: cfg_path,
                model_type: other.to_string(),
                supported: "bert, llama, mistral, qwen2",
            })
        }
    };
    let tok_path = opts.tokenizer.clone().unwrap_or_else(|| dir.join("tokenizer.json"));
    let tokenizer_json = hf::read_json(&tok_path)?;
    let tokenizer = tok::tokenizer_from_json(&tokenizer_json, &tok_path)?;
    let tok_config = hf::read_json(&dir.join("tokenizer_config.json")).ok();
    let chat_template = tok_config
        .as_ref()
        .and_then(|c| hf_chat_template(c.get("chat_template")?))
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let (bos_token_id, eos_token_ids, add_bos) = match &model {
        Model::Bert(_) => (None, vec![], false),
        Model::Llama(_) => {
            let c = &src.config;
            let bos = c.get("bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
            let eos = match c.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
                Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                None => vec![],
            };
            // Whether the HF tokenizer adds BOS is in tokenizer_config.json; default to no.
            let add_bos =
                tok_config.as_ref().and_then(|c| c.get("add_bos_token").and_then(|v| v.as_bool())).unwrap_or(false);
            (bos, eos, add_bos)
        }
    };
    let max_seq_length = hf::read_json(&dir.join("sentence_bert_config.json"))
        .ok()
        .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
        .map(|v| v as usize);
    // Shared blocks hold the very same tensors as their leader (one copy in memory).
    let mut model = model;
    for (&b, &leader) in &shared {
        if b >= model.n_blocks() || leader >= model.n_blocks() || shared.contains_key(&leader) {
            return Err(Error::Config {
                path: cfg_path,
                field: "whittle_shared_blocks".into(),
                msg: format!("block {b} -> {leader}: out of range or chained"),
            });
        }
        model.share_block(b, leader);
    }
    model.set_run_config(&opts.run);
    let loaded = Loaded {
        model,
        tokenizer,
        tokenizer_json,
        bos_token_id,
        add_bos,
        eos_token_ids,
        shared_blocks: shared,
        source: SourceInfo { path: dir.to_path_buf(), format: SourceFormat::HfDir, tensors: src.infos() },
        max_seq_length,
        chat_template,
        truncating: Default::default(),
    };
    check_vocab(&loaded, &tok_path)?;
    Ok(loaded)
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let mut g = Gguf::open(path)?;
    g.device = opts.run.device.clone();
    let arch = g.require("general.architecture")?.as_str().unwrap_or("").to_string();
    if arch != "llama" {
        return Err(Error::UnsupportedModelType {
            path: path.to_path_buf(),
            model_type: format!("{arch} (general.architecture)"),
            supported: "llama",
        });
    }
    let cfg = LlamaConfig::from_gguf(&g)?;
    let weights =
        Weights { src: &g, path: path.to_path_buf(), rename: &crate::names::hf_to_gguf, dequantize: opts.dequantize };
    let mut model = Model::Llama(Llama::load(cfg, &weights, true)?);
    model.set_run_config(&opts.run);
    let (tokenizer_json, tok_path) = match &opts.tokenizer {
        Some(p) => (hf::read_json(p)?, p.clone()),
        None => (tok::gguf_tokenizer_json(&g)?, path.to_path_buf()),
    };
    let tokenizer = tok::tokenizer_from_json(&tokenizer_json, &tok_path)?;
    let id = |k: &str| g.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let loaded = Loaded {
        model,
        tokenizer,
        tokenizer_json,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        add_bos: g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        shared_blocks: Default::default(),
        source: SourceInfo { path: path.to_path_buf(), format: SourceFormat::Gguf, tensors: g.infos() },
        max_seq_length: None,
        chat_template: g.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(String::from),
        truncating: Default::default(),
    };
    check_vocab(&loaded, &tok_path)?;
    Ok(loaded)
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{"name", "template"}` (the one named
/// `default`, else the first).
fn hf_chat_template(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |n: &str| list.iter().find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n));
            let t = named("default").or_else(|| list.first())?;
            t.get("template").and_then(|x| x.as_str()).map(String::from)
        }
        _ => None,
    }
}

fn check_vocab(l: &Loaded, tok_path: &Path) -> Result<()> {
    let n_tok = l.tokenizer.get_vocab_size(true);
    let n_model = l.model.vocab_size();
    if n_tok > n_model {
        return Err(Error::VocabMismatch { path: tok_path.to_path_buf(), tokenizer: n_tok, model: n_model });
    }
    Ok(())
}
