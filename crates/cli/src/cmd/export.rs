//! `export`: a model (any representation whittle loads) to a format another runtime runs, written atomically.

use std::io::Write;

use anyhow::{bail, Context, Result};

use super::{flags, Env, ModelArg, OutputArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub out: OutputArgs,
    /// Target format: `onnx` writes OUT/model.onnx (opset 17), OUT/config.json and OUT/tokenizer.json, the
    /// layout Optimum's ORTModel classes load; `gguf` writes the file OUT that llama.cpp loads (LLaMA family);
    /// `compressed-tensors` writes the HF directory OUT llm-compressor writes (weight-only wNa16 as
    /// pack-quantized, w8a8 as int-quantized), which transformers and vLLM load (LLaMA family; the model
    /// dtype is the global --dtype, default f16)
    #[arg(long)]
    pub format: String,
    /// GGUF: the type of weights with no exact GGUF form: f32, f16 (default for float weights), bf16, q8_0,
    /// q4_0, q4_1, q5_0, q5_1, q2_k … q6_k, q4_k_m, … (llama-quantize's per-tensor mixtures). Weight-only grids
    /// a ggml type holds (symmetric 4/8-bit, asymmetric 4-bit, groups of 32k) are copied exactly whatever it is;
    /// other quantized grids need it (they are requantized, and the report says by how much)
    #[arg(long)]
    pub scheme: Option<String>,
    /// w8a8-dynamic layers with ONNX Runtime's per-tensor DynamicQuantizeLinear (the form its
    /// quantize_dynamic writes) instead of whittle's per-token activation scales (default: per token, as
    /// whittle runs them)
    #[arg(long)]
    pub per_tensor_dynamic: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// The formats `export` writes.
#[derive(Clone, Copy)]
pub enum Format {
    Onnx,
    Gguf,
    CompressedTensors,
}

impl Format {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "onnx" => Ok(Format::Onnx),
            "gguf" => Ok(Format::Gguf),
            "compressed-tensors" => Ok(Format::CompressedTensors),
            // Named in issue 18 and not written yet: say so rather than "unknown".
            "hf" => bail!(
                "--format {s}: not supported yet (formats: onnx, gguf, compressed-tensors; `whittle convert` writes \
                 HF directories)"
            ),
            other => bail!("--format {other}: unknown format (formats: onnx, gguf, compressed-tensors)"),
        }
    }
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    // Checked before the claim and the load: a bad format leaves nothing behind and costs nothing.
    let format = Format::parse(&a.format)?;
    let scheme = match (&a.scheme, format) {
        (Some(s), Format::Gguf) => {
            Some(whittle_export::gguf::GgufScheme::parse(s).map_err(|e| anyhow::anyhow!(flags(&e.to_string())))?)
        }
        (Some(_), Format::Onnx | Format::CompressedTensors) => {
            bail!("--scheme: only for --format gguf (ONNX and compressed-tensors keep each Linear's own form)")
        }
        (None, _) => None,
    };
    if a.per_tensor_dynamic && !matches!(format, Format::Onnx) {
        bail!("--per-tensor-dynamic: only for --format onnx");
    }
    let _claim = a.out.claim()?;
    let l = env.open(&a.m)?;
    let out = &a.out.output;
    let r = match format {
        Format::Onnx => {
            let o = whittle_export::onnx::OnnxOptions {
                linear: whittle_export::onnx::linear::LinearOptions { per_tensor_dynamic: a.per_tensor_dynamic },
            };
            whittle_export::onnx::export(&l, out, &o).with_context(|| format!("exporting to {}", out.display()))?
        }
        Format::Gguf => {
            let o = whittle_export::gguf::GgufOptions { scheme };
            let r = whittle_export::gguf::export(&l, out, &o)
                .map_err(|e| anyhow::anyhow!(flags(&e.to_string())))
                .with_context(|| format!("exporting to {}", out.display()))?;
            return print_gguf(&r, a.json);
        }
        Format::CompressedTensors => {
            let o =
                whittle_export::compressed_tensors::CtOptions { dtype: env.dtype.unwrap_or(candle_core::DType::F16) };
            let r = whittle_export::compressed_tensors::export(&l, out, &o)
                .map_err(|e| anyhow::anyhow!(flags(&e.to_string())))
                .with_context(|| format!("exporting to {}", out.display()))?;
            return print_ct(&r, a.json);
        }
    };
    let mut so = std::io::stdout().lock();
    if a.json {
        writeln!(so, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    writeln!(so, "format   {} (opset {})", r.format, r.opset)?;
    writeln!(so, "inputs   {}", names(&r.inputs))?;
    writeln!(so, "outputs  {}", names(&r.outputs))?;
    for (form, n) in &r.linears {
        writeln!(so, "linears  {n:>3} × {form}")?;
    }
    writeln!(so, "wrote {} ({:.1} MB)", r.model_file.display(), r.bytes as f64 / 1e6)?;
    Ok(())
}

/// Names with the per-block cache tensors folded: `past_key_values.{0..29}.key/value`.
fn names(v: &[String]) -> String {
    let (cache, plain): (Vec<&String>, Vec<&String>) =
        v.iter().partition(|n| n.starts_with("past_key_values.") || n.starts_with("present."));
    let mut out: Vec<String> = plain.iter().map(|s| s.to_string()).collect();
    if let Some(first) = cache.first() {
        let stem = first.split('.').next().unwrap_or("");
        out.push(format!("{stem}.{{0..{}}}.key/value", cache.len() / 2 - 1));
    }
    out.join(", ")
}

fn print_gguf(r: &whittle_export::gguf::GgufReport, json: bool) -> Result<()> {
    use whittle_export::gguf::Conversion;
    let mut so = std::io::stdout().lock();
    if json {
        writeln!(so, "{}", serde_json::to_string_pretty(r)?)?;
        return Ok(());
    }
    writeln!(
        so,
        "format     gguf ({} architecture, tokenizer {} / {}, {} widths)",
        r.architecture,
        r.tokenizer_model,
        r.tokenizer_pre,
        if r.per_layer_widths { "per-layer" } else { "uniform" }
    )?;
    let mut by_type = std::collections::BTreeMap::<(String, String, String), usize>::new();
    for t in &r.tensors {
        *by_type
            .entry((t.source.clone(), t.ggml_type.clone(), format!("{:?}", t.conversion).to_lowercase()))
            .or_default() += 1;
    }
    for ((src, ty, how), n) in by_type {
        writeln!(so, "tensors    {n:>3} × {src} → {ty} ({how})")?;
    }
    if r.count(Conversion::Codes) > 0 {
        writeln!(
            so,
            "codes      {} tensors copied code for code; scales rounded to f16: max relative weight error {:.2e}",
            r.count(Conversion::Codes),
            r.max_codes_rel_err
        )?;
    }
    if r.count(Conversion::Requantized) > 0 {
        writeln!(
            so,
            "requant    {} quantized tensors requantized to {}: max relative weight error {:.2e} (added to the source's)",
            r.count(Conversion::Requantized),
            r.scheme,
            r.max_requantized_rel_err
        )?;
    }
    writeln!(so, "wrote {} ({:.1} MB) in {:.1}s", r.file.display(), r.bytes as f64 / 1e6, r.seconds)?;
    Ok(())
}

fn print_ct(r: &whittle_export::compressed_tensors::CtReport, json: bool) -> Result<()> {
    let mut so = std::io::stdout().lock();
    if json {
        writeln!(so, "{}", serde_json::to_string_pretty(r)?)?;
        return Ok(());
    }
    writeln!(so, "format     compressed-tensors ({}, model dtype {})", r.quant_format, r.dtype)?;
    for g in &r.groups {
        writeln!(so, "group      {}: {:>3} × {} ({})", g.name, g.linears, g.scheme, g.format)?;
    }
    writeln!(so, "ignore     {}", r.ignore.join(", "))?;
    let mut by = std::collections::BTreeMap::<(String, String, String), usize>::new();
    for t in &r.tensors {
        *by.entry((t.source.clone(), t.stored.clone(), format!("{:?}", t.conversion).to_lowercase())).or_default() += 1;
    }
    for ((src, stored, how), n) in by {
        writeln!(so, "tensors    {n:>3} × {src} → {stored} ({how})")?;
    }
    writeln!(
        so,
        "error      max relative weight error: quantized {:.2e} (scales in {}), float {:.2e}",
        r.max_codes_rel_err, r.dtype, r.max_float_rel_err
    )?;
    writeln!(so, "wrote {} ({:.1} MB) in {:.1}s", r.dir.display(), r.bytes as f64 / 1e6, r.seconds)?;
    Ok(())
}
