//! `whittle export --format gguf`: any LLaMA-family model whittle loads (HF directory, GGUF, compressed
//! directory) written as a GGUF file llama.cpp runs, with its tokenizer from `tokenizer.json`.
//!
//! - **Names and layout** as `convert_hf_to_gguf.py` writes them: `token_embd`, `blk.N.attn_q` …, Q and K rows
//!   permuted into llama.cpp's interleaved RoPE order ([`whittle_models::llama::permute_rows`]), norms in f32,
//!   no `output.weight` when the head is tied.
//! - **Per-block widths** (structured pruning): written as llama.cpp's `deci` architecture (the LLaMA block
//!   with per-layer `head_count`, `head_count_kv` and `feed_forward_length` arrays, [`architecture`]): its
//!   `llama` architecture reads the arrays but sizes every layer by layer 0's values.
//! - **Exact forms**: a weight-only grid a ggml block type holds is written code for code, never re-rounded.
//!   ggml's 32-blocks with `d·(q − 8)` are Q4_0 (whittle's symmetric 4-bit, any group that is a multiple of
//!   32: each 32-block repeats its group's scale), `d·q + m` with 4-bit codes Q4_1 (asymmetric 4-bit), 5-bit
//!   codes Q5_0 / Q5_1, `d·q` with int8 codes Q8_0 (symmetric 8-bit, and w8a8's per-channel int8). GGUF stores
//!   the scales (and mins) in f16 where whittle keeps f32: the codes are identical and the only difference is
//!   the f16 rounding of the scales, measured per tensor ([`Conversion::Codes`]); scales that are f16 values
//!   already (a GGUF source) give identical bits ([`Conversion::Exact`]).
//! - **Everything else** is encoded in the type `--scheme` gives it (llama-quantize's per-tensor choices,
//!   [`whittle_quant::gguf_out::tensor_type`]): float weights in f16 by default; a quantized grid with no
//!   exact form (asymmetric 8-bit, K-quants after a row permutation, …) only when a scheme is given, and the
//!   report states the error it adds. Low-rank (U·V) and shared blocks have no GGUF form: llama.cpp has one
//!   dense weight per projection, so they are an error naming the layer.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use serde::Serialize;
use whittle_formats::gguf::{write, Value};
use whittle_kernels::block::BlockWeights;
use whittle_kernels::ggml::{ty, GgmlType};
use whittle_models::llama::{permute_rows, Llama, RopeScaling};
use whittle_models::{Loaded, Model};
use whittle_quant::gguf_out::{tensor_type, Ftype, GGUF_SCHEMES};

use whittle_core::{Linear, LinearWeight};

use crate::{Error, Result};

/// The type weights without an exact form get: f32, or one of llama.cpp's file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufScheme {
    F32,
    Ftype(Ftype),
}

impl GgufScheme {
    /// `f32`, `f16`, `q8_0`, `q4_k_m`, … (option `scheme`).
    pub fn parse(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("f32") {
            return Ok(GgufScheme::F32);
        }
        Ftype::parse(s).map(GgufScheme::Ftype).ok_or_else(|| {
            whittle_core::InvalidOption::new("scheme", s, format!("not a GGUF file type (f32, {GGUF_SCHEMES})")).into()
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufScheme::F32 => "f32",
            GgufScheme::Ftype(f) => f.name(),
        }
    }
}

/// Options of [`export`].
#[derive(Debug, Clone, Default)]
pub struct GgufOptions {
    /// Encoding of the weights with no exact GGUF form. `None`: f16 for float weights, and an error for a
    /// quantized weight (requantizing adds error, so it is asked for, never silent).
    pub scheme: Option<GgufScheme>,
}

/// How a tensor reached the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conversion {
    /// The same values: every stored weight dequantizes to exactly what whittle runs.
    Exact,
    /// The codes copied one for one; the scales (and mins) rounded from whittle's f32 to GGUF's f16.
    Codes,
    /// A float weight encoded in the scheme's type (f16, q8_0, q4_k, …).
    Encoded,
    /// A quantized weight whose grid no GGUF type holds, dequantized and quantized again.
    Requantized,
}

/// One tensor of the file.
#[derive(Debug, Clone, Serialize)]
pub struct GgufTensorRow {
    /// GGUF name (`blk.3.attn_q.weight`).
    pub name: String,
    /// whittle's representation of it (`f32`, `w4a16-g32`, `q4_k`, …).
    pub source: String,
    pub ggml_type: String,
    pub conversion: Conversion,
    /// ‖W_gguf − W‖ / ‖W‖ and max |W_gguf − W| against the weights whittle runs (W: the dequantized source).
    pub rel_err: f64,
    pub max_abs_err: f64,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct GgufReport {
    pub format: String,
    pub file: PathBuf,
    pub bytes: u64,
    pub architecture: String,
    /// The scheme for weights without an exact form (`f16` when none was given).
    pub scheme: String,
    /// Whether head counts / FFN widths are per-layer arrays (the blocks differ).
    pub per_layer_widths: bool,
    pub tokenizer_model: String,
    pub tokenizer_pre: String,
    pub tensors: Vec<GgufTensorRow>,
    /// Largest relative error of a tensor converted with [`Conversion::Codes`] / requantized (0 when none).
    pub max_codes_rel_err: f64,
    pub max_requantized_rel_err: f64,
    pub seconds: f64,
}

impl GgufReport {
    /// Tensors by conversion.
    pub fn count(&self, c: Conversion) -> usize {
        self.tensors.iter().filter(|t| t.conversion == c).count()
    }
}

/// Where one GGUF tensor's values come from.
enum Src<'a> {
    /// A Linear in whatever representation (the rows permuted for llama.cpp's RoPE when `permute` is set).
    Linear(&'a Linear),
    /// A plain tensor (embedding table, norm weight, RoPE divisors).
    Tensor(Tensor),
}

struct Job<'a> {
    /// GGUF name.
    name: String,
    /// HF name, for errors.
    hf: String,
    src: Src<'a>,
    /// Heads whose Q/K rows llama.cpp wants interleaved.
    permute: Option<usize>,
    /// `attn_q`, `ffn_down`, `token_embd`, `output`, … and the block index (llama-quantize's rules).
    kind: &'static str,
    layer: usize,
    /// Kept in f32 whatever the scheme (norms, RoPE divisors).
    f32_only: bool,
}

/// GGUF metadata key/values, in file order.
type Metadata = Vec<(String, Value)>;

/// An encoded tensor: (ggml type, bytes, row of the report).
type Encoded = (u32, Vec<u8>, GgufTensorRow);

/// Writes the LLaMA-family model `l` to `out` as a GGUF file (atomically: a temporary sibling, then rename).
pub fn export(l: &Loaded, out: &Path, o: &GgufOptions) -> Result<GgufReport> {
    let t0 = std::time::Instant::now();
    let Model::Llama(m) = &l.model else {
        return Err(Error::Usage(format!(
            "{}: GGUF export is for decoders (LLaMA family); this is a {} encoder (export it with --format onnx)",
            l.source.path.display(),
            l.model.family()
        )));
    };
    check_exportable(l, m)?;
    let c = &m.config;
    let n_layer = m.blocks.len();
    // Tied: token_embd is the head's table; a block-quantized head (a GGUF source) keeps its exact form.
    let tied = c.tie_word_embeddings;
    let mut jobs: Vec<Job> = Vec::new();
    let plain = |name: &str, hf: &str, t: Tensor, kind: &'static str, layer: usize, f32_only: bool| Job {
        name: name.into(),
        hf: hf.into(),
        src: Src::Tensor(t),
        permute: None,
        kind,
        layer,
        f32_only,
    };
    if tied && m.lm_head.is_quantized() {
        jobs.push(Job {
            name: "token_embd.weight".into(),
            hf: "model.embed_tokens.weight".into(),
            src: Src::Linear(&m.lm_head),
            permute: None,
            kind: "token_embd",
            layer: 0,
            f32_only: false,
        });
    } else {
        jobs.push(plain(
            "token_embd.weight",
            "model.embed_tokens.weight",
            m.embed_tokens.clone(),
            "token_embd",
            0,
            false,
        ));
    }
    if let Some(div) = rope_divisors(m)? {
        jobs.push(plain("rope_freqs.weight", "rope_scaling", div, "rope_freqs", 0, true));
    }
    for (i, b) in m.blocks.iter().enumerate() {
        let hf = |n: &str| format!("model.layers.{i}.{n}");
        jobs.push(plain(
            &format!("blk.{i}.attn_norm.weight"),
            &hf("input_layernorm.weight"),
            b.attn_norm.weight.clone(),
            "attn_norm",
            i,
            true,
        ));
        let linears: [(&Linear, &'static str, &str, Option<usize>); 7] = [
            (&b.q, "attn_q", "self_attn.q_proj", Some(b.n_head)),
            (&b.k, "attn_k", "self_attn.k_proj", Some(b.n_kv_head)),
            (&b.v, "attn_v", "self_attn.v_proj", None),
            (&b.o, "attn_output", "self_attn.o_proj", None),
            (&b.gate, "ffn_gate", "mlp.gate_proj", None),
            (&b.up, "ffn_up", "mlp.up_proj", None),
            (&b.down, "ffn_down", "mlp.down_proj", None),
        ];
        for (lin, kind, hf_name, permute) in linears {
            jobs.push(Job {
                name: format!("blk.{i}.{kind}.weight"),
                hf: hf(hf_name),
                src: Src::Linear(lin),
                permute,
                kind,
                layer: i,
                f32_only: false,
            });
        }
        jobs.push(plain(
            &format!("blk.{i}.ffn_norm.weight"),
            &hf("post_attention_layernorm.weight"),
            b.mlp_norm.weight.clone(),
            "ffn_norm",
            i,
            true,
        ));
    }
    jobs.push(plain("output_norm.weight", "model.norm.weight", m.norm.weight.clone(), "output_norm", 0, true));
    if !tied {
        jobs.push(Job {
            name: "output.weight".into(),
            hf: "lm_head.weight".into(),
            src: Src::Linear(&m.lm_head),
            permute: None,
            kind: "output",
            layer: 0,
            f32_only: false,
        });
    }

    // Encode on every core, largest tensors first (the embedding table must not start last).
    let results: Mutex<Vec<Option<Result<Encoded>>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(job_size(&jobs[i])));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(n) else { break };
                let r = encode_job(&jobs[i], m, n_layer, tied, o);
                results.lock().expect("no worker panics")[i] = Some(r);
            });
        }
    });
    let mut tensors = Vec::with_capacity(jobs.len());
    let mut rows = Vec::with_capacity(jobs.len());
    for (job, r) in jobs.iter().zip(results.into_inner().expect("no worker panics")) {
        let (t, bytes, row) = r.expect("every job ran")?;
        let (rows_n, cols) = job_dims(job);
        let ne = if rows_n == 1 && !matches!(job.src, Src::Linear(_)) {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows_n as u64]
        };
        tensors.push((job.name.as_str(), ne, t, bytes));
        rows.push(row);
    }
    let (meta, tok_model, tok_pre) = metadata(l, m, o, &rows)?;
    let meta_refs: Vec<(&str, Value)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write::write_file(out, &meta_refs, &tensors)?;
    let bytes = std::fs::metadata(out).map(|md| md.len()).unwrap_or(0);
    let max_of = |c: Conversion| rows.iter().filter(|r| r.conversion == c).map(|r| r.rel_err).fold(0.0, f64::max);
    Ok(GgufReport {
        format: "gguf".into(),
        file: out.to_path_buf(),
        bytes,
        architecture: architecture(m).into(),
        scheme: o.scheme.map_or("f16", GgufScheme::name).into(),
        per_layer_widths: !uniform(m),
        tokenizer_model: tok_model,
        tokenizer_pre: tok_pre,
        max_codes_rel_err: max_of(Conversion::Codes),
        max_requantized_rel_err: max_of(Conversion::Requantized),
        tensors: rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Refuses what GGUF cannot express, naming the layer.
fn check_exportable(l: &Loaded, m: &Llama) -> Result<()> {
    let c = &m.config;
    if c.model_type != "llama" && c.model_type != "mistral" {
        return Err(Error::Usage(format!(
            "model_type `{}`: GGUF export writes llama.cpp's `llama` architecture (llama, mistral) only",
            c.model_type
        )));
    }
    if c.attention_bias {
        return Err(Error::Usage(
            "attention biases (attention_bias): llama.cpp's `llama` architecture has none".into(),
        ));
    }
    if !l.shared_blocks.is_empty() {
        let pairs: Vec<String> = l.shared_blocks.iter().map(|(b, leader)| format!("{b}→{leader}")).collect();
        return Err(Error::Usage(format!(
            "{}: blocks share weights ({}, `whittle share`); llama.cpp has one dense weight per projection and \
             GGUF no way to share them: export the model before sharing",
            l.source.path.display(),
            pairs.join(", ")
        )));
    }
    for (name, lin) in l.model.linears() {
        if let LinearWeight::LowRank(_) = &lin.weight {
            return Err(Error::Unsupported {
                tensor: name,
                repr: lin.storage_name(),
                reason: "a low-rank factorisation U·V has no GGUF form (llama.cpp has one dense weight per \
                         projection); export the model before factorising it"
                    .into(),
            });
        }
    }
    Ok(())
}

/// llama.cpp's architecture for `m`: `llama`, or `deci` when the blocks' widths differ. llama.cpp's `llama`
/// reads per-layer arrays of `head_count` / `feed_forward_length` but sizes every layer's tensors by layer
/// 0's values (llama-cpp-python 0.3.36: "check_tensor_dims: tensor 'blk.1.ffn_gate.weight' has wrong shape;
/// expected 576, 1355, got 576, 1304"); `deci` (DeciLM, Nemotron-NAS) is the same LLaMA block — RMSNorm,
/// SwiGLU, the same RoPE and tensor names — with every layer sized and run by its own widths.
pub fn architecture(m: &Llama) -> &'static str {
    if uniform(m) {
        "llama"
    } else {
        "deci"
    }
}

/// Whether every block has the widths of block 0.
fn uniform(m: &Llama) -> bool {
    let d = |b: &whittle_models::llama::LlamaBlock| (b.n_head, b.n_kv_head, b.gate.out_features());
    m.blocks.windows(2).all(|w| d(&w[0]) == d(&w[1]))
}

/// `rope_freqs.weight`: the per-frequency divisors llama.cpp applies (Llama 3 scaling, or a GGUF source's own).
fn rope_divisors(m: &Llama) -> Result<Option<Tensor>> {
    let c = &m.config;
    if matches!(c.rope_scaling, RopeScaling::None | RopeScaling::Linear { .. }) {
        return Ok(None);
    }
    let mut plain = c.clone();
    plain.rope_scaling = RopeScaling::None;
    let div: Vec<f32> = plain.inv_freq().iter().zip(c.inv_freq()).map(|(b, s)| b / s).collect();
    let n = div.len();
    Ok(Some(Tensor::from_vec(div, n, &candle_core::Device::Cpu)?))
}

/// (rows, columns) of a job's tensor (a 1-D tensor is one row).
fn job_dims(j: &Job) -> (usize, usize) {
    match &j.src {
        Src::Linear(l) => (l.out_features(), l.in_features()),
        Src::Tensor(t) => match t.dims() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            d => (1, d.iter().product()),
        },
    }
}

fn job_size(j: &Job) -> usize {
    let (r, c) = job_dims(j);
    r * c
}

/// The row order llama.cpp wants for Q or K of `n_head` heads (as [`permute_rows`]): output row
/// `(h, i, j)` is input row `(h, j, i)` of the (n_head, 2, D/2) split.
fn permutation(rows: usize, n_head: usize) -> Vec<usize> {
    let half = rows / n_head / 2;
    let mut p = Vec::with_capacity(rows);
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                p.push(h * 2 * half + j * half + i);
            }
        }
    }
    p
}

/// A Linear's weight as ggml 32-blocks with codes in whittle's form, when its representation has them.
fn as_blocks(l: &Linear) -> Option<BlockWeights> {
    match &l.weight {
        LinearWeight::Block(b) => Some(b.packed.unpack()),
        LinearWeight::Int8Dynamic(p) | LinearWeight::Int8Static { p, .. } if p.k.is_multiple_of(32) => {
            // Per-channel int8 `s·q`: Q8_0 with every 32-block of a row carrying the row's scale.
            let nsb = p.k / 32;
            Some(BlockWeights {
                m: p.m,
                k: p.k,
                sb: 32,
                q: p.q.iter().map(|&q| (q as i32 + 128) as u8).collect(),
                scale: (0..p.m * nsb).map(|i| p.scale[i / nsb]).collect(),
                min: None,
                off: -128,
                act_block: 32,
            })
        }
        _ => None,
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// The ggml block type that holds `w`'s grid code for code, and its bytes (scales and mins in f16):
/// Q4_0 `d·(q−8)`, Q4_1 `d·q + m` (4-bit codes), Q5_0 `d·(q−16)`, Q5_1 (5-bit codes), Q8_0 `d·q`.
/// `None` when no ggml type has this grid (sub-blocks of 16, asymmetric 8-bit, K-quants' super-blocks).
pub fn exact_blocks(w: &BlockWeights) -> Option<(u32, Vec<u8>)> {
    if w.sb != 32 || !w.k.is_multiple_of(32) {
        return None;
    }
    let qmax = w.q.iter().copied().max().unwrap_or(0);
    let t = match (w.off, w.min.is_some()) {
        (-8, false) if qmax <= 15 => ty::Q4_0,
        (0, true) if qmax <= 15 => ty::Q4_1,
        (-16, false) if qmax <= 31 => ty::Q5_0,
        (0, true) if qmax <= 31 => ty::Q5_1,
        (-128, false) => ty::Q8_0,
        _ => return None,
    };
    let g = GgmlType::by_id(t).expect("a ggml type");
    let mut out = Vec::with_capacity(w.m * w.k / 32 * g.bytes);
    for (bi, q) in w.q.chunks_exact(32).enumerate() {
        out.extend(f16_bytes(w.scale[bi]));
        if let Some(mn) = &w.min {
            out.extend(f16_bytes(mn[bi]));
        }
        match t {
            ty::Q4_0 | ty::Q4_1 => out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4))),
            ty::Q5_0 | ty::Q5_1 => {
                // The fifth bit of code j is bit j of `qh` (little-endian u32), the low nibbles as Q4's.
                let qh = (0..32).fold(0u32, |h, j| h | (((q[j] >> 4) as u32 & 1) << j));
                out.extend(qh.to_le_bytes());
                out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
            }
            _ => out.extend(q.iter().map(|&c| (c as i32 - 128) as i8 as u8)),
        }
    }
    debug_assert_eq!(out.len(), w.m * w.k / 32 * g.bytes);
    Some((t, out))
}

/// (‖a − b‖ / ‖b‖, max |a − b|) (also the compressed-tensors report).
pub(crate) fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (*x as f64) - (*y as f64);
        num += d * d;
        den += (*y as f64) * (*y as f64);
        max = max.max(d.abs());
    }
    ((num / den.max(f64::MIN_POSITIVE)).sqrt(), max)
}

/// The ggml type a float (or requantized) weight gets: f32 for norms, else the scheme's per-tensor choice.
fn scheme_type(j: &Job, m: &Llama, n_layer: usize, tied: bool, cols: usize, o: &GgufOptions) -> u32 {
    if j.f32_only {
        return ty::F32;
    }
    match o.scheme {
        None => ty::F16,
        Some(GgufScheme::F32) => ty::F32,
        Some(GgufScheme::Ftype(ft)) => {
            let b = m.blocks.get(j.layer);
            let n_gqa = b.map_or(1, |b| b.n_head / b.n_kv_head.max(1));
            tensor_type(ft, j.kind, j.layer, n_layer, cols, n_gqa, tied)
        }
    }
}

fn type_name(t: u32) -> String {
    GgmlType::by_id(t).map_or("?", |g| g.name).to_string()
}

fn encode_job(j: &Job, m: &Llama, n_layer: usize, tied: bool, o: &GgufOptions) -> Result<Encoded> {
    let (rows, cols) = job_dims(j);
    let perm = j.permute.map(|h| permutation(rows, h));
    let row = |source: String, t: u32, conversion, (rel_err, max_abs_err): (f64, f64)| GgufTensorRow {
        name: j.name.clone(),
        source,
        ggml_type: type_name(t),
        conversion,
        rel_err,
        max_abs_err,
    };
    let (source, quantized, dense) = match &j.src {
        Src::Linear(l) => {
            if let Some(w) = as_blocks(l) {
                let w = match &perm {
                    Some(p) => w.select_rows(p),
                    None => w,
                };
                if let Some((t, bytes)) = exact_blocks(&w) {
                    // Read the bytes back as llama.cpp will and compare with what whittle runs.
                    let back = whittle_kernels::ggml::unpack(t, &bytes, rows, cols)
                        .map_err(|e| Error::Unsupported { tensor: j.hf.clone(), repr: l.storage_name(), reason: e })?
                        .dequantize();
                    let err = errors(&back, &w.dequantize());
                    let c = if err.1 == 0.0 { Conversion::Exact } else { Conversion::Codes };
                    return Ok((t, bytes, row(l.storage_name(), t, c, err)));
                }
            }
            let d = l.dequantize()?;
            let d = match &perm {
                Some(_) => permute_rows(&d, j.permute.unwrap_or(1))?,
                None => d,
            };
            (l.storage_name(), l.is_quantized(), d)
        }
        Src::Tensor(t) => (format!("{:?}", t.dtype()).to_lowercase(), false, t.to_dtype(DType::F32)?),
    };
    if quantized && o.scheme.is_none() {
        return Err(Error::Unsupported {
            tensor: j.hf.clone(),
            repr: source,
            reason: "no GGUF block type holds this grid exactly (exact: symmetric 4/5/8-bit and asymmetric \
                     4/5-bit, groups a multiple of 32); option `scheme` (e.g. q4_k_m, q8_0) requantizes it \
                     and reports the error it adds"
                .into(),
        });
    }
    let t = scheme_type(j, m, n_layer, tied, cols, o);
    let w2 = if dense.dims().len() == 1 { dense.unsqueeze(0)? } else { dense };
    let (bytes, _rmse) = whittle_quant::gguf_out::encode(&w2, t, &j.hf, None).map_err(|e| Error::Unsupported {
        tensor: j.hf.clone(),
        repr: source.clone(),
        reason: e.to_string(),
    })?;
    let src_vals: Vec<f32> = w2.flatten_all()?.to_vec1()?;
    let back = decode(t, &bytes, rows, cols).map_err(|e| Error::Unsupported {
        tensor: j.hf.clone(),
        repr: source.clone(),
        reason: e,
    })?;
    let c = if quantized { Conversion::Requantized } else { Conversion::Encoded };
    let err = errors(&back, &src_vals);
    let c = if c == Conversion::Encoded && err.1 == 0.0 { Conversion::Exact } else { c };
    Ok((t, bytes, row(source, t, c, err)))
}

/// The f32 values of `bytes` of ggml type `t` (rows × cols), as llama.cpp reads them.
fn decode(t: u32, bytes: &[u8], rows: usize, cols: usize) -> std::result::Result<Vec<f32>, String> {
    Ok(match t {
        ty::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ty::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ty::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => whittle_kernels::ggml::unpack(t, bytes, rows, cols)?.dequantize(),
    })
}

/// The file's metadata: the `llama.*` hyperparameters (per-layer arrays when the blocks differ), the
/// tokenizer, and `general.*`. Also returns the tokenizer's model and pre-tokenizer names.
fn metadata(l: &Loaded, m: &Llama, o: &GgufOptions, rows: &[GgufTensorRow]) -> Result<(Metadata, String, String)> {
    let c = &m.config;
    let a = architecture(m);
    let mut v: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, val: Value| v.push((k.to_string(), val));
    let name = l.source.path.file_stem().map_or("model".into(), |s| s.to_string_lossy().to_string());
    put("general.architecture", Value::String(a.into()));
    put("general.type", Value::String("model".into()));
    put("general.name", Value::String(name));
    put("general.file_type", Value::U32(file_type(o, rows)));
    put("general.quantization_version", Value::U32(2));
    let u = |x: usize| Value::U32(x as u32);
    // One value for `llama`, one per layer for `deci` (llama.cpp's `get_key_or_arr`).
    let per_layer = |f: &dyn Fn(&whittle_models::llama::LlamaBlock) -> usize| -> Value {
        let vals: Vec<usize> = m.blocks.iter().map(f).collect();
        if a == "llama" {
            Value::U32(vals.first().copied().unwrap_or(0) as u32)
        } else {
            Value::Array(vals.into_iter().map(|x| Value::I32(x as i32)).collect())
        }
    };
    put(&format!("{a}.block_count"), u(m.blocks.len()));
    put(&format!("{a}.context_length"), u(c.max_position_embeddings));
    put(&format!("{a}.embedding_length"), u(c.hidden_size));
    put(&format!("{a}.feed_forward_length"), per_layer(&|b| b.gate.out_features()));
    put(&format!("{a}.attention.head_count"), per_layer(&|b| b.n_head));
    put(&format!("{a}.attention.head_count_kv"), per_layer(&|b| b.n_kv_head));
    put(&format!("{a}.attention.key_length"), u(c.head_dim));
    put(&format!("{a}.attention.value_length"), u(c.head_dim));
    put(&format!("{a}.rope.dimension_count"), u(c.head_dim));
    put(&format!("{a}.rope.freq_base"), Value::F32(c.rope_theta as f32));
    put(&format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32));
    put(&format!("{a}.vocab_size"), u(c.vocab_size));
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        put(&format!("{a}.rope.scaling.type"), Value::String("linear".into()));
        put(&format!("{a}.rope.scaling.factor"), Value::F32(factor as f32));
    }
    // The tokenizer: vocabulary and merges from tokenizer.json, special ids as whittle runs the model.
    let tok_path = if l.source.path.is_dir() { l.source.path.join("tokenizer.json") } else { l.source.path.clone() };
    let tok = whittle_formats::tokenizer::gguf_tokenizer_metadata(&l.tokenizer_json, &tok_path, c.vocab_size)?;
    let names: Vec<String> = tok.iter().take(2).map(|(_, v)| v.as_str().unwrap_or_default().to_string()).collect();
    v.extend(tok);
    let mut put = |k: &str, val: Value| v.push((k.to_string(), val));
    if let Some(b) = l.bos_token_id {
        put("tokenizer.ggml.bos_token_id", Value::U32(b));
    }
    if let Some(e) = l.eos_token_ids.first() {
        put("tokenizer.ggml.eos_token_id", Value::U32(*e));
    }
    let tok_id = |key: &str| -> Option<u32> {
        let cfg = whittle_formats::hf::read_json(&l.source.path.join("tokenizer_config.json")).ok()?;
        let t = cfg.get(key)?;
        let s = t.as_str().or_else(|| t.get("content")?.as_str())?;
        l.tokenizer.token_to_id(s)
    };
    if let Some(p) = l.source.path.is_dir().then(|| tok_id("pad_token")).flatten() {
        put("tokenizer.ggml.padding_token_id", Value::U32(p));
    }
    if let Some(unk) = l.tokenizer_json.pointer("/model/unk_token").and_then(|t| t.as_str()) {
        if let Some(id) = l.tokenizer.token_to_id(unk) {
            put("tokenizer.ggml.unknown_token_id", Value::U32(id));
        }
    }
    put("tokenizer.ggml.add_bos_token", Value::Bool(l.add_bos));
    put("tokenizer.ggml.add_eos_token", Value::Bool(false));
    if let Some(t) = &l.chat_template {
        put("tokenizer.chat_template", Value::String(t.clone()));
    }
    let (model, pre) = (names[0].clone(), names[1].clone());
    Ok((v, model, pre))
}

/// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`): the scheme's, else the type most Linear weights
/// have.
fn file_type(o: &GgufOptions, rows: &[GgufTensorRow]) -> u32 {
    match o.scheme {
        Some(GgufScheme::F32) => 0,
        Some(GgufScheme::Ftype(f)) => f.file_type(),
        None => {
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            for r in rows.iter().filter(|r| r.name.starts_with("blk.") && !r.name.contains("_norm")) {
                *counts.entry(r.ggml_type.as_str()).or_default() += 1;
            }
            match counts.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t) {
                Some("f32") => 0,
                Some("q4_0") => 2,
                Some("q4_1") => 3,
                Some("q8_0") => 7,
                Some("q5_0") => 8,
                Some("q5_1") => 9,
                _ => 1,
            }
        }
    }
}
