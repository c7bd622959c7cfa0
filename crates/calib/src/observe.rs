//! The observe mode: run text through the float model with an observer on every Linear's input (one pass),
//! and return the statistics per layer (ranges and histograms for static activation scales, per-channel max |x| for
//! SmoothQuant, mean x² for importance matrices, sample rows for output-error reports).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use whittle_core::observe::ActStats;
use whittle_models::llama::KvCache;
use whittle_models::{text, Loaded, Model};

use crate::{Error, Result};

/// How much calibration text to run.
#[derive(Debug, Clone)]
pub struct CalibOptions {
    /// Decoders: windows of `seq_len` tokens; encoders: sentences (lines) of at most `seq_len` tokens.
    pub samples: usize,
    pub seq_len: usize,
    /// Where the text came from, for error messages.
    pub source: String,
    /// The layer-wise engine runs its calibration forward with int8 weights and activations (w8a8 dynamic, about
    /// 2× faster on VNNI CPUs); the solvers then see the inputs of an 8-bit-rounded model.
    pub int8: bool,
}

/// Statistics per Linear name, with the time and tokens spent.
pub struct Calibration {
    pub stats: BTreeMap<String, ActStats>,
    pub tokens: usize,
    pub seconds: f64,
}

/// Runs `text` through `l` with observers on every Linear.
pub fn calibrate(
    l: &mut Loaded,
    text: &str,
    o: &CalibOptions,
    progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    calibrate_with(l, text, o, |_, k| Some(ActStats::new(k)), progress)
}

/// Like [`calibrate`], observing the Linears for which `make(name, in_features)` gives a record (e.g.
/// [`ActStats::hessian`] for the block Linears alone).
pub fn calibrate_with(
    l: &mut Loaded,
    text: &str,
    o: &CalibOptions,
    make: impl Fn(&str, usize) -> Option<ActStats>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    let t0 = Instant::now();
    let handles: Vec<(String, Arc<Mutex<ActStats>>)> = l
        .model
        .linears_mut()
        .into_iter()
        .filter_map(|(n, lin)| {
            let s = make(&n, lin.in_features())?;
            Some((n, lin.observe_with(s)))
        })
        .collect();
    let run = run_text(l, text, o, &mut progress);
    for (_, lin) in l.model.linears_mut() {
        lin.unobserve();
    }
    let tokens = run?;
    let mut stats = BTreeMap::new();
    for (n, h) in handles {
        let s = Arc::try_unwrap(h)
            .map(|m| m.into_inner().expect("observer lock"))
            .unwrap_or_else(|a| a.lock().expect("observer lock").clone());
        if s.non_finite {
            return Err(Error::NonFinite(format!("{n} (its input on the calibration text)")));
        }
        stats.insert(n, s);
    }
    Ok(Calibration { stats, tokens, seconds: t0.elapsed().as_secs_f64() })
}

fn run_text(l: &Loaded, text: &str, o: &CalibOptions, progress: &mut impl FnMut(usize, usize)) -> Result<usize> {
    match &l.model {
        Model::Llama(m) => {
            let windows = decoder_windows(l, text, o)?;
            let n = windows.len();
            for (i, w) in windows.iter().enumerate() {
                let x = Tensor::new(w.as_slice(), m.embed_tokens.device())?.unsqueeze(0)?;
                m.forward(&x, &mut KvCache::default())?;
                progress(i + 1, n);
            }
            Ok(n * o.seq_len)
        }
        Model::Bert(_) => {
            // Lines of prose (WikiText headings and blank lines skipped), one sentence each.
            let lines: Vec<&str> =
                text.lines().map(str::trim).filter(|s| s.len() > 20 && !s.starts_with('=')).take(o.samples).collect();
            if lines.is_empty() {
                return Err(Error::Text(format!("calibration text {} has no lines of prose", o.source)));
            }
            let batch = 16;
            let mut tokens = 0;
            for (i, c) in lines.chunks(batch).enumerate() {
                text::embed_texts(l, c, o.seq_len, batch)?;
                tokens += c.iter().map(|s| s.split_whitespace().count()).sum::<usize>();
                progress(((i + 1) * batch).min(lines.len()), lines.len());
            }
            Ok(tokens)
        }
    }
}

/// Up to `o.samples` windows of `o.seq_len` tokens from the start of `text`, each starting with BOS when the
/// model has one (as the perplexity protocol's chunks do: the attention sink's huge activations at BOS must be
/// in the statistics).
pub fn decoder_windows(l: &Loaded, text: &str, o: &CalibOptions) -> Result<Vec<Vec<u32>>> {
    // Enough text for the windows (about 4 characters a token), tokenized once.
    let want = o.samples.saturating_mul(o.seq_len);
    let mut end = text.len().min(want.saturating_mul(8));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let enc =
        l.tokenizer.encode(&text[..end], false).map_err(|e| Error::Text(format!("tokenizing {}: {e}", o.source)))?;
    let ids = enc.get_ids();
    if ids.len() < o.seq_len {
        return Err(Error::Text(format!(
            "calibration text {} has {} tokens, fewer than one sample of {} (option `calib_seq_len`)",
            o.source,
            ids.len(),
            o.seq_len
        )));
    }
    let n = (ids.len() / o.seq_len).min(o.samples);
    Ok((0..n)
        .map(|i| {
            let mut w: Vec<u32> = ids[i * o.seq_len..(i + 1) * o.seq_len].to_vec();
            if let Some(b) = l.bos_token_id {
                w[0] = b; // as the perplexity protocol: the first token of every chunk is BOS
            }
            w
        })
        .collect())
}
