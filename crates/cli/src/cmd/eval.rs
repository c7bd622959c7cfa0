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
    /// HF directory, .gguf file, or `org/name` from the local HF cache (offline); not with --url
    #[arg(required_unless_present = "url", conflicts_with = "url")]
    pub model: Option<String>,
    /// Use this tokenizer.json instead of the model's own
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Run GGUF block-quantized weights dequantized to f32
    #[arg(long)]
    pub dequantize: bool,
    #[command(flatten)]
    pub cfg: BenchConfig,
    #[command(flatten)]
    pub live: LiveArgs,
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

/// `bench --url`: drive a running server instead of loading a model.
#[derive(clap::Args)]
pub struct LiveArgs {
    /// Base URL of a running `whittle serve` (or any OpenAI-compatible server), e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: Option<String>,
    /// Clients sending requests back to back (with --url)
    #[arg(long, default_value_t = 16, requires = "url")]
    pub concurrency: usize,
    /// How long to drive the server: 60s, 2m, 500ms (with --url)
    #[arg(long, default_value = "60s", value_parser = whittle_serve::client::parse_duration, requires = "url")]
    pub duration: std::time::Duration,
    /// embeddings, completions or chat (default: from the server's /v1/models)
    #[arg(long, value_parser = |s: &str| s.parse::<whittle_serve::client::Endpoint>(), requires = "url")]
    pub endpoint: Option<whittle_serve::client::Endpoint>,
    /// STS-B TSV whose sentences are sent (default: the STS-B test split)
    #[arg(long, requires = "url")]
    pub data: Option<std::path::PathBuf>,
    /// Tokens generated per completion (with --url)
    #[arg(long, default_value_t = 128, requires = "url")]
    pub max_tokens: usize,
    /// Bearer token for the server
    #[arg(long, requires = "url")]
    pub api_key: Option<String>,
}

pub fn bench(a: &BenchArgs, env: &Env) -> Result<()> {
    if let Some(url) = &a.live.url {
        return bench_url(url, a);
    }
    a.cfg.check_ranges()?;
    let m = ModelArg {
        model: a.model.clone().expect("clap requires MODEL without --url"),
        tokenizer: a.tokenizer.clone(),
        dequantize: a.dequantize,
    };
    let l = env.open(&m)?;
    let r = measure::bench(&l, &m.model, &a.cfg, &env.ctx())?;
    if let Some(w) = whittle_eval::bench::busy_warning(&r) {
        eprintln!("warning: {w}");
    }
    show(&m.model, &r, &a.out)
}

fn bench_url(url: &str, a: &BenchArgs) -> Result<()> {
    let l = &a.live;
    let cfg = whittle_serve::client::LoadConfig {
        url: url.to_string(),
        concurrency: l.concurrency,
        duration: l.duration,
        endpoint: l.endpoint,
        inputs: whittle_serve::client::sts_sentences(l.data.as_deref())?,
        max_tokens: l.max_tokens,
        api_key: l.api_key.clone(),
    };
    let r = whittle_serve::client::run(&cfg)?;
    if a.out.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for (k, val) in serde_json::to_value(&r)?.as_object().expect("object") {
        let s = match val {
            serde_json::Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        writeln!(out, "{k:<18}{s}")?;
    }
    Ok(())
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
