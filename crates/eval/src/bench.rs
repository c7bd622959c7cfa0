//! Speed, size and memory.
//!
//! - Encoders (the STS-B throughput protocol): the first `n_sent` sentences of `sts-test.tsv` (sentence1,
//!   sentence2, sentence1, ...), batches of `batch` consecutive sentences in that order (as the peers' scripts
//!   form them), `max_len` cap, tokenization included as in the peers' scripts; sentences/s (median of
//!   `reps`), and batch-1 latency over the first `n_latency` sentences (a share of them after each
//!   repetition), p50/p95/p99. Each batch runs packed by default (its real tokens only, attention per
//!   sentence: [`text::Layout::Packed`]); `layout` Padded pads it to its longest sentence as the peers do;
//!   `sort_by_length` forms the batches from the whole corpus sorted by length instead (not the peers'
//!   protocol: reported as `sorted_by_length`).
//! - Decoders (llama-bench): `pp` = one prompt of `pp` tokens from an empty cache (logits of the last
//!   position only); `tg` = `tg` single-token steps after a 16-token prompt; tokens/s, median and range of
//!   `reps` runs.
//! - Always: a warm-up before timing, model bytes on disk, bits per weight of the Linear layers as stored,
//!   peak RSS, CPU utilisation during the timed runs, threads and the kernel path; each repetition's figure
//!   and start time, and the CPU other processes took meanwhile ([`busy_warning`]).
//! - [`Runner`] runs one repetition at a time, so `compare` interleaves its models' repetitions.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use whittle_models::llama::{KvCache, Llama};
use whittle_models::{names, text, Loaded, Model, SourceFormat};

use crate::data::StsPair;
use crate::stats::{median, percentile, range};
use crate::sys::{kernel, peak_rss_mb, threads, timed, watched, CpuDelta};
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
    /// How each encoder batch runs (packed by default).
    pub layout: text::Layout,
    /// Encoder batches from the corpus sorted by length rather than in order of arrival.
    pub sort_by_length: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            batch: 32,
            max_len: 128,
            n_sent: 1000,
            n_latency: 200,
            pp: 512,
            tg: 128,
            reps: 5,
            layout: text::Layout::Packed,
            sort_by_length: false,
        }
    }
}

impl BenchOptions {
    /// How the encoder benchmark embeds `batch` texts at a time.
    fn embed(&self, batch: usize) -> text::EmbedOptions {
        text::EmbedOptions { max_len: self.max_len, batch, layout: self.layout, sort_by_length: self.sort_by_length }
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
    // Dense weights kept 16-bit run the half kernel: say which (and drop the f32 kernel when nothing is f32).
    let names: Vec<String> = l.model.linears().iter().map(|(_, lin)| lin.storage_name()).collect();
    let half: Vec<String> = [whittle_kernels::half::Half::F16, whittle_kernels::half::Half::Bf16]
        .into_iter()
        .filter(|h| names.iter().any(|n| n == h.name()))
        .map(whittle_kernels::half::path)
        .collect();
    if !half.is_empty() {
        let f32_too = int8 || sparse || names.iter().any(|n| n == "f32");
        k = if f32_too { format!("{} + {k}", half.join(" + ")) } else { half.join(" + ") };
    }
    m.kernel = Some(k);
}

/// Other processes' CPU at or above this, in cores on average over a model's timed repetitions, makes its
/// speed figures suspect ([`busy_warning`]): a quiet machine's daemons take a few hundredths of a core, a
/// competing job half a core or more.
pub const BUSY_OTHER_CORES: f64 = 0.25;
/// The same for a single repetition (one that lasted at least [`MIN_REP_S_FOR_PEAK`]): a spell that hit
/// one repetition hard.
pub const BUSY_OTHER_CORES_PEAK: f64 = 0.5;
/// Repetitions shorter than this do not count for the peak: `/proc/stat` counts in 10 ms ticks, so one tick
/// of a daemon in a 20 ms repetition reads as half a core.
pub const MIN_REP_S_FOR_PEAK: f64 = 0.5;
/// Hypervisor steal at or above this share of the machine's CPU time makes speed figures suspect.
pub const BUSY_STEAL_FRAC: f64 = 0.05;

/// One model's benchmark, prepared (validated and warmed up) and then run one timed repetition at a time,
/// so that `compare` can make several models take turns (A, B, A, B, …): a busy spell then hits them
/// alike instead of whichever model happened to be measured during it. Each repetition also records when
/// it started and how much CPU other processes took meanwhile ([`CpuDelta`]).
pub struct Runner<'a> {
    l: &'a Loaded,
    o: BenchOptions,
    epoch: Instant,
    work: Work<'a>,
    done: usize,
    starts: Vec<f64>,
    utils: Vec<f64>,
    cpu: Vec<CpuDelta>,
}

enum Work<'a> {
    /// Encoders: sentences/s over the corpus per repetition, and batch-1 latency over a share of the
    /// first `n_latency` sentences per repetition.
    Encoder { corpus: Vec<&'a str>, rates: Vec<f64>, lat: Vec<f64> },
    /// Decoders: one pp and one tg run per repetition.
    Decoder { m: &'a Llama, toks: Vec<u32>, pp: Vec<f64>, tg: Vec<f64> },
}

impl<'a> Runner<'a> {
    /// Validates the options, warms the model up, and times repetitions from `epoch` (shared by the models
    /// of a comparison).
    pub fn new(l: &'a Loaded, pairs: &'a [StsPair], o: &BenchOptions, epoch: Instant) -> Result<Self> {
        let work = match &l.model {
            Model::Bert(_) => {
                if o.batch == 0 || o.max_len < 2 {
                    return Err(Error::Usage("option `batch` must be >= 1 and option `max_len` >= 2".into()));
                }
                let corpus: Vec<&str> =
                    pairs.iter().flat_map(|p| [p.0.as_str(), p.1.as_str()]).take(o.n_sent).collect();
                if corpus.is_empty() {
                    return Err(Error::Usage("no sentences to benchmark".into()));
                }
                text::embed_texts_with(l, &corpus[..o.batch.min(corpus.len())], &o.embed(o.batch))?; // warm-up
                Work::Encoder { corpus, rates: vec![], lat: vec![] }
            }
            Model::Llama(m) => {
                let vocab = m.config.vocab_size as u32;
                if o.pp + 16 + o.tg > m.config.max_position_embeddings || o.pp == 0 || o.tg == 0 {
                    return Err(Error::Usage(format!(
                        "option `pp` and option `tg` must be >= 1 and fit the context ({})",
                        m.config.max_position_embeddings
                    )));
                }
                // Token ids 1000.. as the peers' script uses (wrapped into the vocabulary).
                let toks: Vec<u32> = (0..(o.pp.max(16 + o.tg)) as u32).map(|i| (1000 + i) % vocab).collect();
                decode(m, &toks[..8], &mut KvCache::default())?; // warm-up
                Work::Decoder { m, toks, pp: vec![], tg: vec![] }
            }
        };
        Ok(Self { l, o: o.clone(), epoch, work, done: 0, starts: vec![], utils: vec![], cpu: vec![] })
    }

    /// Timed repetitions in all (`reps`, at least one).
    pub fn reps(&self) -> usize {
        self.o.reps.max(1)
    }

    /// Runs the next timed repetition.
    pub fn rep(&mut self) -> Result<()> {
        let (r, reps) = (self.done, self.reps());
        if r >= reps {
            return Err(Error::Usage(format!("all {reps} repetitions have run")));
        }
        // One untimed batch (or prompt) first: in a comparison the other models ran since this one's last
        // repetition and took the caches; alone it costs a batch and changes nothing.
        match &self.work {
            Work::Encoder { corpus, .. } => {
                text::embed_texts_with(self.l, &corpus[..self.o.batch.min(corpus.len())], &self.o.embed(self.o.batch))?;
            }
            Work::Decoder { m, toks, .. } => decode(m, &toks[..8], &mut KvCache::default())?,
        }
        self.starts.push(self.epoch.elapsed().as_secs_f64());
        let (l, o) = (self.l, &self.o);
        let utils = &mut self.utils;
        let (res, cpu) = watched(|| -> Result<()> {
            match &mut self.work {
                Work::Encoder { corpus, rates, lat } => {
                    let (res, wall, util) = timed(|| text::embed_texts_with(l, corpus, &o.embed(o.batch)));
                    res?;
                    rates.push(corpus.len() as f64 / wall);
                    utils.extend(util);
                    // This repetition's share of the latency sentences.
                    let n = o.n_latency.min(corpus.len());
                    for s in &corpus[r * n / reps..(r + 1) * n / reps] {
                        let (res, wall, _) = timed(|| text::embed_texts_with(l, &[s], &o.embed(1)));
                        res?;
                        lat.push(wall * 1e3);
                    }
                }
                Work::Decoder { m, toks, pp, tg } => {
                    let (res, wall, util) = timed(|| decode(m, &toks[..o.pp], &mut KvCache::default()));
                    res?;
                    pp.push(o.pp as f64 / wall);
                    utils.extend(util);
                    let mut cache = KvCache::default();
                    decode(m, &toks[..16], &mut cache)?;
                    let (res, wall, util) = timed(|| -> Result<()> {
                        for i in 0..o.tg {
                            decode(m, &toks[16 + i..17 + i], &mut cache)?;
                        }
                        Ok(())
                    });
                    res?;
                    tg.push(o.tg as f64 / wall);
                    utils.extend(util);
                }
            }
            Ok(())
        });
        res?;
        self.cpu.extend(cpu);
        self.done += 1;
        Ok(())
    }

    /// The figures of the repetitions that ran.
    pub fn finish(self) -> Metrics {
        let mut m = Metrics {
            task: Some("bench".into()),
            cpu_util: (!self.utils.is_empty()).then(|| median(&self.utils)),
            rep_starts_s: Some(self.starts),
            ..Default::default()
        };
        match self.work {
            Work::Encoder { corpus, rates, lat } => {
                m.sent_per_s = Some(median(&rates));
                m.sent_per_s_range = Some(range(&rates));
                m.sent_per_s_reps = Some(rates);
                m.p50_ms = Some(percentile(&lat, 50.0));
                m.p95_ms = Some(percentile(&lat, 95.0));
                m.p99_ms = Some(percentile(&lat, 99.0));
                m.items = Some(corpus.len());
                m.packed = Some(self.o.layout == text::Layout::Packed);
                m.sorted_by_length = Some(self.o.sort_by_length);
            }
            Work::Decoder { pp, tg, .. } => {
                m.pp_tok_s = Some(median(&pp));
                m.pp_tok_s_range = Some(range(&pp));
                m.pp_tok_s_reps = Some(pp);
                m.tg_tok_s = Some(median(&tg));
                m.tg_tok_s_range = Some(range(&tg));
                m.tg_tok_s_reps = Some(tg);
            }
        }
        if !self.cpu.is_empty() {
            let mut all = CpuDelta::default();
            self.cpu.iter().for_each(|d| all.add(d));
            m.other_cpu = Some(all.other_cores());
            m.steal_frac = Some(all.steal_frac());
            let long = self.cpu.iter().filter(|d| d.wall_s >= MIN_REP_S_FOR_PEAK);
            m.other_cpu_max = long.map(CpuDelta::other_cores).reduce(f64::max);
        }
        common(self.l, &mut m);
        m.peak_rss_mb = peak_rss_mb();
        m
    }
}

/// One forward of `ids` (a prompt or one token) on `cache`, logits of the last position only.
fn decode(m: &Llama, ids: &[u32], cache: &mut KvCache) -> Result<()> {
    let x = Tensor::new(ids, m.embed_tokens.device())?.unsqueeze(0)?;
    m.forward_last(&x, cache)?;
    Ok(())
}

/// Why `m`'s speed figures are suspect, if other processes took enough CPU while it was measured (see
/// [`BUSY_OTHER_CORES`]).
pub fn busy_warning(m: &Metrics) -> Option<String> {
    let name = m.model.as_deref().unwrap_or("the model");
    let (mean, peak, steal) = (m.other_cpu.unwrap_or(0.0), m.other_cpu_max.unwrap_or(0.0), m.steal_frac.unwrap_or(0.0));
    if mean < BUSY_OTHER_CORES && peak < BUSY_OTHER_CORES_PEAK && steal < BUSY_STEAL_FRAC {
        return None;
    }
    let mut why = Vec::new();
    if mean >= BUSY_OTHER_CORES || peak >= BUSY_OTHER_CORES_PEAK {
        why.push(format!(
            "other processes used {mean:.2} of a core on average and up to {peak:.2} in one repetition (threshold {BUSY_OTHER_CORES} on average or {BUSY_OTHER_CORES_PEAK} in one repetition; /proc/stat's busy time less whittle's own)"
        ));
    }
    if steal >= BUSY_STEAL_FRAC {
        why.push(format!(
            "the hypervisor gave {:.0}% of the CPU time to other machines (/proc/stat's steal; threshold {:.0}%)",
            100.0 * steal,
            100.0 * BUSY_STEAL_FRAC
        ));
    }
    let why = why.join(", and ");
    Some(format!(
        "the machine was busy while {name} was measured: {why}; its speed figures are suspect: rerun on a quiet machine"
    ))
}

/// Encoder throughput and latency on `pairs` (the STS-B corpus).
pub fn bench_encoder(l: &Loaded, pairs: &[StsPair], o: &BenchOptions, progress: Progress) -> Result<Metrics> {
    let Model::Bert(_) = &l.model else {
        return Err(Error::Usage("bench_encoder needs an encoder".into()));
    };
    run_alone(l, pairs, o, progress)
}

/// Decoder prefill (pp) and generation (tg) speed, llama-bench style.
pub fn bench_decoder(l: &Loaded, o: &BenchOptions, progress: Progress) -> Result<Metrics> {
    let Model::Llama(_) = &l.model else {
        return Err(Error::Usage("bench_decoder needs a decoder".into()));
    };
    run_alone(l, &[], o, progress)
}

/// Every repetition of one model's [`Runner`].
fn run_alone(l: &Loaded, pairs: &[StsPair], o: &BenchOptions, progress: Progress) -> Result<Metrics> {
    let mut r = Runner::new(l, pairs, o, Instant::now())?;
    let reps = r.reps();
    for i in 0..reps {
        r.rep()?;
        progress(i + 1, reps);
    }
    Ok(r.finish())
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
