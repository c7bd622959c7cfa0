//! `serve`: an OpenAI-compatible HTTP server for one model (`whittle_serve`).

use std::time::Duration;

use anyhow::Result;
use whittle_serve::{ModelSource, ServeConfig, Server};

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Encoders: tokens per batch (batches run packed: real tokens); decoders: prompt tokens prefilled per step (chunked prefill)
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Decoders: sequences decoded together (the running batch)
    #[arg(long, default_value_t = 32)]
    pub max_concurrent: usize,
    /// Requests waiting for the engine before new ones get 429
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Seconds before a request's work is dropped (504)
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Require `Authorization: Bearer KEY` on the API routes (/health and /metrics stay open)
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body in bytes (413 past it)
    #[arg(long, default_value_t = 2 << 20)]
    pub max_body_bytes: usize,
    /// The model name clients pass (default: the model's file or directory name)
    #[arg(long)]
    pub served_model_name: Option<String>,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    if !(a.request_timeout.is_finite() && a.request_timeout > 0.0) {
        anyhow::bail!("--request-timeout must be a positive number of seconds");
    }
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        max_batch_tokens: a.max_batch_tokens,
        max_concurrent: a.max_concurrent,
        max_queue: a.max_queue,
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        api_key: a.api_key.clone(),
        max_body_bytes: a.max_body_bytes,
        served_model_name: a.served_model_name.clone(),
    };
    let source =
        ModelSource::Load { spec: a.m.model.clone(), options: env.load_options(a.m.tokenizer.clone(), a.m.dequantize) };
    let server = Server::start(source, cfg).map_err(|e| anyhow::anyhow!("{}", super::flags(&format!("{e:#}"))))?;
    eprintln!("whittle serve: listening on http://{} (loading {})", server.addr(), a.m.model);
    server.wait_ready(Duration::from_secs(3600))?;
    eprintln!("whittle serve: {} ready; SIGTERM or Ctrl-C drains in-flight requests and exits", a.m.model);
    server.wait()
}
