//! `whittle distill` and `whittle finetune`: the training engine of `whittle-train` behind flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use whittle_models::{load, LoadOptions, Loaded, Model};
use whittle_train::bert::{SentenceObjective, TrainBert};
use whittle_train::llama::TrainLlama;
use whittle_train::{train, Hooks, LlamaObjective, LossOptions, StepLog, TrainOptions, Windows};

/// Flags both commands share.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Training text (default: data/wikitext-2/wiki.valid.tokens; encoders: one sentence per line, default
    /// the STS-B dev and SST-2 dev sentences and the WikiText-2 valid lines)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory: the best student by evaluation (written atomically)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tokens per training window
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Windows (decoders, default 4) or sentences (encoders, default 32) per micro-batch
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation)
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Peak learning rate (AdamW; default 2e-4 decoders, 1e-4 encoders)
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up steps (linear)
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Decay after warm-up: cosine or linear, to 10% of --lr
    #[arg(long, default_value = "cosine")]
    pub decay: String,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping)
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 200)]
    pub max_steps: usize,
    /// Stop after this much time: seconds, or with a unit (20m, 1h)
    #[arg(long)]
    pub max_time: Option<String>,
    /// Stop at this step while the learning-rate schedule still spans --max-steps (to compare runs at the
    /// same step)
    #[arg(long)]
    pub stop_at: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate every N steps: PPL on the first --eval-windows WikiText-2 test windows of 512 (decoders),
    /// STS-B test Spearman (encoders)
    #[arg(long, default_value_t = 25)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 4)]
    pub eval_windows: usize,
    /// Checkpoint every N steps
    #[arg(long, default_value_t = 25)]
    pub ckpt_every: usize,
    /// Checkpoint directory (default: OUTPUT.ckpt)
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// Continue from the checkpoint (same flags)
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many evaluations without improvement (0 = never)
    #[arg(long, default_value_t = 0)]
    pub patience: usize,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// Print the history as JSON
    #[arg(long)]
    pub json: bool,
}

/// Distillation-only flags.
#[derive(Args, Debug, Clone)]
pub struct DistillArgs {
    /// Teacher model
    #[arg(long)]
    pub teacher: String,
    /// Student model (e.g. the output of `whittle prune --structured`)
    #[arg(long)]
    pub student: Option<String>,
    /// Build the student from the teacher, keeping these blocks (DistilBERT's initialisation), e.g. 0,2,4
    #[arg(long)]
    pub keep_layers: Option<String>,
    /// Soft-target temperature
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f64,
    /// Weight of the soft-target term; 1 − alpha goes to hard-label cross-entropy
    #[arg(long, default_value_t = 0.7)]
    pub alpha: f64,
    /// Student:teacher block pairs for hidden-state MSE, e.g. 0:0,1:2 (default: uniform over depth)
    #[arg(long)]
    pub hidden_map: Option<String>,
    /// Weight of the hidden-state MSE (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub hidden_weight: f64,
}

fn parse_time(s: &str) -> Result<f64> {
    let (num, mul) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1.0),
        Some('m') => (&s[..s.len() - 1], 60.0),
        Some('h') => (&s[..s.len() - 1], 3600.0),
        _ => (s, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v * mul),
        _ => bail!("--max-time {s}: expected seconds or a duration like 20m"),
    }
}

fn open(spec: &str) -> Result<Loaded> {
    load(spec, &LoadOptions { tokenizer: None, dequantize: true, run: crate::run_config() })
        .with_context(|| format!("loading model `{spec}`"))
}

/// The options both families share, from the flags and the loss terms.
fn options(a: &TrainArgs, batch: usize, lr: f64, loss: LossOptions) -> TrainOptions {
    TrainOptions {
        seq_len: a.seq_len,
        batch,
        accum: a.accum,
        lr,
        min_lr_ratio: 0.1,
        warmup: a.warmup,
        decay: a.decay.clone(),
        weight_decay: a.weight_decay,
        clip: (a.clip > 0.0).then_some(a.clip),
        max_steps: a.max_steps,
        seed: a.seed,
        eval_every: a.eval_every,
        ckpt_every: a.ckpt_every,
        patience: a.patience,
        loss,
    }
}

fn parse_hidden_map(s: &str, ls: usize, lt: usize) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|p| {
            let (x, y) = p.split_once(':').with_context(|| format!("--hidden-map `{s}`: `{p}` is not S:T"))?;
            let (x, y): (usize, usize) = (x.trim().parse()?, y.trim().parse()?);
            if x >= ls || y >= lt {
                bail!("--hidden-map {p}: the student has blocks 0..{}, the teacher 0..{}", ls - 1, lt - 1);
            }
            Ok((x, y))
        })
        .collect()
}

/// `whittle distill` (teacher given) or `whittle finetune` (teacher None: hard labels only).
pub fn run(student_spec: &str, distill: Option<&DistillArgs>, a: &TrainArgs) -> Result<()> {
    if a.output.exists() && !a.force && !a.resume {
        bail!("{} exists; pass --force to replace it", a.output.display());
    }
    let max_time = a.max_time.as_deref().map(parse_time).transpose()?;
    let teacher_l = distill.map(|d| open(&d.teacher)).transpose()?;
    let mut student_l = open(student_spec)?;
    if let (Some(d), Some(t)) = (distill, &teacher_l) {
        if let Some(keep) = &d.keep_layers {
            let keep: Vec<usize> = keep
                .split(',')
                .map(|v| {
                    v.trim().parse().with_context(|| format!("--keep-layers `{keep}`: `{v}` is not a block index"))
                })
                .collect::<Result<_>>()?;
            let n = t.model.n_blocks();
            if let Some(b) = keep.iter().find(|&&b| b >= n) {
                bail!("--keep-layers {b}: the teacher has blocks 0..{}", n - 1);
            }
            let drop: Vec<usize> = (0..n).filter(|i| !keep.contains(i)).collect();
            let none = whittle_compress::structured::Structured::default();
            let l2 = whittle_compress::structured::Importance::L2;
            whittle_compress::structured::prune_structured(&mut student_l.model, &none, l2, false, None, &drop, None)?;
        }
        if t.model.vocab_size() != student_l.model.vocab_size()
            || t.tokenizer.get_vocab(true) != student_l.tokenizer.get_vocab(true)
        {
            bail!("teacher and student have different vocabularies: cross-tokenizer distillation is not supported");
        }
        if t.model.family() != student_l.model.family() {
            bail!(
                "teacher ({}) and student ({}) are of different families",
                t.model.family(),
                student_l.model.family()
            );
        }
    }
    let ckpt = a.ckpt.clone().unwrap_or_else(|| {
        let mut p = a.output.clone().into_os_string();
        p.push(".ckpt");
        PathBuf::from(p)
    });
    let json = a.json;
    let t0 = std::time::Instant::now();
    let mut on_step = |l: &StepLog, max: usize| {
        let el = t0.elapsed().as_secs_f64();
        let eta = el / l.step.max(1) as f64 * max.saturating_sub(l.step) as f64;
        let ev = l.eval.map_or(String::new(), |e| format!("  eval {e:.4}"));
        let line = format!(
            "step {:>5}/{max}  loss {:.4}  ce {:.4}  kd {:.4}  hid {:.4}  |g| {:.3}  lr {:.2e}  {:.0} tok/s  {:.0}s ETA {:.0}s{ev}",
            l.step, l.loss, l.ce, l.kd, l.hidden, l.grad_norm, l.lr, l.tokens_per_s, el, eta
        );
        eprintln!("{line}");
    };
    let what = if distill.is_some() { "distill" } else { "finetune" };
    let output = a.output.clone();
    let (out, metric) = match &student_l.model {
        Model::Llama(_) => {
            let Model::Llama(sm) = &student_l.model else { unreachable!() };
            let sm = sm.clone();
            let teacher = match &teacher_l {
                Some(t) => match &t.model {
                    Model::Llama(m) => Some(m.clone()),
                    _ => unreachable!("families checked"),
                },
                None => None,
            };
            let (src, text) = whittle_eval::data::read_text(a.data.as_deref(), whittle_eval::data::WIKI_VALID)?;
            let ids = whittle_models::text::encode_prompt(&student_l, &text, false)?;
            let batch = a.batch.unwrap_or(4);
            let data = Windows::new(&ids, a.seq_len, batch, a.seed, &src)?;
            let loss = match distill {
                Some(d) => {
                    let (ls, lt) = (sm.blocks.len(), teacher.as_ref().map_or(0, |t| t.blocks.len()));
                    let hidden_map = match &d.hidden_map {
                        Some(s) => parse_hidden_map(s, ls, lt)?,
                        None if d.hidden_weight > 0.0 => {
                            (0..ls).map(|i| (i, ((i + 1) * lt).div_ceil(ls) - 1)).collect()
                        }
                        None => Vec::new(),
                    };
                    LossOptions {
                        alpha: d.alpha,
                        temperature: d.temperature,
                        hidden_map,
                        hidden_weight: d.hidden_weight,
                    }
                }
                None => LossOptions { alpha: 0.0, temperature: 1.0, hidden_map: Vec::new(), hidden_weight: 0.0 },
            };
            let o = options(a, batch, a.lr.unwrap_or(2e-4), loss);
            o.check()?;
            let s = TrainLlama::from_model(&sm, a.seq_len)?;
            let (_, wiki) = whittle_eval::data::read_text(None, whittle_eval::data::WIKI_TEST)?;
            let cell = std::cell::RefCell::new(student_l);
            let write = |l: &mut Loaded| -> whittle_train::Result<()> {
                if let Model::Llama(m) = &mut l.model {
                    s.write_back(m)?;
                }
                Ok(())
            };
            let mut eval = || -> whittle_train::Result<f64> {
                let mut l = cell.borrow_mut();
                write(&mut l)?;
                let o = whittle_eval::ppl::PplOptions { ctx: 512, chunks: Some(a.eval_windows) };
                let m = whittle_eval::ppl::perplexity(&l, &wiki, &o, None, &mut |_, _| {})
                    .map_err(|e| whittle_train::Error::Usage(format!("evaluation: {e}")))?;
                Ok(m.ppl.unwrap_or(f64::NAN))
            };
            let mut save_best = || -> whittle_train::Result<()> {
                let mut l = cell.borrow_mut();
                write(&mut l)?;
                whittle_models::save::save_hf_dir(&l, &output, DType::F32)?;
                Ok(())
            };
            eprintln!(
                "{what}: {} windows of {} tokens from {src}; checkpoints in {}",
                data.len(),
                a.seq_len + 1,
                ckpt.display()
            );
            let obj = LlamaObjective { student: &s, teacher: teacher.as_ref(), data: &data, batch, loss: &o.loss };
            let hooks = Hooks { eval: &mut eval, save_best: &mut save_best, on_step: &mut on_step };
            (
                train(&obj, &o, &ckpt, a.resume, max_time, a.stop_at, hooks)?,
                format!("PPL ({} WikiText-2 test windows)", a.eval_windows),
            )
        }
        Model::Bert(_) => {
            let Some(t) = &teacher_l else {
                bail!("finetune trains decoders on text; encoders are distilled from a teacher's embeddings (whittle distill)");
            };
            let Model::Bert(sm) = &student_l.model else { unreachable!() };
            let s = TrainBert::from_model(sm, &student_l.shared_blocks)?;
            let sents = encoder_sentences(a.data.as_deref())?;
            let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
            eprintln!("{what}: embedding {} sentences with the teacher ...", refs.len());
            let targets = whittle_models::text::embed_texts(t, &refs, 128, 32)?;
            let tok = whittle_models::text::truncating(&student_l.tokenizer, 128)?;
            let enc = tok.encode_batch(refs.clone(), true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let sentences: Vec<(Vec<u32>, Vec<u32>)> =
                enc.iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).collect();
            let batch = a.batch.unwrap_or(32);
            if sentences.len() < batch {
                bail!("{} sentences: fewer than one batch of {batch}", sentences.len());
            }
            let loss = LossOptions { alpha: 1.0, temperature: 1.0, hidden_map: Vec::new(), hidden_weight: 1.0 };
            let o = options(a, batch, a.lr.unwrap_or(1e-4), loss);
            o.check()?;
            let pairs =
                whittle_eval::data::parse_sts(&whittle_eval::data::read_text(None, whittle_eval::data::STS_TEST)?)?;
            let cell = std::cell::RefCell::new(student_l);
            let write = |l: &mut Loaded| -> whittle_train::Result<()> {
                if let Model::Bert(m) = &mut l.model {
                    s.write_back(m)?;
                }
                Ok(())
            };
            // Lower is better for the engine: the negated Spearman.
            let mut eval = || -> whittle_train::Result<f64> {
                let mut l = cell.borrow_mut();
                write(&mut l)?;
                let m = whittle_eval::sts::sts(&l, &pairs, 128, None, &mut |_, _| {})
                    .map_err(|e| whittle_train::Error::Usage(format!("evaluation: {e}")))?;
                Ok(-m.sts_spearman.unwrap_or(f64::NAN))
            };
            let mut save_best = || -> whittle_train::Result<()> {
                let mut l = cell.borrow_mut();
                write(&mut l)?;
                whittle_models::save::save_hf_dir(&l, &output, DType::F32)?;
                Ok(())
            };
            let obj = SentenceObjective { student: &s, sentences, targets, batch, seed: a.seed, mse_weight: 1.0 };
            let hooks = Hooks { eval: &mut eval, save_best: &mut save_best, on_step: &mut on_step };
            (train(&obj, &o, &ckpt, a.resume, max_time, a.stop_at, hooks)?, "−STS-B test Spearman".to_string())
        }
    };
    if json {
        let v = serde_json::json!({ "stop": out.stop, "steps": out.steps, "best_eval": out.best_eval, "metric": metric, "history": out.history });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{what}: stopped ({:?}) after {} steps; best eval {} = {}; wrote {}",
            out.stop,
            out.steps,
            metric,
            out.best_eval.map_or("-".into(), |e| format!("{e:.4}")),
            Path::new(&a.output).display()
        );
    }
    Ok(())
}

/// The default encoder distillation text: STS-B dev sentences, SST-2 dev sentences and WikiText-2 valid
/// lines (headings skipped), or one sentence per line of `path`.
fn encoder_sentences(path: Option<&Path>) -> Result<Vec<String>> {
    use whittle_eval::data;
    if let Some(p) = path {
        let (_, t) = data::read_text(Some(p), data::WIKI_VALID)?;
        return Ok(t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect());
    }
    let mut v: Vec<String> = Vec::new();
    for (a, b, _) in data::parse_sts(&data::read_text(None, data::STS_DEV)?)? {
        v.push(a);
        v.push(b);
    }
    v.extend(data::parse_sst2(&data::read_text(None, data::SST2_DEV)?)?.into_iter().map(|(s, _)| s));
    let (_, wiki) = data::read_text(None, data::WIKI_VALID)?;
    v.extend(wiki.lines().map(str::trim).filter(|l| l.len() > 20 && !l.starts_with('=')).map(String::from));
    Ok(v)
}
