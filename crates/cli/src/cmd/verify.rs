//! `verify`: runs an export in its own runtime and compares it with whittle's run of the source model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use whittle_export::verify::{VerifyOptions, DEFAULT_PROMPTS};

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct Args {
    /// The export: the directory `whittle export` wrote (ONNX, or compressed-tensors: run in transformers), an
    /// .onnx file, or a .gguf file (run in llama.cpp)
    pub exported: PathBuf,
    /// The model it was exported from (as every command loads it: add --dequantize for a GGUF exported in f32)
    #[command(flatten)]
    pub against: AgainstArg,
    /// libonnxruntime.so to load (default: ORT_DYLIB_PATH, else the `onnxruntime` wheel in $VIRTUAL_ENV,
    /// ~/.cache/whittle-test-venv or ~/.cache/whittle-peers)
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Runtime threads: ONNX Runtime's intra-op threads, llama.cpp's n_threads (default: the runtime's choice)
    #[arg(long)]
    pub ort_threads: Option<usize>,
    /// Run the graph as written, with ONNX Runtime's graph optimizations (fusions) disabled
    #[arg(long)]
    pub ort_no_optimize: bool,
    /// Encoders: token cap per STS-B sentence
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    /// Encoders: an STS-B TSV instead of the bundled test split
    #[arg(long)]
    pub sts_file: Option<PathBuf>,
    /// Decoders: a prompt for the greedy comparison (repeatable; default: three built-in prompts)
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// Decoders: greedy tokens per prompt
    #[arg(short = 'n', long, default_value_t = 32)]
    pub n_tokens: usize,
    /// Decoders: WikiText-2 chunks for KLD and top-1 agreement (0: skip)
    #[arg(long, default_value_t = 2)]
    pub chunks: usize,
    /// Decoders: tokens per chunk
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Decoders: a text file instead of the bundled WikiText-2 test split
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// GGUF / compressed-tensors: a Python with llama-cpp-python, or with torch, transformers and
    /// compressed-tensors (default: ~/.cache/whittle-peers/bin/python)
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// compressed-tensors: the torch dtype transformers runs the model in: float32 (default: the decompressed
    /// weights exactly, f32 activations), float16, bfloat16
    #[arg(long)]
    pub torch_dtype: Option<String>,
    /// GGUF / compressed-tensors: run whittle's side with every quantized Linear dequantized to f32 (exact
    /// activations, as transformers runs decompressed weights) instead of its integer kernels, which round
    /// activations to int8 per 32 values
    #[arg(long)]
    pub whittle_dequantized: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// `--against MODEL` with the usual model flags.
#[derive(clap::Args, Clone)]
pub struct AgainstArg {
    /// HF directory, .gguf file, or `org/name` from the local HF cache
    #[arg(long = "against")]
    pub model: String,
    /// Use this tokenizer.json instead of the model's own
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Run GGUF block-quantized weights dequantized to f32
    #[arg(long)]
    pub dequantize: bool,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    if a.max_len < 3 {
        bail!("--max-len {}: must be at least 3 ([CLS], one token, [SEP])", a.max_len);
    }
    if a.ort_threads == Some(0) {
        bail!("--ort-threads 0: must be at least 1");
    }
    let gguf = whittle_export::verify::is_gguf(&a.exported);
    let ct = whittle_export::transformers::is_compressed_tensors(&a.exported);
    let file = if gguf || ct { a.exported.clone() } else { whittle_export::onnx::model_file(&a.exported)? };
    if a.torch_dtype.is_some() && !ct {
        bail!("--torch-dtype: only for a compressed-tensors export (run in transformers)");
    }
    if a.whittle_dequantized && !(gguf || ct) {
        bail!("--whittle-dequantized: only for a GGUF or compressed-tensors export");
    }
    if ct && a.python.is_none() && whittle_export::llamacpp::default_python().is_none() {
        bail!(
            "{}: a compressed-tensors export is verified in transformers, and the peers' venv \
             (~/.cache/whittle-peers/bin/python, scripts/test-deps.sh) does not exist: make it, or pass --python \
             with a Python that has torch, transformers and compressed-tensors",
            file.display()
        );
    }
    match (&a.python, gguf || ct) {
        (Some(_), false) => bail!("--python: only for a GGUF or compressed-tensors export (run in Python)"),
        // Checked before the model is loaded: a missing runtime costs nothing.
        (Some(p), true) if !p.exists() => bail!("--python {}: no such file", p.display()),
        (None, true) if gguf && whittle_export::llamacpp::default_python().is_none() => bail!(
            "{}: a GGUF export is verified in llama.cpp through llama-cpp-python, and the peers' venv \
             (~/.cache/whittle-peers/bin/python, scripts/test-deps.sh) does not exist: make it, or pass --python \
             with a Python that has `llama_cpp`",
            file.display()
        ),
        _ => {}
    }
    let m = ModelArg {
        model: a.against.model.clone(),
        tokenizer: a.against.tokenizer.clone(),
        dequantize: a.against.dequantize,
    };
    let l = env.open(&m)?;
    let o = VerifyOptions {
        ort_lib: a.ort_lib.clone(),
        threads: a.ort_threads,
        no_optimize: a.ort_no_optimize,
        max_len: a.max_len,
        sts_file: a.sts_file.clone(),
        prompts: if a.prompts.is_empty() {
            DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect()
        } else {
            a.prompts.clone()
        },
        n_tokens: a.n_tokens,
        chunks: a.chunks,
        ctx: a.ctx,
        text_file: a.text_file.clone(),
        python: a.python.clone(),
        torch_dtype: a.torch_dtype.clone(),
        whittle_dequantized: a.whittle_dequantized,
    };
    let r = whittle_export::verify::verify(&file, &l, &o)
        .map_err(|e| anyhow::anyhow!(super::flags(&e.to_string())))
        .with_context(|| format!("verifying {}", file.display()))?;
    let mut so = std::io::stdout().lock();
    if a.json {
        writeln!(so, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    writeln!(so, "runtime    {} ({})", r.runtime, r.runtime_library.display())?;
    let rt = if gguf {
        "llama.cpp"
    } else if ct {
        "hf"
    } else {
        "onnx"
    };
    if let Some(n) = r.quantized_linears {
        writeln!(
            so,
            "model      {n} Linears quantized by compressed-tensors, run in {}",
            r.torch_dtype.as_deref().unwrap_or("float32")
        )?;
    }
    if r.whittle_dequantized {
        writeln!(so, "whittle    quantized Linears run dequantized to f32 (exact activations)")?;
    }
    if let Some(t) = &r.tokenizer {
        let diff = t.first_diff.map_or(String::new(), |(i, p)| format!("; text {i} differs at token {p}"));
        writeln!(
            so,
            "tokenizer  {}/{} texts tokenized identically ({} tokens){diff}",
            t.identical, t.texts, t.whittle_tokens
        )?;
    }
    if let Some(e) = &r.encoder {
        writeln!(so, "sentences  {} (STS-B, {} pairs, max {} tokens)", e.sentences, e.pairs, a.max_len)?;
        writeln!(
            so,
            "cos_min    {:.7}   cos_mean {:.7}   (ONNX Runtime vs whittle, per sentence)",
            e.cos_min, e.cos_mean
        )?;
        writeln!(so, "STS-B      onnx {:.2}   whittle {:.2}", e.sts_onnx, e.sts_whittle)?;
    }
    if let Some(d) = &r.decoder {
        for p in &d.prompts {
            let verdict = match p.first_diff {
                None => format!("identical {} tokens", p.export_ids.len()),
                Some(i) => format!("DIFFER at token {i}"),
            };
            writeln!(so, "prompt     {:?}: {verdict}", p.prompt)?;
            writeln!(so, "  {rt:<8} {:?}", p.export_text)?;
            if p.first_diff.is_some() {
                writeln!(so, "  whittle  {:?}", p.whittle_text)?;
            }
        }
        writeln!(so, "greedy     {}/{} prompts identical", d.identical, d.prompts.len())?;
        if let (Some(k), Some(t)) = (d.kld_mean, d.top1_agree) {
            writeln!(
                so,
                "chunks     {} × {} tokens ({} scored): KLD {:.3e} (p99 {:.3e}), top-1 {:.2}%, PPL {rt} {:.4} whittle {:.4}",
                d.chunks,
                d.ctx,
                d.tokens,
                k,
                d.kld_p99.unwrap_or(0.0),
                t,
                d.ppl_export.unwrap_or(0.0),
                d.ppl_whittle.unwrap_or(0.0)
            )?;
        }
    }
    writeln!(so, "took       {:.1}s", r.seconds)?;
    Ok(())
}
