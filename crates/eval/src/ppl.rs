//! Perplexity with llama.cpp's protocol, and KL divergence against a base model as llama.cpp's
//! option `kl_divergence` reports it.
//!
//! Protocol (`data/README.md`, and `llama-perplexity`): tokenize the whole text (BOS first when the model's
//! tokenizer adds it, as llama.cpp's tokenizer does), cut it into chunks of `ctx` tokens, set each chunk's
//! first token to BOS, run each chunk from an empty cache, and score only the second half: the logits at
//! positions `ctx/2 - 1 .. ctx-2` predicting tokens `ctx/2 .. ctx-1`. PPL = exp(mean NLL); its standard error
//! by the delta method, `ppl · sqrt(var(NLL) / (N-1))`, as llama.cpp prints it.

use candle_core::Tensor;
use whittle_core::InvalidOption;
use whittle_models::llama::{KvCache, Llama};
use whittle_models::{text, Loaded, Model};

use crate::stats::percentile;
use crate::{Error, Metrics, Progress, Result};

/// Perplexity settings.
#[derive(Debug, Clone)]
pub struct PplOptions {
    /// Tokens per chunk (llama.cpp's `n_ctx`).
    pub ctx: usize,
    /// Score only the first `chunks` chunks (None = all).
    pub chunks: Option<usize>,
}

impl Default for PplOptions {
    fn default() -> Self {
        Self { ctx: 512, chunks: None }
    }
}

fn decoder<'a>(l: &'a Loaded, what: &str) -> Result<&'a Llama> {
    match &l.model {
        Model::Llama(m) => Ok(m),
        Model::Bert(_) => Err(Error::Usage(format!(
            "{what}: perplexity needs a decoder; {} is a BERT encoder (try option `task` sts)",
            l.source.path.display()
        ))),
    }
}

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(base ‖ model) = Σ p_base (log p_base − log p_model) of two log-softmax rows, and whether both pick the
/// same top token.
fn kl_top1(lq: &[f64], lp: &[f64]) -> (f64, bool) {
    let kl: f64 = lq.iter().zip(lp).map(|(&q, &p)| if q > -700.0 { q.exp() * (q - p) } else { 0.0 }).sum();
    (kl.max(0.0), argmax(lq) == argmax(lp))
}

/// One scored position of a model against a base, from their logit rows: what [`perplexity`] accumulates.
#[derive(Debug, Clone, Copy)]
pub struct RowScore {
    /// −log p_model(target), −log p_base(target).
    pub nll: f64,
    pub nll_base: f64,
    /// KL(base ‖ model), nats.
    pub kl: f64,
    /// Both rows pick the same top token.
    pub agree: bool,
}

/// Scores one position: the model's and the base's logits and the true next token (for logits computed
/// elsewhere, e.g. an export run in another runtime).
pub fn score_row(base: &[f32], model: &[f32], target: usize) -> RowScore {
    let (lq, lp) = (log_softmax(base), log_softmax(model));
    let (kl, agree) = kl_top1(&lq, &lp);
    RowScore { nll: -lp[target], nll_base: -lq[target], kl, agree }
}

/// The PPL-protocol chunks of `text` for `l`: `ctx` tokens each (BOS first when the tokenizer adds one),
/// the first `chunks` of them; each chunk's scored positions are `ctx/2 ..`.
pub fn chunks(l: &Loaded, text_in: &str, ctx: usize, chunks: usize) -> Result<Vec<Vec<u32>>> {
    if ctx < 4 {
        return Err(InvalidOption::new("ctx", ctx, "too small (at least 4)").into());
    }
    let ids = text::encode_prompt(l, text_in, false)?;
    let n = (ids.len() / ctx).min(chunks);
    if n == 0 {
        return Err(Error::Usage(format!("the text has {} tokens, fewer than option `ctx` {ctx}", ids.len())));
    }
    Ok((0..n)
        .map(|c| {
            let mut chunk = ids[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(bos) = l.bos_token_id {
                chunk[0] = bos;
            }
            chunk
        })
        .collect())
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Logits of positions `from..ctx-1` of one chunk: (n, V) as rows.
pub fn chunk_logits(m: &Llama, chunk: &[u32], from: usize) -> Result<Vec<Vec<f32>>> {
    let ids = Tensor::new(chunk, m.embed_tokens.device())?.unsqueeze(0)?; // (1, ctx)
    let h = m.forward_hidden(&ids, &mut KvCache::default()).map_err(Error::Model)?; // (1, ctx, C)
    let n = chunk.len() - 1 - from;
    let h = h.narrow(1, from, n)?.squeeze(0)?; // (n, C)
    let logits = m.lm_head.forward(&h).map_err(|e| Error::Model(e.into()))?; // (n, V)
    Ok(logits.to_vec2::<f32>()?)
}

/// Perplexity of `l` on `text`; with `base`, also KL(base ‖ model), its 99th percentile, top-1 agreement
/// and the PPL ratio, on the same tokens.
pub fn perplexity(
    l: &Loaded,
    text_in: &str,
    o: &PplOptions,
    base: Option<&Loaded>,
    progress: Progress,
) -> Result<Metrics> {
    let m = decoder(l, "model")?;
    let b = match base {
        Some(b) => Some(decoder(b, "option `base`")?),
        None => None,
    };
    if o.ctx < 4 {
        return Err(InvalidOption::new("ctx", o.ctx, "too small (at least 4)").into());
    }
    if o.ctx > m.config.max_position_embeddings {
        let reason = format!("larger than the model's context ({} tokens)", m.config.max_position_embeddings);
        return Err(InvalidOption::new("ctx", o.ctx, reason).into());
    }
    if o.chunks == Some(0) {
        return Err(InvalidOption::new("chunks", 0, "must be at least 1").into());
    }
    let ids = text::encode_prompt(l, text_in, false)?;
    if let Some(bl) = base {
        if bl.model.vocab_size() != l.model.vocab_size() || text::encode_prompt(bl, text_in, false)? != ids {
            return Err(Error::Usage(
                "option `base` tokenizes the text differently: KL divergence needs the same tokenizer".into(),
            ));
        }
    }
    let available = ids.len() / o.ctx;
    if available == 0 {
        return Err(Error::Usage(format!("the text has {} tokens, fewer than option `ctx` {}", ids.len(), o.ctx)));
    }
    let n_chunks = o.chunks.map_or(available, |c| c.min(available));
    let first = o.ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let (mut nll_base, mut klds, mut agree) = (0f64, Vec::new(), 0usize);
    progress(0, n_chunks);
    for c in 0..n_chunks {
        let mut chunk = ids[c * o.ctx..(c + 1) * o.ctx].to_vec();
        if let Some(bos) = l.bos_token_id {
            chunk[0] = bos;
        }
        let rows = chunk_logits(m, &chunk, first - 1)?;
        let base_rows = match b {
            Some(bm) => Some(chunk_logits(bm, &chunk, first - 1)?),
            None => None,
        };
        for (i, row) in rows.iter().enumerate() {
            let target = chunk[first + i] as usize;
            let lp = log_softmax(row);
            let v = -lp[target];
            nll += v;
            nll2 += v * v;
            count += 1;
            if let Some(br) = &base_rows {
                let lq = log_softmax(&br[i]);
                nll_base -= lq[target];
                let (kl, same) = kl_top1(&lq, &lp);
                klds.push(kl);
                agree += same as usize;
            }
        }
        progress(c + 1, n_chunks);
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let stderr = if var > 0.0 && count > 1 { ppl * (var / (count - 1) as f64).sqrt() } else { 0.0 };
    let mut out = Metrics {
        task: Some("ppl".into()),
        ppl: Some(ppl),
        ppl_stderr: Some(stderr),
        tokens: Some(count),
        chunks: Some(n_chunks),
        ctx: Some(o.ctx),
        ..Default::default()
    };
    if b.is_some() {
        let pb = (nll_base / count as f64).exp();
        out.ppl_base = Some(pb);
        out.ppl_ratio = Some(ppl / pb);
        out.kld_mean = Some(klds.iter().sum::<f64>() / klds.len() as f64);
        out.kld_p99 = Some(percentile(&klds, 99.0));
        out.top1_agree = Some(100.0 * agree as f64 / count as f64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -1000.0]);
        let s: f64 = lp.iter().map(|v| v.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&lp), 2);
    }
}
