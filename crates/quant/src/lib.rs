//! whittle-quant: quantization passes over the Linear seam, every scheme and method:
//!
//! - `w8a8-dynamic` (int8 weights per output channel, activations quantized per token at run time, as
//!   PyTorch's and ONNX Runtime's `quantize_dynamic`) and `w8a8-static` (calibrated activation ranges:
//!   min/max, percentile, MSE or entropy observers), optionally after [`smooth`] (SmoothQuant);
//! - weight-only `w8a16` / `w4a16` / `w3a16` / `w2a16` in groups, rounded by RTN, [`awq`], [`gptq`] (over the
//!   calibration engine's sequential mode, [`layerwise`]) or both; mixed precision per layer under a bit
//!   budget from measured sensitivities ([`mixed`]);
//! - llama.cpp's GGUF file types written tensor by tensor ([`gguf_out`], ggml's quantizers in [`kquant`],
//!   importance matrices in [`imatrix`]).
//!
//! Embeddings and heads (`lm_head`, BERT's pooler) stay in float unless an override regex (option
//! `override`) names them, as users of those tools expect.

pub mod awq;
/// The calibration engine's observe mode (moved to `whittle-calib`; the old path stays).
pub use whittle_calib::observe as calib;
pub mod gguf_out;
pub mod gptq;
pub mod imatrix;
pub mod kquant;
pub mod layerwise;
pub mod mixed;
pub mod smooth;

use std::collections::BTreeMap;

use whittle_core::observe::ActStats;

use std::time::Instant;

use regex::Regex;
use serde::Serialize;
use whittle_core::{InvalidOption, Linear};
use whittle_kernels::int8::PackedI8;
use whittle_models::Model;

/// Errors of the quantization passes, naming the scheme, option or layer (options as configs spell them, see
/// [`whittle_core::InvalidOption`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown scheme `{0}` (valid: {valid})", valid = Scheme::VALID)]
    UnknownScheme(String),
    /// Option `override` not of the form REGEX=VALUE.
    #[error(transparent)]
    BadOverride(InvalidOption),
    /// Option `override` with a regex that does not compile.
    #[error(transparent)]
    BadRegex(InvalidOption),
    #[error("layer `{0}` holds NaN or Inf weights")]
    NonFinite(String),
    #[error("layer `{0}` is already quantized ({1}); option `allow_requantize` quantizes it again from its dequantized weights")]
    AlreadyQuantized(String, String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Option(#[from] InvalidOption),
    #[error(transparent)]
    Calib(#[from] whittle_calib::Error),
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Format(#[from] whittle_formats::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A weight representation a pass can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scheme {
    /// Leave the layer as it is.
    Keep,
    /// int8 weights per output channel, int8 activations per token at run time.
    W8A8Dynamic,
    /// int8 weights per output channel; activations with one scale and zero point from calibration.
    W8A8Static,
    /// Grouped weight-only integers (`w8a16`, `w4a16`): round-to-nearest per group of option `group_size`.
    WeightOnly { bits: u32 },
}

impl Scheme {
    pub const VALID: &'static str =
        "w8a8-dynamic, keep (directory output); GGUF file types for a NAME.gguf output: q8_0, q4_k_m, q6_k, … (see the help)";

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "w8a8-dynamic" | "w8a8" | "int8-dynamic" => Ok(Scheme::W8A8Dynamic),
            "w8a8-static" | "int8-static" => Ok(Scheme::W8A8Static),
            "w8a16" | "int8-weight-only" => Ok(Scheme::WeightOnly { bits: 8 }),
            "w4a16" | "int4-weight-only" => Ok(Scheme::WeightOnly { bits: 4 }),
            "w3a16" => Ok(Scheme::WeightOnly { bits: 3 }),
            "w2a16" => Ok(Scheme::WeightOnly { bits: 2 }),
            "keep" | "f32" | "none" => Ok(Scheme::Keep),
            _ => Err(Error::UnknownScheme(s.into())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Keep => "keep",
            Scheme::W8A8Dynamic => "w8a8-dynamic",
            Scheme::W8A8Static => "w8a8-static",
            Scheme::WeightOnly { bits: 8 } => "w8a16",
            Scheme::WeightOnly { bits: 3 } => "w3a16",
            Scheme::WeightOnly { bits: 2 } => "w2a16",
            Scheme::WeightOnly { .. } => "w4a16",
        }
    }
}

/// Splits an override (option `override`) `REGEX=VALUE` into the regex, anchored to the whole layer name (a `re:` prefix is
/// accepted and ignored), and the value.
pub(crate) fn parse_override(o: &str) -> Result<(Regex, &str)> {
    let (pat, value) = o.rsplit_once('=').ok_or_else(|| {
        let e = "expected REGEX=SCHEME, e.g. 're:.*lm_head=w8a8-dynamic' or '.*pooler.*=keep'";
        Error::BadOverride(InvalidOption::new("override", format!("`{o}`"), e))
    })?;
    let pat = pat.strip_prefix("re:").unwrap_or(pat);
    let re = Regex::new(&format!("^(?:{pat})$")).map_err(|e| {
        Error::BadRegex(InvalidOption::new("override", format!("`{pat}`"), format!("invalid regex: {e}")))
    })?;
    Ok((re, value))
}

/// Which scheme each Linear gets: `default` for block Linears, overrides by regex on the layer name
/// (the last matching override wins; a `re:` prefix is accepted and ignored).
#[derive(Debug, Clone)]
pub struct Plan {
    pub default: Scheme,
    pub overrides: Vec<(Regex, Scheme)>,
    /// Weights per group of the weight-only schemes (a multiple of 32).
    pub group_size: usize,
    /// Asymmetric weight-only groups (a zero point per group).
    pub zero_point: bool,
    /// How `w8a8-static` picks each activation range from the calibration statistics.
    pub observer: Observer,
}

/// Range observers of `w8a8-static`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observer {
    /// The observed minimum and maximum.
    MinMax,
    /// The given percentile at each end (e.g. 99.99).
    Percentile(f64),
    /// The range (a shrink of min/max) with the least expected quantization MSE.
    Mse,
    /// TensorRT's entropy calibration: the |x| threshold minimising KL divergence.
    Entropy,
}

impl Observer {
    pub fn parse(s: &str, percentile: f64) -> Result<Self> {
        match s {
            "minmax" => Ok(Observer::MinMax),
            "percentile" if percentile > 50.0 && percentile <= 100.0 => Ok(Observer::Percentile(percentile)),
            "percentile" => Err(InvalidOption::new("percentile", percentile, "must be in (50, 100]").into()),
            "mse" => Ok(Observer::Mse),
            "entropy" | "kl" => Ok(Observer::Entropy),
            _ => Err(InvalidOption::new("observer", s, "valid: minmax, percentile, mse, entropy").into()),
        }
    }

    /// The activation range [lo, hi] (lo ≤ 0 ≤ hi) for the statistics `s`.
    pub fn range(self, s: &ActStats) -> (f32, f32) {
        let (lo, hi) = (s.min.min(0.0), s.max.max(0.0));
        match self {
            Observer::MinMax => (lo, hi),
            Observer::Percentile(p) => {
                let q = p / 100.0;
                (s.quantile(1.0 - q).clamp(lo, 0.0), s.quantile(q).clamp(0.0, hi))
            }
            Observer::Mse => {
                let mut best = (f64::INFINITY, lo, hi);
                for i in 0..100 {
                    let f = 1.0 - i as f32 * 0.01;
                    let e = s.quant_mse(lo * f, hi * f);
                    if e < best.0 {
                        best = (e, lo * f, hi * f);
                    }
                }
                (best.1, best.2)
            }
            Observer::Entropy => {
                let t = s.entropy_threshold();
                (lo.max(-t), hi.min(t))
            }
        }
    }
}

impl Plan {
    pub fn new(default: &str, overrides: &[String]) -> Result<Self> {
        let default = Scheme::parse(default)?;
        let mut ov = Vec::new();
        for o in overrides {
            let (re, scheme) = parse_override(o)?;
            ov.push((re, Scheme::parse(scheme)?));
        }
        Ok(Self { default, overrides: ov, group_size: 128, zero_point: false, observer: Observer::MinMax })
    }

    /// Gives `name` exactly `scheme`, below every existing override (so the user's overrides still win):
    /// how a mixed-precision allocation is applied.
    pub fn assign(&mut self, name: &str, scheme: Scheme) {
        let re = Regex::new(&format!("^{}$", regex::escape(name))).expect("escaped name is a valid regex");
        self.overrides.insert(0, (re, scheme));
    }

    /// Whether an override names `name`.
    pub fn overridden(&self, name: &str) -> bool {
        self.overrides.iter().any(|(re, _)| re.is_match(name))
    }

    /// The scheme for layer `name`; heads keep their precision unless overridden.
    pub fn scheme_for(&self, name: &str) -> Scheme {
        if let Some((_, s)) = self.overrides.iter().rev().find(|(re, _)| re.is_match(name)) {
            return *s;
        }
        if Model::is_head_linear(name) {
            return Scheme::Keep;
        }
        self.default
    }
}

pub use whittle_calib::report::{rmse, LayerReport, Report};

/// The group a weight-only layer of width `k` gets: the requested one, else the largest multiple of 32 below
/// it that divides `k` (with a note saying so).
pub fn group_for(requested: usize, k: usize, name: &str) -> Result<(usize, String)> {
    if k.is_multiple_of(requested) {
        return Ok((requested, String::new()));
    }
    // From the width down (a group past the width cannot divide it): a huge request must not count down
    // from itself (found by scripts/fuzz.sh, recipe target: `group_size` 2^40 ran for minutes).
    let g = (1..=requested.min(k) / 32).rev().map(|i| 32 * i).find(|g| k.is_multiple_of(*g)).ok_or_else(|| {
        Error::Unsupported(format!("layer `{name}`: input width {k} is not a multiple of 32 (weight-only groups)"))
    })?;
    Ok((g, format!("group {requested} does not divide {k}: group {g}")))
}

/// A quantized Linear and the note on what the pass had to change.
type Quantized = (Linear, String);

fn quantize_linear(l: &Linear, scheme: Scheme, plan: &Plan, name: &str, st: Option<&ActStats>) -> Result<Quantized> {
    if l.rank().is_some() {
        return quantize_low_rank(l, scheme, plan, name, st);
    }
    match scheme {
        Scheme::Keep => Ok((l.clone(), String::new())),
        Scheme::W8A8Static => {
            let s = st
                .filter(|s| s.rows > 0 && s.range > 0.0)
                .ok_or_else(|| Error::Unsupported(format!("w8a8-static: no calibration statistics for `{name}`")))?;
            let (lo, hi) = plan.observer.range(s);
            let scale = (hi - lo) / 255.0;
            let zero = if scale > 0.0 { (-lo / scale).round().clamp(0.0, 255.0) as i32 } else { 0 };
            let w: Vec<f32> = l.dequantize()?.flatten_all()?.to_vec1()?;
            let p = PackedI8::from_f32(&w, l.out_features(), l.in_features());
            Ok((Linear::int8_static(p, scale, zero, l.bias.clone())?.inheriting(l), String::new()))
        }
        Scheme::W8A8Dynamic => {
            let w: Vec<f32> = l.dequantize()?.flatten_all()?.to_vec1()?;
            let p = PackedI8::from_f32(&w, l.out_features(), l.in_features());
            Ok((Linear::int8_dynamic(p, l.bias.clone())?.inheriting(l), String::new()))
        }
        Scheme::WeightOnly { bits } => {
            let (m, k) = (l.out_features(), l.in_features());
            if k % 32 != 0 {
                return Ok((
                    l.clone(),
                    format!("input width {k} is not a multiple of 32: kept in {}", l.storage_name()),
                ));
            }
            let (group, note) = group_for(plan.group_size, k, name)?;
            let rtn = whittle_core::Rtn { bits, group, zero_point: plan.zero_point };
            let w: Vec<f32> = l.dequantize()?.flatten_all()?.to_vec1()?;
            Ok((Linear::rtn(&rtn.quantize(&w, m, k), rtn, l.bias.clone())?.inheriting(l), note))
        }
    }
}

/// A low-rank layer: U and V are quantized as two Linears (the rank padded with zeros to a multiple of 32
/// for the weight-only formats, whose groups need it), so the factorisation's savings add to the format's.
fn quantize_low_rank(l: &Linear, scheme: Scheme, plan: &Plan, name: &str, st: Option<&ActStats>) -> Result<Quantized> {
    let (u, v) = l.factors().expect("a low-rank layer");
    let r = u.in_features();
    let mut note = String::new();
    let (u, v) = match scheme {
        Scheme::Keep => return Ok((l.clone(), note)),
        Scheme::W8A8Static => {
            return Err(Error::Unsupported(format!(
                "w8a8-static on low-rank layer `{name}`: its rank-{r} activations have no calibration statistics; use w8a8-dynamic or a weight-only scheme"
            )))
        }
        Scheme::WeightOnly { .. } if !r.is_multiple_of(32) => {
            let pad = r.next_multiple_of(32) - r;
            note = format!("rank {r} padded to {} for the groups", r + pad);
            let ut = u.dequantize()?.pad_with_zeros(1, 0, pad)?;
            let vt = v.dequantize()?.pad_with_zeros(0, 0, pad)?;
            (Linear::dense(ut, None)?, Linear::dense(vt, None)?)
        }
        _ => (u, v),
    };
    let (qv, nv) = quantize_linear(&v, scheme, plan, &format!("{name}.v"), st)?;
    let (qu, nu) = quantize_linear(&u, scheme, plan, &format!("{name}.u"), None)?;
    for n in [nv, nu] {
        if !n.is_empty() {
            note = if note.is_empty() { n } else { format!("{note}; {n}") };
        }
    }
    Ok((Linear::low_rank_of(qu, qv, l.bias.clone())?.inheriting(l), note))
}

/// Mean squared difference of two layers' outputs on the sample rows of `s`.
fn output_mse(a: &Linear, b: &Linear, s: &ActStats) -> Result<f64> {
    if s.sample.is_empty() {
        return Ok(0.0);
    }
    let x = candle_core::Tensor::from_vec(s.sample.clone(), (s.sample.len() / s.k, s.k), &a.device())?;
    let d = (a.forward(&x)? - b.forward(&x)?)?;
    Ok(d.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
}

/// Applies `plan` to every Linear of `model`, in place.
pub fn quantize(
    model: &mut Model,
    plan: &Plan,
    allow_requantize: bool,
    progress: impl FnMut(usize, usize),
) -> Result<Report> {
    quantize_calibrated(model, plan, allow_requantize, None, progress)
}

/// [`quantize`] with calibration statistics: needed by `w8a8-static`; with them every layer's report also
/// gets its output error on the calibration rows.
pub fn quantize_calibrated(
    model: &mut Model,
    plan: &Plan,
    allow_requantize: bool,
    stats: Option<&BTreeMap<String, ActStats>>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Report> {
    let t0 = Instant::now();
    let mut layers = Vec::new();
    let (mut before, mut after) = (0, 0);
    let mut linears = model.linears_mut();
    let total = linears.len();
    for (i, (name, lin)) in linears.iter_mut().enumerate() {
        let scheme = plan.scheme_for(name);
        before += lin.storage_bytes();
        if scheme != Scheme::Keep {
            if lin.is_quantized() && !allow_requantize {
                return Err(Error::AlreadyQuantized(name.clone(), lin.storage_name()));
            }
            let t = Instant::now();
            let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
            if w.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(name.clone()));
            }
            let st = stats.and_then(|s| s.get(name.as_str()));
            let (q, note) = quantize_linear(lin, scheme, plan, name, st)?;
            let wq: Vec<f32> = q.dequantize()?.flatten_all()?.to_vec1()?;
            let output_mse = match st {
                Some(s) => Some(output_mse(lin, &q, s)?),
                None => None,
            };
            layers.push(LayerReport {
                name: name.clone(),
                scheme: q.storage_name(),
                output_mse,
                rtn_output_mse: None,
                note,
                params: lin.in_features() * lin.out_features(),
                bpw: q.bits_per_weight(),
                weight_rmse: rmse(&w, &wq),
                seconds: t.elapsed().as_secs_f64(),
            });
            **lin = q;
        }
        after += lin.storage_bytes();
        progress(i + 1, total);
    }
    Ok(Report { layers, linear_bytes_before: before, linear_bytes_after: after, seconds: t0.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by scripts/fuzz.sh (recipe target): `group_size` 2^40 with GPTQ counted down from 2^35 looking
    /// for a group that divides the width, and ran for minutes.
    #[test]
    fn fuzz_group_size_huge_falls_back_at_once() {
        let t = std::time::Instant::now();
        let (g, note) = group_for(1 << 40, 576, "q_proj").unwrap();
        assert_eq!(g, 576, "the width itself is the largest multiple of 32 that divides it");
        assert!(note.contains("does not divide 576: group 576"), "{note}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(group_for(128, 576, "x").unwrap().0, 96);
    }

    #[test]
    fn plan_defaults_and_overrides() {
        let p = Plan::new("w8a8-dynamic", &["re:.*lm_head=w8a8-dynamic".into(), "model\\.layers\\.0\\..*=keep".into()])
            .unwrap();
        assert_eq!(p.scheme_for("lm_head"), Scheme::W8A8Dynamic);
        assert_eq!(p.scheme_for("model.layers.0.mlp.up_proj"), Scheme::Keep);
        assert_eq!(p.scheme_for("model.layers.1.mlp.up_proj"), Scheme::W8A8Dynamic);
        assert_eq!(Plan::new("w8a8", &[]).unwrap().scheme_for("pooler.dense"), Scheme::Keep);
        let e = Plan::new("int3-magic", &[]).unwrap_err().to_string();
        assert!(e.contains("int3-magic") && e.contains("w8a8-dynamic"), "{e}");
        assert!(matches!(Plan::new("w8a8", &["nope".into()]), Err(Error::BadOverride(_))));
        assert!(matches!(Plan::new("w8a8", &["(=keep".into()]), Err(Error::BadRegex { .. })));
    }
}
