//! `convert`: a model (GGUF or HF) to an HF directory that transformers loads.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::ValueEnum;

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    /// Output: a directory, or NAME.gguf for GGUF file types (written atomically)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weight dtype in the output
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    pub dtype: OutDtype,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutDtype {
    F32,
    F16,
    Bf16,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    let l = env.open(&a.m)?;
    let dt = match a.dtype {
        OutDtype::F32 => DType::F32,
        OutDtype::F16 => DType::F16,
        OutDtype::Bf16 => DType::BF16,
    };
    whittle_models::save::save_hf_dir(&l, &a.output, dt).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!("wrote {} ({} model, {:?})", a.output.display(), l.model.family(), dt);
    Ok(())
}
