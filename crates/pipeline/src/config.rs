//! Every stage's options in one place — the schema of recipes and, with the `cli` feature, the CLI's
//! argument groups (one declaration: the same names, docs and defaults). Each struct deserialises with
//! `deny_unknown_fields`; `Default` gives the CLI's defaults.

use std::path::PathBuf;

use crate::Result;
use serde::{Deserialize, Serialize};
use whittle_eval::bench;

/// The calibration options (the CLI's `--calib`, `--calib-samples`, `--calib-seq-len`; a `[calibration]`
/// table in recipes). `None`: the default of the family and stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct CalibConfig {
    /// Calibration text (default: data/wikitext-2/wiki.valid.tokens, never the test split)
    #[cfg_attr(feature = "cli", arg(long))]
    pub calib: Option<PathBuf>,
    /// Calibration samples: windows of --calib-seq-len tokens (decoders: 16; 128 for GPTQ, 4 for Wanda, 2
    /// for sensitivity) or sentences (encoders: 256)
    #[cfg_attr(feature = "cli", arg(long))]
    pub calib_samples: Option<usize>,
    /// Tokens per calibration sample (decoders: 512, 256 for sensitivity; encoders: 128)
    #[cfg_attr(feature = "cli", arg(long))]
    pub calib_seq_len: Option<usize>,
}

/// What `eval` scores.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Perplexity (decoders), llama.cpp protocol; with --base, KL divergence
    Ppl,
    /// Last-word accuracy on a JSONL of {"text": ...} (decoders)
    Cloze,
    /// STS-B Spearman x100 (encoders); with --base, cosine to the base's embeddings
    Sts,
    /// SST-2 accuracy of a logistic-regression probe on frozen embeddings (encoders)
    Classify,
}

/// Options of [`evaluate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Task (default: ppl for decoders, sts for encoders)
    #[cfg_attr(feature = "cli", arg(long, value_enum))]
    pub task: Option<Task>,
    /// Data file (defaults: WikiText-2 test, the WikiText-2 cloze set, STS-B test, SST-2 dev)
    #[cfg_attr(feature = "cli", arg(long))]
    pub data: Option<PathBuf>,
    /// Tokens per perplexity chunk
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 512))]
    pub ctx: usize,
    /// Score only the first N chunks (ppl) or lines (cloze)
    #[cfg_attr(feature = "cli", arg(long))]
    pub chunks: Option<usize>,
    /// Encoder token cap (sts, classify)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub max_len: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { task: None, data: None, ctx: 512, chunks: None, max_len: 128 }
    }
}

/// Options of [`bench`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct BenchConfig {
    /// Encoder batch size
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub batch: usize,
    /// Encoder token cap
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub max_len: usize,
    /// Decoder prompt-processing length (llama-bench pp)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 512))]
    pub pp: usize,
    /// Decoder generated tokens (llama-bench tg)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub tg: usize,
    /// Timed repetitions (median reported)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 5))]
    pub reps: usize,
    /// Encoders: pad each batch to its longest sentence (as the peers run it) instead of packing its real
    /// tokens
    #[cfg_attr(feature = "cli", arg(long))]
    pub padded: bool,
    /// Encoders: form the batches from the sentences sorted by length instead of in order (not the peers'
    /// protocol; reported as `sorted_by_length`)
    #[cfg_attr(feature = "cli", arg(long))]
    pub sort_by_length: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        let o = bench::BenchOptions::default();
        Self {
            batch: o.batch,
            max_len: o.max_len,
            pp: o.pp,
            tg: o.tg,
            reps: o.reps,
            padded: o.layout == whittle_models::text::Layout::Padded,
            sort_by_length: o.sort_by_length,
        }
    }
}

impl BenchConfig {
    /// The benchmark options these flags choose.
    pub fn options(&self) -> bench::BenchOptions {
        bench::BenchOptions {
            batch: self.batch,
            max_len: self.max_len,
            pp: self.pp,
            tg: self.tg,
            reps: self.reps,
            layout: if self.padded {
                whittle_models::text::Layout::Padded
            } else {
                whittle_models::text::Layout::Packed
            },
            sort_by_length: self.sort_by_length,
            ..Default::default()
        }
    }
}

/// Options of `prune` (both kinds; the CLI flags of `whittle prune`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct PruneConfig {
    /// Unstructured / N:M criterion: magnitude, wanda, sparsegpt
    #[cfg_attr(feature = "cli", arg(long))]
    pub method: Option<String>,
    /// Fraction of each block Linear's weights set to zero, in [0, 1) (unstructured)
    #[cfg_attr(feature = "cli", arg(long))]
    pub sparsity: Option<f64>,
    /// unstructured, or N:M (N kept in every M consecutive inputs): 2:4, 4:8
    #[cfg_attr(feature = "cli", arg(long, default_value = "unstructured"))]
    pub pattern: String,
    /// Magnitude threshold per layer, or one over all block Linears
    #[cfg_attr(feature = "cli", arg(long, default_value = "layer"))]
    pub scope: String,
    /// Structured removal: fractions of each block's heads (KV groups) and FFN neurons, and a number of
    /// blocks chosen by block influence, e.g. heads=0.25,ffn=0.3,layers=2
    #[cfg_attr(feature = "cli", arg(long))]
    pub structured: Option<String>,
    /// Blocks to remove, e.g. 10,11 (instead of layers=N)
    #[cfg_attr(feature = "cli", arg(long))]
    pub drop_layers: Option<String>,
    /// Unit importance for --structured: activation (|W|·‖X‖ on calibration text), taylor (|w·∂L/∂w|,
    /// gradients of the LM loss on calibration text; decoders), l2 or l1 (weight norms)
    #[cfg_attr(feature = "cli", arg(long, default_value = "activation"))]
    pub importance: String,
    /// --structured: rank heads and neurons over all blocks (widths then differ per block) instead of
    /// removing the same fraction from each
    #[cfg_attr(feature = "cli", arg(long))]
    pub global: bool,
    /// SparseGPT: quantize the kept weights in the same pass to this grouped format (e.g. w4a16; stored
    /// dequantized)
    #[cfg_attr(feature = "cli", arg(long))]
    pub then_quantize: Option<String>,
    /// Weights per group for --then-quantize
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub group_size: usize,
    /// SparseGPT dampening
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.01))]
    pub damp: f64,
    /// How pruned Linears are stored: sparse (zeros not stored: N:M values + position codes, bitmap or
    /// CSR, run by the sparse kernel) or dense
    #[cfg_attr(feature = "cli", arg(long, default_value = "sparse"))]
    pub storage: String,
    /// Progressive pruning: sparsities (unstructured) or fractions of --structured to step through, e.g.
    /// 0.1,0.3,0.5; evaluates after each step
    #[cfg_attr(feature = "cli", arg(long))]
    pub schedule: Option<String>,
    /// With --schedule: stop at the first step whose quality drops more than this (e.g. 2%) and keep the
    /// last model within it
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_drop: Option<String>,
    /// With --schedule: WikiText-2 test windows of 512 tokens per evaluation (decoders); encoders use the
    /// STS-B test set
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4))]
    pub eval_windows: usize,
    /// Calibration text and budget
    #[cfg_attr(feature = "cli", command(flatten))]
    pub calibration: CalibConfig,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self {
            method: None,
            sparsity: None,
            pattern: "unstructured".into(),
            scope: "layer".into(),
            structured: None,
            drop_layers: None,
            importance: "activation".into(),
            global: false,
            then_quantize: None,
            group_size: 64,
            damp: 0.01,
            storage: "sparse".into(),
            schedule: None,
            max_drop: None,
            eval_windows: 4,
            calibration: CalibConfig::default(),
        }
    }
}

/// Options of `lowrank` (the CLI flags of `whittle lowrank`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct LowrankConfig {
    /// svd, asvd or svd-llm
    #[cfg_attr(feature = "cli", arg(long, default_value = "svd-llm"))]
    pub method: String,
    /// Keep this fraction of the block Linears' parameters (ranks allocated over all layers), in (0, 1]
    #[cfg_attr(feature = "cli", arg(long))]
    pub ratio: Option<f64>,
    /// Per layer, the smallest rank keeping this fraction of the singular-value energy, in (0, 1]
    #[cfg_attr(feature = "cli", arg(long))]
    pub energy: Option<f64>,
    /// The same rank in every layer
    #[cfg_attr(feature = "cli", arg(long))]
    pub rank: Option<usize>,
    /// Instead: factorise the queries and keys of every head jointly, so that the attention scores use
    /// R + 1 values per head (BERT-style encoders; --method svd-llm whitens, svd does not)
    #[cfg_attr(feature = "cli", arg(long))]
    pub attention_rank: Option<usize>,
    /// ASVD: exponent on the per-channel activation scale
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.5))]
    pub alpha: f64,
    /// SVD-LLM dampening of Σxᵀx (fraction of its mean diagonal)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.01))]
    pub damp: f64,
    /// Calibration text and budget
    #[cfg_attr(feature = "cli", command(flatten))]
    pub calibration: CalibConfig,
}

impl Default for LowrankConfig {
    fn default() -> Self {
        Self {
            method: "svd-llm".into(),
            ratio: None,
            energy: None,
            rank: None,
            attention_rank: None,
            alpha: 0.5,
            damp: 0.01,
            calibration: CalibConfig::default(),
        }
    }
}

/// Options of `share` (the CLI flags of `whittle share`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct ShareConfig {
    /// Groups of blocks sharing weights: ranges FIRST-LAST separated by commas (0-2,3-5 = {0,1,2}, {3,4,5}),
    /// `+` to join blocks that are not adjacent (0+2); or auto (adjacent blocks merged by weight similarity
    /// down to --unique)
    #[cfg_attr(feature = "cli", arg(long, default_value = "auto"))]
    pub groups: String,
    /// With --groups auto: unique blocks to keep (default: half the blocks)
    #[cfg_attr(feature = "cli", arg(long))]
    pub unique: Option<usize>,
    /// Shared weights: the group's mean, or its most central member
    #[cfg_attr(feature = "cli", arg(long, default_value = "mean"))]
    pub init: String,
    /// Also factorise the word embeddings to rank R (ALBERT's factorised embedding, BERT encoders): U·V with
    /// the subspace weighted by token counts in --calib
    #[cfg_attr(feature = "cli", arg(long))]
    pub embedding_rank: Option<usize>,
    /// Text whose token counts weight --embedding-rank (default: data/wikitext-2/wiki.valid.tokens)
    #[cfg_attr(feature = "cli", arg(long))]
    pub calib: Option<PathBuf>,
}

impl Default for ShareConfig {
    fn default() -> Self {
        Self { groups: "auto".into(), unique: None, init: "mean".into(), embedding_rank: None, calib: None }
    }
}

/// Options of `quantize` (the CLI flags of `whittle quantize`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct QuantizeConfig {
    /// Scheme: w8a8-dynamic, w8a8-static, w8a16, w4a16, w3a16, w2a16 (directory output), or a llama.cpp file
    /// type for -o NAME.gguf: f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s,
    /// q4_k_m, q5_k_s, q5_k_m, q6_k
    #[cfg_attr(feature = "cli", arg(long))]
    pub scheme: String,
    /// Per-layer scheme by regex on the layer name, e.g. 're:.*lm_head=w8a8-dynamic' (repeatable; last wins)
    #[cfg_attr(feature = "cli", arg(long = "override"))]
    #[serde(rename = "override")]
    pub overrides: Vec<String>,
    /// Quantize layers that are already quantized (from their dequantized weights)
    #[cfg_attr(feature = "cli", arg(long))]
    pub allow_requantize: bool,
    /// Weights per group for w4a16/w8a16 (a multiple of 32; layers it does not divide get the largest
    /// multiple of 32 below it that does, and the report says so)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub group_size: usize,
    /// Asymmetric groups for w4a16/w8a16: a zero point per group
    #[cfg_attr(feature = "cli", arg(long))]
    pub zero_point: bool,
    /// Calibration text and budget
    #[cfg_attr(feature = "cli", command(flatten))]
    pub calibration: CalibConfig,
    /// SmoothQuant strength alpha in [0, 1] (e.g. 0.5): migrate activation outliers into the weights first
    #[cfg_attr(feature = "cli", arg(long))]
    pub smoothquant: Option<f32>,
    /// How weight-only schemes round: rtn (plain rounding), gptq (layer by layer, Hessian error feedback) or
    /// awq (activation-aware per-channel scales searched per layer group, then rounding), awq-gptq (both)
    #[cfg_attr(feature = "cli", arg(long, default_value = "rtn"))]
    pub method: String,
    /// GPTQ dampening, a fraction of the Hessian's mean diagonal
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.01))]
    pub damp: f64,
    /// GPTQ act-order: columns by decreasing Hessian diagonal, with static groups (on by default with GPTQ,
    /// as llm-compressor does: it cuts RTN's perplexity increase several times more than plain order on
    /// LLaMA-style models; --act-order=false for the plain column order)
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true"))]
    pub act_order: Option<bool>,
    /// GPTQ: run the calibration forward in int8 (w8a8, about 2× faster on VNNI CPUs); the Hessians then see
    /// the inputs of an 8-bit-rounded model, at no cost in quality on SmolLM2. On by default with `--method
    /// gptq` (whose default is 128 calibration windows); --calib-int8=false calibrates in f32
    #[cfg_attr(feature = "cli", arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true"))]
    pub calib_int8: Option<bool>,
    /// w8a8-static activation range observer: minmax, percentile, mse, entropy
    #[cfg_attr(feature = "cli", arg(long, default_value = "minmax"))]
    pub observer: String,
    /// Percentile for --observer percentile
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 99.99))]
    pub percentile: f64,
    /// Mixed precision: pick a grouped format per block Linear from --candidates so the block Linears average
    /// at most this many bits per weight, minimising the predicted KL (weight-only schemes; --override wins)
    #[cfg_attr(feature = "cli", arg(long))]
    pub target_bpw: Option<f64>,
    /// Per-layer costs from `whittle sensitivity` (default: measure them now, on the calibration text)
    #[cfg_attr(feature = "cli", arg(long))]
    pub sensitivity: Option<PathBuf>,
    /// Candidate bit widths for --target-bpw (grouped by --group-size, --zero-point as given)
    #[cfg_attr(feature = "cli", arg(long, default_value = "8,4,3,2"))]
    pub candidates: String,
    /// Importance matrix (llama.cpp's GGUF imatrix format, from `whittle imatrix` or `llama-imatrix`): GGUF
    /// block types are quantized with ggml's importance-weighted quantizers, as llama-quantize does
    #[cfg_attr(feature = "cli", arg(long))]
    pub imatrix: Option<PathBuf>,
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        Self {
            scheme: String::new(),
            overrides: Vec::new(),
            allow_requantize: false,
            group_size: 128,
            zero_point: false,
            calibration: CalibConfig::default(),
            smoothquant: None,
            method: "rtn".into(),
            damp: 0.01,
            act_order: None,
            calib_int8: None,
            observer: "minmax".into(),
            percentile: 99.99,
            target_bpw: None,
            sensitivity: None,
            candidates: "8,4,3,2".into(),
            imatrix: None,
        }
    }
}

/// Training options both stages share (the CLI flags of `whittle distill` and `whittle finetune`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Training text (default: data/wikitext-2/wiki.valid.tokens; encoders: one sentence per line, default
    /// the STS-B dev and SST-2 dev sentences and the WikiText-2 valid lines)
    #[cfg_attr(feature = "cli", arg(long))]
    pub data: Option<PathBuf>,
    /// Output directory: the best student by evaluation (written atomically)
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub output: PathBuf,
    /// Tokens per training window
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 256))]
    pub seq_len: usize,
    /// Windows (decoders, default 4) or sentences (encoders, default 32) per micro-batch
    #[cfg_attr(feature = "cli", arg(long))]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub accum: usize,
    /// Peak learning rate (AdamW; default 2e-4 decoders, 1e-4 encoders)
    #[cfg_attr(feature = "cli", arg(long))]
    pub lr: Option<f64>,
    /// Warm-up steps (linear)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 10))]
    pub warmup: usize,
    /// Decay after warm-up: cosine or linear, to 10% of --lr
    #[cfg_attr(feature = "cli", arg(long, default_value = "cosine"))]
    pub decay: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.01))]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub clip: f64,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 200))]
    pub max_steps: usize,
    /// Stop after this much time: seconds, or with a unit (20m, 1h)
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_time: Option<String>,
    /// Stop at this step while the learning-rate schedule still spans --max-steps (to compare runs at the
    /// same step)
    #[cfg_attr(feature = "cli", arg(long))]
    pub stop_at: Option<usize>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Evaluate every N steps: PPL on the first --eval-windows WikiText-2 test windows of 512 (decoders),
    /// STS-B test Spearman (encoders)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 25))]
    pub eval_every: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4))]
    pub eval_windows: usize,
    /// Checkpoint every N steps
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 25))]
    pub ckpt_every: usize,
    /// Checkpoint directory (default: OUTPUT.ckpt)
    #[cfg_attr(feature = "cli", arg(long))]
    pub ckpt: Option<PathBuf>,
    /// Continue from the checkpoint (same flags)
    #[cfg_attr(feature = "cli", arg(long))]
    pub resume: bool,
    /// Stop after this many evaluations without improvement (0 = never)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub patience: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: None,
            output: PathBuf::new(),
            seq_len: 256,
            batch: None,
            accum: 1,
            lr: None,
            warmup: 10,
            decay: "cosine".into(),
            weight_decay: 0.01,
            clip: 1.0,
            max_steps: 200,
            max_time: None,
            stop_at: None,
            seed: 0,
            eval_every: 25,
            eval_windows: 4,
            ckpt_every: 25,
            ckpt: None,
            resume: false,
            patience: 0,
        }
    }
}

/// Distillation-only options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Teacher model
    #[cfg_attr(feature = "cli", arg(long))]
    pub teacher: String,
    /// Student model (e.g. the output of `whittle prune --structured`)
    #[cfg_attr(feature = "cli", arg(long))]
    pub student: Option<String>,
    /// Build the student from the teacher, keeping these blocks (DistilBERT's initialisation), e.g. 0,2,4
    #[cfg_attr(feature = "cli", arg(long))]
    pub keep_layers: Option<String>,
    /// Soft-target temperature
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4.0))]
    pub temperature: f64,
    /// Weight of the soft-target term; 1 − alpha goes to hard-label cross-entropy
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.7))]
    pub alpha: f64,
    /// Student:teacher block pairs for hidden-state MSE, e.g. 0:0,1:2 (default: uniform over depth)
    #[cfg_attr(feature = "cli", arg(long))]
    pub hidden_map: Option<String>,
    /// Weight of the hidden-state MSE (0 = off)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.0))]
    pub hidden_weight: f64,
    /// The training options (a `[train]` table in recipes)
    #[cfg_attr(feature = "cli", command(flatten))]
    pub train: TrainConfig,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            teacher: String::new(),
            student: None,
            keep_layers: None,
            temperature: 4.0,
            alpha: 0.7,
            hidden_map: None,
            hidden_weight: 0.0,
            train: TrainConfig::default(),
        }
    }
}

/// Fine-tuning with hard labels only (decoders; the baseline distillation must beat).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// The training options (a `[train]` table in recipes)
    #[cfg_attr(feature = "cli", command(flatten))]
    pub train: TrainConfig,
}

/// Options of `sensitivity` (the CLI flags of `whittle sensitivity`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct SensitivityConfig {
    /// Calibration text and budget (default: 2 windows of 256 tokens)
    #[cfg_attr(feature = "cli", command(flatten))]
    pub calibration: CalibConfig,
    /// Weights per group of the candidate formats
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub group_size: usize,
    /// Asymmetric candidate formats (a zero point per group)
    #[cfg_attr(feature = "cli", arg(long))]
    pub zero_point: bool,
    /// Candidate bit widths
    #[cfg_attr(feature = "cli", arg(long, default_value = "8,4,3,2"))]
    pub candidates: String,
    /// Bit width at which each layer's KL is measured
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub probe_bits: u32,
}

impl Default for SensitivityConfig {
    fn default() -> Self {
        Self {
            calibration: CalibConfig::default(),
            group_size: 64,
            zero_point: false,
            candidates: "8,4,3,2".into(),
            probe_bits: 3,
        }
    }
}

/// Options of `imatrix` (the CLI flags of `whittle imatrix`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct ImatrixConfig {
    /// Calibration text and budget (default: 16 windows of 512 tokens)
    #[cfg_attr(feature = "cli", command(flatten))]
    pub calibration: CalibConfig,
    /// Also the output head's inputs (the tied embedding table when the model has no separate head), which
    /// llama-imatrix leaves out: then the head / embedding is quantized importance-weighted too
    #[cfg_attr(feature = "cli", arg(long))]
    pub head: bool,
}

/// Options of `optimize` (the CLI flags of `whittle optimize`): a recipe, or a search for the smallest /
/// fastest model within a quality tolerance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct OptimizeConfig {
    /// Run the stages of this TOML recipe in order (see examples/recipes/)
    #[cfg_attr(feature = "cli", arg(long))]
    pub recipe: Option<PathBuf>,
    /// Search at a deployment level: light (post-training quantization), medium (+ mixed precision,
    /// pruning, low rank), full (+ structured pruning and sharing with distillation)
    #[cfg_attr(feature = "cli", arg(long))]
    pub level: Option<String>,
    /// Quality the search may lose: relative (1%, the default unit) or absolute in the metric's unit (0.5pt);
    /// default by level: light 1%, medium 2%, full 3%
    #[cfg_attr(feature = "cli", arg(long, allow_hyphen_values = true))]
    pub max_drop: Option<String>,
    /// Quality metric: ppl, kld, cloze (decoders), sts, sst2 (encoders); default ppl / sts
    #[cfg_attr(feature = "cli", arg(long))]
    pub metric: Option<String>,
    /// What to optimise among the models that meet the goal: size, latency, memory, throughput
    #[cfg_attr(feature = "cli", arg(long, default_value = "size"))]
    pub objective: String,
    /// Time the search may take (e.g. 45m); default by level: light 10m, medium 20m, full 40m
    #[cfg_attr(feature = "cli", arg(long))]
    pub budget: Option<String>,
    /// Stop after this many measured candidates
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_trials: Option<usize>,
    /// Seed of the search's order among equal predictions (and of the trainings it runs)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// WikiText-2 test windows of 512 tokens per quality measurement of the search (decoders)
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub eval_windows: usize,
    /// Peers' figures (JSON lines, as ../shared/peers/*.py print them) to show in the report
    #[cfg_attr(feature = "cli", arg(long))]
    pub peers: Option<PathBuf>,
    /// Replace an output directory that holds another run
    #[cfg_attr(feature = "cli", arg(long))]
    pub force: bool,
}

/// Every numeric option's range, checked before any model or data is read (issue 22: values out of range
/// were ignored, or refused only after minutes of work). Each `check_ranges` names the option as configs
/// spell it; `Stage::check` (and the measuring commands) call them first.
mod ranges {
    use whittle_core::InvalidOption;

    use crate::Result;

    pub fn at_least(name: &'static str, v: usize, min: usize) -> Result<()> {
        if v < min {
            return Err(InvalidOption::new(name, v, format!("must be at least {min}")).into());
        }
        Ok(())
    }

    pub fn opt_at_least(name: &'static str, v: Option<usize>, min: usize) -> Result<()> {
        v.map_or(Ok(()), |v| at_least(name, v, min))
    }

    /// `min <= v <= max` when given.
    pub fn opt_between(name: &'static str, v: Option<usize>, min: usize, max: usize) -> Result<()> {
        match v {
            Some(v) if v > max => Err(InvalidOption::new(name, v, format!("must be at most {max}")).into()),
            _ => opt_at_least(name, v, min),
        }
    }

    /// `lo <= v <= hi` (with `open_lo`: `lo < v`), and finite.
    pub fn real(name: &'static str, v: f64, lo: f64, hi: f64, open_lo: bool) -> Result<()> {
        let ok = v.is_finite() && v <= hi && if open_lo { v > lo } else { v >= lo };
        if !ok {
            let (l, h) =
                (if open_lo { "(" } else { "[" }, if hi.is_infinite() { "∞)".to_string() } else { format!("{hi}]") });
            return Err(InvalidOption::new(name, v, format!("must be in {l}{lo}, {h}")).into());
        }
        Ok(())
    }

    pub fn opt_real(name: &'static str, v: Option<f64>, lo: f64, hi: f64, open_lo: bool) -> Result<()> {
        v.map_or(Ok(()), |v| real(name, v, lo, hi, open_lo))
    }

    /// An input file named by an option must be a readable file (checked before any model is loaded).
    pub fn input_file(name: &'static str, p: Option<&std::path::Path>) -> Result<()> {
        let Some(p) = p else { return Ok(()) };
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(InvalidOption::new(name, p.display(), "is a directory, expected a file").into()),
            Err(e) => Err(InvalidOption::new(name, p.display(), e.to_string()).into()),
        }
    }
}

pub(crate) use ranges::input_file;
use ranges::{at_least, opt_at_least, opt_between, opt_real, real};

/// The most calibration windows (decoders) or sentences (encoders) a stage takes: far above what any method
/// needs (llm-compressor's default is 512) and far below what would overflow the text budget's arithmetic.
pub const MAX_CALIB_SAMPLES: usize = 65_536;

impl CalibConfig {
    pub fn check_ranges(&self) -> Result<()> {
        opt_between("calib_samples", self.calib_samples, 1, MAX_CALIB_SAMPLES)?;
        opt_at_least("calib_seq_len", self.calib_seq_len, 2)?;
        input_file("calib", self.calib.as_deref())
    }
}

impl EvalConfig {
    pub fn check_ranges(&self) -> Result<()> {
        input_file("data", self.data.as_deref())?;
        // One scored token needs a chunk of at least two (perplexity scores its second half).
        at_least("ctx", self.ctx, 2)?;
        opt_at_least("chunks", self.chunks, 1)?;
        at_least("max_len", self.max_len, 3)
    }
}

impl BenchConfig {
    pub fn check_ranges(&self) -> Result<()> {
        at_least("batch", self.batch, 1)?;
        at_least("max_len", self.max_len, 3)?;
        at_least("pp", self.pp, 1)?;
        at_least("tg", self.tg, 1)?;
        at_least("reps", self.reps, 1)
    }
}

impl PruneConfig {
    pub fn check_ranges(&self) -> Result<()> {
        opt_real("sparsity", self.sparsity, 0.0, 1.0, false)?;
        if self.sparsity == Some(1.0) {
            return Err(
                whittle_core::InvalidOption::new("sparsity", 1, "must be below 1 (nothing would be left)").into()
            );
        }
        at_least("group_size", self.group_size, 1)?;
        real("damp", self.damp, 0.0, 1.0, true)?;
        at_least("eval_windows", self.eval_windows, 1)
    }
}

impl LowrankConfig {
    pub fn check_ranges(&self) -> Result<()> {
        opt_real("ratio", self.ratio, 0.0, 1.0, true)?;
        opt_real("energy", self.energy, 0.0, 1.0, true)?;
        opt_at_least("rank", self.rank, 1)?;
        opt_at_least("attention_rank", self.attention_rank, 1)?;
        real("alpha", self.alpha, 0.0, 4.0, false)?;
        real("damp", self.damp, 0.0, 1.0, true)
    }
}

impl ShareConfig {
    pub fn check_ranges(&self) -> Result<()> {
        opt_at_least("unique", self.unique, 1)?;
        opt_at_least("embedding_rank", self.embedding_rank, 1)
    }
}

impl QuantizeConfig {
    pub fn check_ranges(&self) -> Result<()> {
        opt_real("smoothquant", self.smoothquant.map(f64::from), 0.0, 1.0, false)?;
        real("damp", self.damp, 0.0, 1.0, true)?;
        real("percentile", self.percentile, 0.0, 100.0, true)?;
        opt_real("target_bpw", self.target_bpw, 0.0, 32.0, true)
    }
}

impl TrainConfig {
    pub fn check_ranges(&self) -> Result<()> {
        input_file("data", self.data.as_deref())?;
        at_least("seq_len", self.seq_len, 2)?;
        opt_at_least("batch", self.batch, 1)?;
        at_least("accum", self.accum, 1)?;
        opt_real("lr", self.lr, 0.0, 1.0, true)?;
        real("weight_decay", self.weight_decay, 0.0, 1.0, false)?;
        real("clip", self.clip, 0.0, f64::INFINITY, false)?;
        at_least("max_steps", self.max_steps, 1)?;
        opt_at_least("stop_at", self.stop_at, 1)?;
        at_least("eval_every", self.eval_every, 1)?;
        at_least("eval_windows", self.eval_windows, 1)?;
        at_least("ckpt_every", self.ckpt_every, 1)
    }
}

impl DistillConfig {
    pub fn check_ranges(&self) -> Result<()> {
        real("temperature", self.temperature, 0.0, f64::INFINITY, true)?;
        real("alpha", self.alpha, 0.0, 1.0, false)?;
        real("hidden_weight", self.hidden_weight, 0.0, f64::INFINITY, false)?;
        self.train.check_ranges()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every numeric option out of range is refused by its config, naming the option.
    #[test]
    fn numeric_options_out_of_range_are_named() {
        let q = |f: fn(&mut QuantizeConfig)| {
            let mut c = QuantizeConfig { scheme: "w8a8-dynamic".into(), ..Default::default() };
            f(&mut c);
            c.check_ranges().unwrap_err().to_string()
        };
        assert!(q(|c| c.smoothquant = Some(5.0)).starts_with("option `smoothquant` 5: must be in [0, 1]"));
        assert!(q(|c| c.damp = 0.0).starts_with("option `damp` 0: must be in (0, 1]"));
        assert!(q(|c| c.percentile = f64::NAN).starts_with("option `percentile` NaN"));
        let e = EvalConfig { ctx: 1, ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.starts_with("option `ctx` 1: must be at least 2"), "{e}");
        let e = BenchConfig { reps: 0, ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.starts_with("option `reps` 0"), "{e}");
        let e = PruneConfig { sparsity: Some(1.0), ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.contains("option `sparsity`"), "{e}");
        let e = LowrankConfig { ratio: Some(1.5), ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.starts_with("option `ratio` 1.5: must be in (0, 1]"), "{e}");
        let e = ShareConfig { unique: Some(0), ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.starts_with("option `unique` 0"), "{e}");
        let e = DistillConfig { temperature: 0.0, ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.starts_with("option `temperature` 0"), "{e}");
        let e = TrainConfig { accum: 0, ..Default::default() }.check_ranges().unwrap_err().to_string();
        assert!(e.starts_with("option `accum` 0"), "{e}");
        // The defaults are all in range.
        QuantizeConfig::default().check_ranges().unwrap();
        PruneConfig::default().check_ranges().unwrap();
        LowrankConfig::default().check_ranges().unwrap();
        DistillConfig::default().check_ranges().unwrap();
        EvalConfig::default().check_ranges().unwrap();
        BenchConfig::default().check_ranges().unwrap();
    }
}
