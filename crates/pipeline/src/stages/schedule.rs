//! Progressive schedules of `prune`: the steps, the quick quality check after each, the lines a user reads.

use whittle_compress::schedule::{run_schedule, Step};
use whittle_models::Loaded;

use crate::measure::quick_quality;
use crate::{Ctx, Result};

/// Runs `prune(l, amount)` for each step, measuring with [`quick_quality`] on `windows` windows (decoders) or
/// STS-B (encoders); each step's line goes to [`Ctx::step`].
pub(super) fn run(
    l: &mut Loaded,
    steps: &[f64],
    max_drop: Option<f64>,
    windows: usize,
    prune: impl FnMut(&mut Loaded, f64) -> whittle_compress::Result<()>,
    ctx: &Ctx,
) -> Result<Vec<Step>> {
    let unit = if l.model.is_decoder() { "tok/s" } else { "sent/s" };
    let eval =
        |l: &Loaded| quick_quality(l, windows).map_err(|e| whittle_compress::Error::Usage(format!("evaluation: {e}")));
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
    Ok(run_schedule(l, steps, max_drop, prune, eval, print)?)
}
