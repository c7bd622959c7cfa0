//! One module per technique: its config (serde, `deny_unknown_fields`; the CLI's flags with the `cli`
//! feature), its [`Stage`](crate::Stage) implementation and its report.

pub mod lowrank;
mod mixed;
pub mod prune;
pub mod quantize;
mod schedule;
pub mod share;
pub mod structured;
pub mod train;

use serde::{Deserialize, Serialize};
use whittle_models::Loaded;

pub use lowrank::LowrankConfig;
pub use prune::PruneConfig;
pub use quantize::QuantizeConfig;
pub use share::ShareConfig;
pub use train::{DistillConfig, FinetuneConfig};

use crate::{Ctx, Report, Result, Stage};

/// Any stage, as a recipe names it: `stage = "prune"` plus the stage's own keys (the CLI flags' names with
/// underscores). Unknown stages and unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "stage", rename_all = "lowercase", deny_unknown_fields)]
pub enum AnyStage {
    /// Unstructured / N:M pruning (`method`), or structured removal (`structured`, `drop_layers`).
    Prune(PruneConfig),
    /// Structured pruning alone (the same keys as `prune`, without `method`).
    Structured(PruneConfig),
    Lowrank(LowrankConfig),
    Share(ShareConfig),
    Quantize(QuantizeConfig),
    Distill(DistillConfig),
    Finetune(FinetuneConfig),
}

impl AnyStage {
    fn inner(&self) -> &dyn Stage {
        match self {
            Self::Prune(c) | Self::Structured(c) => c,
            Self::Lowrank(c) => c,
            Self::Share(c) => c,
            Self::Quantize(c) => c,
            Self::Distill(c) => c,
            Self::Finetune(c) => c,
        }
    }
}

impl Stage for AnyStage {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn check(&self) -> Result<()> {
        if let Self::Structured(c) = self {
            if c.method.is_some() {
                crate::bail!(
                    "a `structured` stage removes heads, neurons and blocks: option `method` belongs to `prune`"
                );
            }
        }
        self.inner().check()
    }

    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        self.inner().apply(l, ctx)
    }
}

/// The per-layer table of quantization and pruning reports.
pub(crate) fn layer_table(layers: &[whittle_quant::LayerReport]) -> crate::Table {
    let with_mse = layers.iter().any(|r| r.output_mse.is_some());
    let with_rtn = layers.iter().any(|r| r.rtn_output_mse.is_some());
    let mut header = vec!["layer", "scheme", "bpw", "weight RMSE"];
    header.extend(with_mse.then_some("output MSE"));
    header.extend(with_rtn.then_some("RTN out MSE"));
    header.push("ms");
    let mut t = crate::Table::new(&header);
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3e}"));
    for r in layers {
        let mut row = vec![r.name.clone(), r.scheme.clone(), format!("{:.2}", r.bpw), format!("{:.3e}", r.weight_rmse)];
        row.extend(with_mse.then(|| opt(r.output_mse)));
        row.extend(with_rtn.then(|| opt(r.rtn_output_mse)));
        row.push(format!("{:.1}", r.seconds * 1e3));
        t.row(row);
    }
    t
}

/// "notes (N):" and the first eight per-layer notes.
pub(crate) fn layer_notes(layers: &[whittle_quant::LayerReport]) -> Vec<String> {
    let notes: Vec<String> =
        layers.iter().filter(|r| !r.note.is_empty()).map(|r| format!("  {}: {}", r.name, r.note)).collect();
    if notes.is_empty() {
        return notes;
    }
    let mut out = vec![format!("notes ({}):", notes.len())];
    out.extend(notes.iter().take(8).cloned());
    if notes.len() > 8 {
        out.push(format!("  … and {} more", notes.len() - 8));
    }
    out
}
