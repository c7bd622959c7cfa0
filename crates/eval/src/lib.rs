//! whittle-eval: the measurements every compression decision rests on.
//!
//! Quality (`ppl` with KL divergence against a base, `cloze`, `sts`, `classify`) and speed, size and memory
//! (`bench`), with protocols chosen to match the peers' (llama.cpp, PyTorch, ONNX Runtime; see
//! `data/README.md`). Every function returns [`Metrics`], whose JSON keys are stable: later tools parse them.

pub mod bench;
pub mod classify;
pub mod cloze;
pub mod data;
pub mod error;
pub mod ppl;
pub mod stats;
pub mod sts;
pub mod sys;

pub use error::{Error, Result};

use serde::{Deserialize, Serialize};

/// Progress of a long measurement: `(done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// One model's measurements. Absent figures are left out of the JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    // --- perplexity (llama.cpp protocol) ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl_stderr: Option<f64>,
    /// Tokens scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<usize>,
    // --- against a base model ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl_ratio: Option<f64>,
    /// Mean KL(base ‖ model) per scored token, nats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld_p99: Option<f64>,
    /// % of scored positions where model and base pick the same top token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1_agree: Option<f64>,
    // --- other quality tasks (percentages) ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloze_acc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_spearman: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cos_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cos_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sst2_acc: Option<f64>,
    /// Items the task scored (sentence pairs, test rows, cloze lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
    // --- speed ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_per_s: Option<f64>,
    /// Encoder bench: whether each batch ran packed (real tokens only, attention per sentence) rather than
    /// padded to its longest sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<bool>,
    /// Encoder bench: whether the batches were formed from the corpus sorted by length (not the peers'
    /// protocol, which takes the sentences in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sorted_by_length: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_tok_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tg_tok_s: Option<f64>,
    /// (min, max) over repetitions of the figure above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_tok_s_range: Option<(f64, f64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tg_tok_s_range: Option<(f64, f64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_per_s_range: Option<(f64, f64)>,
    /// The figure of each timed repetition, in the order they ran (the median and range above come from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_per_s_reps: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_tok_s_reps: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tg_tok_s_reps: Option<Vec<f64>>,
    /// Streaming read bandwidth of this machine in GB/s, measured between the timed repetitions (`whittle
    /// machine --bandwidth`, in a child process); the best pass counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_gbps: Option<f64>,
    /// Decoding as a fraction of the bandwidth limit: `model_bytes` × `tg_tok_s` ÷ `mem_gbps`, with the weights
    /// as the file stores them (for a GGUF with a tied LM head, every byte is read once per token; it
    /// understates the fraction when the weights run wider than stored, `--dtype f32` / `--dequantize`, and
    /// overstates it for an untied embedding table, of which decoding reads one row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tg_bw_frac: Option<f64>,
    /// When each timed repetition started, in seconds from the start of the benchmark (`compare`: of all
    /// the models' benchmarks, which take turns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rep_starts_s: Option<Vec<f64>>,
    /// CPU other processes used during the timed repetitions, in cores on average (`/proc/stat`'s busy time
    /// less this process's): 1.0 = another process held a whole core throughout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_cpu: Option<f64>,
    /// The most any one repetition saw of [`Self::other_cpu`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_cpu_max: Option<f64>,
    /// Share of the machine's CPU time stolen by the hypervisor during the timed repetitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steal_frac: Option<f64>,
    // --- size and resources ---
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
    /// Bits per weight of the Linear layers as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpw: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    /// Process CPU time / wall time during the timed runs (2.0 = two cores busy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_util: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

impl Metrics {
    /// Fills every field of `self` that is empty from `other`.
    pub fn merge(&mut self, other: Metrics) {
        let a = serde_json::to_value(&*self).expect("serialisable");
        let b = serde_json::to_value(other).expect("serialisable");
        let (serde_json::Value::Object(mut a), serde_json::Value::Object(b)) = (a, b) else { unreachable!() };
        for (k, v) in b {
            a.entry(k).or_insert(v);
        }
        *self = serde_json::from_value(serde_json::Value::Object(a)).expect("same shape");
    }
}
