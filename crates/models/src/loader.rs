//! Turning a MODEL argument (HF directory, `.gguf` file, or hub id) into a [`Loaded`] model.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tokenizers::Tokenizer;
use whittle_core::Linear;
use whittle_formats::gguf::Gguf;
use whittle_formats::hf::{self, HfDir};
use whittle_formats::{tokenizer as tok, TensorInfo, TensorSource};

use crate::bert::{Bert, BertConfig, HfBertConfig};
use crate::llama::{HfLlamaConfig, Llama, LlamaConfig};
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
}

/// Tensors of one source, checked against the shapes the config implies.
pub struct Weights<'a> {
    pub src: &'a dyn TensorSource,
    pub path: PathBuf,
    /// Maps a Hugging Face name to the source's name.
    pub rename: &'a dyn Fn(&str) -> Option<String>,
    /// Load block-quantized Linears as dense f32.
    pub dequantize: bool,
}

/// Whether a stored 2-D `shape` matches `expect` (0 = any size).
fn fits(shape: &[usize], expect: &[usize; 2]) -> bool {
    shape.len() == 2 && shape.iter().zip(expect).all(|(a, b)| *b == 0 || a == b)
}

impl Weights<'_> {
    fn source_name(&self, name: &str) -> String {
        (self.rename)(name).unwrap_or_else(|| name.to_string())
    }

    /// Whether `name` will load as a block-quantized Linear.
    pub fn is_block(&self, name: &str) -> bool {
        !self.dequantize
            && self
                .src
                .raw_block(&self.source_name(name))
                .is_some_and(|(t, _, _)| whittle_kernels::ggml::type_info(t).is_some())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.source_name(name))
    }

    pub fn shape_err(&self, name: &str, expected: &[usize], got: &[usize]) -> Error {
        Error::Shape {
            path: self.path.clone(),
            tensor: self.source_name(name),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    /// Loads `name` as f32 and checks its shape; `0` in `shape` accepts any size.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.src.load_f32(&self.source_name(name))?;
        let ok = t.dims().len() == shape.len() && t.dims().iter().zip(shape).all(|(a, b)| *b == 0 || a == b);
        if !ok {
            return Err(self.shape_err(name, shape, t.dims()));
        }
        Ok(t)
    }

    /// A Linear `name.weight` (out, in) with `name.bias` when `bias` is true (or present).
    pub fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        self.linear_any(name, Some(out), Some(inp), bias)
    }

    /// Like [`Weights::linear`], accepting any size where `None` is given (widths pruning may change).
    pub fn linear_any(&self, name: &str, out: Option<usize>, inp: Option<usize>, bias: bool) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let expect = [out.unwrap_or(0), inp.unwrap_or(0)];
        let bname = format!("{name}.bias");
        if let Some((type_id, shape, raw)) = self.src.raw_block(&self.source_name(&wname)).filter(|_| !self.dequantize)
        {
            if let Some((fmt, qk, bb)) = whittle_kernels::ggml::type_info(type_id) {
                if !fits(&shape, &expect) {
                    return Err(self.shape_err(&wname, &expect, &shape));
                }
                let bw = whittle_kernels::ggml::unpack(type_id, raw, shape[0], shape[1])
                    .map_err(|msg| Error::Config { path: self.path.clone(), field: self.source_name(&wname), msg })?;
                let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[shape[0]])?) } else { None };
                return Ok(Linear::block(&bw, fmt, 8.0 * bb as f64 / qk as f64, b)?);
            }
        }
        // `.weight_u` (out, r) + `.weight_v` (r, in): a low-rank factorisation.
        if self.contains(&format!("{name}.weight_u")) {
            let u = self.get(&format!("{name}.weight_u"), &[expect[0], 0])?;
            let v = self.get(&format!("{name}.weight_v"), &[u.dim(1)?, expect[1]])?;
            let rows = u.dim(0)?;
            let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[rows])?) } else { None };
            return Ok(Linear::low_rank(u, v, b)?);
        }
        // `.u.*` + `.v.*`: a low-rank factorisation with quantized factors, each stored as a Linear.
        if ["weight", "weight_packed", "weight_shape"].iter().any(|t| self.contains(&format!("{name}.v.{t}"))) {
            let u = self.linear_any(&format!("{name}.u"), out, None, false)?;
            let v = self.linear_any(&format!("{name}.v"), Some(u.in_features()), inp, false)?;
            let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[u.out_features()])?) } else { None };
            return Ok(Linear::low_rank_of(u, v, b)?);
        }
        // `.weight_values` + a layout (`.weight_indices`, `.weight_bitmap` or CSR) + `.weight_shape`: pruned.
        if self.contains(&format!("{name}.weight_values")) {
            return self.load_sparse(name, &expect, bias);
        }
        // `.weight_packed` + `.weight_scale` (+ `.weight_zero_point`) + `.weight_shape`: grouped weight-only.
        let pname = format!("{name}.weight_packed");
        if self.contains(&pname) {
            return self.load_rtn(name, &expect, bias);
        }
        // An int8 `.weight` with a `.weight_scale` is a w8a8-dynamic layer (whittle's saved format).
        if self.src.dtype_of(&self.source_name(&wname)).as_deref() == Some("i8") {
            let (shape, q) = self.src.load_i8(&self.source_name(&wname))?;
            if !fits(&shape, &expect) {
                return Err(self.shape_err(&wname, &expect, &shape));
            }
            let sname = format!("{name}.weight_scale");
            let scale: Vec<f32> = self.get(&sname, &[shape[0]])?.to_vec1()?;
            if scale.iter().any(|v| !v.is_finite()) {
                return Err(Error::Config {
                    path: self.path.clone(),
                    field: self.source_name(&sname),
                    msg: "holds NaN or Inf".into(),
                });
            }
            let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[shape[0]])?) } else { None };
            let p = whittle_kernels::int8::PackedI8::new(q, scale, shape[0], shape[1]);
            // `.input_scale` + `.input_zero_point`: activations with calibrated (static) parameters.
            if self.contains(&format!("{name}.input_scale")) {
                let s: Vec<f32> = self.get(&format!("{name}.input_scale"), &[1])?.to_vec1()?;
                let z: Vec<f32> = self.get(&format!("{name}.input_zero_point"), &[1])?.to_vec1()?;
                if !(s[0].is_finite() && s[0] >= 0.0 && (0.0..=255.0).contains(&z[0])) {
                    return Err(Error::Config {
                        path: self.path.clone(),
                        field: self.source_name(&format!("{name}.input_scale")),
                        msg: format!("scale {} / zero point {} out of range", s[0], z[0]),
                    });
                }
                return Ok(Linear::int8_static(p, s[0], z[0] as i32, b)?);
            }
            return Ok(Linear::int8_dynamic(p, b)?);
        }
        let w = self.get(&wname, &expect)?;
        let rows = w.dim(0)?;
        let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[rows])?) } else { None };
        Ok(Linear::dense(w, b)?)
    }
}

impl Weights<'_> {
    /// A sparse layer (whittle's pruned format, [`whittle_core::sparse`]): N:M, bitmap or CSR.
    fn load_sparse(&self, name: &str, expect: &[usize; 2], bias: bool) -> Result<Linear> {
        use whittle_core::sparse::{SparseDisk, SparseLinear};
        let field = |suffix: &str| self.source_name(&format!("{name}.{suffix}"));
        let bad = |suffix: &str, msg: String| Error::Config { path: self.path.clone(), field: field(suffix), msg };
        let ints = |suffix: &str| -> Result<Vec<i64>> {
            Ok(self.src.load_native(&field(suffix))?.to_dtype(candle_core::DType::I64)?.flatten_all()?.to_vec1()?)
        };
        let bytes = |suffix: &str| -> Result<Vec<u8>> {
            let t = self.src.load_native(&field(suffix))?;
            if t.dtype() != candle_core::DType::U8 {
                return Err(bad(suffix, format!("expected u8, got {:?}", t.dtype())));
            }
            Ok(t.flatten_all()?.to_vec1()?)
        };
        let shape = ints("weight_shape")?;
        let [m, k] = shape[..] else { return Err(bad("weight_shape", format!("expected [out, in], got {shape:?}"))) };
        if m <= 0 || k <= 0 {
            return Err(bad("weight_shape", format!("expected positive sizes, got {shape:?}")));
        }
        let (m, k) = (m as usize, k as usize);
        if expect.iter().zip([m, k]).any(|(e, g)| *e != 0 && *e != g) {
            return Err(self.shape_err(&format!("{name}.weight_shape"), expect, &[m, k]));
        }
        let values: Vec<f32> = self.src.load_f32(&field("weight_values"))?.flatten_all()?.to_vec1()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad("weight_values", "holds NaN or Inf".into()));
        }
        let (u8s, ptr);
        let layout = if self.contains(&format!("{name}.weight_nm")) {
            let nm = ints("weight_nm")?;
            let [n, mm] = nm[..] else { return Err(bad("weight_nm", format!("expected [n, m], got {nm:?}"))) };
            if !(1..=64).contains(&mm) || n < 1 {
                return Err(bad("weight_nm", format!("{n}:{mm} is not an N:M pattern")));
            }
            u8s = bytes("weight_indices")?;
            SparseDisk::NM { n: n as usize, m: mm as usize, indices: &u8s }
        } else if self.contains(&format!("{name}.weight_bitmap")) {
            u8s = bytes("weight_bitmap")?;
            SparseDisk::Bitmap(&u8s)
        } else {
            u8s = bytes("weight_col_indices")?;
            ptr = ints("weight_row_ptr")?;
            SparseDisk::Csr { col_indices: &u8s, row_ptr: &ptr }
        };
        let (w, nm) = SparseLinear::decode(m, k, &values, layout).map_err(|(suffix, msg)| bad(suffix, msg))?;
        let bname = format!("{name}.bias");
        let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[m])?) } else { None };
        let w = Tensor::from_vec(w, (m, k), &candle_core::Device::Cpu)?;
        Ok(Linear::sparse(&w, nm, b)?)
    }

    /// A grouped weight-only layer (`w4a16`/`w8a16`, whittle's saved format): sizes from `weight_shape`,
    /// bits from the packed width, group from the scales' width.
    fn load_rtn(&self, name: &str, expect: &[usize; 2], bias: bool) -> Result<Linear> {
        let field = |suffix: &str| self.source_name(&format!("{name}.{suffix}"));
        let bad = |suffix: &str, msg: String| Error::Config { path: self.path.clone(), field: field(suffix), msg };
        let shape: Vec<i64> =
            self.src.load_native(&field("weight_shape"))?.to_dtype(candle_core::DType::I64)?.to_vec1()?;
        let [m, k] = shape[..] else { return Err(bad("weight_shape", format!("expected [out, in], got {shape:?}"))) };
        let (m, k) = (m as usize, k as usize);
        if expect.iter().zip([m, k]).any(|(e, g)| *e != 0 && *e != g) {
            return Err(self.shape_err(&format!("{name}.weight_shape"), expect, &[m, k]));
        }
        let packed = self.src.load_native(&field("weight_packed"))?;
        let (pm, pk) = packed.dims2()?;
        let packed: Vec<u8> = packed.flatten_all()?.to_vec1()?;
        let scale = self.src.load_f32(&field("weight_scale"))?;
        let (_, ng) = scale.dims2()?;
        let scale: Vec<f32> = scale.flatten_all()?.to_vec1()?;
        if scale.iter().any(|v| !v.is_finite()) {
            return Err(bad("weight_scale", "holds NaN or Inf".into()));
        }
        let zero: Option<Vec<u8>> = if self.contains(&format!("{name}.weight_zero_point")) {
            Some(self.src.load_native(&field("weight_zero_point"))?.flatten_all()?.to_vec1()?)
        } else {
            None
        };
        let bits = if k > 0 && pm == m { (pk * 8 / k) as u32 } else { 0 };
        if ng == 0 || k % ng != 0 || !matches!(bits, 2 | 3 | 4 | 8) {
            return Err(bad("weight_packed", format!("({pm}, {pk}) packed with {ng} groups does not fit ({m}, {k})")));
        }
        let rtn = whittle_core::Rtn { bits, group: k / ng, zero_point: zero.is_some() };
        let bw = rtn
            .unpack(m, k, &packed, &scale, zero.as_deref())
            .ok_or_else(|| bad("weight_packed", format!("sizes do not fit {} for ({m}, {k})", rtn.name())))?;
        let bname = format!("{name}.bias");
        let b = if bias || self.contains(&bname) { Some(self.get(&bname, &[m])?) } else { None };
        Ok(Linear::rtn(&bw, rtn, b)?)
    }
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
    let src = HfDir::open(dir)?;
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
            let add_bos = hf::read_json(&dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|c| c.get("add_bos_token").and_then(|v| v.as_bool()))
                .unwrap_or(false);
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
        truncating: Default::default(),
    };
    check_vocab(&loaded, &tok_path)?;
    Ok(loaded)
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let g = Gguf::open(path)?;
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
    let model = Model::Llama(Llama::load(cfg, &weights, true)?);
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
        truncating: Default::default(),
    };
    check_vocab(&loaded, &tok_path)?;
    Ok(loaded)
}

fn check_vocab(l: &Loaded, tok_path: &Path) -> Result<()> {
    let n_tok = l.tokenizer.get_vocab_size(true);
    let n_model = l.model.vocab_size();
    if n_tok > n_model {
        return Err(Error::VocabMismatch { path: tok_path.to_path_buf(), tokenizer: n_tok, model: n_model });
    }
    Ok(())
}
