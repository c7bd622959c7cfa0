//! `whittle verify`: an export run in its own runtime against whittle's run of the source model, on real data.
//! ONNX exports run in ONNX Runtime, GGUF files in llama.cpp ([`crate::llamacpp`]), compressed-tensors
//! directories in transformers ([`crate::transformers`]).
//!
//! - Encoders: every STS-B test sentence (truncated at `max_len` tokens, batches of 32) embedded by ONNX Runtime
//!   (`sentence_embedding`) and by whittle; the cosine between the two embeddings of each sentence (mean and
//!   minimum), and the STS-B Spearman of each ([`whittle_eval::sts::spearman_of`]).
//! - Decoders: greedy continuations of a few prompts, ONNX Runtime decoding with its KV cache
//!   (`past_key_values.N.*` → `present.N.*`) against [`whittle_models::generate::generate`]; and on the first
//!   WikiText-2 chunks (llama.cpp's perplexity protocol), KL(whittle ‖ ONNX Runtime), top-1 agreement and both
//!   perplexities ([`whittle_eval::ppl::score_row`]).

use std::path::{Path, PathBuf};

use serde::Serialize;
use whittle_eval::data;
use whittle_models::llama::Llama;
use whittle_models::{text, Loaded, Model};

use crate::llamacpp::PyRuntime;
use crate::runtime::{Input, OrtModel};
use crate::{Error, Result};

/// What to verify with.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The ONNX Runtime library (else found as [`crate::runtime::find_library`] says).
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (None: its default).
    pub threads: Option<usize>,
    /// Run the graph as written, without ONNX Runtime's graph optimizations (fusions).
    pub no_optimize: bool,
    /// Encoders: token cap per sentence (the STS-B protocol's 128).
    pub max_len: usize,
    /// Encoders: an STS-B TSV instead of the bundled test split.
    pub sts_file: Option<PathBuf>,
    /// Decoders: prompts for the greedy comparison.
    pub prompts: Vec<String>,
    /// Decoders: new tokens per prompt.
    pub n_tokens: usize,
    /// Decoders: WikiText-2 chunks for KLD / top-1 (0 skips them), of `ctx` tokens.
    pub chunks: usize,
    pub ctx: usize,
    /// Decoders: a text instead of the bundled WikiText-2 test split.
    pub text_file: Option<PathBuf>,
    /// GGUF / compressed-tensors: a Python with llama-cpp-python, or with torch, transformers and
    /// compressed-tensors (else the peers' venv, [`crate::llamacpp::default_python`]).
    pub python: Option<PathBuf>,
    /// compressed-tensors: the torch dtype transformers loads the model in (`float32` when `None`).
    pub torch_dtype: Option<String>,
    /// Decoders run in Python: whittle's side runs every quantized Linear dequantized to f32 (exact
    /// activations, as transformers runs the decompressed weights) instead of its integer kernels.
    pub whittle_dequantized: bool,
}

/// The prompts `verify` decodes when none are given.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "Once upon a time, in a small village,",
];

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            ort_lib: None,
            threads: None,
            no_optimize: false,
            max_len: 128,
            sts_file: None,
            prompts: DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
            n_tokens: 32,
            chunks: 2,
            ctx: 512,
            text_file: None,
            python: None,
            torch_dtype: None,
            whittle_dequantized: false,
        }
    }
}

/// Encoder figures.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderCheck {
    pub sentences: usize,
    /// Cosine between ONNX Runtime's and whittle's embedding of each sentence.
    pub cos_min: f64,
    pub cos_mean: f64,
    /// STS-B Spearman × 100 of each.
    pub sts_onnx: f64,
    pub sts_whittle: f64,
    pub pairs: usize,
}

/// One prompt's greedy continuations.
#[derive(Debug, Clone, Serialize)]
pub struct PromptCheck {
    pub prompt: String,
    pub whittle_ids: Vec<u32>,
    /// The export's continuation in its runtime.
    pub export_ids: Vec<u32>,
    /// Position of the first differing token (None: identical).
    pub first_diff: Option<usize>,
    pub whittle_text: String,
    pub export_text: String,
}

/// Decoder figures.
#[derive(Debug, Clone, Serialize)]
pub struct DecoderCheck {
    pub prompts: Vec<PromptCheck>,
    /// Prompts whose continuations are identical.
    pub identical: usize,
    pub chunks: usize,
    pub ctx: usize,
    pub tokens: usize,
    /// KL(whittle ‖ the export's runtime) per scored token, nats.
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    /// % of scored positions with the same top token.
    pub top1_agree: Option<f64>,
    pub ppl_export: Option<f64>,
    pub ppl_whittle: Option<f64>,
}

/// The export's own tokenizer (a GGUF's, built by llama.cpp from its metadata) against whittle's.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerCheck {
    pub texts: usize,
    /// Texts tokenized identically.
    pub identical: usize,
    pub whittle_tokens: usize,
    /// For the first text that differs: its index and the first differing token position.
    pub first_diff: Option<(usize, usize)>,
}

/// The result of `verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub exported: PathBuf,
    pub against: PathBuf,
    /// `onnxruntime`, `llama.cpp (llama-cpp-python 0.3.36)`, or `transformers (5.24.0, compressed-tensors …)`.
    pub runtime: String,
    /// The libonnxruntime loaded, or the Python that ran llama.cpp.
    pub runtime_library: PathBuf,
    /// GGUF / compressed-tensors: the runtime's tokenization of the prompts and the text against whittle's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder: Option<DecoderCheck>,
    /// compressed-tensors: the Linears transformers quantized through compressed-tensors, and its dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantized_linears: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Whether whittle's side ran its quantized Linears dequantized (exact activations).
    pub whittle_dequantized: bool,
    pub seconds: f64,
}

/// Runs the ONNX export at `exported` (its directory or `.onnx` file) in ONNX Runtime and compares it with
/// whittle's run of `l`.
pub fn verify(exported: &Path, l: &Loaded, o: &VerifyOptions) -> Result<VerifyReport> {
    if is_gguf(exported) {
        return verify_py(exported, l, o, PyRuntime::LlamaCpp);
    }
    if crate::transformers::is_compressed_tensors(exported) {
        return verify_py(exported, l, o, PyRuntime::Transformers);
    }
    if o.whittle_dequantized {
        return Err(Error::Usage(
            "option `whittle-dequantized` is for exports run in Python (GGUF, compressed-tensors)".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let file = crate::onnx::model_file(exported)?;
    check_block_activations(&file, l)?;
    let lib = crate::runtime::init(o.ort_lib.as_deref())?;
    let mut ort = OrtModel::open_with(&file, o.ort_lib.as_deref(), o.threads, o.no_optimize)?;
    let (encoder, decoder) = match &l.model {
        Model::Bert(_) => (Some(encoder(&mut ort, l, o)?), None),
        Model::Llama(m) => (None, Some(decoder(&mut ort, l, m, o)?)),
    };
    Ok(VerifyReport {
        exported: file,
        against: l.source.path.clone(),
        runtime: "onnxruntime".into(),
        runtime_library: lib,
        tokenizer: None,
        encoder,
        decoder,
        quantized_linears: None,
        torch_dtype: None,
        whittle_dequantized: false,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Refuses to compare an export whose 4-bit layers take other activations than whittle's run of the source
/// (f32 vs int8-rounded): the two would differ by the activation rounding, not by the runtime.
fn check_block_activations(file: &Path, l: &Loaded) -> Result<()> {
    use prost::Message;
    let Some(ours) = crate::onnx::block_activations(l) else { return Ok(()) };
    let bytes = std::fs::read(file).map_err(|e| Error::File { path: file.into(), msg: format!("reading: {e}") })?;
    let meta = crate::onnx::proto::ModelMetadataOnly::decode(bytes.as_slice())
        .map_err(|e| Error::File { path: file.into(), msg: format!("not an ONNX model: {e}") })?;
    let Some(theirs) =
        meta.metadata_props.iter().find(|p| p.key == crate::onnx::BLOCK_ACTIVATIONS_KEY).map(|p| p.value.as_str())
    else {
        return Ok(()); // not written by this exporter: compared as it is
    };
    if theirs != ours {
        let flag = |a: &str| if a == crate::onnx::F32_ACTS { "with" } else { "without" };
        return Err(Error::Usage(format!(
            "{}: its 4-bit layers take {theirs} activations (exported {} option `float_activations`), but the \
             source runs them with {ours} activations; verify {} option `float_activations` to compare the same \
             arithmetic",
            file.display(),
            flag(theirs),
            flag(theirs)
        )));
    }
    Ok(())
}

/// Checks that the ONNX model has the inputs this model family's export has.
fn expect_inputs(ort: &OrtModel, want: &[&str]) -> Result<()> {
    let have = ort.input_names();
    if let Some(miss) = want.iter().find(|w| !have.iter().any(|h| h == *w)) {
        return Err(Error::Usage(format!(
            "{}: no input `{miss}` (inputs: {}); is it the export of this model?",
            ort.path.display(),
            have.join(", ")
        )));
    }
    Ok(())
}

fn encoder(ort: &mut OrtModel, l: &Loaded, o: &VerifyOptions) -> Result<EncoderCheck> {
    expect_inputs(ort, &["input_ids", "attention_mask", "token_type_ids"])?;
    let named = data::read_text(o.sts_file.as_deref(), data::STS_TEST)?;
    let pairs = data::parse_sts(&named)?;
    let sents: Vec<&str> = pairs.iter().flat_map(|(a, b, _)| [a.as_str(), b.as_str()]).collect();
    let ours = whittle_eval::sts::embed_all(l, &sents, o.max_len, &mut |_, _| {})?;
    let Model::Bert(m) = &l.model else { unreachable!("encoder() takes encoders") };
    let tok = text::truncating(&l.tokenizer, o.max_len.min(m.config.max_position_embeddings))?;
    let mut theirs = Vec::with_capacity(sents.len());
    for chunk in sents.chunks(32) {
        let b = text::encode_batch(&tok, chunk)?;
        let shape = b.ids.dims().to_vec();
        let as_i64 = |t: &candle_core::Tensor| -> Result<Vec<i64>> {
            Ok(t.flatten_all()?.to_vec1::<u32>()?.into_iter().map(i64::from).collect())
        };
        let inputs = vec![
            ("input_ids".to_string(), Input::I64(shape.clone(), as_i64(&b.ids)?)),
            ("attention_mask".to_string(), Input::I64(shape.clone(), as_i64(&b.mask)?)),
            ("token_type_ids".to_string(), Input::I64(shape.clone(), as_i64(&b.type_ids)?)),
        ];
        let out = ort.run(inputs, &["sentence_embedding"])?.remove(0);
        let c = *out.shape.last().unwrap_or(&0);
        theirs.extend(out.data.chunks(c.max(1)).map(|r| r.to_vec()));
    }
    let (cos_mean, cos_min) = whittle_eval::sts::cosine_agreement(&theirs, &ours);
    Ok(EncoderCheck {
        sentences: sents.len(),
        cos_min,
        cos_mean,
        sts_onnx: whittle_eval::sts::spearman_of(&theirs, &pairs),
        sts_whittle: whittle_eval::sts::spearman_of(&ours, &pairs),
        pairs: pairs.len(),
    })
}

/// One ONNX Runtime call of the decoder: `ids` after the cache `past` (one (key, value) per block, each
/// (1, KV, P, D) as flat data); returns the logits (T, V) and the new cache.
#[allow(clippy::type_complexity)]
fn ort_step(
    ort: &mut OrtModel,
    m: &Llama,
    ids: &[u32],
    past: &[(Vec<f32>, Vec<f32>)],
    past_len: usize,
) -> Result<(Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>)> {
    let t = ids.len();
    let d = m.config.head_dim;
    let mut inputs = vec![
        ("input_ids".to_string(), Input::I64(vec![1, t], ids.iter().map(|&i| i as i64).collect())),
        ("attention_mask".to_string(), Input::I64(vec![1, past_len + t], vec![1; past_len + t])),
        ("position_ids".to_string(), Input::I64(vec![1, t], (past_len..past_len + t).map(|p| p as i64).collect())),
    ];
    let mut want = vec!["logits".to_string()];
    for (i, (b, (k, v))) in m.blocks.iter().zip(past).enumerate() {
        let shape = vec![1, b.n_kv_head, past_len, d];
        inputs.push((format!("past_key_values.{i}.key"), Input::F32(shape.clone(), k.clone())));
        inputs.push((format!("past_key_values.{i}.value"), Input::F32(shape, v.clone())));
        want.push(format!("present.{i}.key"));
        want.push(format!("present.{i}.value"));
    }
    let want_refs: Vec<&str> = want.iter().map(String::as_str).collect();
    let mut outs = ort.run(inputs, &want_refs)?.into_iter();
    let logits = outs.next().expect("logits requested").data;
    let mut present = Vec::with_capacity(m.blocks.len());
    while let (Some(k), Some(v)) = (outs.next(), outs.next()) {
        present.push((k.data, v.data));
    }
    Ok((logits, present))
}

/// Greedy decoding in ONNX Runtime: `n` tokens after `prompt` (no early stop, as the comparison needs).
fn ort_greedy(ort: &mut OrtModel, m: &Llama, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let v = m.config.vocab_size;
    let mut past: Vec<(Vec<f32>, Vec<f32>)> = m.blocks.iter().map(|_| (Vec::new(), Vec::new())).collect();
    let mut past_len = 0;
    let mut input = prompt.to_vec();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (logits, present) = ort_step(ort, m, &input, &past, past_len)?;
        let last = &logits[logits.len() - v..];
        let next = whittle_models::generate::argmax(last);
        out.push(next);
        past_len += input.len();
        past = present;
        input = vec![next];
    }
    Ok(out)
}

fn decoder(ort: &mut OrtModel, l: &Loaded, m: &Llama, o: &VerifyOptions) -> Result<DecoderCheck> {
    expect_inputs(ort, &["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"])?;
    if o.prompts.is_empty() && o.chunks == 0 {
        return Err(Error::Usage("nothing to verify: no prompts and option `chunks` 0".into()));
    }
    let mut prompts = Vec::new();
    for p in &o.prompts {
        let ids = text::encode_prompt(l, p, false)?;
        if ids.is_empty() {
            return Err(Error::Usage(format!("prompt {p:?} is empty after tokenization")));
        }
        let theirs = ort_greedy(ort, m, &ids, o.n_tokens)?;
        prompts.push(prompt_check(l, m, p, &ids, theirs, o.n_tokens)?);
    }
    let mut check = DecoderCheck::new(prompts, 0, o.ctx);
    if o.chunks == 0 {
        return Ok(check);
    }
    if o.ctx > m.config.max_position_embeddings {
        return Err(whittle_core::InvalidOption::new("ctx", o.ctx, "larger than the model's context").into());
    }
    let named = data::read_text(o.text_file.as_deref(), data::WIKI_TEST)?;
    let chunks = whittle_eval::ppl::chunks(l, &named.1, o.ctx, o.chunks)?;
    let first = o.ctx / 2;
    let v = m.config.vocab_size;
    let mut scores = Vec::new();
    for chunk in &chunks {
        let ours = whittle_eval::ppl::chunk_logits(m, chunk, first - 1)?;
        let empty: Vec<(Vec<f32>, Vec<f32>)> = m.blocks.iter().map(|_| (Vec::new(), Vec::new())).collect();
        let (theirs, _) = ort_step(ort, m, chunk, &empty, 0)?; // (ctx, V)
        for (i, row) in ours.iter().enumerate() {
            let pos = first - 1 + i;
            let t_row = &theirs[pos * v..(pos + 1) * v];
            scores.push(whittle_eval::ppl::score_row(row, t_row, chunk[pos + 1] as usize));
        }
    }
    check.chunks = chunks.len();
    summarize(&mut check, &scores);
    Ok(check)
}

/// whittle's greedy continuation of `ids` beside the export's (`theirs`), both decoded.
fn prompt_check(
    l: &Loaded,
    m: &Llama,
    prompt: &str,
    ids: &[u32],
    theirs: Vec<u32>,
    n_tokens: usize,
) -> Result<PromptCheck> {
    let sampling = whittle_models::generate::Sampling::default();
    let ours = whittle_models::generate::generate(m, ids, n_tokens, &[], &sampling, |_| {})?;
    let first_diff = ours.iter().zip(&theirs).position(|(a, b)| a != b);
    Ok(PromptCheck {
        prompt: prompt.to_string(),
        whittle_text: text::decode(l, &ours)?,
        export_text: text::decode(l, &theirs)?,
        whittle_ids: ours,
        export_ids: theirs,
        first_diff,
    })
}

impl DecoderCheck {
    /// The prompts' results, with the scores of `chunks` chunks still to come ([`summarize`]).
    fn new(prompts: Vec<PromptCheck>, chunks: usize, ctx: usize) -> Self {
        let identical = prompts.iter().filter(|p| p.first_diff.is_none()).count();
        DecoderCheck {
            prompts,
            identical,
            chunks,
            ctx,
            tokens: 0,
            kld_mean: None,
            kld_p99: None,
            top1_agree: None,
            ppl_export: None,
            ppl_whittle: None,
        }
    }
}

/// KLD, top-1 agreement and both perplexities of the scored positions.
fn summarize(check: &mut DecoderCheck, scores: &[whittle_eval::ppl::RowScore]) {
    let n = scores.len() as f64;
    let klds: Vec<f64> = scores.iter().map(|s| s.kl).collect();
    check.tokens = scores.len();
    check.kld_mean = Some(klds.iter().sum::<f64>() / n);
    check.kld_p99 = Some(whittle_eval::stats::percentile(&klds, 99.0));
    check.top1_agree = Some(100.0 * scores.iter().filter(|s| s.agree).count() as f64 / n);
    check.ppl_export = Some((scores.iter().map(|s| s.nll).sum::<f64>() / n).exp());
    check.ppl_whittle = Some((scores.iter().map(|s| s.nll_base).sum::<f64>() / n).exp());
}

/// Whether `p` is a GGUF file (by its magic, whatever its name).
pub fn is_gguf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    p.is_file()
        && std::fs::File::open(p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}

/// Characters of the WikiText-2 text whose tokenizations are compared (a few thousand tokens).
const TOKENIZER_CHECK_CHARS: usize = 20_000;

/// Runs the export `exported` in `rt` — a GGUF file in llama.cpp, a compressed-tensors directory in
/// transformers — and compares it with whittle's run of `l`: the same prompt ids decoded greedily, the same
/// WikiText-2 chunks scored (KLD, top-1, both PPLs), and the runtime's tokenizer (llama.cpp's built from the
/// file's metadata, transformers' from the directory) against whittle's on the prompts and the first part
/// of the text.
fn verify_py(exported: &Path, l: &Loaded, o: &VerifyOptions, rt: PyRuntime) -> Result<VerifyReport> {
    let t0 = std::time::Instant::now();
    let Model::Llama(m) = &l.model else {
        return Err(Error::Usage(format!(
            "{}: the export is a decoder, and --against {} is an encoder",
            exported.display(),
            l.source.path.display()
        )));
    };
    let torch_dtype = match (rt, &o.torch_dtype) {
        (PyRuntime::Transformers, d) => {
            let d = d.clone().unwrap_or_else(|| "float32".into());
            if !crate::transformers::DTYPES.contains(&d.as_str()) {
                return Err(whittle_core::InvalidOption::new("torch-dtype", &d, "float32, float16 or bfloat16").into());
            }
            Some(d)
        }
        (PyRuntime::LlamaCpp, Some(_)) => {
            return Err(Error::Usage("option `torch-dtype` is for compressed-tensors exports".into()))
        }
        (PyRuntime::LlamaCpp, None) => None,
    };
    // whittle's side: as it runs, or with every quantized Linear dequantized (exact activations).
    let dequantized = if o.whittle_dequantized { Some(dequantized(m)?) } else { None };
    let m = dequantized.as_ref().unwrap_or(m);
    if o.prompts.is_empty() && o.chunks == 0 {
        return Err(Error::Usage("nothing to verify: no prompts and option `chunks` 0".into()));
    }
    if o.chunks > 0 && o.ctx > m.config.max_position_embeddings {
        return Err(whittle_core::InvalidOption::new("ctx", o.ctx, "larger than the model's context").into());
    }
    let mut prompt_ids = Vec::new();
    for p in &o.prompts {
        let ids = text::encode_prompt(l, p, false)?;
        if ids.is_empty() {
            return Err(Error::Usage(format!("prompt {p:?} is empty after tokenization")));
        }
        prompt_ids.push(ids);
    }
    let (chunks, wiki) = if o.chunks > 0 {
        let named = data::read_text(o.text_file.as_deref(), data::WIKI_TEST)?;
        (whittle_eval::ppl::chunks(l, &named.1, o.ctx, o.chunks)?, named.1)
    } else {
        (Vec::new(), String::new())
    };
    let mut texts: Vec<String> = o.prompts.clone();
    if !wiki.is_empty() {
        texts.push(wiki[..wiki.floor_char_boundary(TOKENIZER_CHECK_CHARS)].to_string());
    }
    let first = o.ctx / 2;
    let req = crate::llamacpp::Request {
        prompts: prompt_ids.clone(),
        n_tokens: o.n_tokens,
        chunks: chunks.clone(),
        first,
        texts: texts.clone(),
        threads: o.threads,
    };
    let mut session = match &torch_dtype {
        Some(d) => crate::llamacpp::Session::start_runtime(
            rt,
            o.python.as_deref(),
            exported,
            &crate::transformers::Request { base: req, dtype: d.clone() },
        )?,
        None => crate::llamacpp::Session::start(o.python.as_deref(), exported, &req)?,
    };
    let rt_name = match rt {
        PyRuntime::LlamaCpp => "llama.cpp",
        PyRuntime::Transformers => "transformers",
    };
    let v = m.config.vocab_size;
    if session.reply.n_vocab != v {
        return Err(Error::Usage(format!(
            "{}: {rt_name} reads a vocabulary of {} tokens, the model has {v}: is it the export of this model?",
            exported.display(),
            session.reply.n_vocab
        )));
    }
    if session.reply.quantized_linears == Some(0) {
        return Err(rt.err(format!(
            "{}: transformers quantized no Linear through compressed-tensors (its quantization_config was not \
             applied): the comparison would be of a float model",
            exported.display()
        )));
    }
    // The tokenizer llama.cpp built from the file's metadata, on the same texts.
    let mut tok = TokenizerCheck { texts: texts.len(), identical: 0, whittle_tokens: 0, first_diff: None };
    for (i, (t, theirs)) in texts.iter().zip(&session.reply.tokens).enumerate() {
        let ours = l.tokenizer.encode(t.as_str(), false).map_err(|e| Error::Usage(format!("tokenizing: {e}")))?;
        let ours = ours.get_ids();
        tok.whittle_tokens += ours.len();
        let diff = ours
            .iter()
            .zip(theirs)
            .position(|(a, b)| a != b)
            .or((ours.len() != theirs.len()).then(|| ours.len().min(theirs.len())));
        match diff {
            None => tok.identical += 1,
            Some(d) if tok.first_diff.is_none() => tok.first_diff = Some((i, d)),
            Some(_) => {}
        }
    }
    let mut prompts = Vec::new();
    for ((p, ids), theirs) in o.prompts.iter().zip(&prompt_ids).zip(session.reply.greedy.clone()) {
        prompts.push(prompt_check(l, m, p, ids, theirs, o.n_tokens)?);
    }
    let mut check = DecoderCheck::new(prompts, chunks.len(), o.ctx);
    let mut scores = Vec::new();
    for chunk in &chunks {
        let ours = whittle_eval::ppl::chunk_logits(m, chunk, first - 1)?; // (ctx - first, V) rows
        let theirs = session.next_chunk(ours.len(), v)?;
        for (i, row) in ours.iter().enumerate() {
            let pos = first - 1 + i;
            scores.push(whittle_eval::ppl::score_row(row, &theirs[i * v..(i + 1) * v], chunk[pos + 1] as usize));
        }
    }
    let runtime = match rt {
        PyRuntime::LlamaCpp => format!("llama.cpp (llama-cpp-python {})", session.reply.version),
        PyRuntime::Transformers => format!("transformers ({})", session.reply.version),
    };
    let quantized_linears = session.reply.quantized_linears;
    let python = session.python.clone();
    session.finish()?;
    if !scores.is_empty() {
        summarize(&mut check, &scores);
    }
    Ok(VerifyReport {
        exported: exported.to_path_buf(),
        against: l.source.path.clone(),
        runtime,
        runtime_library: python,
        tokenizer: Some(tok),
        encoder: None,
        decoder: Some(check),
        quantized_linears,
        torch_dtype,
        whittle_dequantized: o.whittle_dequantized,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A copy of `m` whose quantized Linears are dense f32 (their dequantized weights): whittle's run with exact
/// activations, the reference for a runtime that runs decompressed weights in float.
fn dequantized(m: &Llama) -> Result<Llama> {
    let mut d = m.clone();
    let dense = |l: &mut whittle_core::Linear| -> Result<()> {
        if l.is_quantized() {
            let w = l.dequantize()?.to_dtype(candle_core::DType::F32)?;
            *l = whittle_core::Linear::dense(w, l.bias.clone())?;
        }
        Ok(())
    };
    for b in &mut d.blocks {
        for l in [&mut b.q, &mut b.k, &mut b.v, &mut b.o, &mut b.gate, &mut b.up, &mut b.down] {
            dense(l)?;
        }
    }
    dense(&mut d.lm_head)?;
    let run = d.run.clone();
    let mut model = Model::Llama(d);
    model.set_run_config(&run);
    let Model::Llama(d) = model else { unreachable!("built as a decoder") };
    Ok(d)
}
