//! `whittle`: make Transformer models smaller and faster, and prove it with numbers.
//!
//! A thin binary: flags are parsed into typed options here and the work is done by the library crates.

mod train_cmd;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use whittle_eval::{bench, classify, cloze, data, ppl, sts, Metrics};
use whittle_models::generate::{generate, Sampling};
use whittle_models::{load, stats, text, LoadOptions, Loaded, Model};

/// mimalloc keeps freed tensor buffers for reuse; glibc returns large ones to the OS and page-faults them
/// back on every op (measured: whittle bench, MiniLM w8a8).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "whittle", version, about = "Make Transformer models smaller and faster, and prove it with numbers.")]
struct Cli {
    /// Worker threads for the tensor engine (default: every core)
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Force the integer kernels to one implementation (default: the best this CPU has)
    #[arg(long, global = true, value_enum)]
    kernel: Option<KernelArg>,
    /// Quantize block layers' activations per 32 values even for K-quants, which llama.cpp runs against one
    /// scale per 256 (finer: slightly lower perplexity than llama.cpp on the same file)
    #[arg(long, global = true)]
    fine_activations: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// MODEL: an HF directory, a .gguf file, or an `org/name` hub id in the local HF cache.
#[derive(clap::Args, Clone)]
struct ModelArg {
    /// HF directory, .gguf file, or `org/name` from the local HF cache
    model: String,
    /// Use this tokenizer.json instead of the model's own
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Run GGUF block-quantized weights dequantized to f32 (default: in their block format, as llama.cpp)
    #[arg(long)]
    dequantize: bool,
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
        /// Output: a directory, or NAME.gguf for GGUF file types (written atomically)
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
    /// Quantize a model's Linear layers (w8a8-dynamic today) and save it as an HF-style directory
    Quantize {
        #[command(flatten)]
        m: ModelArg,
        /// Scheme: w8a8-dynamic (directory output), or a llama.cpp file type for -o NAME.gguf: f16, bf16, q8_0,
        /// q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k
        #[arg(long)]
        scheme: String,
        /// Output: a directory, or NAME.gguf for GGUF file types (written atomically)
        #[arg(short, long)]
        output: PathBuf,
        /// Per-layer scheme by regex on the layer name, e.g. 're:.*lm_head=w8a8-dynamic' (repeatable; last wins)
        #[arg(long = "override")]
        overrides: Vec<String>,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
        /// Quantize layers that are already quantized (from their dequantized weights)
        #[arg(long)]
        allow_requantize: bool,
        /// Weights per group for w4a16/w8a16 (a multiple of 32; layers it does not divide get the largest
        /// multiple of 32 below it that does, and the report says so)
        #[arg(long, default_value_t = 128)]
        group_size: usize,
        /// Asymmetric groups for w4a16/w8a16: a zero point per group
        #[arg(long)]
        zero_point: bool,
        #[command(flatten)]
        calib: CalibArgs,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Collect an importance matrix (Σx² per input channel of every Linear) on calibration text, written in
    /// llama.cpp's GGUF imatrix format
    Imatrix {
        #[command(flatten)]
        m: ModelArg,
        /// Output file (imatrix.gguf), written atomically
        #[arg(short, long)]
        output: PathBuf,
        /// Calibration text (default: data/wikitext-2/wiki.valid.tokens)
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Windows of --calib-seq-len tokens
        #[arg(long, default_value_t = 16)]
        calib_samples: usize,
        #[arg(long, default_value_t = 512)]
        calib_seq_len: usize,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
    },
    /// Prune a model: unstructured or N:M (--method magnitude|wanda|sparsegpt --sparsity S [--pattern 2:4]) or
    /// structured, really removing heads, FFN neurons and blocks (--structured heads=0.25,ffn=0.3,layers=2)
    Prune {
        #[command(flatten)]
        m: ModelArg,
        /// Output directory (written atomically)
        #[arg(short, long)]
        output: PathBuf,
        /// Unstructured / N:M criterion: magnitude, wanda, sparsegpt
        #[arg(long)]
        method: Option<String>,
        /// Fraction of each block Linear's weights set to zero, in [0, 1) (unstructured)
        #[arg(long)]
        sparsity: Option<f64>,
        /// unstructured, or N:M (N kept in every M consecutive inputs): 2:4, 4:8
        #[arg(long, default_value = "unstructured")]
        pattern: String,
        /// Magnitude threshold per layer, or one over all block Linears
        #[arg(long, default_value = "layer")]
        scope: String,
        /// Structured removal: fractions of each block's heads (KV groups) and FFN neurons, and a number of
        /// blocks chosen by block influence, e.g. heads=0.25,ffn=0.3,layers=2
        #[arg(long)]
        structured: Option<String>,
        /// Blocks to remove, e.g. 10,11 (instead of layers=N)
        #[arg(long)]
        drop_layers: Option<String>,
        /// Unit importance for --structured: activation (|W|·‖X‖ on calibration text), taylor (|w·∂L/∂w|,
        /// gradients of the LM loss on calibration text; decoders), l2 or l1 (weight norms)
        #[arg(long, default_value = "activation")]
        importance: String,
        /// --structured: rank heads and neurons over all blocks (widths then differ per block) instead of
        /// removing the same fraction from each
        #[arg(long)]
        global: bool,
        /// SparseGPT: quantize the kept weights in the same pass to this grouped format (e.g. w4a16; stored
        /// dequantized)
        #[arg(long)]
        then_quantize: Option<String>,
        /// Weights per group for --then-quantize
        #[arg(long, default_value_t = 64)]
        group_size: usize,
        /// SparseGPT dampening
        #[arg(long, default_value_t = 0.01)]
        damp: f64,
        /// How pruned Linears are stored: sparse (zeros not stored: N:M values + position codes, bitmap or
        /// CSR, run by the sparse kernel) or dense
        #[arg(long, default_value = "sparse")]
        storage: String,
        /// Progressive pruning: sparsities (unstructured) or fractions of --structured to step through, e.g.
        /// 0.1,0.3,0.5; evaluates after each step
        #[arg(long)]
        schedule: Option<String>,
        /// With --schedule: stop at the first step whose quality drops more than this (e.g. 2%) and keep the
        /// last model within it
        #[arg(long)]
        max_drop: Option<String>,
        /// With --schedule: WikiText-2 test windows of 512 tokens per evaluation (decoders); encoders use the
        /// STS-B test set
        #[arg(long, default_value_t = 4)]
        eval_windows: usize,
        /// Calibration text (default: data/wikitext-2/wiki.valid.tokens)
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Calibration windows (decoders, default 16; 4 for Wanda) or sentences (encoders, default 256)
        #[arg(long)]
        calib_samples: Option<usize>,
        /// Tokens per calibration sample (default 512 decoders, 128 encoders)
        #[arg(long)]
        calib_seq_len: Option<usize>,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Distil a student from a teacher on text: soft targets at a temperature blended with hard labels,
    /// optional hidden-state MSE; AdamW, warm-up + decay, checkpoints and --resume (LLaMA decoders)
    Distill {
        #[command(flatten)]
        d: train_cmd::DistillArgs,
        #[command(flatten)]
        t: train_cmd::TrainArgs,
    },
    /// Fine-tune a model on text with hard labels only (the same engine as distill; its baseline)
    Finetune {
        /// The model to train
        model: String,
        #[command(flatten)]
        t: train_cmd::TrainArgs,
    },
    /// Share weights across blocks (ALBERT): each group of blocks uses one set of weights, stored once and
    /// held once in memory; prints the quality before any recovery
    Share {
        #[command(flatten)]
        m: ModelArg,
        /// Output directory (written atomically)
        #[arg(short, long)]
        output: PathBuf,
        /// Groups like 0-1,2-3, or auto (adjacent blocks merged by weight similarity down to --unique)
        #[arg(long, default_value = "auto")]
        groups: String,
        /// With --groups auto: unique blocks to keep (default: half the blocks)
        #[arg(long)]
        unique: Option<usize>,
        /// Shared weights: the group's mean, or its most central member
        #[arg(long, default_value = "mean")]
        init: String,
        /// Also factorise the word embeddings to rank R (ALBERT's factorised embedding, BERT encoders): U·V with
        /// the subspace weighted by token counts in --calib
        #[arg(long)]
        embedding_rank: Option<usize>,
        /// Text whose token counts weight --embedding-rank (default: data/wikitext-2/wiki.valid.tokens)
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Factorise block Linears as U·V of lower rank: plain SVD, ASVD (activation-scaled) or SVD-LLM
    /// (whitened by the Cholesky factor of Σxᵀx, minimising the output error); ranks by --ratio, --energy
    /// or --rank
    Lowrank {
        #[command(flatten)]
        m: ModelArg,
        /// Output directory (written atomically)
        #[arg(short, long)]
        output: PathBuf,
        /// svd, asvd or svd-llm
        #[arg(long, default_value = "svd-llm")]
        method: String,
        /// Keep this fraction of the block Linears' parameters (ranks allocated over all layers), in (0, 1]
        #[arg(long)]
        ratio: Option<f64>,
        /// Per layer, the smallest rank keeping this fraction of the singular-value energy, in (0, 1]
        #[arg(long)]
        energy: Option<f64>,
        /// The same rank in every layer
        #[arg(long)]
        rank: Option<usize>,
        /// Instead: factorise the queries and keys of every head jointly, so that the attention scores use
        /// R + 1 values per head (BERT-style encoders; --method svd-llm whitens, svd does not)
        #[arg(long)]
        attention_rank: Option<usize>,
        /// ASVD: exponent on the per-channel activation scale
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        /// SVD-LLM dampening of Σxᵀx (fraction of its mean diagonal)
        #[arg(long, default_value_t = 0.01)]
        damp: f64,
        /// Calibration text (default: data/wikitext-2/wiki.valid.tokens)
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Calibration windows (decoders, default 16) or sentences (encoders, default 256)
        #[arg(long)]
        calib_samples: Option<usize>,
        /// Tokens per calibration sample (default 512 decoders, 128 encoders)
        #[arg(long)]
        calib_seq_len: Option<usize>,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Measure each block Linear's cost when it alone is quantized (KL divergence on calibration text at a
    /// probe format, extrapolated to each candidate by its diagonal-Hessian output error), for --target-bpw
    Sensitivity {
        #[command(flatten)]
        m: ModelArg,
        /// Output JSON (read by `quantize --target-bpw --sensitivity FILE`), written atomically
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Calibration text (default: data/wikitext-2/wiki.valid.tokens)
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Windows of --calib-seq-len tokens
        #[arg(long, default_value_t = 2)]
        calib_samples: usize,
        #[arg(long, default_value_t = 256)]
        calib_seq_len: usize,
        /// Weights per group of the candidate formats
        #[arg(long, default_value_t = 64)]
        group_size: usize,
        /// Asymmetric candidate formats (a zero point per group)
        #[arg(long)]
        zero_point: bool,
        /// Candidate bit widths
        #[arg(long, default_value = "8,4,3,2")]
        candidates: String,
        /// Bit width at which each layer's KL is measured
        #[arg(long, default_value_t = 3)]
        probe_bits: u32,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Measure quality: perplexity / KL divergence, cloze, STS-B or SST-2 probe accuracy
    Eval {
        #[command(flatten)]
        m: ModelArg,
        /// Task (default: ppl for decoders, sts for encoders)
        #[arg(long, value_enum)]
        task: Option<Task>,
        /// Data file (defaults: WikiText-2 test, the WikiText-2 cloze set, STS-B test, SST-2 dev)
        #[arg(long)]
        data: Option<PathBuf>,
        /// Reference model for KL divergence (ppl) or embedding cosine (sts)
        #[arg(long)]
        base: Option<String>,
        /// Tokens per perplexity chunk
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Score only the first N chunks (ppl) or lines (cloze)
        #[arg(long)]
        chunks: Option<usize>,
        /// Encoder token cap (sts, classify)
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        /// Also save the figures next to the model (read by `compare`)
        #[arg(long)]
        save: bool,
    },
    /// Measure speed, size and memory (sentences/s and latency, or llama-bench pp/tg)
    Bench {
        #[command(flatten)]
        m: ModelArg,
        #[command(flatten)]
        b: BenchArgs,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        /// Also save the figures next to the model (read by `compare`)
        #[arg(long)]
        save: bool,
    },
    /// Evaluate and benchmark a base and its variants side by side: a markdown table and JSON
    Compare {
        /// The reference model
        base: String,
        /// Models to compare with it
        #[arg(required = true)]
        variants: Vec<String>,
        /// Perplexity chunks (decoders)
        #[arg(long, default_value_t = 16)]
        chunks: usize,
        #[command(flatten)]
        b: BenchArgs,
        /// Reuse figures saved next to a model by `eval --save` / `bench --save` / `compare --save`
        #[arg(long)]
        reuse: bool,
        /// Save each model's figures next to it (never done unless asked: models are inputs)
        #[arg(long)]
        save: bool,
        /// Write all results as JSON here
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print JSON instead of the table
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Task {
    /// Perplexity (decoders), llama.cpp protocol; with --base, KL divergence
    Ppl,
    /// Last-word accuracy on a JSONL of {"text": ...} (decoders)
    Cloze,
    /// STS-B Spearman x100 (encoders); with --base, cosine to the base's embeddings
    Sts,
    /// SST-2 accuracy of a logistic-regression probe on frozen embeddings (encoders)
    Classify,
}

#[derive(clap::Args, Clone)]
struct BenchArgs {
    /// Encoder batch size
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Encoder token cap
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Decoder prompt-processing length (llama-bench pp)
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Decoder generated tokens (llama-bench tg)
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Timed repetitions (median reported)
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

/// Calibration options of `quantize`.
#[derive(clap::Args, Clone)]
struct CalibArgs {
    /// Calibration text (default: data/wikitext-2/wiki.valid.tokens, never the test split)
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration samples: windows of --calib-seq-len tokens (decoders, default 16) or sentences (encoders,
    /// default 256)
    #[arg(long)]
    calib_samples: Option<usize>,
    /// Tokens per calibration sample (default 512 for decoders, 128 for encoders)
    #[arg(long)]
    calib_seq_len: Option<usize>,
    /// SmoothQuant strength alpha in [0, 1] (e.g. 0.5): migrate activation outliers into the weights first
    #[arg(long)]
    smoothquant: Option<f32>,
    /// How weight-only schemes round: rtn (plain rounding), gptq (layer by layer, Hessian error feedback) or
    /// awq (activation-aware per-channel scales searched per layer group, then rounding), awq-gptq (both)
    #[arg(long, default_value = "rtn")]
    method: String,
    /// GPTQ dampening, a fraction of the Hessian's mean diagonal
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// GPTQ act-order: columns by decreasing Hessian diagonal (static groups)
    #[arg(long)]
    act_order: bool,
    /// GPTQ: run the calibration forward in int8 (w8a8, about 2× faster on VNNI CPUs); the Hessians then see
    /// the inputs of an 8-bit-rounded model
    #[arg(long)]
    calib_int8: bool,
    /// w8a8-static activation range observer: minmax, percentile, mse, entropy
    #[arg(long, default_value = "minmax")]
    observer: String,
    /// Percentile for --observer percentile
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Mixed precision: pick a grouped format per block Linear from --candidates so the block Linears average
    /// at most this many bits per weight, minimising the predicted KL (weight-only schemes; --override wins)
    #[arg(long)]
    target_bpw: Option<f64>,
    /// Per-layer costs from `whittle sensitivity` (default: measure them now, on the calibration text)
    #[arg(long)]
    sensitivity: Option<PathBuf>,
    /// Candidate bit widths for --target-bpw (grouped by --group-size, --zero-point as given)
    #[arg(long, default_value = "8,4,3,2")]
    candidates: String,
    /// Importance matrix (llama.cpp's GGUF imatrix format, from `whittle imatrix` or `llama-imatrix`): GGUF
    /// block types are quantized with ggml's importance-weighted quantizers, as llama-quantize does
    #[arg(long)]
    imatrix: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelArg {
    Ref,
    Avx2,
    Avx512,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutDtype {
    F32,
    F16,
    Bf16,
}

/// The run configuration from `--kernel` / `--fine-activations`, set once in `main` before any command runs.
static RUN_CONFIG: std::sync::OnceLock<whittle_core::RunConfig> = std::sync::OnceLock::new();

/// The run configuration every model this process loads runs with.
fn run_config() -> whittle_core::RunConfig {
    RUN_CONFIG.get().cloned().unwrap_or_default()
}

fn open(m: &ModelArg) -> Result<Loaded> {
    load(&m.model, &LoadOptions { tokenizer: m.tokenizer.clone(), dequantize: m.dequantize, run: run_config() })
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

fn cmd_convert(m: &ModelArg, output: &std::path::Path, dtype: OutDtype) -> Result<()> {
    let l = open(m)?;
    let dt = match dtype {
        OutDtype::F32 => DType::F32,
        OutDtype::F16 => DType::F16,
        OutDtype::Bf16 => DType::BF16,
    };
    whittle_models::save::save_hf_dir(&l, output, dt).with_context(|| format!("writing {}", output.display()))?;
    eprintln!("wrote {} ({} model, {:?})", output.display(), l.model.family(), dt);
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
        bail!("`generate` needs a decoder; {} is a {} encoder", m.model, l.model.family());
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
    let eos: Vec<u32> = if ignore_eos { vec![] } else { l.eos_token_ids.clone() };
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

/// A progress bar on stderr when it is a terminal; silent otherwise.
fn progress_bar(what: &str) -> impl FnMut(usize, usize) {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        b
    });
    move |done, total| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
        }
    }
}

/// `f(a, b)` when both figures exist.
fn both(a: Option<f64>, b: Option<f64>, f: impl Fn(f64, f64) -> f64) -> Option<f64> {
    Some(f(a?, b?))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

fn print_metrics(m: &Metrics) -> Result<()> {
    let v = serde_json::to_value(m)?;
    let mut out = std::io::stdout().lock();
    for (k, val) in v.as_object().expect("object") {
        let s = match val {
            serde_json::Value::Number(n) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap()),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        writeln!(out, "{k:<16}{s}")?;
    }
    Ok(())
}

/// Writes `v` as pretty JSON to `path` through a temporary file and a rename (never a half-written file).
fn write_json_atomic(path: &std::path::Path, v: &impl serde::Serialize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn save_results(model: &str, m: &Metrics) -> Result<()> {
    let path = bench::results_path(std::path::Path::new(model));
    let mut all = read_saved(model).unwrap_or_default();
    all.merge(Metrics::default());
    let mut fresh = m.clone();
    fresh.merge(all);
    write_json_atomic(&path, &fresh)?;
    eprintln!("saved {}", path.display());
    Ok(())
}

fn read_saved(model: &str) -> Option<Metrics> {
    let s = std::fs::read_to_string(bench::results_path(std::path::Path::new(model))).ok()?;
    serde_json::from_str(&s).ok()
}

#[allow(clippy::too_many_arguments)]
fn eval_model(
    l: &Loaded,
    name: &str,
    task: Option<Task>,
    data_path: Option<&std::path::Path>,
    base: Option<&Loaded>,
    ctx: usize,
    chunks: Option<usize>,
    max_len: usize,
) -> Result<Metrics> {
    let task = task.unwrap_or(if l.model.is_decoder() { Task::Ppl } else { Task::Sts });
    let t0 = std::time::Instant::now();
    let mut pb = progress_bar(&format!("{task:?} {name}").to_lowercase());
    let mut m = match task {
        Task::Ppl => {
            let (_, text) = data::read_text(data_path, data::WIKI_TEST)?;
            ppl::perplexity(l, &text, &ppl::PplOptions { ctx, chunks }, base, &mut pb)?
        }
        Task::Cloze => {
            if chunks == Some(0) {
                bail!("--chunks must be at least 1");
            }
            let lines = data::parse_jsonl_texts(&data::read_text(data_path, data::CLOZE)?)?;
            cloze::cloze(l, &lines, chunks, &mut pb)?
        }
        Task::Sts => {
            let pairs = data::parse_sts(&data::read_text(data_path, data::STS_TEST)?)?;
            sts::sts(l, &pairs, max_len, base, &mut pb)?
        }
        Task::Classify => {
            let rows = data::parse_sst2(&data::read_text(data_path, data::SST2_DEV)?)?;
            classify::classify(l, &rows, classify::N_TRAIN, max_len, &mut pb)?
        }
    };
    m.model = Some(name.to_string());
    m.seconds = Some(t0.elapsed().as_secs_f64());
    Ok(m)
}

fn bench_model(l: &Loaded, name: &str, b: &BenchArgs) -> Result<Metrics> {
    let pairs = data::parse_sts(&data::read_text(None, data::STS_TEST)?)?;
    let o = bench::BenchOptions {
        batch: b.batch,
        max_len: b.max_len,
        pp: b.pp,
        tg: b.tg,
        reps: b.reps,
        ..Default::default()
    };
    let mut pb = progress_bar(&format!("bench {name}"));
    let mut m = bench::bench(l, &pairs, &o, &mut pb)?;
    m.model = Some(name.to_string());
    Ok(m)
}

#[allow(clippy::too_many_arguments)]
fn cmd_compare(
    save: bool,
    base: &str,
    variants: &[String],
    chunks: usize,
    b: &BenchArgs,
    reuse: bool,
    output: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    let base_l = open(&ModelArg { model: base.to_string(), tokenizer: None, dequantize: false })?;
    let decoder = base_l.model.is_decoder();
    let mut rows: Vec<Metrics> = Vec::new();
    for name in std::iter::once(base.to_string()).chain(variants.iter().cloned()) {
        let saved = if reuse { read_saved(&name) } else { None };
        let have = |m: &Metrics| {
            if decoder {
                m.ppl.is_some() && m.pp_tok_s.is_some()
            } else {
                m.sts_spearman.is_some() && m.sent_per_s.is_some()
            }
        };
        if let Some(m) =
            saved.filter(|m| have(m) && (name == base || m.kld_mean.is_some() || m.cos_mean.is_some() || !decoder))
        {
            eprintln!("reusing saved figures for {name}");
            rows.push(m);
            continue;
        }
        let l = if name == base {
            None
        } else {
            Some(open(&ModelArg { model: name.clone(), tokenizer: None, dequantize: false })?)
        };
        let lm = l.as_ref().unwrap_or(&base_l);
        if lm.model.is_decoder() != decoder {
            bail!(
                "{name} is a {} but the base is a {}: compare models of one kind",
                lm.model.family(),
                base_l.model.family()
            );
        }
        let against = if name == base { None } else { Some(&base_l) };
        let mut m = eval_model(lm, &name, None, None, against, 512, Some(chunks), 128)?;
        m.merge(bench_model(lm, &name, b)?);
        if save {
            save_results(&name, &m)?;
        }
        rows.push(m);
    }
    let b0 = rows[0].clone();
    if let Some(p) = output {
        write_json_atomic(p, &rows)?;
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let mb = |m: &Metrics| m.model_bytes.map_or(0.0, |b| b as f64 / 1e6);
    if decoder {
        writeln!(
            out,
            "| model | PPL | Δ PPL | KLD | top-1 % | size MB | bpw | pp tok/s | tg tok/s | speed-up tg | peak MB |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for m in &rows {
            let d = both(m.ppl, b0.ppl, |a, b| 100.0 * (a / b - 1.0));
            let su = both(m.tg_tok_s, b0.tg_tok_s, |a, b| a / b);
            writeln!(
                out,
                "| {} | {} | {}% | {} | {} | {:.1} | {} | {} | {} | {}x | {} |",
                m.model.as_deref().unwrap_or("?"),
                fmt_opt(m.ppl, 3),
                fmt_opt(d, 2),
                fmt_opt(m.kld_mean, 6),
                fmt_opt(m.top1_agree, 2),
                mb(m),
                fmt_opt(m.bpw, 2),
                fmt_opt(m.pp_tok_s, 1),
                fmt_opt(m.tg_tok_s, 1),
                fmt_opt(su, 2),
                fmt_opt(m.peak_rss_mb, 0)
            )?;
        }
    } else {
        writeln!(
            out,
            "| model | STS-B | Δ | cos min | size MB | bpw | sent/s | speed-up | p50 ms | p99 ms | peak MB |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for m in &rows {
            let d = both(m.sts_spearman, b0.sts_spearman, |a, b| a - b);
            let su = both(m.sent_per_s, b0.sent_per_s, |a, b| a / b);
            writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} | {} | {} | {}x | {} | {} | {} |",
                m.model.as_deref().unwrap_or("?"),
                fmt_opt(m.sts_spearman, 2),
                fmt_opt(d, 2),
                fmt_opt(m.cos_min, 5),
                mb(m),
                fmt_opt(m.bpw, 2),
                fmt_opt(m.sent_per_s, 1),
                fmt_opt(su, 2),
                fmt_opt(m.p50_ms, 2),
                fmt_opt(m.p99_ms, 2),
                fmt_opt(m.peak_rss_mb, 0)
            )?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// The options of `quantize` besides the model, scheme and output.
struct QuantArgs {
    overrides: Vec<String>,
    force: bool,
    allow_requantize: bool,
    group_size: usize,
    zero_point: bool,
    calib: CalibArgs,
    json: bool,
}

fn cmd_quantize(m: &ModelArg, scheme: &str, output: &std::path::Path, q: &QuantArgs) -> Result<()> {
    let QuantArgs { overrides, force, allow_requantize, group_size, zero_point, calib, json } = q;
    let (force, allow_requantize, json) = (*force, *allow_requantize, *json);
    let to_gguf = output.extension().is_some_and(|e| e == "gguf");
    let ftype = whittle_quant::gguf_out::Ftype::parse(scheme);
    if to_gguf && ftype.is_none() {
        bail!(
            "--scheme {scheme} cannot be written as GGUF ({}); GGUF schemes: {}",
            output.display(),
            whittle_quant::gguf_out::GGUF_SCHEMES
        );
    }
    let overrides = overrides.as_slice();
    if !to_gguf && ftype.is_some() {
        bail!("--scheme {scheme} is a GGUF file type: write it with -o NAME.gguf (got {})", output.display());
    }
    if output.exists() && !force {
        bail!("{} exists; pass --force to replace it", output.display());
    }
    if let Some(ftype) = ftype {
        // Tensor by tensor from the source file: no model in memory.
        let path = whittle_models::loader::resolve(&m.model)?;
        if path.is_dir() {
            bail!("--scheme {scheme} writes GGUF from a GGUF source (its metadata and tokenizer are copied); {} is an HF directory (pruned, factorised and shared models are directories: llama.cpp's graph has one dense weight per projection, so factorised and shared layers have no GGUF form)", m.model);
        }
        let src = whittle_formats::gguf::Gguf::open(&path)?;
        let im = match &calib.imatrix {
            Some(f) => Some(whittle_quant::imatrix::read_imatrix(f)?),
            None => None,
        };
        let opts = whittle_quant::gguf_out::GgufOptions { ftype, overrides, allow_requantize, imatrix: im.as_ref() };
        let report = whittle_quant::gguf_out::write_gguf(&src, output, &opts)?;
        return print_quant_report(
            &report,
            output,
            json,
            std::fs::metadata(&path)?.len(),
            std::fs::metadata(output)?.len(),
            "quantized",
        );
    }
    if calib.imatrix.is_some() {
        bail!("--imatrix weights the rounding of GGUF block types (-o NAME.gguf); for directory schemes use --method awq or gptq, which measure the activations themselves");
    }
    let mut plan = whittle_quant::Plan::new(scheme, overrides)?;
    plan.group_size = *group_size;
    plan.zero_point = *zero_point;
    plan.observer = whittle_quant::Observer::parse(&calib.observer, calib.percentile)?;
    if let Some(target) = calib.target_bpw {
        apply_target_bpw(m, &mut plan, calib, target)?;
    } else if calib.sensitivity.is_some() {
        bail!("--sensitivity is read by --target-bpw; pass --target-bpw BITS too");
    }
    if calib.method != "rtn" {
        // GPTQ and AWQ round one dense weight against its inputs; a factor's inputs are another factor's output.
        let l = open(m)?;
        if let Some((name, lin)) = l.model.linears().into_iter().find(|(_, l)| l.rank().is_some()) {
            bail!(
                "--method {}: `{name}` is low-rank ({}); quantize factorised models with --method rtn (U and V are quantized separately)",
                calib.method,
                lin.storage_name()
            );
        }
    }
    let gptq = matches!(calib.method.as_str(), "gptq" | "awq-gptq");
    if calib.calib_int8 && !gptq {
        bail!("--calib-int8 runs GPTQ's layer-wise calibration in int8; it needs --method gptq or awq-gptq");
    }
    if calib.act_order && !gptq {
        bail!("--act-order orders GPTQ's columns; it needs --method gptq or awq-gptq");
    }
    let awq = match calib.method.as_str() {
        "rtn" => false,
        "awq" if matches!(plan.default, whittle_quant::Scheme::WeightOnly { .. }) => true,
        "awq" => bail!("--method awq applies to the weight-only schemes (w8a16, w4a16, w3a16, w2a16)"),
        "gptq" | "awq-gptq" => return cmd_quantize_gptq(m, &plan, output, calib, allow_requantize, json),
        other => bail!("--method {other}: valid: rtn, gptq, awq, awq-gptq"),
    };
    let statics = std::iter::once(plan.default)
        .chain(plan.overrides.iter().map(|o| o.1))
        .any(|s| s == whittle_quant::Scheme::W8A8Static);
    let mut l = open(m)?;
    let stats = if statics || awq || calib.smoothquant.is_some() || calib.calib.is_some() {
        let (src, text) = whittle_eval::data::read_text(calib.calib.as_deref(), whittle_eval::data::WIKI_VALID)?;
        let decoder = matches!(l.model, whittle_models::Model::Llama(_));
        let co = whittle_quant::calib::CalibOptions {
            samples: calib.calib_samples.unwrap_or(if decoder { 16 } else { 256 }),
            seq_len: calib.calib_seq_len.unwrap_or(if decoder { 512 } else { 128 }),
            source: src.clone(),
            int8: false,
        };
        if co.samples == 0 || co.seq_len == 0 {
            bail!("--calib-samples and --calib-seq-len must be at least 1");
        }
        let mut pb = progress_bar("calibrate");
        let mut cal = whittle_quant::calib::calibrate(&mut l, &text, &co, &mut pb)?;
        eprintln!("calibrated on {} tokens of {src} in {:.1}s", cal.tokens, cal.seconds);
        if let Some(alpha) = calib.smoothquant {
            let r = whittle_quant::smooth::smooth(&mut l.model, &mut cal.stats, alpha)?;
            let worst = r.iter().max_by(|a, b| a.act_absmax_before.total_cmp(&b.act_absmax_before));
            if let Some(w) = worst {
                eprintln!(
                    "smoothquant alpha {alpha}: {} groups; largest input max |x| {:.1} -> {:.1} ({})",
                    r.len(),
                    w.act_absmax_before,
                    w.act_absmax_after,
                    w.layers[0]
                );
            }
            if statics {
                // Static ranges must describe the smoothed inputs: observe again.
                let mut pb = progress_bar("recalibrate");
                cal = whittle_quant::calib::calibrate(&mut l, &text, &co, &mut pb)?;
            }
        }
        if awq {
            let rtn_for = |name: &str, k: usize| weight_only_format(&plan, name, k);
            let mut pb = progress_bar("awq");
            let r = whittle_quant::awq::awq(&mut l.model, &mut cal.stats, rtn_for, 20, &mut pb)?;
            let (e0, e1): (f64, f64) = r.iter().fold((0.0, 0.0), |(a, b), g| (a + g.rtn_error, b + g.awq_error));
            let alphas: Vec<String> = r.iter().take(6).map(|g| format!("{:.2}", g.alpha)).collect();
            eprintln!(
                "awq: {} groups; output error on calibration rows {:.4e} -> {:.4e} ({:.1}% of plain rounding); alpha {} …",
                r.len(),
                e0,
                e1,
                100.0 * e1 / e0.max(f64::MIN_POSITIVE),
                alphas.join(" ")
            );
        }
        Some(cal.stats)
    } else {
        None
    };
    let mut pb = progress_bar("quantize");
    let report = whittle_quant::quantize_calibrated(&mut l.model, &plan, allow_requantize, stats.as_ref(), &mut pb)?;
    whittle_models::save::save_hf_dir(&l, output, DType::F32)
        .with_context(|| format!("writing {}", output.display()))?;
    print_quant_report(&report, output, json, whittle_eval::bench::model_bytes(&l), bench_bytes(output), "quantized")
}

/// `--candidates 8,4,3,2` → bit widths.
fn parse_bits(s: &str, flag: &str) -> Result<Vec<u32>> {
    let v: Vec<u32> =
        s.split(',')
            .map(|b| {
                b.trim().parse::<u32>().ok().filter(|b| [2, 3, 4, 8].contains(b)).with_context(|| {
                    format!("{flag} `{s}`: `{b}` is not a bit width of the grouped formats (8, 4, 3, 2)")
                })
            })
            .collect::<Result<_>>()?;
    if v.is_empty() {
        bail!("{flag}: give at least one bit width");
    }
    Ok(v)
}

fn measure_sensitivity(
    l: &mut Loaded,
    calib: Option<&std::path::Path>,
    samples: usize,
    seq_len: usize,
    o: &whittle_quant::mixed::SensitivityOptions,
) -> Result<whittle_quant::mixed::Sensitivity> {
    if samples == 0 || seq_len == 0 {
        bail!("--calib-samples and --calib-seq-len must be at least 1");
    }
    let (src, text) = whittle_eval::data::read_text(calib, whittle_eval::data::WIKI_VALID)?;
    let co = whittle_quant::calib::CalibOptions { samples, seq_len, source: src.clone(), int8: false };
    let mut pb = progress_bar("sensitivity");
    let s = whittle_quant::mixed::sensitivity(l, &text, &co, o, &mut pb)?;
    eprintln!("sensitivity: {} layers on {} tokens of {src} in {:.1}s", s.layers.len(), s.tokens, s.seconds);
    Ok(s)
}

fn print_sensitivity(s: &whittle_quant::mixed::Sensitivity) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let Some(first) = s.layers.first() else { return Ok(()) };
    write!(out, "{:<36} {:>11} {:>11}", "layer", "shape", format!("KL @ {} bit", first.probe_bits))?;
    for c in &first.candidates {
        write!(out, " {:>11}", format!("pred @ {}", c.bits))?;
    }
    writeln!(out)?;
    for l in &s.layers {
        write!(out, "{:<36} {:>11} {:>11.3e}", l.name, format!("{}x{}", l.shape[0], l.shape[1]), l.probe_kl)?;
        for c in &l.candidates {
            write!(out, " {:>11.3e}", c.predicted_kl)?;
        }
        writeln!(out)?;
    }
    writeln!(out, "\n{} ({} tokens of {}, {:.1}s)", s.method, s.tokens, s.calib, s.seconds)?;
    Ok(())
}

/// `--target-bpw`: per-layer formats from the sensitivities (read or measured), assigned into `plan` below the
/// user's overrides.
fn apply_target_bpw(m: &ModelArg, plan: &mut whittle_quant::Plan, calib: &CalibArgs, target: f64) -> Result<()> {
    use whittle_quant::mixed;
    if !matches!(plan.default, whittle_quant::Scheme::WeightOnly { .. }) {
        bail!(
            "--target-bpw picks among the grouped weight-only formats: use --scheme w4a16 (its --group-size and --zero-point apply to every candidate), not {}",
            plan.default.name()
        );
    }
    let candidates = parse_bits(&calib.candidates, "--candidates")?;
    let o = mixed::SensitivityOptions {
        candidates: candidates.clone(),
        group_size: plan.group_size,
        zero_point: plan.zero_point,
        ..Default::default()
    };
    let mut l = open(m)?;
    let mut s = match &calib.sensitivity {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let s: mixed::Sensitivity = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a `whittle sensitivity` JSON file", f.display()))?;
            s.check_matches(&l.model, &f.display().to_string())?;
            if s.group_size != o.group_size || s.zero_point != o.zero_point {
                bail!(
                    "{}: measured with group {}{}, but this run quantizes with --group-size {}{}",
                    f.display(),
                    s.group_size,
                    if s.zero_point { " --zero-point" } else { "" },
                    o.group_size,
                    if o.zero_point { " --zero-point" } else { "" }
                );
            }
            s
        }
        None => measure_sensitivity(
            &mut l,
            calib.calib.as_deref(),
            calib.calib_samples.map_or(2, |n| n.min(4)),
            calib.calib_seq_len.unwrap_or(256),
            &o,
        )?,
    };
    for layer in s.layers.iter_mut() {
        for b in &candidates {
            if !layer.candidates.iter().any(|c| c.bits == *b) {
                bail!("--candidates {}: the sensitivity of `{}` has no {b}-bit entry", calib.candidates, layer.name);
            }
        }
        layer.candidates.retain(|c| candidates.contains(&c.bits));
    }
    let a = mixed::allocate(&s, target, |n| plan.overridden(n))?;
    print_allocation(&a)?;
    for c in &a.choices {
        plan.assign(&c.name, whittle_quant::Scheme::WeightOnly { bits: c.bits });
    }
    Ok(())
}

/// The chosen map: blocks as rows, the block's Linears as columns, bits in the cells.
fn print_allocation(a: &whittle_quant::mixed::Allocation) -> Result<()> {
    let mut err = std::io::stderr().lock();
    let mut grid: std::collections::BTreeMap<usize, Vec<(String, u32)>> = Default::default();
    let mut counts: std::collections::BTreeMap<u32, usize> = Default::default();
    for c in &a.choices {
        *counts.entry(c.bits).or_default() += 1;
        let rest = c.name.strip_prefix("model.layers.").unwrap_or(&c.name);
        let (b, kind) = rest.split_once('.').unwrap_or(("0", rest));
        let kind = kind.rsplit('.').next().unwrap_or(kind).trim_end_matches("_proj").to_string();
        grid.entry(b.parse().unwrap_or(0)).or_default().push((kind, c.bits));
    }
    writeln!(
        err,
        "target-bpw {:.3}: chose {:.3} bpw, predicted KL {:.4e} (sum over layers)",
        a.target_bpw, a.bpw, a.predicted_kl
    )?;
    if let Some(row) = grid.values().next() {
        writeln!(err, "block {}", row.iter().map(|(k, _)| format!("{k:>5}")).collect::<String>())?;
    }
    for (b, row) in &grid {
        writeln!(err, "{b:>5} {}", row.iter().map(|(_, bits)| format!("{bits:>5}")).collect::<String>())?;
    }
    let c: Vec<String> = counts.iter().rev().map(|(b, n)| format!("{n} layers at {b} bits")).collect();
    writeln!(err, "{}", c.join(", "))?;
    Ok(())
}

/// The grouped format `plan` gives layer `name` (input width `k`), if it is a weight-only scheme.
fn weight_only_format(plan: &whittle_quant::Plan, name: &str, k: usize) -> Option<whittle_core::Rtn> {
    match plan.scheme_for(name) {
        whittle_quant::Scheme::WeightOnly { bits } if k.is_multiple_of(32) => {
            let (group, _) = whittle_quant::group_for(plan.group_size, k, name).ok()?;
            Some(whittle_core::Rtn { bits, group, zero_point: plan.zero_point })
        }
        _ => None,
    }
}

fn cmd_quantize_gptq(
    m: &ModelArg,
    plan: &whittle_quant::Plan,
    output: &std::path::Path,
    calib: &CalibArgs,
    allow_requantize: bool,
    json: bool,
) -> Result<()> {
    use whittle_quant::Scheme;
    if !(calib.damp > 0.0 && calib.damp < 1.0) {
        bail!("--damp {}: must be in (0, 1)", calib.damp);
    }
    if !matches!(plan.default, Scheme::WeightOnly { .. }) {
        bail!(
            "--method gptq applies to the weight-only schemes (w8a16, w4a16, w3a16, w2a16), not {}",
            plan.default.name()
        );
    }
    let mut l = open(m)?;
    if !allow_requantize {
        if let Some((n, lin)) = l.model.linears().into_iter().find(|(_, l)| l.is_quantized()) {
            bail!("layer `{n}` is already quantized ({}); pass --allow-requantize", lin.storage_name());
        }
    }
    let (src, text) = whittle_eval::data::read_text(calib.calib.as_deref(), whittle_eval::data::WIKI_VALID)?;
    let decoder = matches!(l.model, whittle_models::Model::Llama(_));
    let co = whittle_quant::calib::CalibOptions {
        samples: calib.calib_samples.unwrap_or(if decoder { 16 } else { 256 }),
        seq_len: calib.calib_seq_len.unwrap_or(if decoder { 512 } else { 128 }),
        source: src.clone(),
        int8: calib.calib_int8,
    };
    if co.samples == 0 || co.seq_len == 0 {
        bail!("--calib-samples and --calib-seq-len must be at least 1");
    }
    let scheme_for = |name: &str, k: usize| weight_only_format(plan, name, k);
    if calib.method == "awq-gptq" {
        // AWQ's scales first (a float rewrite), then GPTQ rounds the scaled weights.
        let mut pb = progress_bar("calibrate");
        let mut cal = whittle_quant::calib::calibrate(&mut l, &text, &co, &mut pb)?;
        let mut pb = progress_bar("awq");
        let r = whittle_quant::awq::awq(&mut l.model, &mut cal.stats, scheme_for, 20, &mut pb)?;
        eprintln!("awq: {} groups scaled", r.len());
    }
    let go = whittle_quant::gptq::GptqOptions { damp: calib.damp, act_order: calib.act_order };
    let mut pb = progress_bar("gptq");
    let r = whittle_quant::layerwise::gptq_model(&mut l, &text, &co, scheme_for, go, &mut pb)?;
    eprintln!(
        "gptq: {} tokens of {src}, {} layers, {:.1}s; calibration activations {:.1} MB",
        r.tokens,
        r.report.layers.len(),
        r.report.seconds,
        r.activation_bytes as f64 / 1e6
    );
    whittle_models::save::save_hf_dir(&l, output, DType::F32)
        .with_context(|| format!("writing {}", output.display()))?;
    print_quant_report(&r.report, output, json, whittle_eval::bench::model_bytes(&l), bench_bytes(output), "quantized")
}

fn print_quant_report(
    report: &whittle_quant::Report,
    output: &std::path::Path,
    json: bool,
    bytes_in: u64,
    bytes_out: u64,
    verb: &str,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let with_mse = report.layers.iter().any(|r| r.output_mse.is_some());
    let with_rtn = report.layers.iter().any(|r| r.rtn_output_mse.is_some());
    let col = |on: bool, v: Option<f64>| match (on, v) {
        (true, Some(v)) => format!(" {v:>11.3e}"),
        (true, None) => format!(" {:>11}", "-"),
        _ => String::new(),
    };
    write!(out, "{:<44} {:>20} {:>6} {:>11}", "layer", "scheme", "bpw", "weight RMSE")?;
    let h = |on: bool, s: &str| if on { format!(" {s:>11}") } else { String::new() };
    writeln!(out, "{}{}{:>8}", h(with_mse, "output MSE"), h(with_rtn, "RTN out MSE"), "ms")?;
    for r in &report.layers {
        write!(out, "{:<44} {:>20} {:>6.2} {:>11.3e}", r.name, r.scheme, r.bpw, r.weight_rmse)?;
        writeln!(out, "{}{}{:>8.1}", col(with_mse, r.output_mse), col(with_rtn, r.rtn_output_mse), r.seconds * 1e3)?;
    }
    let notes: Vec<String> =
        report.layers.iter().filter(|r| !r.note.is_empty()).map(|r| format!("{}: {}", r.name, r.note)).collect();
    if !notes.is_empty() {
        writeln!(out, "\nnotes ({}):", notes.len())?;
        for n in notes.iter().take(8) {
            writeln!(out, "  {n}")?;
        }
        if notes.len() > 8 {
            writeln!(out, "  … and {} more", notes.len() - 8)?;
        }
    }
    writeln!(
        out,
        "\n{} layers {verb}; weights {:.2} MB -> {:.2} MB; model on disk {:.2} MB -> {:.2} MB; {:.2}s",
        report.layers.len(),
        report.linear_bytes_before as f64 / 1e6,
        report.linear_bytes_after as f64 / 1e6,
        bytes_in as f64 / 1e6,
        bytes_out as f64 / 1e6,
        report.seconds
    )?;
    writeln!(out, "wrote {}", output.display())?;
    Ok(())
}

/// Prints the sparse-vs-dense kernel measurement and which one pays on this CPU.
fn print_kernel_check(c: &whittle_compress::pass::KernelCheck) {
    let verdict = |r: f64| if r < 1.0 { "sparse kernel faster" } else { "sparse kernel slower than dense" };
    println!(
        "kernel check on this CPU ({} sparse Linears, medians): decode 1 row {:.2} ms sparse vs {:.2} ms dense = {:.2}x time ({}); prefill {} rows (first block) {:.2} ms vs {:.2} ms = {:.2}x time ({})",
        c.layers,
        c.decode_sparse_ms,
        c.decode_dense_ms,
        c.decode_ratio(),
        verdict(c.decode_ratio()),
        c.prefill_rows,
        c.prefill_sparse_ms,
        c.prefill_dense_ms,
        c.prefill_ratio(),
        verdict(c.prefill_ratio())
    );
    if whittle_core::Isa::detect() != whittle_core::Isa::Avx512Vnni {
        println!("this CPU has no AVX-512: sparse layers run densified (no speed-up; the file is still smaller)");
    }
}

/// Runs a progressive schedule with `prune` per step, evaluating on WikiText-2 test (decoders, the first
/// `windows` windows of 512) or STS-B test (encoders); prints the history as it goes (to stderr with --json).
fn run_prune_schedule(
    l: &mut whittle_models::Loaded,
    steps: &[f64],
    max_drop: Option<f64>,
    windows: usize,
    prune: impl FnMut(&mut whittle_models::Loaded, f64) -> whittle_compress::Result<()>,
    json: bool,
) -> Result<Vec<whittle_compress::schedule::Step>> {
    use whittle_compress::schedule::{run_schedule, Quality};
    use whittle_eval::data;
    let decoder = matches!(l.model, Model::Llama(_));
    let wiki = if decoder { Some(data::read_text(None, data::WIKI_TEST)?.1) } else { None };
    let pairs = if decoder { Vec::new() } else { data::parse_sts(&data::read_text(None, data::STS_TEST)?)? };
    let eval = |l: &whittle_models::Loaded| -> whittle_compress::Result<Quality> {
        let t = std::time::Instant::now();
        let wrap = |e: whittle_eval::Error| whittle_compress::Error::Usage(format!("evaluation: {e}"));
        let mut quiet = |_: usize, _: usize| {};
        let q = match &wiki {
            Some(text) => {
                let o = whittle_eval::ppl::PplOptions { ctx: 512, chunks: Some(windows) };
                let m = whittle_eval::ppl::perplexity(l, text, &o, None, &mut quiet).map_err(wrap)?;
                let toks = m.tokens.unwrap_or(0) as f64;
                Quality {
                    name: "ppl".into(),
                    value: m.ppl.unwrap_or(f64::NAN),
                    lower_is_better: true,
                    per_second: toks,
                }
            }
            None => {
                let m = whittle_eval::sts::sts(l, &pairs, 128, None, &mut quiet).map_err(wrap)?;
                let n = 2.0 * pairs.len() as f64;
                Quality {
                    name: "sts".into(),
                    value: m.sts_spearman.unwrap_or(f64::NAN),
                    lower_is_better: false,
                    per_second: n,
                }
            }
        };
        Ok(Quality { per_second: q.per_second / t.elapsed().as_secs_f64(), ..q })
    };
    let unit = if decoder { "tok/s" } else { "sent/s" };
    let mut print = |s: &whittle_compress::schedule::Step| {
        let line = format!(
            "step {:>2}  amount {:>5.3}  removed {:>6.2}%  Linears {:>8.2} MB  {} {:>9.4}  drop {:>+7.2}%  {:>8.1} {unit}{}",
            s.step,
            s.amount,
            100.0 * s.removed,
            s.bytes as f64 / 1e6,
            s.quality.name,
            s.quality.value,
            100.0 * s.drop,
            s.quality.per_second,
            if s.kept { "" } else { "  -> over --max-drop: keeping the previous step" }
        );
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    Ok(run_schedule(l, steps, max_drop, prune, eval, &mut print)?)
}

fn bench_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Quantize {
            m,
            scheme,
            output,
            overrides,
            force,
            allow_requantize,
            group_size,
            zero_point,
            calib,
            json,
        } => {
            if group_size == 0 || group_size % 32 != 0 {
                bail!("--group-size {group_size}: must be a positive multiple of 32");
            }
            let q = QuantArgs { overrides, force, allow_requantize, group_size, zero_point, calib, json };
            cmd_quantize(&m, &scheme, &output, &q)
        }
        Cmd::Prune {
            m,
            output,
            method,
            sparsity,
            pattern,
            scope,
            structured,
            drop_layers,
            importance,
            global,
            then_quantize,
            group_size,
            damp,
            storage,
            schedule,
            max_drop,
            eval_windows,
            calib,
            calib_samples,
            calib_seq_len,
            force,
            json,
        } => {
            let sparse = match storage.as_str() {
                "sparse" => true,
                "dense" => false,
                s => bail!("--storage {s}: valid: sparse, dense"),
            };
            let schedule = schedule.as_deref().map(whittle_compress::schedule::parse_schedule).transpose()?;
            let max_drop = max_drop.as_deref().map(whittle_compress::schedule::parse_max_drop).transpose()?;
            if max_drop.is_some() && schedule.is_none() {
                bail!("--max-drop applies to a --schedule");
            }
            if eval_windows == 0 {
                bail!("--eval-windows must be at least 1");
            }
            if output.exists() && !force {
                bail!("{} exists; pass --force to replace it", output.display());
            }
            let mut l = open(&m)?;
            let decoder = matches!(l.model, Model::Llama(_));
            let (src, text) = whittle_eval::data::read_text(calib.as_deref(), whittle_eval::data::WIKI_VALID)?;
            // Wanda needs only per-channel norms, which 4 windows already estimate well (the 20 s).
            let wanda = method.as_deref() == Some("wanda");
            let co = whittle_quant::calib::CalibOptions {
                samples: calib_samples.unwrap_or(if !decoder {
                    256
                } else if wanda {
                    4
                } else {
                    16
                }),
                seq_len: calib_seq_len.unwrap_or(if decoder { 512 } else { 128 }),
                source: src.clone(),
                int8: false,
            };
            if co.samples == 0 || co.seq_len == 0 {
                bail!("--calib-samples and --calib-seq-len must be at least 1");
            }
            let bytes_in = whittle_eval::bench::model_bytes(&l);
            let params_in = l.model.linears().iter().map(|(_, l)| l.num_params()).sum::<usize>();
            match (method, structured.is_some() || drop_layers.is_some()) {
                (Some(_), true) => bail!("--method (unstructured / N:M) and --structured / --drop-layers are separate passes: run one, then the other"),
                (None, false) => bail!("prune needs --method magnitude|wanda|sparsegpt --sparsity S, or --structured heads=..,ffn=..,layers=N"),
                (Some(method), false) => {
                    let method = whittle_compress::pass::Method::parse(&method)?;
                    let pattern = whittle_compress::parse_pattern(&pattern)?;
                    if schedule.is_some() && sparsity.is_some() {
                        bail!("--schedule gives the sparsities: drop --sparsity");
                    }
                    let sparsity = match (sparsity, pattern) {
                        (Some(s), _) => s,
                        (None, _) if schedule.is_some() => 0.0,
                        (None, whittle_compress::Pattern::NM { n, m }) => 1.0 - n as f64 / m as f64,
                        (None, _) => bail!("--sparsity S is needed for unstructured pruning (e.g. 0.5)"),
                    };
                    let global = match scope.as_str() {
                        "layer" => false,
                        "global" => true,
                        s => bail!("--scope {s}: valid: layer, global"),
                    };
                    let quant = match &then_quantize {
                        Some(sch) => match whittle_quant::Scheme::parse(sch)? {
                            whittle_quant::Scheme::WeightOnly { bits } => {
                                Some(whittle_core::Rtn { bits, group: group_size, zero_point: false })
                            }
                            _ => bail!("--then-quantize {sch}: a grouped weight-only scheme (w8a16, w4a16, w3a16, w2a16)"),
                        },
                        None => None,
                    };
                    if schedule.is_some() && pattern != whittle_compress::Pattern::Unstructured {
                        bail!("--schedule steps through unstructured sparsities; an N:M pattern fixes the sparsity at 1 - N/M");
                    }
                    let mut o = whittle_compress::pass::PruneOptions { method, sparsity, pattern, global, damp, quant, sparse };
                    let mut reports = Vec::new();
                    let mut history = None;
                    match &schedule {
                        None => {
                            let mut pb = progress_bar(method.name());
                            reports.push(whittle_compress::pass::prune_model(&mut l, &o, &text, &co, &mut pb)?);
                        }
                        Some(steps) => {
                            let prune = |l: &mut whittle_models::Loaded, a: f64| {
                                o.sparsity = a;
                                let mut pb = progress_bar(&format!("{} {a}", method.name()));
                                reports.push(whittle_compress::pass::prune_model(l, &o, &text, &co, &mut pb)?);
                                Ok(())
                            };
                            history = Some(run_prune_schedule(&mut l, steps, max_drop, eval_windows, prune, json)?);
                        }
                    }
                    let r = reports.last().expect("at least one step ran").clone();
                    if r.tokens > 0 {
                        eprintln!("{}: {} calibration tokens of {src}", method.name(), r.tokens);
                    }
                    whittle_models::save::save_hf_dir(&l, &output, DType::F32)
                        .with_context(|| format!("writing {}", output.display()))?;
                    let check = whittle_compress::pass::kernel_check(&l, 128)?;
                    if json {
                        let v = serde_json::json!({ "report": r, "kernel_check": check, "schedule": history });
                        println!("{}", serde_json::to_string_pretty(&v)?);
                        return Ok(());
                    }
                    let linear_after = l.model.linears().iter().map(|(_, l)| l.storage_bytes()).sum::<usize>();
                    let rep = whittle_quant::Report {
                        layers: r.layers.clone(),
                        linear_bytes_before: 4 * params_in,
                        linear_bytes_after: linear_after,
                        seconds: r.seconds,
                    };
                    print_quant_report(&rep, &output, false, bytes_in, bench_bytes(&output), "pruned")?;
                    let stored = if sparse { "stored sparse (zeros not stored)" } else { "stored dense" };
                    println!(
                        "{} {}: {:.2}% of the {} block-Linear weights are zero ({:.1}s); {stored}",
                        r.method,
                        r.pattern,
                        100.0 * r.zeros as f64 / r.params.max(1) as f64,
                        human(r.params),
                        r.seconds
                    );
                    if let Some(c) = check {
                        print_kernel_check(&c);
                    }
                    Ok(())
                }
                (None, true) => {
                    let t0 = std::time::Instant::now();
                    let s = match &structured {
                        Some(s) => whittle_compress::structured::Structured::parse(s)?,
                        None => Default::default(),
                    };
                    let imp = whittle_compress::structured::Importance::parse(&importance)?;
                    let mut drop: Vec<usize> = match &drop_layers {
                        Some(d) => d
                            .split(',')
                            .map(|v| v.trim().parse::<usize>().with_context(|| format!("--drop-layers `{d}`: `{v}` is not a block index")))
                            .collect::<Result<_>>()?,
                        None => Vec::new(),
                    };
                    if s.layers > 0 && !drop.is_empty() {
                        bail!("--structured layers={} and --drop-layers both choose blocks: give one", s.layers);
                    }
                    if s.layers >= l.model.n_blocks() {
                        bail!("--structured layers={}: the model has {} blocks; at least one must stay", s.layers, l.model.n_blocks());
                    }
                    let mut influence = None;
                    if s.layers > 0 {
                        let Model::Llama(mm) = &l.model else {
                            bail!("--structured layers=N ranks blocks by influence on decoders; for encoders name them with --drop-layers");
                        };
                        let windows = whittle_quant::calib::decoder_windows(&l, &text, &co)?;
                        let xs: Vec<candle_core::Tensor> = windows
                            .iter()
                            .map(|w| mm.embed(&candle_core::Tensor::new(w.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?))
                            .collect::<std::result::Result<_, _>>()?;
                        let bi = whittle_compress::structured::block_influence_llama(mm, &xs)?;
                        drop = whittle_compress::structured::least_influential(&bi, s.layers);
                        influence = Some(bi);
                    }
                    let stats = if imp == whittle_compress::structured::Importance::Activation {
                        let mut pb = progress_bar("calibrate");
                        Some(whittle_quant::calib::calibrate(&mut l, &text, &co, &mut pb)?.stats)
                    } else {
                        None
                    };
                    let saliency = if imp == whittle_compress::structured::Importance::Taylor {
                        let Model::Llama(mm) = &l.model else {
                            bail!("--importance taylor: decoders only for now (encoders: l2, l1, activation)");
                        };
                        let ids = text::encode_prompt(&l, &text, false)?;
                        let w = whittle_train::Windows::new(&ids, co.seq_len, 1, 0, &src)?;
                        eprintln!("taylor: gradients of the LM loss on {} windows of {} tokens", co.samples, co.seq_len);
                        Some(whittle_train::taylor_saliency(mm, &w, co.samples, 1)?)
                    } else {
                        None
                    };
                    if schedule.is_some() && drop_layers.is_some() {
                        bail!("--schedule scales --structured heads=..,ffn=..,layers=N; it does not apply to --drop-layers");
                    }
                    // One step: the original model with `a` × the asked fractions removed (a = 1 without a
                    // schedule); the importance and block influence come from the original model.
                    let orig = l.model.clone();
                    let mut last = None;
                    let mut prune_step = |model: &mut Model, a: f64| -> whittle_compress::Result<()> {
                        *model = orig.clone();
                        let sa = whittle_compress::structured::Structured { heads: s.heads * a, ffn: s.ffn * a, layers: 0, drop_layers: vec![] };
                        let drop_a = match &influence {
                            Some(bi) => whittle_compress::structured::least_influential(bi, (s.layers as f64 * a).round() as usize),
                            None => drop.clone(),
                        };
                        last = Some(whittle_compress::structured::prune_structured_with(
                            model,
                            &sa,
                            imp,
                            global,
                            stats.as_ref(),
                            saliency.as_ref(),
                            &drop_a,
                            influence.as_deref(),
                        )?);
                        Ok(())
                    };
                    let history = match &schedule {
                        None => {
                            prune_step(&mut l.model, 1.0)?;
                            None
                        }
                        Some(steps) => {
                            let step = |l: &mut whittle_models::Loaded, a: f64| prune_step(&mut l.model, a);
                            let h = run_prune_schedule(&mut l, steps, max_drop, eval_windows, step, json)?;
                            // The kept model is the last step within --max-drop: re-run it for its report.
                            let kept = h.iter().rev().find(|r| r.kept).map_or(0.0, |r| r.amount);
                            if kept == 0.0 {
                                eprintln!("the first step already exceeds --max-drop: writing the unpruned model");
                            }
                            prune_step(&mut l.model, kept)?;
                            Some(h)
                        }
                    };
                    let r = last.expect("a step ran");
                    whittle_models::save::save_hf_dir(&l, &output, DType::F32)
                        .with_context(|| format!("writing {}", output.display()))?;
                    let params_out = l.model.linears().iter().map(|(_, l)| l.num_params()).sum::<usize>();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "report": r, "schedule": history }))?);
                        return Ok(());
                    }
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{:>5} {:>13} {:>13} {:>13} {:>10} {:>10} {:>9}", "block", "heads", "kv heads", "ffn", "params", "after", "influence")?;
                    for b in &r.blocks {
                        let inf = b.influence.map_or("-".to_string(), |v| format!("{v:.4}"));
                        let what = |a: usize, z: usize| if b.dropped { format!("{a} -> 0") } else { format!("{a} -> {z}") };
                        writeln!(
                            out,
                            "{:>5} {:>13} {:>13} {:>13} {:>10} {:>10} {:>9}{}",
                            b.block,
                            what(b.heads_before, b.heads_after),
                            what(b.kv_heads_before, b.kv_heads_after),
                            what(b.ffn_before, b.ffn_after),
                            human(b.params_before),
                            human(b.params_after),
                            inf,
                            if b.note.is_empty() { String::new() } else { format!("  ({})", b.note) }
                        )?;
                    }
                    let bytes_out = bench_bytes(&output);
                    writeln!(
                        out,
                        "\nblock Linears {} -> {} params ({:.1}% removed); all Linears {} -> {}; file {:.2} MB (f32); {:.1}s",
                        human(r.params_before),
                        human(r.params_after),
                        100.0 * (1.0 - r.params_after as f64 / r.params_before.max(1) as f64),
                        human(params_in),
                        human(params_out),
                        bytes_out as f64 / 1e6,
                        t0.elapsed().as_secs_f64()
                    )?;
                    let _ = bytes_in;
                    writeln!(out, "wrote {}", output.display())?;
                    Ok(())
                }
            }
        }
        Cmd::Distill { d, t } => {
            let student = match (&d.student, &d.keep_layers) {
                (Some(s), None) => s.clone(),
                (None, Some(_)) => d.teacher.clone(),
                (Some(_), Some(_)) => bail!("--student and --keep-layers both give the student: use one"),
                (None, None) => {
                    bail!("distill needs --student MODEL or --keep-layers 0,2,4 (student from the teacher)")
                }
            };
            train_cmd::run(&student, Some(&d), &t)
        }
        Cmd::Finetune { model, t } => train_cmd::run(&model, None, &t),
        Cmd::Share { m, output, groups, unique, init, embedding_rank, calib, force, json } => {
            use whittle_compress::share;
            if output.exists() && !force {
                bail!("{} exists; pass --force to replace it", output.display());
            }
            let mut l = open(&m)?;
            if calib.is_some() && embedding_rank.is_none() {
                bail!("--calib weights --embedding-rank; pass --embedding-rank R too");
            }
            if embedding_rank.is_some() && !matches!(l.model, Model::Bert(_)) {
                bail!("--embedding-rank factorises a BERT encoder's word embeddings; {} is a decoder (its embeddings are tied to the output head)", m.model);
            }
            let n = l.model.n_blocks();
            let groups = if groups == "auto" {
                share::auto_groups(&l.model, unique.unwrap_or(n.div_ceil(2)))?
            } else {
                if unique.is_some() {
                    bail!("--unique applies to --groups auto");
                }
                share::parse_groups(&groups, n)?
            };
            let init = share::Init::parse(&init)?;
            let quality = |l: &Loaded| -> Result<(String, f64)> {
                Ok(match &l.model {
                    Model::Bert(_) => {
                        let pairs = data::parse_sts(&data::read_text(None, data::STS_TEST)?)?;
                        (
                            "STS-B Spearman".into(),
                            sts::sts(l, &pairs, 128, None, &mut |_, _| {})?.sts_spearman.unwrap_or(f64::NAN),
                        )
                    }
                    Model::Llama(_) => {
                        let (_, t) = data::read_text(None, data::WIKI_TEST)?;
                        let o = ppl::PplOptions { ctx: 512, chunks: Some(4) };
                        (
                            "PPL (4 windows)".into(),
                            ppl::perplexity(l, &t, &o, None, &mut |_, _| {})?.ppl.unwrap_or(f64::NAN),
                        )
                    }
                })
            };
            let bytes_in = whittle_eval::bench::model_bytes(&l);
            let (qname, q0) = quality(&l)?;
            let r = share::share_blocks(&mut l, &groups, init)?;
            let emb = match embedding_rank {
                Some(rank) => {
                    let (_, text) = data::read_text(calib.as_deref(), data::WIKI_VALID)?;
                    let vocab = match &l.model {
                        Model::Bert(b) => b.config.vocab_size,
                        Model::Llama(_) => 0,
                    };
                    let mut w = vec![1f64; vocab];
                    for line in text.lines().filter(|s| !s.trim().is_empty()) {
                        let enc = l.tokenizer.encode(line, true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
                        for &id in enc.get_ids() {
                            if let Some(c) = w.get_mut(id as usize) {
                                *c += 1.0;
                            }
                        }
                    }
                    Some(share::factorise_embeddings(&mut l, rank, &w)?)
                }
                None => None,
            };
            let (_, q1) = quality(&l)?;
            whittle_models::save::save_hf_dir(&l, &output, DType::F32)
                .with_context(|| format!("writing {}", output.display()))?;
            let bytes_out = bench_bytes(&output);
            if json {
                let v = serde_json::json!({ "report": r, "embedding": emb, "quality": qname, "before": q0, "after": q1, "bytes_before": bytes_in, "bytes_after": bytes_out });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            for g in &r.groups {
                let ch: Vec<String> = g.rel_change.iter().map(|c| format!("{c:.3}")).collect();
                let from = g.central.map_or("mean".to_string(), |c| format!("block {c}"));
                println!(
                    "blocks {:?} share one set of weights ({from}); relative change per member: {}",
                    g.blocks,
                    ch.join(", ")
                );
            }
            if let Some(e) = &emb {
                println!(
                    "word embeddings factorised to rank {}: parameters {} -> {}, relative error {:.3} (token-weighted {:.3}), {:.1}s",
                    e.rank,
                    human(e.params_before),
                    human(e.params_after),
                    e.rel_err,
                    e.weighted_rel_err,
                    e.seconds
                );
            }
            println!(
                "{} -> {} unique blocks; block parameters {} -> {}; file {:.2} MB -> {:.2} MB ({:.1}% smaller); {qname} {q0:.4} -> {q1:.4} before recovery (whittle distill recovers it)",
                n,
                r.unique_blocks,
                human(r.params_before),
                human(r.params_after),
                bytes_in as f64 / 1e6,
                bytes_out as f64 / 1e6,
                100.0 * (1.0 - bytes_out as f64 / bytes_in.max(1) as f64)
            );
            println!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Lowrank {
            m,
            output,
            method,
            ratio,
            energy,
            rank,
            attention_rank,
            alpha,
            damp,
            calib,
            calib_samples,
            calib_seq_len,
            force,
            json,
        } => {
            use whittle_compress::lowrank::{lowrank_model, LowRankOptions, Method, Target};
            if output.exists() && !force {
                bail!("{} exists; pass --force to replace it", output.display());
            }
            let method = Method::parse(&method)?;
            let target = match (attention_rank, ratio, energy, rank) {
                (Some(_), None, None, None) => None,
                (Some(_), ..) => bail!("--attention-rank factorises the attention scores alone: run `lowrank` again on its output for --ratio, --energy or --rank"),
                (None, Some(r), None, None) => Some(Target::Ratio(r)),
                (None, None, Some(e), None) => Some(Target::Energy(e)),
                (None, None, None, Some(r)) => Some(Target::Rank(r)),
                (None, None, None, None) => bail!("lowrank needs one of --ratio R (e.g. 0.8), --energy E or --rank R"),
                _ => bail!("--ratio, --energy and --rank each choose the ranks: give one"),
            };
            let mut l = open(&m)?;
            let decoder = matches!(l.model, Model::Llama(_));
            let (src, text) = whittle_eval::data::read_text(calib.as_deref(), whittle_eval::data::WIKI_VALID)?;
            let co = whittle_quant::calib::CalibOptions {
                samples: calib_samples.unwrap_or(if decoder { 16 } else { 256 }),
                seq_len: calib_seq_len.unwrap_or(if decoder { 512 } else { 128 }),
                source: src.clone(),
                int8: false,
            };
            if co.samples == 0 || co.seq_len == 0 {
                bail!("--calib-samples and --calib-seq-len must be at least 1");
            }
            let bytes_in = whittle_eval::bench::model_bytes(&l);
            let mut pb = progress_bar("calibrate");
            let save = |l: &whittle_models::Loaded| {
                whittle_models::save::save_hf_dir(l, &output, DType::F32)
                    .with_context(|| format!("writing {}", output.display()))
            };
            let mut out = std::io::stdout().lock();
            // After the output is written.
            let sizes = || {
                format!("model on disk {:.2} MB -> {:.2} MB", bytes_in as f64 / 1e6, bench_bytes(&output) as f64 / 1e6)
            };
            match (attention_rank, target) {
                (Some(ar), _) => {
                    let r = whittle_compress::attention::attention_rank(&mut l, ar, method, damp, &text, &co, &mut pb)?;
                    save(&l)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                        return Ok(());
                    }
                    let sizes = sizes();
                    writeln!(
                        out,
                        "{:<6} {:>6} {:>10} {:>10} {:>10} {:>12} {:>8}",
                        "block", "heads", "dims", "Q+K", "after", "score err", "ms"
                    )?;
                    for b in &r.blocks {
                        writeln!(
                            out,
                            "{:<6} {:>6} {:>10} {:>10} {:>10} {:>12.4} {:>8.1}",
                            b.block,
                            b.heads,
                            format!("{} -> {}", b.dim_before, b.dim_after),
                            human(b.params_before),
                            human(b.params_after),
                            b.score_rel_err,
                            b.seconds * 1e3
                        )?;
                    }
                    let cal = if r.tokens > 0 {
                        format!("{} calibration tokens of {src}", r.tokens)
                    } else {
                        "no calibration".into()
                    };
                    writeln!(
                        out,
                        "\n{} attention rank {}: query+key parameters {} -> {} ({:.1}%); {sizes}; {cal}; {:.1}s",
                        r.method,
                        r.rank,
                        human(r.params_before),
                        human(r.params_after),
                        100.0 * r.params_after as f64 / r.params_before.max(1) as f64,
                        r.seconds,
                    )?;
                }
                (None, target) => {
                    let o = LowRankOptions { method, target: target.expect("chosen above"), alpha, damp };
                    let r = lowrank_model(&mut l, &o, &text, &co, &mut pb)?;
                    save(&l)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                        return Ok(());
                    }
                    let sizes = sizes();
                    writeln!(
                        out,
                        "{:<44} {:>11} {:>6} {:>9} {:>9} {:>10} {:>10} {:>8}",
                        "layer", "shape", "rank", "params", "after", "weight err", "output err", "ms"
                    )?;
                    for x in &r.layers {
                        let rank = x.rank.map_or("dense".to_string(), |r| r.to_string());
                        writeln!(
                            out,
                            "{:<44} {:>11} {:>6} {:>9} {:>9} {:>10.4} {:>10.4} {:>8.1}",
                            x.name,
                            format!("{}x{}", x.out_features, x.in_features),
                            rank,
                            human(x.params_before),
                            human(x.params_after),
                            x.weight_rel_err,
                            x.output_rel_err,
                            x.seconds * 1e3
                        )?;
                    }
                    let factored = r.layers.iter().filter(|x| x.rank.is_some()).count();
                    writeln!(
                        out,
                        "\n{}: {factored} of {} block Linears factorised; their parameters {} -> {} ({:.1}% of dense); {sizes}; {} calibration tokens of {src}; {:.1}s",
                        r.method,
                        r.layers.len(),
                        human(r.params_before),
                        human(r.params_after),
                        100.0 * r.params_after as f64 / r.params_before.max(1) as f64,
                        r.tokens,
                        r.seconds
                    )?;
                }
            }
            writeln!(out, "wrote {}", output.display())?;
            Ok(())
        }
        Cmd::Sensitivity {
            m,
            output,
            calib,
            calib_samples,
            calib_seq_len,
            group_size,
            zero_point,
            candidates,
            probe_bits,
            force,
            json,
        } => {
            if let Some(o) = output.as_ref().filter(|o| o.exists() && !force) {
                bail!("{} exists; pass --force to replace it", o.display());
            }
            if group_size == 0 || group_size % 32 != 0 {
                bail!("--group-size {group_size}: must be a positive multiple of 32");
            }
            let candidates = parse_bits(&candidates, "--candidates")?;
            let probe_bits = parse_bits(&probe_bits.to_string(), "--probe-bits")?[0];
            let o = whittle_quant::mixed::SensitivityOptions { candidates, probe_bits, group_size, zero_point };
            let mut l = open(&m)?;
            let s = measure_sensitivity(&mut l, calib.as_deref(), calib_samples, calib_seq_len, &o)?;
            if let Some(o) = &output {
                write_json_atomic(o, &s)?;
                eprintln!("wrote {}", o.display());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                Ok(())
            } else {
                print_sensitivity(&s)
            }
        }
        Cmd::Imatrix { m, output, calib, calib_samples, calib_seq_len, force } => {
            if output.exists() && !force {
                bail!("{} exists; pass --force to replace it", output.display());
            }
            if calib_samples == 0 || calib_seq_len == 0 {
                bail!("--calib-samples and --calib-seq-len must be at least 1");
            }
            let mut l = open(&m)?;
            if !matches!(l.model, whittle_models::Model::Llama(_)) {
                bail!("imatrix: llama.cpp's imatrix names GGUF tensors of decoders; {} is an encoder", m.model);
            }
            let (src, text) = whittle_eval::data::read_text(calib.as_deref(), whittle_eval::data::WIKI_VALID)?;
            let co = whittle_quant::calib::CalibOptions {
                samples: calib_samples,
                seq_len: calib_seq_len,
                source: src.clone(),
                int8: false,
            };
            let mut pb = progress_bar("imatrix");
            let cal = whittle_quant::calib::calibrate(&mut l, &text, &co, &mut pb)?;
            let chunks = cal.tokens / calib_seq_len;
            let n = whittle_quant::imatrix::write_imatrix(&cal.stats, &output, &src, chunks, calib_seq_len)?;
            eprintln!("{n} tensors, {} tokens of {src}, {:.1}s", cal.tokens, cal.seconds);
            println!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Eval { m, task, data, base, ctx, chunks, max_len, json, save } => {
            let l = open(&m)?;
            let b = match &base {
                Some(b) => Some(open(&ModelArg {
                    model: b.clone(),
                    tokenizer: m.tokenizer.clone(),
                    dequantize: m.dequantize,
                })?),
                None => None,
            };
            let r = eval_model(&l, &m.model, task, data.as_deref(), b.as_ref(), ctx, chunks, max_len)?;
            if save {
                save_results(&m.model, &r)?;
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            } else {
                print_metrics(&r)
            }
        }
        Cmd::Bench { m, b, json, save } => {
            let l = open(&m)?;
            let r = bench_model(&l, &m.model, &b)?;
            if save {
                save_results(&m.model, &r)?;
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            } else {
                print_metrics(&r)
            }
        }
        Cmd::Compare { base, variants, chunks, b, reuse, save, output, json } => {
            cmd_compare(save, &base, &variants, chunks, &b, reuse, output.as_deref(), json)
        }
        Cmd::Inspect { m, json, seq } => cmd_inspect(&m, json, seq),
        Cmd::Convert { m, output, dtype } => cmd_convert(&m, &output, dtype),
        Cmd::Embed { m, texts, file, max_len, batch, json } => cmd_embed(&m, &texts, &file, max_len, batch, json),
        Cmd::Generate { m, prompt, n, temperature, top_k, top_p, seed, chat, ignore_eos, json } => {
            if temperature < 0.0 || !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                bail!("--temperature must be >= 0 and --top-p in (0, 1]");
            }
            cmd_generate(&m, &prompt, n, Sampling { temperature, top_k, top_p, seed }, chat, ignore_eos, json)
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (index 15 in mimalloc 3's `mi_option_e`; libmimalloc-sys names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed pages: purging them makes the kernel zero them again on the next tensor (measured:
    // `clear_page_erms` was 6% of MiniLM w8a8 bench time).
    // SAFETY: called before any other thread exists; the option only changes when memory is returned.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::FAILURE;
        }
        // candle sizes its thread pools from RAYON_NUM_THREADS; set it before any tensor work starts.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Pin candle's default (physical cores) once: without the variable candle recounts the cores by
        // parsing /proc/cpuinfo on every matmul (measured: ~3% of decoding time).
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let mut forced = None;
    if let Some(k) = cli.kernel {
        let isa = match k {
            KernelArg::Ref => whittle_kernels::Isa::Ref,
            KernelArg::Avx2 => whittle_kernels::Isa::Avx2,
            KernelArg::Avx512 => whittle_kernels::Isa::Avx512Vnni,
        };
        if !isa.supported() {
            eprintln!("error: --kernel {}: this CPU does not support it", isa.name());
            return ExitCode::FAILURE;
        }
        forced = Some(isa);
    }
    let rc = whittle_core::RunConfig { isa: forced, fine_activations: cli.fine_activations, ..Default::default() };
    RUN_CONFIG.set(rc).expect("set once");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`whittle ... | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            // Libraries name options as configs spell them; show them as this CLI's flags.
            let msg = whittle_core::option_words(&format!("{e:#}"), |n| format!("--{}", n.replace('_', "-")));
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
