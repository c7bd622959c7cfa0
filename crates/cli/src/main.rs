//! `whittle`: make Transformer models smaller and faster, and prove it with numbers.
//!
//! A thin binary: this file parses the flags and dispatches; each command is a module of [`cmd`] that builds
//! a typed request (most are `whittle_pipeline` configs), calls one library function and prints its report.

mod cmd;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cmd::{
    compare, convert, embed, eval, export, generate, inspect, machine, measure, optimize, serve, stage, train, verify,
};

/// mimalloc keeps freed tensor buffers for reuse; glibc returns large ones to the OS and page-faults them
/// back on every op (measured: whittle bench, MiniLM w8a8).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "whittle", version, about = "Make Transformer models smaller and faster, and prove it with numbers.")]
struct Cli {
    #[command(flatten)]
    run: cmd::RunArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a model's family, config, parameters by component, storage, FLOPs and per-layer widths
    Inspect(inspect::Args),
    /// Convert a model (GGUF or HF) to an HF directory that transformers loads
    Convert(convert::Args),
    /// Print sentence embeddings of an encoder (mean pooling + L2 normalisation)
    Embed(embed::Args),
    /// Quantize a model's Linear layers: w8a8 (dynamic / static), weight-only wNa16 (RTN, AWQ, GPTQ, mixed
    /// precision under a bit budget) to an HF-style directory, or llama.cpp file types to NAME.gguf
    Quantize(stage::Quantize),
    /// Collect an importance matrix (Σx² per input channel of every Linear) on calibration text, written in
    /// llama.cpp's GGUF imatrix format
    Imatrix(measure::ImatrixArgs),
    /// Prune a model: unstructured or N:M (--method magnitude|wanda|sparsegpt --sparsity S [--pattern 2:4]) or
    /// structured, really removing heads, FFN neurons and blocks (--structured heads=0.25,ffn=0.3,layers=2)
    Prune(stage::Prune),
    /// Distil a student from a teacher on text: soft targets at a temperature blended with hard labels,
    /// optional hidden-state MSE; AdamW, warm-up + decay, checkpoints and --resume (LLaMA decoders)
    Distill(train::DistillArgs),
    /// Fine-tune a model on text with hard labels only (the same engine as distill; its baseline)
    Finetune(train::FinetuneArgs),
    /// Share weights across blocks (ALBERT): each group of blocks uses one set of weights, stored once and
    /// held once in memory; prints the quality before any recovery
    Share(stage::Share),
    /// Factorise block Linears as U·V of lower rank: plain SVD, ASVD (activation-scaled) or SVD-LLM
    /// (whitened by the Cholesky factor of Σxᵀx, minimising the output error); ranks by --ratio, --energy
    /// or --rank
    Lowrank(stage::Lowrank),
    /// Measure each block Linear's cost when it alone is quantized (KL divergence on calibration text at a
    /// probe format, extrapolated to each candidate by its diagonal-Hessian output error), for --target-bpw
    Sensitivity(measure::SensitivityArgs),
    /// Measure quality: perplexity / KL divergence, cloze, STS-B or SST-2 probe accuracy
    Eval(eval::EvalArgs),
    /// Measure speed, size and memory (sentences/s and latency, or llama-bench pp/tg)
    Bench(eval::BenchArgs),
    /// Evaluate and benchmark a base and its variants side by side: a markdown table and JSON
    Compare(compare::Args),
    /// Generate text with a decoder (greedy by default; sampling with --temperature)
    Generate(generate::Args),
    /// Make the smallest (or fastest) model within a quality tolerance: a recipe of stages (--recipe R.toml),
    /// or a search at a level (--level light|medium|full, --max-drop 1%); writes OUT/model, OUT/report.html
    Optimize(optimize::Args),
    /// Export a model to another runtime's format: ONNX (encoders with pooling in the graph, decoders with a
    /// KV cache; f32, w8a8-dynamic as DynamicQuantizeLinear + MatMulInteger, w8a8-static as Q/DQ)
    Export(export::Args),
    /// Run an export in its own runtime (ONNX Runtime) and compare it with whittle's run of the source model:
    /// cos_min and STS-B for encoders, greedy tokens, KLD and top-1 for decoders
    Verify(verify::Args),
    /// Measure this machine's limits: streaming read bandwidth, f32 FMA and int8 dot-product throughput (what
    /// `bench` and `cargo bench -p whittle-kernels` compare the kernels with)
    Machine(machine::Args),
    /// Serve a model over HTTP with OpenAI's API: embeddings (encoders), completions and chat with
    /// continuous batching (decoders), /health, /metrics
    Serve(serve::Args),
}

impl Cmd {
    /// Whether the command prints JSON on stdout (then everything else goes to stderr).
    fn json(&self) -> bool {
        match self {
            Cmd::Inspect(a) => a.json,
            Cmd::Quantize(a) => a.json,
            Cmd::Prune(a) => a.json,
            Cmd::Share(a) => a.json,
            Cmd::Lowrank(a) => a.json,
            Cmd::Distill(a) => a.run.json,
            Cmd::Finetune(a) => a.run.json,
            Cmd::Sensitivity(a) => a.json,
            Cmd::Eval(a) => a.out.json,
            Cmd::Bench(a) => a.out.json,
            Cmd::Compare(a) => a.json,
            Cmd::Generate(a) => a.json,
            Cmd::Embed(a) => a.json,
            Cmd::Optimize(a) => a.json,
            Cmd::Export(a) => a.json,
            Cmd::Verify(a) => a.json,
            Cmd::Machine(a) => a.json,
            Cmd::Convert(_) | Cmd::Imatrix(_) | Cmd::Serve(_) => false,
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut env = cli.run.env()?;
    env.json = cli.cmd.json();
    match &cli.cmd {
        Cmd::Inspect(a) => inspect::run(a, &env),
        Cmd::Convert(a) => convert::run(a, &env),
        Cmd::Embed(a) => embed::run(a, &env),
        Cmd::Generate(a) => generate::run(a, &env),
        Cmd::Quantize(a) => stage::quantize(a, &env),
        Cmd::Prune(a) => stage::run(a, &env),
        Cmd::Lowrank(a) => stage::run(a, &env),
        Cmd::Share(a) => stage::run(a, &env),
        Cmd::Imatrix(a) => measure::imatrix(a, &env),
        Cmd::Sensitivity(a) => measure::sensitivity(a, &env),
        Cmd::Distill(a) => train::distill(a, &env),
        Cmd::Finetune(a) => train::finetune(a, &env),
        Cmd::Eval(a) => eval::eval(a, &env),
        Cmd::Bench(a) => eval::bench(a, &env),
        Cmd::Compare(a) => compare::run(a, &env),
        Cmd::Optimize(a) => optimize::run(a, &env),
        Cmd::Export(a) => export::run(a, &env),
        Cmd::Verify(a) => verify::run(a, &env),
        Cmd::Serve(a) => serve::run(a, &env),
        Cmd::Machine(a) => machine::run(a),
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`whittle ... | head`) is not a failure.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            // Libraries name options as configs spell them; show them as this CLI's flags.
            eprintln!("error: {}", cmd::flags(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
