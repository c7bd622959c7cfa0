//! Measurement as the stages and the CLI use it, all through `whittle_eval`: the task a model is scored on,
//! the speed benchmark, the quick quality check of progressive schedules / sharing / training, the figures
//! saved next to a model, and `compare`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use whittle_compress::schedule::Quality;
use whittle_eval::{bench, classify, cloze, data, ppl, sts, Metrics};
use whittle_models::Loaded;

pub use crate::config::{BenchConfig, EvalConfig, Task};
use crate::{bail, Ctx, Result};

/// Scores `l` (named `name` in the result) on its task; `base` gives KL divergence (ppl) or embedding cosine
/// (sts).
pub fn evaluate(l: &Loaded, name: &str, c: &EvalConfig, base: Option<&Loaded>, ctx: &Ctx) -> Result<Metrics> {
    let task = c.task.unwrap_or(if l.model.is_decoder() { Task::Ppl } else { Task::Sts });
    let t0 = Instant::now();
    let mut pb = ctx.progress(&format!("{task:?} {name}").to_lowercase());
    let data_path = c.data.as_deref();
    let mut m = match task {
        Task::Ppl => {
            let (_, text) = data::read_text(data_path, data::WIKI_TEST)?;
            ppl::perplexity(l, &text, &ppl::PplOptions { ctx: c.ctx, chunks: c.chunks }, base, &mut pb)?
        }
        Task::Cloze => {
            if c.chunks == Some(0) {
                return Err(whittle_core::InvalidOption::new("chunks", 0, "must be at least 1").into());
            }
            let lines = data::parse_jsonl_texts(&data::read_text(data_path, data::CLOZE)?)?;
            cloze::cloze(l, &lines, c.chunks, &mut pb)?
        }
        Task::Sts => {
            let pairs = data::parse_sts(&data::read_text(data_path, data::STS_TEST)?)?;
            sts::sts(l, &pairs, c.max_len, base, &mut pb)?
        }
        Task::Classify => {
            let rows = data::parse_sst2(&data::read_text(data_path, data::SST2_DEV)?)?;
            classify::classify(l, &rows, classify::N_TRAIN, c.max_len, &mut pb)?
        }
    };
    m.model = Some(name.to_string());
    m.seconds = Some(t0.elapsed().as_secs_f64());
    Ok(m)
}

/// Speed, size and memory of `l` (sentences/s and latency, or llama-bench pp/tg; decoders also the
/// machine's read bandwidth and the fraction of it decoding reaches).
pub fn bench(l: &Loaded, name: &str, c: &BenchConfig, ctx: &Ctx) -> Result<Metrics> {
    let mut rows = bench_interleaved(&[(l, name)], c, ctx)?;
    Ok(rows.remove(0))
}

/// This machine's streaming read bandwidth in GB/s, from `whittle machine --bandwidth --json` run as a child
/// process (its 256 MiB buffer must not count in the benchmarked process's peak memory, and mimalloc would
/// keep it); `None` when this process is not the `whittle` binary or the probe fails.
pub fn bandwidth_probe() -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    if exe.file_stem()? != "whittle" {
        return None;
    }
    let out = std::process::Command::new(exe)
        .args(["machine", "--bandwidth", "--reps", "4", "--json"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["read_gbps"].as_f64().filter(|g| g.is_finite() && *g > 0.0)
}

/// The quick quality check of schedules, sharing and training: perplexity on the first `windows` WikiText-2
/// test windows of 512 tokens (decoders), or STS-B test Spearman (encoders), with its throughput. The data
/// is read once, when the probe is made (before any expensive work).
pub struct QualityProbe {
    windows: usize,
    data: ProbeData,
}

enum ProbeData {
    Text(String),
    Pairs(Vec<data::StsPair>),
}

impl QualityProbe {
    /// The probe for models of `l`'s family.
    pub fn new(l: &Loaded, windows: usize) -> Result<Self> {
        let data = if l.model.is_decoder() {
            ProbeData::Text(data::read_text(None, data::WIKI_TEST)?.1)
        } else {
            ProbeData::Pairs(data::parse_sts(&data::read_text(None, data::STS_TEST)?)?)
        };
        Ok(Self { windows, data })
    }

    pub fn measure(&self, l: &Loaded) -> Result<Quality> {
        let t = Instant::now();
        let mut quiet = |_: usize, _: usize| {};
        let (name, value, lower_is_better, n) = match &self.data {
            ProbeData::Text(text) => {
                let o = ppl::PplOptions { ctx: 512, chunks: Some(self.windows) };
                let m = ppl::perplexity(l, text, &o, None, &mut quiet)?;
                ("ppl", m.ppl.unwrap_or(f64::NAN), true, m.tokens.unwrap_or(0) as f64)
            }
            ProbeData::Pairs(pairs) => {
                let m = sts::sts(l, pairs, 128, None, &mut quiet)?;
                ("sts", m.sts_spearman.unwrap_or(f64::NAN), false, 2.0 * pairs.len() as f64)
            }
        };
        Ok(Quality { name: name.into(), value, lower_is_better, per_second: n / t.elapsed().as_secs_f64() })
    }
}

/// [`QualityProbe`] made and used once.
pub fn quick_quality(l: &Loaded, windows: usize) -> Result<Quality> {
    QualityProbe::new(l, windows)?.measure(l)
}

/// Figures saved next to `model` by an earlier `--save`, if any.
pub fn read_saved(model: &str) -> Option<Metrics> {
    let s = std::fs::read_to_string(bench::results_path(Path::new(model))).ok()?;
    serde_json::from_str(&s).ok()
}

/// Saves `m` next to `model` (merged over what is saved there); returns the file.
pub fn save_results(model: &str, m: &Metrics) -> Result<PathBuf> {
    let path = bench::results_path(Path::new(model));
    let mut fresh = m.clone();
    fresh.merge(read_saved(model).unwrap_or_default());
    crate::output::write_json(&path, &fresh)?;
    Ok(path)
}

/// Options of [`compare`].
pub struct CompareOptions<'a> {
    pub chunks: usize,
    pub bench: &'a BenchConfig,
    pub reuse: bool,
    pub save: bool,
}

/// Evaluates and benchmarks `base` and each variant (the variants' quality measured against the base); one
/// row per model, the base first. Quality is measured model by model; speed with the models' repetitions
/// interleaved ([`bench_interleaved`]), so every model stays loaded until the end.
pub fn compare(
    open: impl Fn(&str) -> whittle_models::Result<Loaded>,
    base: &str,
    variants: &[String],
    o: &CompareOptions,
    ctx: &Ctx,
) -> Result<Vec<Metrics>> {
    let base_l = open(base)?;
    let decoder = base_l.model.is_decoder();
    let complete = |m: &Metrics, is_base: bool| {
        let (q, s) = if decoder { (m.ppl, m.pp_tok_s) } else { (m.sts_spearman, m.sent_per_s) };
        q.is_some() && s.is_some() && (is_base || !decoder || m.kld_mean.is_some() || m.cos_mean.is_some())
    };
    let names: Vec<&str> = std::iter::once(base).chain(variants.iter().map(String::as_str)).collect();
    let mut rows = Vec::new();
    // The variants loaded for the benchmark (None: the base, or figures reused), and the rows it fills.
    let mut loaded: Vec<Option<Loaded>> = Vec::new();
    let mut to_bench = Vec::new();
    for (i, &name) in names.iter().enumerate() {
        let is_base = i == 0;
        if let Some(m) = read_saved(name).filter(|m| o.reuse && complete(m, is_base)) {
            ctx.note(&format!("reusing saved figures for {name}"));
            rows.push(m);
            loaded.push(None);
            continue;
        }
        let l = if is_base { None } else { Some(open(name)?) };
        let lm = l.as_ref().unwrap_or(&base_l);
        if lm.model.is_decoder() != decoder {
            bail!(
                "{name} is a {} but the base is a {}: compare models of one kind",
                lm.model.family(),
                base_l.model.family()
            );
        }
        let ec = EvalConfig { chunks: Some(o.chunks), ..Default::default() };
        rows.push(evaluate(lm, name, &ec, (!is_base).then_some(&base_l), ctx)?);
        loaded.push(l);
        to_bench.push(i);
    }
    let models: Vec<(&Loaded, &str)> =
        to_bench.iter().map(|&i| (loaded[i].as_ref().unwrap_or(&base_l), names[i])).collect();
    let speeds = bench_interleaved(&models, o.bench, ctx)?;
    for (&i, speed) in to_bench.iter().zip(speeds) {
        rows[i].merge(speed);
        if o.save {
            ctx.note(&format!("saved {}", save_results(names[i], &rows[i])?.display()));
        }
    }
    Ok(rows)
}

/// Benchmarks `models` with their timed repetitions taking turns (A, B, C, A, B, C, …, after every model's
/// warm-up), so that a spell of other work on the machine slows them alike rather than whichever one was
/// being measured; each row keeps its repetitions' figures, start times and the CPU other processes took
/// ([`bench::busy_warning`]).
pub fn bench_interleaved(models: &[(&Loaded, &str)], c: &BenchConfig, ctx: &Ctx) -> Result<Vec<Metrics>> {
    if models.is_empty() {
        return Ok(vec![]);
    }
    let pairs = data::parse_sts(&data::read_text(None, data::STS_TEST)?)?;
    let o = c.options();
    let epoch = Instant::now();
    let mut runners = models
        .iter()
        .map(|(l, _)| bench::Runner::new(l, &pairs, &o, epoch))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let reps = runners[0].reps();
    let n = runners.len();
    let names: Vec<&str> = models.iter().map(|m| m.1).collect();
    let label =
        if n == 1 { format!("bench {}", names[0]) } else { format!("bench {} (interleaved)", names.join(", ")) };
    let mut pb = ctx.progress(&label);
    // Decoding is bound by memory bandwidth: measure it between the rounds, as close as possible to the
    // timed decoding (this machine's bandwidth moves with its neighbours' load).
    let decoders = models.iter().any(|(l, _)| l.model.is_decoder());
    let mut bw: Option<f64> = None;
    for r in 0..reps {
        for (k, run) in runners.iter_mut().enumerate() {
            run.rep()?;
            pb(r * n + k + 1, reps * n);
        }
        if decoders {
            if let Some(g) = bandwidth_probe() {
                bw = Some(bw.map_or(g, |b: f64| b.max(g)));
            }
        }
    }
    Ok(runners
        .into_iter()
        .zip(names)
        .map(|(run, name)| {
            let mut m = run.finish();
            m.model = Some(name.to_string());
            if m.tg_tok_s.is_some() {
                m.mem_gbps = bw;
                if let (Some(g), Some(tg), Some(b)) = (bw, m.tg_tok_s, m.model_bytes) {
                    m.tg_bw_frac = Some(b as f64 * tg / (g * 1e9));
                }
            }
            m
        })
        .collect())
}
