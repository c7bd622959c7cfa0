//! `distill` and `finetune`: the training stages behind flags.

use anyhow::{Context, Result};
use whittle_pipeline::stages::train::{open_for_training, DistillConfig, FinetuneConfig, TrainConfig};
use whittle_pipeline::{output, Stage};

use super::{print_report, Env};

#[derive(clap::Args)]
pub struct DistillArgs {
    #[command(flatten)]
    pub cfg: DistillConfig,
    #[command(flatten)]
    pub run: RunFlags,
}

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The model to train
    pub model: String,
    #[command(flatten)]
    pub cfg: FinetuneConfig,
    #[command(flatten)]
    pub run: RunFlags,
}

/// What the CLI adds to the training options.
#[derive(clap::Args)]
pub struct RunFlags {
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// If another whittle process is writing the same output, wait for it instead of failing
    #[arg(long)]
    pub wait: bool,
    /// Print the history as JSON
    #[arg(long)]
    pub json: bool,
}

fn run(student: &str, stage: &dyn Stage, t: &TrainConfig, f: &RunFlags, env: &Env) -> Result<()> {
    stage.check()?;
    // Resuming continues into an output the interrupted run may already have written.
    let _claim = output::check_exclusive(&t.output, f.force || t.resume, f.wait)?;
    let mut l = open_for_training(student, &env.run).with_context(|| format!("loading model `{student}`"))?;
    let report = stage.apply(&mut l, &mut env.ctx())?;
    print_report(report.as_ref(), f.json, None)
}

pub fn distill(a: &DistillArgs, env: &Env) -> Result<()> {
    run(a.cfg.student_source()?, &a.cfg, &a.cfg.train, &a.run, env)
}

pub fn finetune(a: &FinetuneArgs, env: &Env) -> Result<()> {
    run(&a.model, &a.cfg, &a.cfg.train, &a.run, env)
}
