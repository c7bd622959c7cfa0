//! Mixed precision for `quantize`: a grouped format per block Linear under a bit budget, from sensitivities
//! read from a file or measured now, written into the plan below the user's overrides.

use std::collections::BTreeMap;

use whittle_models::Loaded;
use whittle_quant::mixed::{self, Allocation, SensitivityOptions};
use whittle_quant::{Plan, Scheme};

use crate::config::QuantizeConfig;
use crate::importance::{self, parse_bits};
use crate::{bail, Ctx, Result};

/// Checks the mixed-precision options against the plan (before any work).
pub(super) fn check(c: &QuantizeConfig, plan: &Plan) -> Result<()> {
    if c.target_bpw.is_none() {
        if c.sensitivity.is_some() {
            bail!("option `sensitivity` is read by option `target_bpw`; set option `target_bpw` BITS too");
        }
        return Ok(());
    }
    if !matches!(plan.default, Scheme::WeightOnly { .. }) {
        bail!(
            "option `target_bpw` picks among the grouped weight-only formats: use option `scheme` w4a16 (its option `group_size` and option `zero_point` apply to every candidate), not {}",
            plan.default.name()
        );
    }
    parse_bits(&c.candidates, "candidates").map(|_| ())
}

/// Assigns per-layer formats from the sensitivities into `plan` (layers the overrides name are left to them).
pub(super) fn apply_target_bpw(
    c: &QuantizeConfig,
    l: &mut Loaded,
    plan: &mut Plan,
    target: f64,
    ctx: &Ctx,
) -> Result<()> {
    check(c, plan)?;
    let candidates = parse_bits(&c.candidates, "candidates")?;
    let o = SensitivityOptions {
        candidates: candidates.clone(),
        group_size: plan.group_size,
        zero_point: plan.zero_point,
        ..Default::default()
    };
    let mut s = match &c.sensitivity {
        Some(f) => importance::read(f, l, &o)?,
        None => {
            // A quick measurement: at most 4 windows of 256 tokens.
            let cal = &c.calibration;
            let budget = crate::calib::CalibConfig {
                calib_samples: Some(cal.calib_samples.map_or(2, |n| n.min(4))),
                ..cal.clone()
            };
            importance::measure(l, &budget, &o, ctx)?
        }
    };
    for layer in s.layers.iter_mut() {
        if let Some(b) = candidates.iter().find(|b| !layer.candidates.iter().any(|x| x.bits == **b)) {
            bail!("option `candidates` {}: the sensitivity of `{}` has no {b}-bit entry", c.candidates, layer.name);
        }
        layer.candidates.retain(|x| candidates.contains(&x.bits));
    }
    let a = mixed::allocate(&s, target, |n| plan.overridden(n))?;
    for line in allocation_lines(&a) {
        ctx.note(&line);
    }
    for ch in &a.choices {
        plan.assign(&ch.name, Scheme::WeightOnly { bits: ch.bits });
    }
    Ok(())
}

/// The chosen map: blocks as rows, the block's Linears as columns, bits in the cells.
fn allocation_lines(a: &Allocation) -> Vec<String> {
    let mut grid: BTreeMap<usize, Vec<(String, u32)>> = BTreeMap::new();
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for ch in &a.choices {
        *counts.entry(ch.bits).or_default() += 1;
        // Display only: the first numeric segment of the name is the block, the last one the Linear.
        let block = ch.name.split('.').find_map(|p| p.parse::<usize>().ok()).unwrap_or(0);
        let kind = ch.name.rsplit('.').next().unwrap_or(&ch.name).trim_end_matches("_proj");
        grid.entry(block).or_default().push((kind.to_string(), ch.bits));
    }
    let mut out = vec![format!(
        "target-bpw {:.3}: chose {:.3} bpw, predicted KL {:.4e} (sum over layers)",
        a.target_bpw, a.bpw, a.predicted_kl
    )];
    if let Some(row) = grid.values().next() {
        out.push(format!("block {}", row.iter().map(|(k, _)| format!("{k:>5}")).collect::<String>()));
    }
    for (b, row) in &grid {
        out.push(format!("{b:>5} {}", row.iter().map(|(_, bits)| format!("{bits:>5}")).collect::<String>()));
    }
    let c: Vec<String> = counts.iter().rev().map(|(b, n)| format!("{n} layers at {b} bits")).collect();
    out.push(c.join(", "));
    out
}
