//! What the search aims at: the quality metric and how far it may move (`--max-drop`), the objective it
//! minimises or maximises, and the time it may take.

use serde::{Deserialize, Serialize};
use whittle_core::InvalidOption;
use whittle_eval::Metrics;

use crate::config::{EvalConfig, Task};
use crate::Result;

/// The quality metric a search holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Perplexity on WikiText-2 test (decoders).
    Ppl,
    /// Mean KL divergence from the original model on WikiText-2 test (decoders), nats.
    Kld,
    /// Last-word accuracy (decoders).
    Cloze,
    /// STS-B test Spearman ×100 (encoders).
    Sts,
    /// SST-2 probe accuracy (encoders).
    Sst2,
}

impl Metric {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ppl" => Self::Ppl,
            "kld" => Self::Kld,
            "cloze" => Self::Cloze,
            "sts" => Self::Sts,
            "sst2" => Self::Sst2,
            _ => {
                return Err(
                    InvalidOption::new("metric", s, "valid: ppl, kld, cloze (decoders); sts, sst2 (encoders)").into()
                )
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ppl => "ppl",
            Self::Kld => "kld",
            Self::Cloze => "cloze",
            Self::Sts => "sts",
            Self::Sst2 => "sst2",
        }
    }

    /// The default metric of a family.
    pub fn default_for(decoder: bool) -> Self {
        if decoder {
            Self::Ppl
        } else {
            Self::Sts
        }
    }

    /// Refuses a metric that does not fit the model (STS on a decoder, perplexity on an encoder).
    pub fn check_fits(self, decoder: bool, family: &str) -> Result<()> {
        let for_decoders = matches!(self, Self::Ppl | Self::Kld | Self::Cloze);
        if for_decoders != decoder {
            let fits = if decoder { "ppl, kld, cloze" } else { "sts, sst2" };
            return Err(InvalidOption::new(
                "metric",
                self.name(),
                format!("does not apply to a {family} model; use {fits}"),
            )
            .into());
        }
        Ok(())
    }

    pub fn lower_is_better(self) -> bool {
        matches!(self, Self::Ppl | Self::Kld)
    }

    /// The figure in `m`.
    pub fn value(self, m: &Metrics) -> Option<f64> {
        match self {
            Self::Ppl => m.ppl,
            Self::Kld => m.kld_mean,
            Self::Cloze => m.cloze_acc,
            Self::Sts => m.sts_spearman,
            Self::Sst2 => m.sst2_acc,
        }
    }

    /// The evaluation that gives the figure; `windows` limits perplexity / KL / cloze to a prefix of the
    /// test split (None: the whole protocol).
    pub fn eval_config(self, windows: Option<usize>) -> EvalConfig {
        let task = match self {
            Self::Ppl | Self::Kld => Task::Ppl,
            Self::Cloze => Task::Cloze,
            Self::Sts => Task::Sts,
            Self::Sst2 => Task::Classify,
        };
        EvalConfig { task: Some(task), chunks: windows, ..Default::default() }
    }
}

/// How far the metric may move from the baseline: relative (`1%`, the default unit) or absolute in the
/// metric's own unit (`0.5pt`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxDrop {
    /// A fraction of the baseline (0.01 = 1%).
    Relative(f64),
    /// Points of the metric (STS points, perplexity, nats of KL).
    Absolute(f64),
}

impl MaxDrop {
    /// `1%`, `1` (= 1%), `0.5pt`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| InvalidOption::new("max_drop", s, why.to_string());
        let t = s.trim();
        let (num, abs) = if let Some(n) = t.strip_suffix("pt") {
            (n, true)
        } else if let Some(n) = t.strip_suffix('%') {
            (n, false)
        } else {
            (t, false)
        };
        let v: f64 = num.trim().parse().map_err(|_| bad("expected a number like 1%, 0.5% or 0.5pt"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(bad("must be a finite number >= 0").into());
        }
        Ok(if abs { Self::Absolute(v) } else { Self::Relative(v / 100.0) })
    }

    /// The worst acceptable value of `metric` given its baseline value.
    pub fn threshold(self, metric: Metric, base: f64) -> Result<f64> {
        let sign = if metric.lower_is_better() { 1.0 } else { -1.0 };
        match self {
            Self::Relative(_) if metric == Metric::Kld => Err(InvalidOption::new(
                "max_drop",
                self,
                "KL divergence is 0 for the original model: give an absolute bound in nats, e.g. 0.05pt",
            )
            .into()),
            Self::Relative(r) => Ok(base + sign * r * base.abs()),
            Self::Absolute(a) => Ok(base + sign * a),
        }
    }
}

impl std::fmt::Display for MaxDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Relative(r) => write!(f, "{}%", r * 100.0),
            Self::Absolute(a) => write!(f, "{a}pt"),
        }
    }
}

/// Whether `value` meets `threshold` for `metric`.
pub fn meets(metric: Metric, value: f64, threshold: f64) -> bool {
    if metric.lower_is_better() {
        value <= threshold
    } else {
        value >= threshold
    }
}

/// The drop of `value` from `base`, in the metric's direction (positive = worse), relative and absolute.
pub fn drop(metric: Metric, value: f64, base: f64) -> (f64, f64) {
    let abs = if metric.lower_is_better() { value - base } else { base - value };
    (abs / base.abs().max(f64::MIN_POSITIVE), abs)
}

/// What the search optimises among the models that meet the goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Bytes of the model on disk (smaller is better).
    Size,
    /// Batch-1 latency: encoder p50 ms, decoder ms per generated token (smaller is better).
    Latency,
    /// Bytes of the weights held in memory (smaller is better).
    Memory,
    /// Sentences/s at the bench batch (encoders), prompt tokens/s (decoders) (larger is better).
    Throughput,
}

impl Objective {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "size" => Self::Size,
            "latency" => Self::Latency,
            "memory" => Self::Memory,
            "throughput" => Self::Throughput,
            _ => return Err(InvalidOption::new("objective", s, "valid: size, latency, memory, throughput").into()),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Latency => "latency",
            Self::Memory => "memory",
            Self::Throughput => "throughput",
        }
    }

    pub fn maximise(self) -> bool {
        self == Self::Throughput
    }

    /// Whether the objective needs the speed benchmark.
    pub fn needs_speed(self) -> bool {
        matches!(self, Self::Latency | Self::Throughput)
    }

    /// The figure of a measured trial.
    pub fn value(self, f: &Figures) -> Option<f64> {
        match self {
            Self::Size => Some(f.bytes as f64),
            Self::Memory => Some(f.memory_bytes as f64),
            Self::Latency => f.latency_ms,
            Self::Throughput => f.throughput,
        }
    }

    /// `a` is better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        if self.maximise() {
            a > b
        } else {
            a < b
        }
    }

    pub fn unit(self, decoder: bool) -> &'static str {
        match (self, decoder) {
            (Self::Size | Self::Memory, _) => "MB",
            (Self::Latency, false) => "ms (p50, batch 1)",
            (Self::Latency, true) => "ms/token",
            (Self::Throughput, false) => "sentences/s",
            (Self::Throughput, true) => "prompt tokens/s",
        }
    }
}

/// One model's figures as the search records them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// The metric's value at the search's fidelity.
    pub quality: f64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Bytes of the weights in memory.
    pub memory_bytes: u64,
    /// Encoder p50 batch-1 ms, or decoder ms per generated token.
    pub latency_ms: Option<f64>,
    /// Encoder sentences/s, or decoder prompt tokens/s.
    pub throughput: Option<f64>,
    /// Every figure the evaluation and the benchmark gave.
    pub metrics: Metrics,
}

/// Seconds from `45m`, `1h`, `90s` or `90` (seconds); `option` names the option in errors.
pub fn parse_duration(s: &str, option: &'static str) -> Result<f64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1.0),
        Some('m') => (&t[..t.len() - 1], 60.0),
        Some('h') => (&t[..t.len() - 1], 3600.0),
        _ => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v * mul),
        _ => Err(InvalidOption::new(option, s, "expected a positive duration like 45m, 1h or 90s").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_drop_parses_relative_and_absolute_and_refuses_bad_numbers() {
        assert_eq!(MaxDrop::parse("1%").unwrap(), MaxDrop::Relative(0.01));
        assert_eq!(MaxDrop::parse("5").unwrap(), MaxDrop::Relative(0.05));
        assert_eq!(MaxDrop::parse("0.5pt").unwrap(), MaxDrop::Absolute(0.5));
        for bad in ["-1%", "abc", "nan%", "", "1pt%"] {
            let e = MaxDrop::parse(bad).unwrap_err().to_string();
            assert!(e.contains("max_drop"), "{bad}: {e}");
        }
    }

    #[test]
    fn thresholds_follow_the_metric_direction() {
        let t = MaxDrop::Relative(0.05).threshold(Metric::Ppl, 20.0).unwrap();
        assert!((t - 21.0).abs() < 1e-12);
        let t = MaxDrop::Absolute(1.0).threshold(Metric::Sts, 82.0).unwrap();
        assert!((t - 81.0).abs() < 1e-12);
        assert!(meets(Metric::Sts, 81.5, t) && !meets(Metric::Sts, 80.9, t));
        assert!(MaxDrop::Relative(0.01).threshold(Metric::Kld, 0.0).is_err());
        let (rel, abs) = drop(Metric::Ppl, 22.0, 20.0);
        assert!((rel - 0.1).abs() < 1e-12 && (abs - 2.0).abs() < 1e-12);
    }

    #[test]
    fn metrics_must_fit_the_family() {
        assert!(Metric::Sts.check_fits(true, "llama").unwrap_err().to_string().contains("does not apply"));
        assert!(Metric::Ppl.check_fits(false, "bert").is_err());
        assert!(Metric::Kld.check_fits(true, "llama").is_ok());
        assert_eq!(parse_duration("45m", "budget").unwrap(), 2700.0);
        assert!(parse_duration("0s", "budget").is_err());
    }
}
