//! `embed`: sentence embeddings of an encoder (mean pooling over the mask + L2 normalisation).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use whittle_models::text;

use super::{Env, ModelArg};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArg,
    /// Texts to embed
    pub texts: Vec<String>,
    /// Read texts from a file, one per line
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Truncate inputs to this many tokens (default: the model's max_seq_length, else 512)
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Pad each batch to its longest text instead of packing its real tokens (the reference path)
    #[arg(long)]
    pub padded: bool,
    /// Batch consecutive texts instead of texts of similar lengths (the output keeps the input order either
    /// way)
    #[arg(long)]
    pub in_order: bool,
    /// Print JSON: {"model", "dim", "embeddings": [[...], ...]}
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    let mut all: Vec<String> = a.texts.clone();
    if let Some(f) = &a.file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        all.extend(s.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    if all.is_empty() {
        bail!("no texts: pass TEXT arguments or --file");
    }
    if a.batch == 0 {
        bail!("--batch 0: must be at least 1");
    }
    if a.max_len.is_some_and(|n| n < 3) {
        bail!("--max-len {}: must be at least 3 ([CLS], one token, [SEP])", a.max_len.unwrap_or(0));
    }
    let l = env.open(&a.m)?;
    let max_len = a.max_len.or(l.max_seq_length).unwrap_or(512);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let o = text::EmbedOptions {
        max_len,
        batch: a.batch,
        layout: if a.padded { text::Layout::Padded } else { text::Layout::Packed },
        sort_by_length: !a.in_order,
    };
    let e = text::embed_texts_with(&l, &refs, &o)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({"model": a.m.model, "dim": e.first().map_or(0, |x| x.len()), "embeddings": e});
        writeln!(out, "{v}")?;
        return Ok(());
    }
    for (t, v) in all.iter().zip(&e) {
        let nums: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
        writeln!(out, "{t}\t[{}]", nums.join(", "))?;
    }
    Ok(())
}
