//! `whittle`: make Transformer models smaller and faster, and prove it with numbers.
//!
//! A thin binary: flags are parsed into typed options here and the work is done by the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use whittle_models::generate::{generate, Sampling};
use whittle_models::{load, stats, text, LoadOptions, Loaded, Model};

#[derive(Parser)]
#[command(
    name = "whittle",
    version,
    about = "Make Transformer models smaller and faster, and prove it with numbers."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// MODEL: an HF directory, a .gguf file, or an `org/name` hub id in the local HF cache.
#[derive(clap::Args)]
struct ModelArg {
    /// HF directory, .gguf file, or `org/name` from the local HF cache
    model: String,
    /// Use this tokenizer.json instead of the model's own
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a model's family, config, parameters by component, storage, FLOPs and per-layer widths
    Inspect {
        #[command(flatten)]
        m: ModelArg,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        /// Context length for the FLOPs-per-token figure
        #[arg(long, default_value_t = 512)]
        seq: usize,
    },
    /// Convert a model (GGUF or HF) to an HF directory that transformers loads
    Convert {
        #[command(flatten)]
        m: ModelArg,
        /// Output directory (written atomically)
        #[arg(short, long)]
        output: PathBuf,
        /// Weight dtype in the output
        #[arg(long, value_enum, default_value_t = OutDtype::F32)]
        dtype: OutDtype,
    },
    /// Print sentence embeddings of an encoder (mean pooling + L2 normalisation)
    Embed {
        #[command(flatten)]
        m: ModelArg,
        /// Texts to embed
        texts: Vec<String>,
        /// Read texts from a file, one per line
        #[arg(long)]
        file: Option<PathBuf>,
        /// Truncate inputs to this many tokens (default: the model's max_seq_length, else 512)
        #[arg(long)]
        max_len: Option<usize>,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Print JSON: {"model", "dim", "embeddings": [[...], ...]}
        #[arg(long)]
        json: bool,
    },
    /// Generate text with a decoder (greedy by default; sampling with --temperature)
    Generate {
        #[command(flatten)]
        m: ModelArg,
        #[arg(short, long)]
        prompt: String,
        /// Tokens to generate
        #[arg(short, default_value_t = 32)]
        n: usize,
        /// 0 = greedy
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Wrap the prompt in the model's chat template (ChatML for SmolLM2)
        #[arg(long)]
        chat: bool,
        /// Keep generating past end-of-sequence tokens
        #[arg(long)]
        ignore_eos: bool,
        /// Print one JSON object with prompt and generated token ids
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OutDtype {
    F32,
    F16,
    Bf16,
}

fn open(m: &ModelArg) -> Result<Loaded> {
    load(
        &m.model,
        &LoadOptions {
            tokenizer: m.tokenizer.clone(),
        },
    )
    .with_context(|| format!("loading model `{}`", m.model))
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
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

fn cmd_inspect(m: &ModelArg, json: bool, seq: usize) -> Result<()> {
    let l = open(m)?;
    let r = stats::report(&l, seq);
    let mut out = std::io::stdout().lock();
    if json {
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
    let cfg: Vec<String> = keys
        .iter()
        .filter_map(|k| c.get(*k).map(|v| format!("{k}={v}")))
        .collect();
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
    writeln!(
        out,
        "\nstorage in file ({} bytes)",
        with_commas(r.file_bytes)
    )?;
    for (dt, (bytes, count)) in &r.storage {
        writeln!(
            out,
            "  {dt:<11}{:>14} bytes  {count:>4} tensors",
            with_commas(*bytes)
        )?;
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

fn cmd_convert(m: &ModelArg, output: &std::path::Path, dtype: OutDtype) -> Result<()> {
    let l = open(m)?;
    let dt = match dtype {
        OutDtype::F32 => DType::F32,
        OutDtype::F16 => DType::F16,
        OutDtype::Bf16 => DType::BF16,
    };
    whittle_models::save::save_hf_dir(&l, output, dt)
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!(
        "wrote {} ({} model, {:?})",
        output.display(),
        l.model.family(),
        dt
    );
    Ok(())
}

fn cmd_embed(
    m: &ModelArg,
    texts: &[String],
    file: &Option<PathBuf>,
    max_len: Option<usize>,
    batch: usize,
    json: bool,
) -> Result<()> {
    let mut all: Vec<String> = texts.to_vec();
    if let Some(f) = file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        all.extend(s.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    if all.is_empty() {
        bail!("no texts: pass TEXT arguments or --file");
    }
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let l = open(m)?;
    let max_len = max_len.or(l.max_seq_length).unwrap_or(512);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let e = text::embed_texts(&l, &refs, max_len, batch)?;
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({"model": m.model, "dim": e.first().map_or(0, |x| x.len()), "embeddings": e});
        writeln!(out, "{v}")?;
    } else {
        for (t, v) in all.iter().zip(&e) {
            let nums: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
            writeln!(out, "{t}\t[{}]", nums.join(", "))?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_generate(
    m: &ModelArg,
    prompt: &str,
    n: usize,
    s: Sampling,
    chat: bool,
    ignore_eos: bool,
    json: bool,
) -> Result<()> {
    let l = open(m)?;
    let Model::Llama(dec) = &l.model else {
        bail!(
            "`generate` needs a decoder; {} is a {} encoder",
            m.model,
            l.model.family()
        );
    };
    let text_in = if chat {
        format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    } else {
        prompt.to_string()
    };
    let ids = text::encode_prompt(&l, &text_in, false)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let eos: Vec<u32> = if ignore_eos {
        vec![]
    } else {
        l.eos_token_ids.clone()
    };
    let mut stdout = std::io::stdout().lock();
    if !json {
        write!(stdout, "{text_in}")?;
        stdout.flush()?;
    }
    let t0 = std::time::Instant::now();
    let mut shown = String::new();
    let mut so_far = Vec::new();
    let out = generate(dec, &ids, n, &eos, &s, |tok| {
        if json {
            return;
        }
        // Decode the whole continuation each time so multi-byte characters print whole.
        so_far.push(tok);
        if let Ok(t) = text::decode(&l, &so_far) {
            if t.len() > shown.len() && t.starts_with(&shown) {
                let _ = write!(stdout, "{}", &t[shown.len()..]);
                let _ = stdout.flush();
                shown = t;
            }
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if json {
        let v = serde_json::json!({
            "model": m.model, "prompt": text_in, "prompt_ids": ids, "ids": out,
            "text": text::decode(&l, &out)?, "seconds": secs,
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated in {:.2}s, {:.1} tok/s]",
            ids.len(),
            out.len(),
            secs,
            out.len() as f64 / secs
        );
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { m, json, seq } => cmd_inspect(&m, json, seq),
        Cmd::Convert { m, output, dtype } => cmd_convert(&m, &output, dtype),
        Cmd::Embed {
            m,
            texts,
            file,
            max_len,
            batch,
            json,
        } => cmd_embed(&m, &texts, &file, max_len, batch, json),
        Cmd::Generate {
            m,
            prompt,
            n,
            temperature,
            top_k,
            top_p,
            seed,
            chat,
            ignore_eos,
            json,
        } => {
            if temperature < 0.0 || !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--temperature must be >= 0 and --top-p in (0, 1]");
            }
            cmd_generate(
                &m,
                &prompt,
                n,
                Sampling {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                },
                chat,
                ignore_eos,
                json,
            )
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`whittle ... | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
