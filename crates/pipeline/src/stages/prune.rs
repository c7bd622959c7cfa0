//! `prune`: unstructured and N:M pruning of every block Linear (magnitude, Wanda, SparseGPT; optionally
//! progressive), or — with `structured` / `drop_layers` — structured removal ([`super::structured`]).

use whittle_compress::pass::{self, KernelCheck, Method, PruneOptions, PruneReport};
use whittle_compress::schedule::Step;
use whittle_compress::{parse_pattern, Pattern};
use whittle_core::{InvalidOption, Rtn};
use whittle_models::Loaded;
use whittle_quant::Scheme;

use super::schedule::Schedule;
use crate::calib::{DECODER_SAMPLES, WANDA_DECODER_SAMPLES};
pub use crate::config::PruneConfig;
use crate::report::human;
use crate::{bail, Ctx, Report, Result, Stage, Table};

impl PruneConfig {
    /// Structured removal (heads, neurons, blocks) rather than unstructured / N:M.
    pub fn is_structured(&self) -> bool {
        self.structured.is_some() || self.drop_layers.is_some()
    }

    fn sparse(&self) -> Result<bool> {
        match self.storage.as_str() {
            "sparse" => Ok(true),
            "dense" => Ok(false),
            s => Err(InvalidOption::new("storage", s, "valid: sparse, dense").into()),
        }
    }

    /// The options of the unstructured pass (the sparsity of a schedule's steps is set per step).
    fn options(&self, method: &str, scheduled: bool) -> Result<PruneOptions> {
        let method = Method::parse(method)?;
        let pattern = parse_pattern(&self.pattern)?;
        if scheduled && self.sparsity.is_some() {
            bail!("option `schedule` gives the sparsities: drop option `sparsity`");
        }
        let sparsity = match (self.sparsity, pattern) {
            (Some(s), _) if !(0.0..1.0).contains(&s) => {
                return Err(InvalidOption::new("sparsity", s, "must be in [0, 1)").into())
            }
            (Some(s), _) => s,
            (None, _) if scheduled => 0.0,
            (None, Pattern::NM { n, m }) => 1.0 - n as f64 / m as f64,
            (None, _) => bail!("option `sparsity` S is needed for unstructured pruning (e.g. 0.5)"),
        };
        let global = match self.scope.as_str() {
            "layer" => false,
            "global" => true,
            s => return Err(InvalidOption::new("scope", s, "valid: layer, global").into()),
        };
        let quant = match &self.then_quantize {
            Some(sch) => match Scheme::parse(sch)? {
                Scheme::WeightOnly { bits } => Some(Rtn { bits, group: self.group_size, zero_point: false }),
                _ => {
                    return Err(InvalidOption::new(
                        "then_quantize",
                        sch,
                        "a grouped weight-only scheme (w8a16, w4a16, w3a16, w2a16)",
                    )
                    .into())
                }
            },
            None => None,
        };
        if scheduled && pattern != Pattern::Unstructured {
            bail!(
                "option `schedule` steps through unstructured sparsities; an N:M pattern fixes the sparsity at 1 - N/M"
            );
        }
        Ok(PruneOptions { method, sparsity, pattern, global, damp: self.damp, quant, sparse: self.sparse()? })
    }
}

impl Stage for PruneConfig {
    fn name(&self) -> &'static str {
        if self.is_structured() {
            "structured"
        } else {
            "prune"
        }
    }

    fn check(&self) -> Result<()> {
        self.check_ranges()?;
        self.sparse()?;
        let s = Schedule::of(self)?;
        self.calibration.check()?;
        match (&self.method, self.is_structured()) {
            (Some(_), true) => bail!("option `method` (unstructured / N:M) and option `structured` / option `drop_layers` are separate passes: run one, then the other"),
            (None, false) => bail!("prune needs option `method` magnitude|wanda|sparsegpt with option `sparsity` S, or option `structured` heads=..,ffn=..,layers=N"),
            (Some(m), false) => self.options(m, s.steps.is_some()).map(|_| ()),
            (None, true) => super::structured::check(self),
        }
    }

    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        let Some(method) = &self.method else {
            return super::structured::apply(self, l, ctx);
        };
        let sched = Schedule::of(self)?;
        let mut o = self.options(method, sched.steps.is_some())?;
        let wanda = o.method == Method::Wanda;
        let cal = self.calibration.resolve(l, if wanda { WANDA_DECODER_SAMPLES } else { DECODER_SAMPLES })?;
        let bytes_in = whittle_eval::bench::model_bytes(l);
        let params_in: usize = l.model.linears().iter().map(|(_, l)| l.num_params()).sum();
        let mut reports = Vec::new();
        let mut history = None;
        match &sched.steps {
            None => reports.push(pass::prune_model(l, &o, &cal.text, &cal.opts, ctx.progress(o.method.name()))?),
            Some(steps) => {
                let prune = |l: &mut Loaded, a: f64| {
                    o.sparsity = a;
                    let pb = ctx.progress(&format!("{} {a}", o.method.name()));
                    reports.push(pass::prune_model(l, &o, &cal.text, &cal.opts, pb)?);
                    Ok(())
                };
                history = Some(super::schedule::run(l, steps, sched.max_drop, self.eval_windows, prune, ctx)?);
            }
        }
        let report = reports.pop().expect("at least one step ran");
        if report.tokens > 0 {
            ctx.note(&format!("{}: {} calibration tokens of {}", report.method, report.tokens, cal.opts.source));
        }
        let kernel_check = pass::kernel_check(l, 128)?;
        let linear_bytes_after = l.model.linears().iter().map(|(_, l)| l.storage_bytes()).sum();
        let sizes = Sizes { params_in, bytes_in, linear_bytes_after, bytes_out: 0, sparse: o.sparse };
        Ok(Box::new(PruneStageReport { report, kernel_check, schedule: history, sizes }))
    }
}

/// Sizes around an unstructured pass (for the text summary).
struct Sizes {
    params_in: usize,
    bytes_in: u64,
    linear_bytes_after: usize,
    bytes_out: u64,
    sparse: bool,
}

/// The unstructured pass's report, its kernel check and the schedule's history.
pub struct PruneStageReport {
    pub report: PruneReport,
    pub kernel_check: Option<KernelCheck>,
    pub schedule: Option<Vec<Step>>,
    sizes: Sizes,
}

impl Report for PruneStageReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "report": self.report, "kernel_check": self.kernel_check, "schedule": self.schedule })
    }

    fn table(&self) -> Table {
        super::layer_table(&self.report.layers)
    }

    fn summary(&self) -> Vec<String> {
        let (r, s) = (&self.report, &self.sizes);
        let mut out = super::layer_notes(&r.layers);
        out.push(format!(
            "{} layers pruned; weights {:.2} MB -> {:.2} MB; model on disk {:.2} MB -> {:.2} MB; {:.2}s",
            r.layers.len(),
            (4 * s.params_in) as f64 / 1e6,
            s.linear_bytes_after as f64 / 1e6,
            s.bytes_in as f64 / 1e6,
            s.bytes_out as f64 / 1e6,
            r.seconds
        ));
        let stored = if s.sparse { "stored sparse (zeros not stored)" } else { "stored dense" };
        out.push(format!(
            "{} {}: {:.2}% of the {} block-Linear weights are zero ({:.1}s); {stored}",
            r.method,
            r.pattern,
            crate::report::percent(r.zeros, r.params),
            human(r.params),
            r.seconds
        ));
        out.extend(self.kernel_check.as_ref().map(kernel_check_line));
        out
    }

    fn saved(&mut self, out: &std::path::Path) {
        self.sizes.bytes_out = whittle_eval::bench::weight_bytes(out);
    }
}

/// The sparse-vs-dense kernel measurement and which one pays on this CPU.
fn kernel_check_line(c: &KernelCheck) -> String {
    let verdict = |r: f64| if r < 1.0 { "sparse kernel faster" } else { "sparse kernel slower than dense" };
    let mut s = format!(
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
        s += "\nthis CPU has no AVX-512: sparse layers run densified (no speed-up; the file is still smaller)";
    }
    s
}
