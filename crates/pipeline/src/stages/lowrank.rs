//! `lowrank`: W ≈ U·V of block Linears (SVD, ASVD, SVD-LLM; ranks by ratio, energy or rank), or — with
//! `attention_rank` — the queries and keys of every head factorised jointly (BERT-style encoders).

use whittle_compress::attention::{attention_rank, AttentionRankReport};
use whittle_compress::lowrank::{lowrank_model, LowRankOptions, LowRankReport, Method, Target};
use whittle_models::Loaded;

use crate::calib::DECODER_SAMPLES;
pub use crate::config::LowrankConfig;
use crate::report::{human, percent};
use crate::{bail, Ctx, Report, Result, Stage, Table};

impl LowrankConfig {
    /// The rank target (`None` with `attention_rank`).
    fn target(&self) -> Result<Option<Target>> {
        Ok(match (self.attention_rank, self.ratio, self.energy, self.rank) {
            (Some(_), None, None, None) => None,
            (Some(_), ..) => bail!("option `attention_rank` factorises the attention scores alone: run `lowrank` again on its output for option `ratio`, option `energy` or option `rank`"),
            (None, Some(r), None, None) => Some(Target::Ratio(r)),
            (None, None, Some(e), None) => Some(Target::Energy(e)),
            (None, None, None, Some(r)) => Some(Target::Rank(r)),
            (None, None, None, None) => bail!("lowrank needs one of option `ratio` R (e.g. 0.8), option `energy` E or option `rank` R"),
            _ => bail!("option `ratio`, option `energy` and option `rank` each choose the ranks: give one"),
        })
    }
}

impl Stage for LowrankConfig {
    fn name(&self) -> &'static str {
        "lowrank"
    }

    fn check(&self) -> Result<()> {
        self.check_ranges()?;
        Method::parse(&self.method)?;
        self.target()?;
        self.calibration.check()
    }

    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        let method = Method::parse(&self.method)?;
        let target = self.target()?;
        let cal = self.calibration.resolve(l, DECODER_SAMPLES)?;
        let bytes_in = whittle_eval::bench::model_bytes(l);
        let pb = ctx.progress("calibrate");
        let report = match (self.attention_rank, target) {
            (Some(r), _) => Done::Attention(attention_rank(l, r, method, self.damp, &cal.text, &cal.opts, pb)?),
            (None, Some(target)) => {
                let o = LowRankOptions { method, target, alpha: self.alpha, damp: self.damp };
                Done::Layers(lowrank_model(l, &o, &cal.text, &cal.opts, pb)?)
            }
            (None, None) => unreachable!("target() gives one without attention_rank"),
        };
        Ok(Box::new(LowrankStageReport { report, source: cal.opts.source, bytes_in, bytes_out: 0 }))
    }
}

/// Which factorisation ran.
pub enum Done {
    Layers(LowRankReport),
    Attention(AttentionRankReport),
}

pub struct LowrankStageReport {
    pub report: Done,
    source: String,
    bytes_in: u64,
    bytes_out: u64,
}

impl LowrankStageReport {
    fn sizes(&self) -> String {
        format!("model on disk {:.2} MB -> {:.2} MB", self.bytes_in as f64 / 1e6, self.bytes_out as f64 / 1e6)
    }
}

impl Report for LowrankStageReport {
    fn to_json(&self) -> serde_json::Value {
        match &self.report {
            Done::Layers(r) => serde_json::json!(r),
            Done::Attention(r) => serde_json::json!(r),
        }
    }

    fn table(&self) -> Table {
        match &self.report {
            Done::Layers(r) => {
                let mut t =
                    Table::new(&["layer", "shape", "rank", "params", "after", "weight err", "output err", "ms"]);
                for x in &r.layers {
                    t.row(vec![
                        x.name.clone(),
                        format!("{}x{}", x.out_features, x.in_features),
                        x.rank.map_or("dense".to_string(), |r| r.to_string()),
                        human(x.params_before),
                        human(x.params_after),
                        format!("{:.4}", x.weight_rel_err),
                        format!("{:.4}", x.output_rel_err),
                        format!("{:.1}", x.seconds * 1e3),
                    ]);
                }
                t
            }
            Done::Attention(r) => {
                let mut t = Table::new(&["block", "heads", "dims", "Q+K", "after", "score err", "ms"]);
                for b in &r.blocks {
                    t.row(vec![
                        b.block.to_string(),
                        b.heads.to_string(),
                        format!("{} -> {}", b.dim_before, b.dim_after),
                        human(b.params_before),
                        human(b.params_after),
                        format!("{:.4}", b.score_rel_err),
                        format!("{:.1}", b.seconds * 1e3),
                    ]);
                }
                t
            }
        }
    }

    fn summary(&self) -> Vec<String> {
        let (sizes, src) = (self.sizes(), &self.source);
        vec![match &self.report {
            Done::Layers(r) => format!(
                "{}: {} of {} block Linears factorised; their parameters {} -> {} ({:.1}% of dense); {sizes}; {} calibration tokens of {src}; {:.1}s",
                r.method,
                r.layers.iter().filter(|x| x.rank.is_some()).count(),
                r.layers.len(),
                human(r.params_before),
                human(r.params_after),
                percent(r.params_after, r.params_before),
                r.tokens,
                r.seconds
            ),
            Done::Attention(r) => {
                let cal = if r.tokens > 0 { format!("{} calibration tokens of {src}", r.tokens) } else { "no calibration".into() };
                format!(
                    "{} attention rank {}: query+key parameters {} -> {} ({:.1}%); {sizes}; {cal}; {:.1}s",
                    r.method,
                    r.rank,
                    human(r.params_before),
                    human(r.params_after),
                    percent(r.params_after, r.params_before),
                    r.seconds
                )
            }
        }]
    }

    fn saved(&mut self, out: &std::path::Path) {
        self.bytes_out = whittle_eval::bench::weight_bytes(out);
    }
}
