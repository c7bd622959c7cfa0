//! `compare`: eval + bench of a base and its variants, one markdown table with deltas and speed-ups. The
//! speed figures are medians of repetitions that took turns between the models (A, B, A, B, …), shown with
//! their min–max; a warning goes to stderr when other processes took CPU meanwhile.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use whittle_eval::Metrics;
use whittle_pipeline::measure::{self, BenchConfig, CompareOptions};

use super::Env;

#[derive(clap::Args)]
pub struct Args {
    /// The reference model
    pub base: String,
    /// Models to compare with it
    #[arg(required = true)]
    pub variants: Vec<String>,
    /// Perplexity chunks (decoders)
    #[arg(long, default_value_t = 16)]
    pub chunks: usize,
    #[command(flatten)]
    pub b: BenchConfig,
    /// Reuse figures saved next to a model by `eval --save` / `bench --save` / `compare --save`
    #[arg(long)]
    pub reuse: bool,
    /// Save each model's figures next to it (never done unless asked: models are inputs)
    #[arg(long)]
    pub save: bool,
    /// Write all results as JSON here
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON instead of the table
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Args, env: &Env) -> Result<()> {
    if a.chunks == 0 {
        anyhow::bail!("--chunks 0: must be at least 1");
    }
    a.b.check_ranges()?;
    let o = CompareOptions { chunks: a.chunks, bench: &a.b, reuse: a.reuse, save: a.save };
    let open = |spec: &str| whittle_models::load(spec, &env.load_options(None, false));
    let rows = measure::compare(open, &a.base, &a.variants, &o, &env.ctx())?;
    // The busy warnings first (stderr), so they are not missed under a long table.
    for w in rows.iter().filter_map(whittle_eval::bench::busy_warning) {
        eprintln!("warning: {w}");
    }
    if let Some(p) = &a.output {
        whittle_pipeline::output::write_json(p, &rows)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let decoder = rows[0].ppl.is_some() || rows[0].tg_tok_s.is_some();
    let table = markdown(&if decoder { decoder_cols() } else { encoder_cols() }, &rows);
    for line in table {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// `f(a, b)` when both figures exist.
fn both(a: Option<f64>, b: Option<f64>, f: impl Fn(f64, f64) -> f64) -> Option<f64> {
    Some(f(a?, b?))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

/// The spread of a figure over its repetitions: "min–max".
fn spread(r: Option<(f64, f64)>, prec: usize) -> String {
    r.map_or_else(|| "-".into(), |(lo, hi)| format!("{lo:.prec$}–{hi:.prec$}"))
}

fn mb(m: &Metrics) -> f64 {
    m.model_bytes.map_or(0.0, |b| b as f64 / 1e6)
}

/// A column: header and the cell of a row (given the base row).
type Col = (&'static str, fn(&Metrics, &Metrics) -> String);

fn name(m: &Metrics, _: &Metrics) -> String {
    m.model.clone().unwrap_or_else(|| "?".into())
}

fn decoder_cols() -> Vec<Col> {
    vec![
        ("model", name),
        ("PPL", |m, _| fmt_opt(m.ppl, 3)),
        ("Δ PPL", |m, b| fmt_opt(both(m.ppl, b.ppl, |a, b| 100.0 * (a / b - 1.0)), 2) + "%"),
        ("KLD", |m, _| fmt_opt(m.kld_mean, 6)),
        ("top-1 %", |m, _| fmt_opt(m.top1_agree, 2)),
        ("size MB", |m, _| format!("{:.1}", mb(m))),
        ("bpw", |m, _| fmt_opt(m.bpw, 2)),
        ("pp tok/s", |m, _| fmt_opt(m.pp_tok_s, 1)),
        ("tg tok/s", |m, _| fmt_opt(m.tg_tok_s, 1)),
        ("tg min–max", |m, _| spread(m.tg_tok_s_range, 1)),
        ("speed-up tg", |m, b| fmt_opt(both(m.tg_tok_s, b.tg_tok_s, |a, b| a / b), 2) + "x"),
        ("peak MB", |m, _| fmt_opt(m.peak_rss_mb, 0)),
    ]
}

fn encoder_cols() -> Vec<Col> {
    vec![
        ("model", name),
        ("STS-B", |m, _| fmt_opt(m.sts_spearman, 2)),
        ("Δ", |m, b| fmt_opt(both(m.sts_spearman, b.sts_spearman, |a, b| a - b), 2)),
        ("cos min", |m, _| fmt_opt(m.cos_min, 5)),
        ("size MB", |m, _| format!("{:.1}", mb(m))),
        ("bpw", |m, _| fmt_opt(m.bpw, 2)),
        ("sent/s", |m, _| fmt_opt(m.sent_per_s, 1)),
        ("sent/s min–max", |m, _| spread(m.sent_per_s_range, 1)),
        ("speed-up", |m, b| fmt_opt(both(m.sent_per_s, b.sent_per_s, |a, b| a / b), 2) + "x"),
        ("p50 ms", |m, _| fmt_opt(m.p50_ms, 2)),
        ("p99 ms", |m, _| fmt_opt(m.p99_ms, 2)),
        ("peak MB", |m, _| fmt_opt(m.peak_rss_mb, 0)),
    ]
}

/// A markdown table of `rows` (the first is the base).
fn markdown(cols: &[Col], rows: &[Metrics]) -> Vec<String> {
    let line = |cells: Vec<String>| format!("| {} |", cells.join(" | "));
    let mut out = vec![line(cols.iter().map(|c| c.0.to_string()).collect()), format!("|{}", "---|".repeat(cols.len()))];
    out.extend(rows.iter().map(|m| line(cols.iter().map(|c| (c.1)(m, &rows[0])).collect())));
    out
}
