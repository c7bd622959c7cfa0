//! Structured pruning (the `structured` / `drop_layers` options of `prune`): removes KV groups / heads, FFN
//! neurons and blocks. Importance from activations (calibration), weight norms or Taylor saliency (gradients of
//! the LM loss through the training windows); blocks chosen by block influence (decoders) or by index.

use std::collections::BTreeMap;

use whittle_compress::schedule::Step;
use whittle_compress::structured::{self as st, Importance, Structured, StructuredReport};
use whittle_core::{InvalidOption, Tensor};
use whittle_models::{text, Loaded, Model};

use super::schedule::Schedule;
use crate::calib::DECODER_SAMPLES;
use crate::config::PruneConfig;
use crate::report::{human, percent};
use crate::{bail, Ctx, Report, Result, Table};

/// The parsed structured options.
struct Plan {
    s: Structured,
    imp: Importance,
    drop: Vec<usize>,
}

fn plan(c: &PruneConfig) -> Result<Plan> {
    let s = match &c.structured {
        Some(s) => Structured::parse(s)?,
        None => Default::default(),
    };
    let imp = Importance::parse(&c.importance)?;
    let drop: Vec<usize> = match &c.drop_layers {
        Some(d) => d
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| InvalidOption::new("drop_layers", d, format!("`{v}` is not a block index")))
            })
            .collect::<std::result::Result<_, _>>()?,
        None => Vec::new(),
    };
    let mut uniq = drop.clone();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.len() != drop.len() {
        return Err(InvalidOption::new(
            "drop_layers",
            c.drop_layers.as_deref().unwrap_or(""),
            "a block is named twice",
        )
        .into());
    }
    if s.layers > 0 && !drop.is_empty() {
        bail!("option `structured` layers={} and option `drop_layers` both choose blocks: give one", s.layers);
    }
    if c.schedule.is_some() && c.drop_layers.is_some() {
        bail!("option `schedule` scales option `structured` heads=..,ffn=..,layers=N; it does not apply to option `drop_layers`");
    }
    Ok(Plan { s, imp, drop })
}

pub(super) fn check(c: &PruneConfig) -> Result<()> {
    plan(c).map(|_| ())
}

/// Block influence of every block on the calibration windows (decoders), for choosing `layers=N` blocks.
fn influence(l: &Loaded, cal: &crate::calib::Calib) -> Result<Vec<f64>> {
    let Model::Llama(m) = &l.model else {
        bail!("option `structured` layers=N ranks blocks by influence on decoders; for encoders name them with option `drop_layers`");
    };
    let dev = m.embed_tokens.device();
    let windows = whittle_calib::observe::decoder_windows(l, &cal.text, &cal.opts)?;
    let mut xs = Vec::with_capacity(windows.len());
    for w in &windows {
        xs.push(m.embed(&Tensor::new(w.as_slice(), dev)?.unsqueeze(0)?)?);
    }
    Ok(st::block_influence_llama(m, &xs)?)
}

/// |w·∂L/∂w| per weight, from the LM loss on the calibration windows (decoders).
fn taylor(l: &Loaded, cal: &crate::calib::Calib, ctx: &Ctx) -> Result<BTreeMap<String, Vec<f32>>> {
    let Model::Llama(m) = &l.model else {
        bail!("option `importance` taylor: decoders only for now (encoders: l2, l1, activation)");
    };
    let ids = text::encode_prompt(l, &cal.text, false)?;
    let w = whittle_train::Windows::new(&ids, cal.opts.seq_len, 1, 0, &cal.opts.source)?;
    ctx.note(&format!(
        "taylor: gradients of the LM loss on {} windows of {} tokens",
        cal.opts.samples, cal.opts.seq_len
    ));
    Ok(whittle_train::taylor_saliency(m, &w, cal.opts.samples, 1)?)
}

pub(super) fn apply(c: &PruneConfig, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
    let t0 = std::time::Instant::now();
    let Plan { s, imp, mut drop } = plan(c)?;
    let sched = Schedule::of(c)?;
    if s.layers >= l.model.n_blocks() {
        bail!(
            "option `structured` layers={}: the model has {} blocks; at least one must stay",
            s.layers,
            l.model.n_blocks()
        );
    }
    // Everything that needs only the block count is checked before calibration (issue 22: `drop_layers` 99
    // was refused only after ~10 s of it).
    st::check_drop(l.model.n_blocks(), &drop)?;
    let cal = c.calibration.resolve(l, DECODER_SAMPLES)?;
    let params_in: usize = l.model.linears().iter().map(|(_, l)| l.num_params()).sum();
    let influence = if s.layers > 0 { Some(influence(l, &cal)?) } else { None };
    if let Some(bi) = &influence {
        drop = st::least_influential(bi, s.layers);
    }
    let stats = if imp == Importance::Activation {
        Some(whittle_calib::observe::calibrate(l, &cal.text, &cal.opts, ctx.progress("calibrate"))?.stats)
    } else {
        None
    };
    let saliency = if imp == Importance::Taylor { Some(taylor(l, &cal, ctx)?) } else { None };
    // One step: the original model with `a` × the asked fractions removed (a = 1 without a schedule); the
    // importance and block influence come from the original model.
    let orig = l.model.clone();
    let mut last = None;
    let mut step = |model: &mut Model, a: f64| -> whittle_compress::Result<()> {
        *model = orig.clone();
        let sa = Structured { heads: s.heads * a, ffn: s.ffn * a, layers: 0, drop_layers: vec![] };
        let drop_a = match &influence {
            Some(bi) => st::least_influential(bi, (s.layers as f64 * a).round() as usize),
            None => drop.clone(),
        };
        let r = st::prune_structured_with(
            model,
            &sa,
            imp,
            c.global,
            stats.as_ref(),
            saliency.as_ref(),
            &drop_a,
            influence.as_deref(),
        )?;
        last = Some(r);
        Ok(())
    };
    let history = match &sched.steps {
        None => {
            step(&mut l.model, 1.0)?;
            None
        }
        Some(steps) => {
            let h =
                super::schedule::run(l, steps, sched.max_drop, c.eval_windows, |l, a| Ok(step(&mut l.model, a)?), ctx)?;
            // The kept model is the last step within the bound: run it again for its report.
            let kept = h.iter().rev().find(|r| r.kept).map_or(0.0, |r| r.amount);
            if kept == 0.0 {
                ctx.note("the first step already exceeds option `max_drop`: writing the unpruned model");
            }
            step(&mut l.model, kept)?;
            Some(h)
        }
    };
    let report = last.expect("a step ran");
    let params_out = l.model.linears().iter().map(|(_, l)| l.num_params()).sum();
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Box::new(StructuredStageReport { report, schedule: history, params_in, params_out, bytes_out: 0, seconds }))
}

/// Structured pruning's report and the schedule's history.
pub struct StructuredStageReport {
    pub report: StructuredReport,
    pub schedule: Option<Vec<Step>>,
    params_in: usize,
    params_out: usize,
    bytes_out: u64,
    seconds: f64,
}

impl Report for StructuredStageReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "report": self.report, "schedule": self.schedule })
    }

    fn table(&self) -> Table {
        let mut t = Table::new(&["block", "heads", "kv heads", "ffn", "params", "after", "influence"]);
        for b in &self.report.blocks {
            let what = |a: usize, z: usize| if b.dropped { format!("{a} -> 0") } else { format!("{a} -> {z}") };
            let note = if b.note.is_empty() { String::new() } else { format!("  ({})", b.note) };
            t.row(vec![
                b.block.to_string(),
                what(b.heads_before, b.heads_after),
                what(b.kv_heads_before, b.kv_heads_after),
                what(b.ffn_before, b.ffn_after),
                human(b.params_before),
                human(b.params_after),
                b.influence.map_or("-".to_string(), |v| format!("{v:.4}")) + &note,
            ]);
        }
        t
    }

    fn summary(&self) -> Vec<String> {
        let r = &self.report;
        vec![format!(
            "block Linears {} -> {} params ({:.1}% removed); all Linears {} -> {}; file {:.2} MB (f32); {:.1}s",
            human(r.params_before),
            human(r.params_after),
            100.0 - percent(r.params_after, r.params_before),
            human(self.params_in),
            human(self.params_out),
            self.bytes_out as f64 / 1e6,
            self.seconds
        )]
    }

    fn saved(&mut self, out: &std::path::Path) {
        self.bytes_out = whittle_eval::bench::weight_bytes(out);
    }
}
