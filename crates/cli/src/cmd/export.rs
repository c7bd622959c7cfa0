//! `export`: a model (any representation whittle loads) to a format another runtime runs, written atomically.

use std::io::Write;

use anyhow::{bail, Context, Result};

use super::{Env, ModelArg, OutputArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub out: OutputArgs,
    /// Target format: `onnx` writes OUT/model.onnx (opset 17), OUT/config.json and OUT/tokenizer.json, the
    /// layout Optimum's ORTModel classes load
    #[arg(long)]
    pub format: String,
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
}

impl Format {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "onnx" => Ok(Format::Onnx),
            // Named in issue 18 and not written yet: say so rather than "unknown".
            "gguf" | "hf" => bail!("--format {s}: not supported yet (formats: onnx)"),
            other => bail!("--format {other}: unknown format (formats: onnx)"),
        }
    }
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    // Checked before the claim and the load: a bad format leaves nothing behind and costs nothing.
    let format = Format::parse(&a.format)?;
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
