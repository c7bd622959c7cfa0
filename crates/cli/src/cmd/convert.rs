//! `convert`: a model (GGUF or HF) to an HF directory that transformers loads.

use anyhow::{Context, Result};
use candle_core::DType;

use super::{Env, ModelArg, OutputArgs};

/// The output's weight dtype is the global `--dtype` (default f32); the model is loaded in it too, so an
/// f16 GGUF converted with `--dtype f16` never passes through f32.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    let _claim = a.out.claim()?;
    let dt = env.dtype.unwrap_or(DType::F32);
    let o = env.load_options(a.m.tokenizer.clone(), a.m.dequantize);
    let l = whittle_models::load(&a.m.model, &whittle_models::LoadOptions { dtype: Some(dt), ..o })
        .with_context(|| format!("loading model `{}`", a.m.model))?;
    let out = &a.out.output;
    whittle_models::save::save_hf_dir(&l, out, dt).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({} model, {:?})", out.display(), l.model.family(), dt);
    Ok(())
}
