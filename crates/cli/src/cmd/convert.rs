//! `convert`: a model (GGUF or HF) to an HF directory that transformers loads.

use anyhow::{Context, Result};
use candle_core::DType;
use clap::ValueEnum;

use super::{Env, ModelArg, OutputArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub out: OutputArgs,
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
    let _claim = a.out.claim()?;
    let l = env.open(&a.m)?;
    let dt = match a.dtype {
        OutDtype::F32 => DType::F32,
        OutDtype::F16 => DType::F16,
        OutDtype::Bf16 => DType::BF16,
    };
    let out = &a.out.output;
    whittle_models::save::save_hf_dir(&l, out, dt).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({} model, {:?})", out.display(), l.model.family(), dt);
    Ok(())
}
