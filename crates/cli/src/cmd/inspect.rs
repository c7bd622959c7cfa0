//! `inspect`: a model's family, config, parameters by component, storage, FLOPs and per-layer widths.

use std::io::Write;

use anyhow::Result;
use whittle_models::stats;
use whittle_pipeline::report::human;

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
    /// Context length for the FLOPs-per-token figure
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
}

fn with_commas(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    let l = env.open(&a.m)?;
    let r = stats::report(&l, a.seq);
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    writeln!(out, "model      {}  ({}, {})", r.source, r.family, r.format)?;
    let c = &r.config;
    let keys = [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    ];
    let cfg: Vec<String> = keys.iter().filter_map(|k| c.get(*k).map(|v| format!("{k}={v}"))).collect();
    writeln!(out, "config     {}", cfg.join(" "))?;
    writeln!(out, "\nparameters")?;
    let p = &r.params;
    for (name, v) in [
        ("embeddings", p.embeddings),
        ("attention", p.attention),
        ("mlp", p.mlp),
        ("norms", p.norms),
        ("head", p.head),
        ("total", p.total),
    ] {
        writeln!(out, "  {name:<11}{:>14}  {:>8}", with_commas(v), human(v))?;
    }
    writeln!(out, "\nstorage in file ({} bytes)", with_commas(r.file_bytes))?;
    for (dt, (bytes, count)) in &r.storage {
        writeln!(out, "  {dt:<11}{:>14} bytes  {count:>4} tensors", with_commas(*bytes))?;
    }
    writeln!(
        out,
        "\nFLOPs/token at seq {}: {} ({:.3} GFLOP)",
        r.seq,
        with_commas(r.flops_per_token as usize),
        r.flops_per_token as f64 / 1e9
    )?;
    writeln!(
        out,
        "\n{:>5} {:>6} {:>6} {:>6} {:>7} {:>12} {:>12} {:>8}",
        "layer", "heads", "kv", "hdim", "ffn", "attn params", "mlp params", "norms"
    )?;
    for row in &r.layers {
        let d = row.dims;
        writeln!(
            out,
            "{:>5} {:>6} {:>6} {:>6} {:>7} {:>12} {:>12} {:>8}",
            row.index,
            d.n_head,
            d.n_kv_head,
            d.head_dim,
            d.ffn,
            with_commas(row.attention_params),
            with_commas(row.mlp_params),
            row.norm_params
        )?;
    }
    Ok(())
}
