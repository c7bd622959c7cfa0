//! `sensitivity` and `imatrix`: per-layer measurements written to a file for a later `quantize`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use whittle_pipeline::importance::{ImatrixConfig, SensitivityConfig};
use whittle_pipeline::output;
use whittle_quant::mixed::Sensitivity;

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct SensitivityArgs {
    #[command(flatten)]
    pub m: ModelArg,
    /// Output JSON (read by `quantize --target-bpw --sensitivity FILE`), written atomically
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub cfg: SensitivityConfig,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// If another whittle process is writing the same output, wait for it instead of failing
    #[arg(long)]
    pub wait: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn sensitivity(a: &SensitivityArgs, env: &Env) -> Result<()> {
    let _claim = match &a.output {
        Some(o) => Some(output::check_exclusive(o, a.force, a.wait)?),
        None => None,
    };
    a.cfg.options()?;
    let mut l = env.open(&a.m)?;
    let s = a.cfg.measure(&mut l, &env.ctx())?;
    if let Some(o) = &a.output {
        output::write_json(o, &s)?;
        eprintln!("wrote {}", o.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print_sensitivity(&s)
}

fn print_sensitivity(s: &Sensitivity) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let Some(first) = s.layers.first() else { return Ok(()) };
    write!(out, "{:<36} {:>11} {:>11}", "layer", "shape", format!("KL @ {} bit", first.probe_bits))?;
    for c in &first.candidates {
        write!(out, " {:>11}", format!("pred @ {}", c.bits))?;
    }
    writeln!(out)?;
    for l in &s.layers {
        write!(out, "{:<36} {:>11} {:>11.3e}", l.name, format!("{}x{}", l.shape[0], l.shape[1]), l.probe_kl)?;
        for c in &l.candidates {
            write!(out, " {:>11.3e}", c.predicted_kl)?;
        }
        writeln!(out)?;
    }
    writeln!(out, "\n{} ({} tokens of {}, {:.1}s)", s.method, s.tokens, s.calib, s.seconds)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ImatrixArgs {
    #[command(flatten)]
    pub m: ModelArg,
    /// Output file (imatrix.gguf), written atomically
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub cfg: ImatrixConfig,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// If another whittle process is writing the same output, wait for it instead of failing
    #[arg(long)]
    pub wait: bool,
}

pub fn imatrix(a: &ImatrixArgs, env: &Env) -> Result<()> {
    let _claim = output::check_exclusive(&a.output, a.force, a.wait)?;
    a.cfg.check()?;
    let mut l = env.open(&a.m)?;
    a.cfg.write(&mut l, &a.output, &env.ctx())?;
    println!("wrote {}", a.output.display());
    Ok(())
}
