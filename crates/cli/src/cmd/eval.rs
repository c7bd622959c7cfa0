//! `eval` and `bench`: quality and speed of one model.

use std::io::Write;

use anyhow::Result;
use whittle_eval::Metrics;
use whittle_pipeline::measure::{self, BenchConfig, EvalConfig};

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub cfg: EvalConfig,
    /// Reference model for KL divergence (ppl) or embedding cosine (sts)
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub out: Print,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub m: ModelArg,
    #[command(flatten)]
    pub cfg: BenchConfig,
    #[command(flatten)]
    pub out: Print,
}

/// How a measurement is shown and kept.
#[derive(clap::Args)]
pub struct Print {
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
    /// Also save the figures next to the model (read by `compare`)
    #[arg(long)]
    pub save: bool,
}

pub fn eval(a: &EvalArgs, env: &Env) -> Result<()> {
    a.cfg.check_ranges()?;
    let l = env.open(&a.m)?;
    let base = match &a.base {
        Some(b) => Some(env.open(&ModelArg { model: b.clone(), ..a.m.clone() })?),
        None => None,
    };
    let r = measure::evaluate(&l, &a.m.model, &a.cfg, base.as_ref(), &env.ctx())?;
    show(&a.m.model, &r, &a.out)
}

pub fn bench(a: &BenchArgs, env: &Env) -> Result<()> {
    a.cfg.check_ranges()?;
    let l = env.open(&a.m)?;
    let r = measure::bench(&l, &a.m.model, &a.cfg, &env.ctx())?;
    show(&a.m.model, &r, &a.out)
}

fn show(model: &str, m: &Metrics, p: &Print) -> Result<()> {
    if p.save {
        eprintln!("saved {}", measure::save_results(model, m)?.display());
    }
    if p.json {
        println!("{}", serde_json::to_string(m)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for (k, val) in serde_json::to_value(m)?.as_object().expect("object") {
        let s = match val {
            serde_json::Value::Number(n) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        writeln!(out, "{k:<16}{s}")?;
    }
    Ok(())
}
