//! `quantize`: every scheme and method. Directory schemes run on the model in memory (this stage):
//! `w8a8-dynamic`, `w8a8-static` (calibrated ranges, optional SmoothQuant first — then the ranges are observed
//! again), weight-only `wNa16` by round-to-nearest, AWQ (scales, then rounding), GPTQ or AWQ-then-GPTQ, with
//! per-layer overrides and mixed precision under a bit budget ([`super::mixed`]). GGUF file types are written
//! tensor by tensor from a GGUF source ([`quantize_gguf`]).

use std::path::Path;

use whittle_core::{InvalidOption, Rtn};
use whittle_eval::bench::weight_bytes;
use whittle_models::Loaded;
use whittle_quant::gguf_out::{self, Ftype};
use whittle_quant::{awq, calib, gptq, layerwise, smooth, Observer, Plan, Scheme};

use crate::calib::{DECODER_SAMPLES, GPTQ_DECODER_SAMPLES};
pub use crate::config::QuantizeConfig;
use crate::{bail, Ctx, Report, Result, Stage, Table};

/// How the weights are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Rtn,
    Awq,
    Gptq,
    AwqGptq,
}

impl QuantizeConfig {
    /// A llama.cpp file type (written with [`quantize_gguf`]), or `None` for a directory scheme.
    pub fn gguf_ftype(&self) -> Option<Ftype> {
        Ftype::parse(&self.scheme)
    }

    fn method(&self) -> Result<Method> {
        let m = match self.method.as_str() {
            "rtn" => Method::Rtn,
            "awq" => Method::Awq,
            "gptq" => Method::Gptq,
            "awq-gptq" => Method::AwqGptq,
            other => return Err(InvalidOption::new("method", other, "valid: rtn, gptq, awq, awq-gptq").into()),
        };
        let gptq = matches!(m, Method::Gptq | Method::AwqGptq);
        if self.calib_int8 == Some(true) && !gptq {
            bail!("option `calib_int8` runs GPTQ's layer-wise calibration in int8; it needs option `method` gptq or awq-gptq");
        }
        if self.act_order == Some(true) && !gptq {
            bail!("option `act_order` orders GPTQ's columns; it needs option `method` gptq or awq-gptq");
        }
        if gptq && !(self.damp > 0.0 && self.damp < 1.0) {
            return Err(InvalidOption::new("damp", self.damp, "must be in (0, 1)").into());
        }
        Ok(m)
    }

    /// The plan of a directory scheme: default scheme, overrides, group and observer.
    pub(super) fn plan(&self) -> Result<Plan> {
        let mut plan = Plan::new(&self.scheme, &self.overrides)?;
        plan.group_size = self.group_size;
        plan.zero_point = self.zero_point;
        plan.observer = Observer::parse(&self.observer, self.percentile)?;
        let weight_only = matches!(plan.default, Scheme::WeightOnly { .. });
        let m = self.method()?;
        if m != Method::Rtn && !weight_only {
            bail!(
                "option `method` {} applies to the weight-only schemes (w8a16, w4a16, w3a16, w2a16), not {}",
                self.method,
                plan.default.name()
            );
        }
        Ok(plan)
    }

    /// Checks the combination of scheme and output: GGUF file types go to `NAME.gguf`, the rest to directories.
    pub fn check_output(&self, out: &Path) -> Result<()> {
        let to_gguf = out.extension().is_some_and(|e| e == "gguf");
        match (to_gguf, self.gguf_ftype()) {
            (true, None) => Err(InvalidOption::new(
                "scheme",
                &self.scheme,
                format!("cannot be written as GGUF ({}); GGUF schemes: {}", out.display(), gguf_out::GGUF_SCHEMES),
            )
            .into()),
            (false, Some(_)) => Err(InvalidOption::new(
                "scheme",
                &self.scheme,
                format!("a GGUF file type: write it to NAME.gguf (got {})", out.display()),
            )
            .into()),
            _ => Ok(()),
        }
    }
}

impl Stage for QuantizeConfig {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn check(&self) -> Result<()> {
        self.check_ranges()?;
        if self.group_size == 0 || !self.group_size.is_multiple_of(32) {
            return Err(InvalidOption::new("group_size", self.group_size, "must be a positive multiple of 32").into());
        }
        if self.gguf_ftype().is_some() {
            return crate::config::input_file("imatrix", self.imatrix.as_deref());
        }
        if let Some(a) = self.smoothquant.filter(|a| !(0.0..=1.0).contains(a)) {
            return Err(InvalidOption::new("smoothquant", a, "the strength alpha must be in [0, 1]").into());
        }
        if self.imatrix.is_some() {
            bail!("option `imatrix` weights the rounding of GGUF block types (NAME.gguf outputs); for directory schemes use option `method` awq or gptq, which measure the activations themselves");
        }
        let plan = self.plan()?;
        super::mixed::check(self, &plan)?;
        crate::config::input_file("sensitivity", self.sensitivity.as_deref())?;
        self.calibration.check()
    }

    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        if self.gguf_ftype().is_some() {
            bail!("option `scheme` {} is a GGUF file type, written from a GGUF file (see quantize_gguf), not from a model in memory", self.scheme);
        }
        let mut plan = self.plan()?;
        let method = self.method()?;
        if method != Method::Rtn {
            // GPTQ and AWQ round one dense weight against its inputs; a factor's inputs are another factor's output.
            if let Some((name, lin)) = l.model.linears().into_iter().find(|(_, l)| l.rank().is_some()) {
                bail!("option `method` {}: `{name}` is low-rank ({}); quantize factorised models with option `method` rtn (U and V are quantized separately)", self.method, lin.storage_name());
            }
        }
        if let Some(target) = self.target_bpw {
            super::mixed::apply_target_bpw(self, l, &mut plan, target, ctx)?;
        }
        let bytes_in = whittle_eval::bench::model_bytes(l);
        let report = match method {
            Method::Gptq | Method::AwqGptq => self.gptq(l, &plan, method == Method::AwqGptq, ctx)?,
            Method::Rtn | Method::Awq => self.round(l, &plan, method == Method::Awq, ctx)?,
        };
        Ok(Box::new(QuantStageReport { report, bytes_in, bytes_out: 0, verb: "quantized" }))
    }
}

/// The grouped format `plan` gives layer `name` (input width `k`), if it is a weight-only scheme.
fn weight_only_format(plan: &Plan, name: &str, k: usize) -> Option<Rtn> {
    match plan.scheme_for(name) {
        Scheme::WeightOnly { bits } if k.is_multiple_of(32) => {
            let (group, _) = whittle_quant::group_for(plan.group_size, k, name).ok()?;
            Some(Rtn { bits, group, zero_point: plan.zero_point })
        }
        _ => None,
    }
}

impl QuantizeConfig {
    /// SmoothQuant → (recalibrate) → AWQ → rounding; calibrates only when a step needs it.
    fn round(&self, l: &mut Loaded, plan: &Plan, awq: bool, ctx: &Ctx) -> Result<whittle_quant::Report> {
        let statics =
            std::iter::once(plan.default).chain(plan.overrides.iter().map(|o| o.1)).any(|s| s == Scheme::W8A8Static);
        let mut stats = None;
        if statics || awq || self.smoothquant.is_some() || self.calibration.calib.is_some() {
            let c = self.calibration.resolve(l, DECODER_SAMPLES)?;
            let mut cal = calib::calibrate(l, &c.text, &c.opts, ctx.progress("calibrate"))?;
            ctx.note(&format!("calibrated on {} tokens of {} in {:.1}s", cal.tokens, c.opts.source, cal.seconds));
            if let Some(alpha) = self.smoothquant {
                let r = smooth::smooth(&mut l.model, &mut cal.stats, alpha)?;
                if let Some(w) = r.iter().max_by(|a, b| a.act_absmax_before.total_cmp(&b.act_absmax_before)) {
                    ctx.note(&format!(
                        "smoothquant alpha {alpha}: {} groups; largest input max |x| {:.1} -> {:.1} ({})",
                        r.len(),
                        w.act_absmax_before,
                        w.act_absmax_after,
                        w.layers[0]
                    ));
                }
                if statics {
                    // Static ranges must describe the smoothed inputs: observe again.
                    cal = calib::calibrate(l, &c.text, &c.opts, ctx.progress("recalibrate"))?;
                }
            }
            if awq {
                let r = awq::awq(
                    &mut l.model,
                    &mut cal.stats,
                    |n, k| weight_only_format(plan, n, k),
                    20,
                    ctx.progress("awq"),
                )?;
                let (e0, e1) = r.iter().fold((0.0, 0.0), |(a, b), g| (a + g.rtn_error, b + g.awq_error));
                let alphas: Vec<String> = r.iter().take(6).map(|g| format!("{:.2}", g.alpha)).collect();
                ctx.note(&format!(
                    "awq: {} groups; output error on calibration rows {e0:.4e} -> {e1:.4e} ({:.1}% of plain rounding); alpha {} …",
                    r.len(),
                    100.0 * e1 / f64::max(e0, f64::MIN_POSITIVE),
                    alphas.join(" ")
                ));
            }
            stats = Some(cal.stats);
        }
        let pb = ctx.progress("quantize");
        Ok(whittle_quant::quantize_calibrated(&mut l.model, plan, self.allow_requantize, stats.as_ref(), pb)?)
    }

    /// GPTQ layer by layer (after AWQ's scales with `awq`).
    fn gptq(&self, l: &mut Loaded, plan: &Plan, awq: bool, ctx: &Ctx) -> Result<whittle_quant::Report> {
        if !self.allow_requantize {
            if let Some((n, lin)) = l.model.linears().into_iter().find(|(_, l)| l.is_quantized()) {
                return Err(whittle_quant::Error::AlreadyQuantized(n, lin.storage_name()).into());
            }
        }
        // Plain GPTQ gets the calibration that makes it pay (see GPTQ_DECODER_SAMPLES); AWQ-then-GPTQ keeps the
        // float calibration its scales were tuned on.
        let mut c = self.calibration.resolve(l, if awq { DECODER_SAMPLES } else { GPTQ_DECODER_SAMPLES })?;
        c.opts.int8 = self.calib_int8.unwrap_or(!awq);
        let scheme_for = |name: &str, k: usize| weight_only_format(plan, name, k);
        if awq {
            // AWQ's scales first (a float rewrite), then GPTQ rounds the scaled weights.
            let mut cal = calib::calibrate(l, &c.text, &c.opts, ctx.progress("calibrate"))?;
            let r = awq::awq(&mut l.model, &mut cal.stats, scheme_for, 20, ctx.progress("awq"))?;
            ctx.note(&format!("awq: {} groups scaled", r.len()));
        }
        let go = gptq::GptqOptions { damp: self.damp, act_order: self.act_order.unwrap_or(true) };
        let r = layerwise::gptq_model(l, &c.text, &c.opts, scheme_for, go, ctx.progress("gptq"))?;
        ctx.note(&format!(
            "gptq: {} tokens of {}, {} layers, {:.1}s; calibration activations {:.1} MB",
            r.tokens,
            c.opts.source,
            r.report.layers.len(),
            r.report.seconds,
            r.activation_bytes as f64 / 1e6
        ));
        Ok(r.report)
    }
}

/// Writes the GGUF file type `c.scheme` from the GGUF `model` to `out`, tensor by tensor (no model in memory).
pub fn quantize_gguf(model: &str, out: &Path, c: &QuantizeConfig) -> Result<Box<dyn Report>> {
    let Some(ftype) = c.gguf_ftype() else {
        return Err(InvalidOption::new("scheme", &c.scheme, "not a GGUF file type").into());
    };
    let path = whittle_models::loader::resolve(model)?;
    if path.is_dir() {
        bail!("option `scheme` {} writes GGUF from a GGUF source (its metadata and tokenizer are copied); {model} is an HF directory (pruned, factorised and shared models are directories: llama.cpp's graph has one dense weight per projection, so factorised and shared layers have no GGUF form)", c.scheme);
    }
    let src = whittle_formats::gguf::Gguf::open(&path)?;
    let im = c.imatrix.as_deref().map(whittle_quant::imatrix::read_imatrix).transpose()?;
    let o = gguf_out::GgufOptions {
        ftype,
        overrides: &c.overrides,
        allow_requantize: c.allow_requantize,
        imatrix: im.as_ref(),
    };
    let report = gguf_out::write_gguf(&src, out, &o)?;
    Ok(Box::new(QuantStageReport {
        report,
        bytes_in: weight_bytes(&path),
        bytes_out: weight_bytes(out),
        verb: "quantized",
    }))
}

/// A quantization pass's report, with the model's sizes on disk.
pub struct QuantStageReport {
    pub report: whittle_quant::Report,
    bytes_in: u64,
    bytes_out: u64,
    verb: &'static str,
}

impl Report for QuantStageReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self.report)
    }

    fn table(&self) -> Table {
        super::layer_table(&self.report.layers)
    }

    fn summary(&self) -> Vec<String> {
        let r = &self.report;
        let mut out = super::layer_notes(&r.layers);
        out.push(format!(
            "{} layers {}; weights {:.2} MB -> {:.2} MB; model on disk {:.2} MB -> {:.2} MB; {:.2}s",
            r.layers.len(),
            self.verb,
            r.linear_bytes_before as f64 / 1e6,
            r.linear_bytes_after as f64 / 1e6,
            self.bytes_in as f64 / 1e6,
            self.bytes_out as f64 / 1e6,
            r.seconds
        ));
        out
    }

    fn saved(&mut self, out: &Path) {
        self.bytes_out = weight_bytes(out);
    }
}
