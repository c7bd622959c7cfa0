//! `share`: cross-layer weight sharing (ALBERT) — each group of blocks uses one set of weights, stored and held
//! once — and optionally ALBERT's factorised word embedding, weighted by token counts in calibration text.
//! Measures the quality before and after (before any recovery).

use serde::Serialize;
use whittle_compress::share::{self, EmbeddingReport, Init, ShareReport};
use whittle_eval::data;
use whittle_models::{Loaded, Model};

pub use crate::config::ShareConfig;
use crate::measure::quick_quality;
use crate::report::human;
use crate::{bail, Ctx, Error, Report, Result, Stage};

/// Windows of the quick perplexity check (decoders).
const QUALITY_WINDOWS: usize = 4;

/// 1 + the count of each token of `l`'s vocabulary in `text` (one sentence per line).
fn token_weights(l: &Loaded, text: &str) -> Result<Vec<f64>> {
    let mut w = vec![1f64; l.model.vocab_size()];
    for line in text.lines().filter(|s| !s.trim().is_empty()) {
        let enc = l.tokenizer.encode(line, true).map_err(|e| Error::Config(format!("tokenizing: {e}")))?;
        for &id in enc.get_ids() {
            if let Some(c) = w.get_mut(id as usize) {
                *c += 1.0;
            }
        }
    }
    Ok(w)
}

impl Stage for ShareConfig {
    fn name(&self) -> &'static str {
        "share"
    }

    fn check(&self) -> Result<()> {
        self.check_ranges()?;
        Init::parse(&self.init)?;
        if !matches!(self.groups.as_str(), "auto") {
            // The syntax alone (block indices need the model): a typo fails before loading.
            whittle_compress::share::check_groups_syntax(&self.groups)?;
        }
        if self.calib.is_some() && self.embedding_rank.is_none() {
            bail!("option `calib` weights option `embedding_rank`; set option `embedding_rank` R too");
        }
        if self.unique.is_some() && self.groups != "auto" {
            bail!("option `unique` applies to option `groups` auto");
        }
        crate::config::input_file("calib", self.calib.as_deref())
    }

    fn apply(&self, l: &mut Loaded, _ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        self.check()?;
        if self.embedding_rank.is_some() && !matches!(l.model, Model::Bert(_)) {
            bail!("option `embedding_rank` factorises a BERT encoder's word embeddings; this model is a decoder (its embeddings are tied to the output head)");
        }
        let n = l.model.n_blocks();
        let groups = match self.groups.as_str() {
            "auto" => share::auto_groups(&l.model, self.unique.unwrap_or(n.div_ceil(2)))?,
            g => share::parse_groups(g, n)?,
        };
        let init = Init::parse(&self.init)?;
        let bytes_before = whittle_eval::bench::model_bytes(l);
        let before = quick_quality(l, QUALITY_WINDOWS)?;
        let report = share::share_blocks(l, &groups, init)?;
        let embedding = match self.embedding_rank {
            Some(rank) => {
                let (_, text) = data::read_text(self.calib.as_deref(), data::WIKI_VALID)?;
                let w = token_weights(l, &text)?;
                Some(share::factorise_embeddings(l, rank, &w)?)
            }
            None => None,
        };
        let after = quick_quality(l, QUALITY_WINDOWS)?;
        let quality =
            if before.lower_is_better { format!("PPL ({QUALITY_WINDOWS} windows)") } else { "STS-B Spearman".into() };
        Ok(Box::new(ShareStageReport {
            report,
            embedding,
            quality,
            before: before.value,
            after: after.value,
            blocks: n,
            bytes_before,
            bytes_after: 0,
        }))
    }
}

/// Sharing's report, the embedding factorisation's, and the quality before and after.
#[derive(Serialize)]
pub struct ShareStageReport {
    pub report: ShareReport,
    pub embedding: Option<EmbeddingReport>,
    pub quality: String,
    pub before: f64,
    pub after: f64,
    #[serde(skip)]
    blocks: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Report for ShareStageReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self)
    }

    fn summary(&self) -> Vec<String> {
        let r = &self.report;
        let mut out = Vec::new();
        for g in &r.groups {
            let ch: Vec<String> = g.rel_change.iter().map(|c| format!("{c:.3}")).collect();
            let from = g.central.map_or("mean".to_string(), |c| format!("block {c}"));
            out.push(format!(
                "blocks {:?} share one set of weights ({from}); relative change per member: {}",
                g.blocks,
                ch.join(", ")
            ));
        }
        if let Some(e) = &self.embedding {
            out.push(format!(
                "word embeddings factorised to rank {}: parameters {} -> {}, relative error {:.3} (token-weighted {:.3}), {:.1}s",
                e.rank,
                human(e.params_before),
                human(e.params_after),
                e.rel_err,
                e.weighted_rel_err,
                e.seconds
            ));
        }
        out.push(format!(
            "{} -> {} unique blocks; block parameters {} -> {}; file {:.2} MB -> {:.2} MB ({:.1}% smaller); {} {:.4} -> {:.4} before recovery (whittle distill recovers it)",
            self.blocks,
            r.unique_blocks,
            human(r.params_before),
            human(r.params_after),
            self.bytes_before as f64 / 1e6,
            self.bytes_after as f64 / 1e6,
            100.0 * (1.0 - self.bytes_after as f64 / self.bytes_before.max(1) as f64),
            self.quality,
            self.before,
            self.after
        ));
        out
    }

    fn saved(&mut self, out: &std::path::Path) {
        self.bytes_after = whittle_eval::bench::weight_bytes(out);
    }
}
