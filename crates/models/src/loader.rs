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
    /// The dtype dense weights and the token embedding table are kept in (`--dtype`): `None` keeps f16 and
    /// bf16 weights 16-bit as stored (run by the half kernel) and the rest f32; `F32` widens everything;
    /// `F16` / `BF16` round f32 weights to 16 bits at load.
    pub dtype: Option<candle_core::DType>,
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
    let weights = Weights { src: &src, path: dir.to_path_buf(), rename: &rename, dequantize: true, dtype: opts.dtype };
    let infos = src.infos();
    let model = match model_type.as_str() {
        "bert" => {
            let hf: HfBertConfig = parse_config(&src.config, &cfg_path)?;
            check_block_count(hf.num_hidden_layers, &infos, &cfg_path, "num_hidden_layers", shared.len())?;
            Model::Bert(Bert::load(BertConfig::from_hf(&hf, &cfg_path)?, &weights)?)
        }
        "llama" | "mistral" | "qwen2" => {
            let hf: HfLlamaConfig = parse_config(&src.config, &cfg_path)?;
            check_block_count(hf.num_hidden_layers, &infos, &cfg_path, "num_hidden_layers", shared.len())?;
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
    check_vocab(&loaded, &tok_path, None)?;
    Ok(loaded)
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let mut g = Gguf::open(path)?;
    g.device = opts.run.device.clone();
    let arch = g.require("general.architecture")?.as_str().unwrap_or("").to_string();
    // `deci` is llama.cpp's LLaMA with per-layer head counts and FFN widths (what whittle writes for a
    // structurally pruned model); whittle reads every block's widths from its tensors either way.
    if arch != "llama" && arch != "deci" {
        return Err(Error::UnsupportedModelType {
            path: path.to_path_buf(),
            model_type: format!("{arch} (general.architecture)"),
            supported: "llama, deci",
        });
    }
    let cfg = LlamaConfig::from_gguf(&g)?;
    check_block_count(cfg.num_layers, &g.infos(), path, &format!("{arch}.block_count"), 0)?;
    let weights = Weights {
        src: &g,
        path: path.to_path_buf(),
        rename: &crate::names::hf_to_gguf,
        dequantize: opts.dequantize,
        dtype: opts.dtype,
    };
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
    // A tokenizer given with --tokenizer must spell the ids as the file's own vocabulary does.
    let own_vocab = match (&opts.tokenizer, g.get("tokenizer.ggml.tokens")) {
        (Some(_), Some(whittle_formats::gguf::Value::Array(v))) => {
            Some(v.iter().map(|t| t.as_str().unwrap_or("").to_string()).collect::<Vec<_>>())
        }
        _ => None,
    };
    check_vocab(&loaded, &tok_path, own_vocab.as_deref())?;
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

/// Parses `config.json` into `T`; a field of the wrong type is named (serde's message alone does not say
/// which field it is).
fn parse_config<T: serde::de::DeserializeOwned>(config: &serde_json::Value, path: &Path) -> Result<T> {
    let e = match serde_json::from_value::<T>(config.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    let missing = e.strip_prefix("missing field `").and_then(|r| r.split('`').next()).map(String::from);
    // The culprit is the key whose removal turns the error into "missing field" (required) or away (optional).
    let culprit = missing.or_else(|| {
        let obj = config.as_object()?;
        obj.keys()
            .find(|k| {
                let mut o = obj.clone();
                o.remove(*k);
                match serde_json::from_value::<T>(o.into()) {
                    Ok(_) => true,
                    Err(e2) => e2.to_string() == format!("missing field `{k}`"),
                }
            })
            .cloned()
    });
    let (field, msg) = match culprit {
        Some(k) => {
            let got = config.get(&k).map(|v| format!(" (found {v})")).unwrap_or_default();
            (k, format!("{e}{got}"))
        }
        None => ("?".into(), e),
    };
    Err(Error::Config { path: path.to_path_buf(), field, msg })
}

/// The block index of a tensor name (`encoder.layer.N.`, `model.layers.N.`, `blk.N.`).
fn block_of(name: &str) -> Option<usize> {
    let rest = ["encoder.layer.", "model.layers.", "blk."].iter().find_map(|p| name.strip_prefix(p))?;
    rest.split('.').next()?.parse().ok()
}

/// A config must have at least one block, no fewer than the weights file holds (the rest would be silently
/// ignored: issue 22's `num_hidden_layers: 0` ran on the embeddings alone) and no more than it holds plus
/// `aliases` (blocks stored as another block's weights, `whittle share`): a huge count must fail here, not
/// as an allocation (found by scripts/fuzz.sh).
fn check_block_count(n: usize, tensors: &[TensorInfo], path: &Path, field: &str, aliases: usize) -> Result<()> {
    let err = |msg: String| Error::Config { path: path.to_path_buf(), field: field.into(), msg };
    if n == 0 {
        return Err(err("must be at least 1".into()));
    }
    let last = tensors.iter().filter_map(|t| Some((block_of(&t.name)?, &t.name))).max_by_key(|(b, _)| *b);
    let stored = last.map_or(0, |(b, _)| b + 1);
    if let Some((b, t)) = last.filter(|(b, _)| *b >= n) {
        return Err(err(format!("{n}, but the weights hold {} blocks (tensor `{t}`)", b + 1)));
    }
    if n > stored.saturating_add(aliases) {
        return Err(err(format!("{n}, but the weights hold only {stored} blocks")));
    }
    Ok(())
}

/// The tokenizer must fit the model: every id inside the embedding table, a decoder not driven by a
/// WordPiece (BERT) vocabulary, and, when the model file has its own vocabulary (`gguf_vocab`), the same
/// tokens at the same ids.
fn check_vocab(l: &Loaded, tok_path: &Path, gguf_vocab: Option<&[String]>) -> Result<()> {
    let n_model = l.model.vocab_size();
    let vocab = l.tokenizer.get_vocab(true);
    if let Some(max_id) = vocab.values().max().map(|&m| m as usize).filter(|&m| m >= n_model) {
        return Err(Error::VocabMismatch { path: tok_path.to_path_buf(), max_id, model: n_model });
    }
    let mismatch = |msg: String| Error::TokenizerMismatch { path: tok_path.to_path_buf(), msg };
    if l.model.is_decoder() && matches!(l.tokenizer.get_model(), tokenizers::models::ModelWrapper::WordPiece(_)) {
        return Err(mismatch(format!(
            "a WordPiece (BERT-style) tokenizer cannot drive a {} decoder",
            l.model.family()
        )));
    }
    if let Some(own) = gguf_vocab {
        let agree = own
            .iter()
            .enumerate()
            .filter(|(i, t)| l.tokenizer.id_to_token(*i as u32).as_deref() == Some(t.as_str()))
            .count();
        // Byte-level spellings agree exactly between tokenizer.json and GGUF; allow a few special tokens.
        if (agree as f64) < 0.99 * own.len() as f64 {
            let (i, t) = own
                .iter()
                .enumerate()
                .find(|(i, t)| l.tokenizer.id_to_token(*i as u32).as_deref() != Some(t.as_str()))
                .expect("some id disagrees");
            return Err(mismatch(format!(
                "only {agree} of the model's {} tokens have the same id (id {i} is `{t}` in the model, {} in the tokenizer)",
                own.len(),
                l.tokenizer.id_to_token(i as u32).map_or("absent".into(), |x| format!("`{x}`"))
            )));
        }
    }
    Ok(())
}
