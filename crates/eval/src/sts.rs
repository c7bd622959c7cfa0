//! STS-B: mean-pool + L2-normalise each sentence (truncated at `max_len` tokens), cosine of each pair,
//! Spearman correlation with the gold scores, × 100. With a base encoder: mean and minimum cosine between the
//! model's and the base's embedding of every sentence.

use whittle_models::{text, Loaded, Model};

use crate::data::StsPair;
use crate::stats::spearman;
use crate::{Error, Metrics, Progress, Result};

fn encoder_check(l: &Loaded, what: &str) -> Result<()> {
    match &l.model {
        Model::Bert(_) => Ok(()),
        Model::Llama(_) => Err(Error::Usage(format!(
            "{what}: this task needs a sentence encoder; {} is a decoder (try option `task` ppl)",
            l.source.path.display()
        ))),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Embeds `texts` in batches of 32, reporting progress.
pub fn embed_all(l: &Loaded, texts: &[&str], max_len: usize, progress: Progress) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        out.extend(text::embed_texts(l, chunk, max_len, 32)?);
        progress(out.len(), texts.len());
    }
    Ok(out)
}

pub fn sts(
    l: &Loaded,
    pairs: &[StsPair],
    max_len: usize,
    base: Option<&Loaded>,
    progress: Progress,
) -> Result<Metrics> {
    encoder_check(l, "model")?;
    if let Some(b) = base {
        encoder_check(b, "option `base`")?;
    }
    let sents: Vec<&str> = pairs.iter().flat_map(|(a, b, _)| [a.as_str(), b.as_str()]).collect();
    let e = embed_all(l, &sents, max_len, progress)?;
    let mut m = Metrics {
        task: Some("sts".into()),
        sts_spearman: Some(spearman_of(&e, pairs)),
        items: Some(pairs.len()),
        ..Default::default()
    };
    if let Some(b) = base {
        let eb = embed_all(b, &sents, max_len, &mut |_, _| {})?;
        let (mean, min) = cosine_agreement(&e, &eb);
        m.cos_mean = Some(mean);
        m.cos_min = Some(min);
    }
    Ok(m)
}

/// STS-B Spearman × 100 of embeddings `e` of the pairs' sentences in order (sentence 1, sentence 2, …),
/// L2-normalised (cosine = dot product): the figure [`sts`] reports, for embeddings computed elsewhere (an
/// export run in another runtime).
pub fn spearman_of(e: &[Vec<f32>], pairs: &[StsPair]) -> f64 {
    let cos: Vec<f64> = e.chunks(2).map(|p| dot(&p[0], &p[1])).collect();
    let gold: Vec<f64> = pairs.iter().map(|p| p.2).collect();
    100.0 * spearman(&cos, &gold)
}

/// Mean and minimum cosine between `a[i]` and `b[i]` (the same sentences embedded twice).
pub fn cosine_agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64) {
    let c: Vec<f64> = a.iter().zip(b).map(|(x, y)| dot(x, y) / (dot(x, x) * dot(y, y)).sqrt()).collect();
    (c.iter().sum::<f64>() / c.len().max(1) as f64, c.iter().copied().fold(f64::INFINITY, f64::min))
}

pub(crate) fn require_encoder(l: &Loaded) -> Result<()> {
    encoder_check(l, "model")
}
