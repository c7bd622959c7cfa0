//! One module per command (as cargo does); this module holds the argument groups they share and the few
//! helpers every command uses: opening a model, progress bars, the stage runner and report printing.

pub mod compare;
pub mod convert;
pub mod embed;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod machine;
pub mod measure;
pub mod optimize;
pub mod serve;
pub mod stage;
pub mod train;
pub mod verify;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;
use whittle_models::{load, LoadOptions, Loaded};
use whittle_pipeline::{Ctx, Report};

/// MODEL: an HF directory, a .gguf file, or an `org/name` hub id in the local HF cache.
#[derive(clap::Args, Clone)]
pub struct ModelArg {
    /// HF directory, .gguf file, or `org/name` from the local HF cache
    pub model: String,
    /// Use this tokenizer.json instead of the model's own
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Run GGUF block-quantized weights dequantized to f32 (default: in their block format, as llama.cpp)
    #[arg(long)]
    pub dequantize: bool,
}

/// Where a command writes its model.
#[derive(clap::Args, Clone)]
pub struct OutputArgs {
    /// Output directory (written atomically)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// If another whittle process is writing the same output, wait for it instead of failing
    #[arg(long)]
    pub wait: bool,
}

impl OutputArgs {
    /// Claims the output (before any work): refused if it exists without --force, or if another run is
    /// writing it (unless --wait). Hold the guard until the output is written.
    pub fn claim(&self) -> Result<whittle_pipeline::output::Claim> {
        Ok(whittle_pipeline::output::check_exclusive(&self.output, self.force, self.wait)?)
    }
}

/// Run options every command takes (global flags).
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Worker threads for the tensor engine (default: every core)
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Force the integer kernels to one implementation (default: the best this CPU has)
    #[arg(long, global = true, value_enum)]
    pub kernel: Option<KernelArg>,
    /// Quantize block layers' activations per 32 values even for K-quants, which llama.cpp runs against one
    /// scale per 256 (finer: slightly lower perplexity than llama.cpp on the same file)
    #[arg(long, global = true)]
    pub fine_activations: bool,
    /// Run block layers (GGUF types, wNa16 groups) against f32 activations, their weights dequantized to f32
    /// (what a16 means and ONNX Runtime's MatMulNBits computes; 8× the 4-bit weights' memory, slower); with
    /// `export --format onnx`, 4-bit layers take f32 activations in the graph too
    #[arg(long, global = true)]
    pub float_activations: bool,
    /// Keep dense weights and the token embeddings in this dtype (default: f16 and bf16 weights stay 16-bit
    /// as stored, others f32); with `convert`, also the output's weight dtype (default there: f32)
    #[arg(long, global = true, value_enum)]
    pub dtype: Option<DtypeArg>,
}

/// `--dtype`.
#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DtypeArg::F32 => candle_core::DType::F32,
            DtypeArg::F16 => candle_core::DType::F16,
            DtypeArg::Bf16 => candle_core::DType::BF16,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KernelArg {
    Ref,
    Avx2,
    Avx512,
}

/// What every command needs from the global flags: how models are loaded and run.
pub struct Env {
    /// Every model this process loads runs with it.
    pub run: whittle_core::RunConfig,
    /// `--json`: notes and schedule lines go to stderr, stdout holds the JSON alone.
    pub json: bool,
    /// `--dtype`: the dtype dense weights are kept in (`None`: as stored, f16/bf16 16-bit, others f32).
    pub dtype: Option<candle_core::DType>,
}

impl RunArgs {
    /// Checks the flags and sizes the thread pool (before any tensor work starts).
    pub fn env(&self) -> Result<Env> {
        match self.threads {
            Some(0) => anyhow::bail!("--threads 0: must be at least 1"),
            // candle sizes its thread pools from RAYON_NUM_THREADS; set it before any tensor work starts.
            Some(n) => {
                let n = cap_threads(n);
                std::env::set_var("RAYON_NUM_THREADS", n.to_string())
            }
            // Pin candle's default (physical cores) once: without the variable candle recounts the cores by
            // parsing /proc/cpuinfo on every matmul (measured: ~3% of decoding time).
            None if std::env::var_os("RAYON_NUM_THREADS").is_none() => {
                std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string())
            }
            None => {}
        }
        // candle's own barrier pool (its elementwise ops) would be a second set of spinning workers beside
        // whittle's kernel pool: two pools on the same cores cost ~15% quiet and collapse under contention
        // (issue 22). With one thread it has no workers and runs those ops on the caller.
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        let kernel = self.kernel.map(|k| match k {
            KernelArg::Ref => whittle_kernels::Isa::Ref,
            KernelArg::Avx2 => whittle_kernels::Isa::Avx2,
            KernelArg::Avx512 => whittle_kernels::Isa::Avx512Vnni,
        });
        if let Some(isa) = kernel.filter(|i| !i.supported()) {
            anyhow::bail!("--kernel {}: this CPU does not support it", isa.name());
        }
        let run = whittle_core::RunConfig {
            isa: kernel,
            fine_activations: self.fine_activations,
            float_activations: self.float_activations,
            ..Default::default()
        };
        Ok(Env { run, json: false, dtype: self.dtype.map(DtypeArg::dtype) })
    }
}

/// More threads than this multiple of the CPUs this process may use only add switching (and spawning
/// 100000 of them took minutes: issue 22).
pub const MAX_THREADS_PER_CPU: usize = 4;

/// `--threads n`, capped at [`MAX_THREADS_PER_CPU`] × the CPUs available to this process (affinity mask and
/// cgroup CPU quota, as `std::thread::available_parallelism` counts them), with a note when capped.
pub fn cap_threads(n: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let max = cpus * MAX_THREADS_PER_CPU;
    if n > max {
        eprintln!(
            "note: --threads {n} capped at {max} ({MAX_THREADS_PER_CPU} × the {cpus} CPUs available to this process)"
        );
        return max;
    }
    n
}

impl Env {
    /// How this run loads models (with `tokenizer` instead of the model's own, block formats dequantized or not).
    pub fn load_options(&self, tokenizer: Option<PathBuf>, dequantize: bool) -> LoadOptions {
        LoadOptions { tokenizer, dequantize, run: self.run.clone(), dtype: self.dtype }
    }

    /// Loads `m` with these run options.
    pub fn open(&self, m: &ModelArg) -> Result<Loaded> {
        let o = self.load_options(m.tokenizer.clone(), m.dequantize);
        load(&m.model, &o).with_context(|| format!("loading model `{}`", m.model))
    }

    /// The stage context of this run: progress bars on a terminal, notes on stderr, schedule lines on
    /// stdout (stderr with `--json`).
    pub fn ctx(&self) -> Ctx {
        let json = self.json;
        let step = move |line: &str| {
            let line = flags(line);
            if json {
                eprintln!("{line}")
            } else {
                println!("{line}")
            }
        };
        Ctx::new(|what| Box::new(progress_bar(what)), |line| eprintln!("{}", flags(line)), step)
    }
}

/// A library message with its options named as this CLI's flags (`option `group_size`` → `--group-size`).
pub fn flags(msg: &str) -> String {
    whittle_core::option_words(msg, |n| format!("--{}", n.replace('_', "-")))
}

/// A progress bar on stderr when it is a terminal; silent otherwise.
pub fn progress_bar(what: &str) -> impl FnMut(usize, usize) {
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

/// Prints a stage's report: pretty JSON, or its table, summary lines and where the model went.
pub fn print_report(r: &dyn Report, json: bool, wrote: Option<&std::path::Path>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r.to_json())?)?;
        return Ok(());
    }
    let table = r.table().render();
    if !table.is_empty() {
        writeln!(out, "{table}")?;
    }
    for line in r.summary() {
        writeln!(out, "{}", flags(&line))?;
    }
    if let Some(p) = wrote {
        writeln!(out, "wrote {}", p.display())?;
    }
    Ok(())
}
