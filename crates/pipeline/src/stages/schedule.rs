//! Progressive schedules of `prune`: the steps, the quick quality check after each, the lines a user reads.

use whittle_compress::schedule::{run_schedule, Step};
use whittle_models::Loaded;

use whittle_compress::schedule::{parse_max_drop, parse_schedule};
use whittle_core::InvalidOption;

use crate::config::PruneConfig;
use crate::measure::QualityProbe;
use crate::{bail, Ctx, Result};

/// The parsed progressive schedule of a `prune` config.
pub(super) struct Schedule {
    pub steps: Option<Vec<f64>>,
    pub max_drop: Option<f64>,
}

impl Schedule {
    pub(super) fn of(c: &PruneConfig) -> Result<Self> {
        let steps = c.schedule.as_deref().map(parse_schedule).transpose()?;
        let max_drop = c.max_drop.as_deref().map(parse_max_drop).transpose()?;
        if max_drop.is_some() && steps.is_none() {
            bail!("option `max_drop` applies to a progressive option `schedule`");
        }
        if c.eval_windows == 0 {
            return Err(InvalidOption::new("eval_windows", 0, "must be at least 1").into());
        }
        Ok(Self { steps, max_drop })
    }
}

/// Runs `prune(l, amount)` for each step, measuring with a [`QualityProbe`](crate::measure::QualityProbe) on `windows` windows (decoders) or
/// STS-B (encoders); each step's line goes to [`Ctx::step`].
pub(super) fn run(
    l: &mut Loaded,
    steps: &[f64],
    max_drop: Option<f64>,
    windows: usize,
    prune: impl FnMut(&mut Loaded, f64) -> Result<()>,
    ctx: &Ctx,
) -> Result<Vec<Step>> {
    let unit = if l.model.is_decoder() { "tok/s" } else { "sent/s" };
    let probe = QualityProbe::new(l, windows)?;
    let eval = |l: &Loaded| probe.measure(l);
    let print = |s: &Step| {
        ctx.step(&format!(
            "step {:>2}  amount {:>5.3}  removed {:>6.2}%  Linears {:>8.2} MB  {} {:>9.4}  drop {:>+7.2}%  {:>8.1} {unit}{}",
            s.step,
            s.amount,
            100.0 * s.removed,
            s.bytes as f64 / 1e6,
            s.quality.name,
            s.quality.value,
            100.0 * s.drop,
            s.quality.per_second,
            if s.kept { "" } else { "  -> over option `max_drop`: keeping the previous step" }
        ))
    };
    run_schedule(l, steps, max_drop, prune, eval, print)
}
