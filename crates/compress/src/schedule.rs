//! Progressive pruning: prune step by step, measure after each step, stop at the first step whose quality
//! drop exceeds a bound and keep the last model within it.

use serde::Serialize;
use whittle_core::InvalidOption;
use whittle_models::{Loaded, Model};

use crate::{Error, Result};

/// A quality measurement: `value` of metric `name`, where lower is better (perplexity) or not (STS).
#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub name: String,
    pub value: f64,
    pub lower_is_better: bool,
    /// Throughput of the measurement (tokens/s or sentences/s), a proxy for speed.
    pub per_second: f64,
}

impl Quality {
    /// Relative worsening against `base` (0.02 = 2% worse).
    pub fn drop_from(&self, base: &Quality) -> f64 {
        let d = if self.lower_is_better { self.value - base.value } else { base.value - self.value };
        d / base.value.abs().max(f64::MIN_POSITIVE)
    }
}

/// One row of the history: step 0 is the model before pruning.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: usize,
    /// The schedule's value at this step (sparsity, or the fraction of option `structured`).
    pub amount: f64,
    /// Block-Linear parameters that are zero or removed, as a fraction of the original.
    pub removed: f64,
    /// Bytes the Linears take in their current representation.
    pub bytes: usize,
    pub quality: Quality,
    /// Relative quality drop against step 0.
    pub drop: f64,
    pub kept: bool,
}

/// Option `schedule` `s` is invalid: `reason`.
fn bad_schedule(s: &str, reason: String) -> Error {
    InvalidOption::new("schedule", format!("`{s}`"), reason).into()
}

/// Parses `0.1,0.3,0.5`: increasing values in (0, 1].
pub fn parse_schedule(s: &str) -> Result<Vec<f64>> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|_| bad_schedule(s, format!("`{x}` is not a number"))))
        .collect::<Result<_>>()?;
    if v.is_empty() || v.iter().any(|x| !(*x > 0.0 && *x <= 1.0)) {
        return Err(bad_schedule(s, "values must lie in (0, 1]".into()));
    }
    if v.windows(2).any(|w| w[1] <= w[0]) {
        return Err(bad_schedule(s, "values must increase".into()));
    }
    Ok(v)
}

/// Parses `2%` or `0.02` as a fraction.
pub fn parse_max_drop(s: &str) -> Result<f64> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 0.01),
        None => (s, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v * scale),
        _ => {
            Err(InvalidOption::new("max_drop", format!("`{s}`"), "expected a non-negative percentage like 2% or 0.02")
                .into())
        }
    }
}

/// Fraction of the original block-Linear parameters that are zero or gone, and the Linears' bytes.
pub fn footprint(l: &Loaded, params_before: usize) -> Result<(f64, usize)> {
    let mut nonzero = 0usize;
    let mut bytes = 0usize;
    for (n, lin) in l.model.linears() {
        bytes += lin.storage_bytes();
        if Model::is_block_linear(&n) {
            let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
            nonzero += w.iter().filter(|v| **v != 0.0).count();
        }
    }
    Ok((1.0 - nonzero as f64 / params_before.max(1) as f64, bytes))
}

/// Runs `prune(model, amount)` for each amount in turn (each step starts from the previous step's model),
/// measures with `eval` after each, and stops at the first step whose drop exceeds `max_drop` (then `l` is
/// the last model within it — the original if the first step already fails). `on_step` sees each row as
/// it is measured.
/// `prune` and `eval` may fail with the caller's own error type `E` (errors of this crate convert into it).
pub fn run_schedule<E: From<Error>>(
    l: &mut Loaded,
    amounts: &[f64],
    max_drop: Option<f64>,
    mut prune: impl FnMut(&mut Loaded, f64) -> std::result::Result<(), E>,
    mut eval: impl FnMut(&Loaded) -> std::result::Result<Quality, E>,
    mut on_step: impl FnMut(&Step),
) -> std::result::Result<Vec<Step>, E> {
    let params_before: usize =
        l.model.block_linears().iter().map(|(_, lin)| lin.in_features() * lin.out_features()).sum();
    let base = eval(l)?;
    let (removed, bytes) = footprint(l, params_before)?;
    let row0 = Step { step: 0, amount: 0.0, removed, bytes, quality: base.clone(), drop: 0.0, kept: true };
    on_step(&row0);
    let mut history = vec![row0];
    let mut good = l.model.clone();
    for (i, &a) in amounts.iter().enumerate() {
        prune(l, a)?;
        let q = eval(l)?;
        let (removed, bytes) = footprint(l, params_before)?;
        let drop = q.drop_from(&base);
        let kept = max_drop.is_none_or(|m| drop <= m);
        let row = Step { step: i + 1, amount: a, removed, bytes, quality: q, drop, kept };
        on_step(&row);
        history.push(row);
        if !kept {
            l.model = good;
            break;
        }
        good = l.model.clone();
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_and_drops_parse_or_are_refused() {
        assert_eq!(parse_schedule("0.1, 0.3,0.5").unwrap(), vec![0.1, 0.3, 0.5]);
        for bad in ["0.3,0.1", "0.1,0.1", "0,0.5", "0.5,1.5", "a", ""] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
        assert!((parse_max_drop("2%").unwrap() - 0.02).abs() < 1e-12);
        assert_eq!(parse_max_drop("0.05").unwrap(), 0.05);
        assert!(parse_max_drop("-1%").is_err() && parse_max_drop("x").is_err());
        let q = |v| Quality { name: "ppl".into(), value: v, lower_is_better: true, per_second: 1.0 };
        assert!((q(10.2).drop_from(&q(10.0)) - 0.02).abs() < 1e-12);
        let s = |v| Quality { name: "sts".into(), value: v, lower_is_better: false, per_second: 1.0 };
        assert!((s(80.0).drop_from(&s(82.0)) - 2.0 / 82.0).abs() < 1e-12);
    }
}
