//! `optimize`: a recipe of stages, or the accuracy-driven search at a level; writes the chosen model, a
//! self-contained HTML report and its JSON into the output directory.

use std::path::PathBuf;

use anyhow::Result;
use whittle_pipeline::optimize::OptimizeConfig;

use super::{print_report, Env};

#[derive(clap::Args)]
pub struct Args {
    /// HF directory or .gguf file
    pub model: String,
    /// Output directory: OUT/model (or OUT/model.gguf), OUT/report.html, OUT/report.json, OUT/stages/
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub cfg: OptimizeConfig,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    // Every option is checked (and the recipe read) before the model is opened.
    a.cfg.request()?;
    let open = |spec: &str, float: bool| whittle_models::load(spec, &env.load_options(None, float));
    let r = whittle_pipeline::optimize::run(&a.model, &a.cfg, &a.output, &open, &mut env.ctx())?;
    print_report(&r, a.json, None)
}
