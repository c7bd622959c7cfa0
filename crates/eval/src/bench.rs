//! Speed, size and memory.
//!
//! - Encoders (the STS-B throughput protocol): the first `n_sent` sentences of `sts-test.tsv` (sentence1,
//!   sentence2, sentence1, ...), batches of `batch` padded to the longest, `max_len` cap, tokenization
//!   included as in the peers' scripts; sentences/s (median of `reps`), then batch-1 latency over the first
//!   `n_latency` sentences, p50/p95/p99.
//! - Decoders (llama-bench): `pp` = one prompt of `pp` tokens from an empty cache (logits of the last
//!   position only); `tg` = `tg` single-token steps after a 16-token prompt; tokens/s, median and range of
//!   `reps` runs.
//! - Always: a warm-up before timing, model bytes on disk, bits per weight of the Linear layers as stored,
//!   peak RSS, CPU utilisation during the timed runs, threads and the kernel path.

use std::path::Path;

use candle_core::Tensor;
use whittle_models::llama::KvCache;
use whittle_models::{names, text, Loaded, Model, SourceFormat};

use crate::data::StsPair;
use crate::stats::{median, percentile, range};
use crate::sys::{kernel, peak_rss_mb, threads, timed};
use crate::{Error, Metrics, Progress, Result};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    pub max_len: usize,
    pub n_sent: usize,
    pub n_latency: usize,
    pub pp: usize,
    pub tg: usize,
    pub reps: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { batch: 32, max_len: 128, n_sent: 1000, n_latency: 200, pp: 512, tg: 128, reps: 5 }
    }
}

/// Bytes of the model's weight files on disk.
pub fn model_bytes(l: &Loaded) -> u64 {
    weight_bytes(&l.source.path)
}

/// Bytes of the weights at `p`: the file itself, or a directory's `.safetensors` / `.gguf` files.
pub fn weight_bytes(p: &std::path::Path) -> u64 {
    if p.is_file() {
        return std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors" || x == "gguf"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// Bits per weight of the Linear layers as the source file stores them (tied heads excluded: they are the
/// embedding table).
pub fn linear_bpw(l: &Loaded) -> Option<f64> {
    let (mut bits, mut params) = (0f64, 0f64);
    for (name, lin) in l.model.linears() {
        let w = format!("{name}.weight");
        let src = match l.source.format {
            SourceFormat::Gguf => names::hf_to_gguf(&w).unwrap_or(w),
            SourceFormat::HfDir => w,
        };
        // Scales, packed codes and sparse layouts (`.weight_*`) and quantized low-rank factors (`.u.weight*`,
        // `.v.weight*`) are part of the weight's cost.
        let own = [format!("{name}.weight_"), format!("{name}.u.weight"), format!("{name}.v.weight")];
        let parts: usize = l
            .source
            .tensors
            .iter()
            .filter(|t| t.name == src || own.iter().any(|p| t.name.starts_with(p.as_str())))
            .map(|t| t.bytes)
            .sum();
        if parts > 0 {
            bits += 8.0 * parts as f64;
            params += (lin.in_features() * lin.out_features()) as f64;
        }
    }
    (params > 0.0).then(|| bits / params)
}

fn common(l: &Loaded, m: &mut Metrics) {
    m.model_bytes = Some(model_bytes(l));
    m.bpw = linear_bpw(l);
    m.threads = Some(threads());
    let int8 = l.model.linears().iter().any(|(_, lin)| lin.is_quantized());
    let sparse = l.model.linears().iter().any(|(_, lin)| lin.is_sparse());
    let mut k =
        if int8 { format!("int8 {} + {}", l.model.run_config().dispatch().isa.name(), kernel()) } else { kernel() };
    if sparse {
        let isa = if whittle_kernels::sparse::PackedSparse::available() { "avx512" } else { "dense fallback" };
        k = format!("sparse f32 {isa} + {k}");
    }
    m.kernel = Some(k);
}

/// Encoder throughput and latency on `pairs` (the STS-B corpus).
pub fn bench_encoder(l: &Loaded, pairs: &[StsPair], o: &BenchOptions, progress: Progress) -> Result<Metrics> {
    let Model::Bert(_) = &l.model else {
        return Err(Error::Usage("bench_encoder needs an encoder".into()));
    };
    if o.batch == 0 || o.max_len < 2 {
        return Err(Error::Usage("option `batch` must be >= 1 and option `max_len` >= 2".into()));
    }
    let corpus: Vec<&str> = pairs.iter().flat_map(|p| [p.0.as_str(), p.1.as_str()]).take(o.n_sent).collect();
    if corpus.is_empty() {
        return Err(Error::Usage("no sentences to benchmark".into()));
    }
    let total = o.reps + 1;
    text::embed_texts(l, &corpus[..o.batch.min(corpus.len())], o.max_len, o.batch)?; // warm-up
    let mut rates = Vec::new();
    let mut utils = Vec::new();
    for r in 0..o.reps.max(1) {
        let (res, wall, util) = timed(|| text::embed_texts(l, &corpus, o.max_len, o.batch));
        res?;
        rates.push(corpus.len() as f64 / wall);
        utils.extend(util);
        progress(r + 1, total);
    }
    let mut lat = Vec::new();
    for s in corpus.iter().take(o.n_latency) {
        let (res, wall, _) = timed(|| text::embed_texts(l, &[s], o.max_len, 1));
        res?;
        lat.push(wall * 1e3);
    }
    progress(total, total);
    let mut m = Metrics {
        task: Some("bench".into()),
        sent_per_s: Some(median(&rates)),
        sent_per_s_range: Some(range(&rates)),
        p50_ms: Some(percentile(&lat, 50.0)),
        p95_ms: Some(percentile(&lat, 95.0)),
        p99_ms: Some(percentile(&lat, 99.0)),
        cpu_util: (!utils.is_empty()).then(|| median(&utils)),
        items: Some(corpus.len()),
        ..Default::default()
    };
    common(l, &mut m);
    m.peak_rss_mb = peak_rss_mb();
    Ok(m)
}

/// Decoder prefill (pp) and generation (tg) speed, llama-bench style.
pub fn bench_decoder(l: &Loaded, o: &BenchOptions, progress: Progress) -> Result<Metrics> {
    let Model::Llama(m) = &l.model else {
        return Err(Error::Usage("bench_decoder needs a decoder".into()));
    };
    let vocab = m.config.vocab_size as u32;
    if o.pp + 16 + o.tg > m.config.max_position_embeddings || o.pp == 0 || o.tg == 0 {
        return Err(Error::Usage(format!(
            "option `pp` and option `tg` must be >= 1 and fit the context ({})",
            m.config.max_position_embeddings
        )));
    }
    // Token ids 1000.. as the peers' script uses (wrapped into the vocabulary).
    let toks: Vec<u32> = (0..(o.pp.max(16 + o.tg)) as u32).map(|i| (1000 + i) % vocab).collect();
    let run = |ids: &[u32], cache: &mut KvCache| -> Result<()> {
        let x = Tensor::new(ids, m.embed_tokens.device())?.unsqueeze(0)?;
        m.forward_last(&x, cache)?;
        Ok(())
    };
    run(&toks[..8], &mut KvCache::default())?; // warm-up
    let total = 2 * o.reps.max(1);
    let (mut pp, mut tg, mut utils) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..o.reps.max(1) {
        let (res, wall, util) = timed(|| run(&toks[..o.pp], &mut KvCache::default()));
        res?;
        pp.push(o.pp as f64 / wall);
        utils.extend(util);
        progress(2 * r + 1, total);
        let mut cache = KvCache::default();
        run(&toks[..16], &mut cache)?;
        let (res, wall, util) = timed(|| -> Result<()> {
            for i in 0..o.tg {
                run(&toks[16 + i..17 + i], &mut cache)?;
            }
            Ok(())
        });
        res?;
        tg.push(o.tg as f64 / wall);
        utils.extend(util);
        progress(2 * r + 2, total);
    }
    let mut out = Metrics {
        task: Some("bench".into()),
        pp_tok_s: Some(median(&pp)),
        pp_tok_s_range: Some(range(&pp)),
        tg_tok_s: Some(median(&tg)),
        tg_tok_s_range: Some(range(&tg)),
        cpu_util: (!utils.is_empty()).then(|| median(&utils)),
        ..Default::default()
    };
    common(l, &mut out);
    out.peak_rss_mb = peak_rss_mb();
    Ok(out)
}

/// Runs the benchmark that fits the model's family.
pub fn bench(l: &Loaded, sts_corpus: &[StsPair], o: &BenchOptions, progress: Progress) -> Result<Metrics> {
    match &l.model {
        Model::Bert(_) => bench_encoder(l, sts_corpus, o, progress),
        Model::Llama(_) => bench_decoder(l, o, progress),
    }
}

/// Where saved results of a model live: `MODEL.whittle.json` beside a file, `whittle-results.json` inside a
/// directory.
pub fn results_path(model: &Path) -> std::path::PathBuf {
    if model.is_dir() {
        model.join("whittle-results.json")
    } else {
        let mut s = model.as_os_str().to_owned();
        s.push(".whittle.json");
        s.into()
    }
}
