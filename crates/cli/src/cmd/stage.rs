//! The commands that apply one stage to a model and write the result: `prune`, `lowrank`, `share`,
//! `quantize`. Each parses its config (the pipeline's config type is the argument group), checks it and the
//! output before any work, then opens, applies, saves and prints.

use anyhow::{Context, Result};
use whittle_pipeline::stages::{LowrankConfig, PruneConfig, QuantizeConfig, ShareConfig};
use whittle_pipeline::{output, Stage};

use super::{print_report, Env, ModelArg, OutputArgs};

/// A stage command's arguments: the model, the output, the stage's config and `--json`.
#[derive(clap::Args)]
pub struct Args<C: clap::Args> {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub cfg: C,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub type Prune = Args<PruneConfig>;
pub type Lowrank = Args<LowrankConfig>;
pub type Share = Args<ShareConfig>;
pub type Quantize = Args<QuantizeConfig>;

/// Checks, opens, applies, saves (atomically) and prints.
pub fn run<C: clap::Args + Stage>(a: &Args<C>, env: &Env) -> Result<()> {
    a.cfg.check()?;
    let _claim = a.out.claim()?;
    let mut l = env.open(&a.m)?;
    let mut report = a.cfg.apply(&mut l, &mut env.ctx())?;
    output::save(&l, &a.out.output, Some(report.as_mut()))
        .with_context(|| format!("writing {}", a.out.output.display()))?;
    print_report(report.as_ref(), a.json, Some(&a.out.output))
}

/// `quantize`: GGUF file types are written tensor by tensor from the GGUF source; the rest is a stage.
pub fn quantize(a: &Quantize, env: &Env) -> Result<()> {
    a.cfg.check_output(&a.out.output)?;
    if a.cfg.gguf_ftype().is_none() {
        return run(a, env);
    }
    a.cfg.check()?;
    let _claim = a.out.claim()?;
    let report = whittle_pipeline::stages::quantize::quantize_gguf(&a.m.model, &a.out.output, &a.cfg)?;
    print_report(report.as_ref(), a.json, Some(&a.out.output))
}
