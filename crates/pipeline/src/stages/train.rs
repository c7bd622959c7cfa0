//! `distill` and `finetune`: the training engine of `whittle-train` as stages. Decoders train on text windows
//! (soft targets at a temperature blended with hard labels, optional hidden-state MSE; hard labels alone for
//! `finetune`); encoders are distilled from a teacher's sentence embeddings. The best student by evaluation
//! is written to `output` as it is found; after training the model in memory is that best student.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use whittle_core::InvalidOption;
use whittle_eval::data;
use whittle_models::{LoadOptions, Loaded, Model};
use whittle_train::bert::{SentenceObjective, TrainBert};
use whittle_train::llama::TrainLlama;
use whittle_train::{train, Hooks, LlamaObjective, LossOptions, Objective, Outcome, StepLog, TrainOptions, Windows};

pub use crate::config::{DistillConfig, FinetuneConfig, TrainConfig};
use crate::measure::QualityProbe;
use crate::{bail, Ctx, Report, Result, Stage};

/// Seconds of option `max_time` (`20m`, `1h`, `90s` or `90`).
fn parse_time(s: &str) -> Result<f64> {
    crate::optimize::goal::parse_duration(s, "max_time")
}

/// Block indices like `0,2,4`.
fn parse_blocks(s: &str, option: &'static str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| InvalidOption::new(option, format!("`{s}`"), format!("`{v}` is not a block index")).into())
        })
        .collect()
}

fn parse_hidden_map(s: &str, ls: usize, lt: usize) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|p| {
            let bad = |why: String| InvalidOption::new("hidden_map", p, why);
            let (x, y) = p.split_once(':').ok_or_else(|| bad("not S:T".into()))?;
            let (x, y): (usize, usize) = match (x.trim().parse(), y.trim().parse()) {
                (Ok(x), Ok(y)) => (x, y),
                _ => return Err(bad("not S:T".into()).into()),
            };
            if x >= ls || y >= lt {
                return Err(bad(format!("the student has blocks 0..{}, the teacher 0..{}", ls - 1, lt - 1)).into());
            }
            Ok((x, y))
        })
        .collect()
}

impl TrainConfig {
    fn check(&self) -> Result<()> {
        self.check_ranges()?;
        if self.output.as_os_str().is_empty() {
            return Err(InvalidOption::new(
                "output",
                "(none)",
                "the directory the best student is written to is required",
            )
            .into());
        }
        self.max_time.as_deref().map(parse_time).transpose()?;
        Ok(())
    }

    /// The engine's options, with the family's batch and learning rate defaults.
    fn options(&self, batch: usize, lr: f64, loss: LossOptions) -> Result<TrainOptions> {
        let o = TrainOptions {
            seq_len: self.seq_len,
            batch,
            accum: self.accum,
            lr: self.lr.unwrap_or(lr),
            min_lr_ratio: 0.1,
            warmup: self.warmup,
            decay: self.decay.clone(),
            weight_decay: self.weight_decay,
            clip: (self.clip > 0.0).then_some(self.clip),
            max_steps: self.max_steps,
            seed: self.seed,
            eval_every: self.eval_every,
            ckpt_every: self.ckpt_every,
            patience: self.patience,
            loss,
        };
        o.check()?;
        Ok(o)
    }

    fn ckpt(&self) -> PathBuf {
        self.ckpt.clone().unwrap_or_else(|| {
            let mut p = self.output.clone().into_os_string();
            p.push(".ckpt");
            PathBuf::from(p)
        })
    }
}

impl DistillConfig {
    /// The model the student starts from: `student`, or the teacher itself with `keep_layers`.
    pub fn student_source(&self) -> Result<&str> {
        match (&self.student, &self.keep_layers) {
            (Some(s), None) => Ok(s),
            (None, Some(_)) => Ok(&self.teacher),
            (Some(_), Some(_)) => bail!("option `student` and option `keep_layers` both give the student: use one"),
            (None, None) => {
                bail!("distill needs option `student` MODEL or option `keep_layers` 0,2,4 (student from the teacher)")
            }
        }
    }
}

/// Loads a model for training (block formats dequantized) with the run options `run`.
pub fn open_for_training(spec: &str, run: &whittle_core::RunConfig) -> Result<Loaded> {
    Ok(whittle_models::load(
        spec,
        &LoadOptions { tokenizer: None, dequantize: true, run: run.clone(), dtype: Some(candle_core::DType::F32) },
    )?)
}

impl Stage for DistillConfig {
    fn name(&self) -> &'static str {
        "distill"
    }

    fn check(&self) -> Result<()> {
        if self.teacher.is_empty() {
            return Err(InvalidOption::new("teacher", "(none)", "the teacher model is required").into());
        }
        if let Some(k) = &self.keep_layers {
            parse_blocks(k, "keep_layers")?;
        }
        self.check_ranges()?;
        self.train.check()
    }

    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        self.check()?;
        let t = open_for_training(&self.teacher, l.model.run_config())?;
        if let Some(keep) = &self.keep_layers {
            let keep = parse_blocks(keep, "keep_layers")?;
            let n = t.model.n_blocks();
            if let Some(b) = keep.iter().find(|&&b| b >= n) {
                return Err(InvalidOption::new("keep_layers", b, format!("the teacher has blocks 0..{}", n - 1)).into());
            }
            let drop: Vec<usize> = (0..n).filter(|i| !keep.contains(i)).collect();
            let (none, l2) =
                (whittle_compress::structured::Structured::default(), whittle_compress::structured::Importance::L2);
            whittle_compress::structured::prune_structured(&mut l.model, &none, l2, false, None, &drop, None)?;
        }
        if t.model.vocab_size() != l.model.vocab_size() || t.tokenizer.get_vocab(true) != l.tokenizer.get_vocab(true) {
            bail!("teacher and student have different vocabularies: cross-tokenizer distillation is not supported");
        }
        if t.model.family() != l.model.family() {
            bail!("teacher ({}) and student ({}) are of different families", t.model.family(), l.model.family());
        }
        run(l, Some((self, &t)), &self.train, ctx)
    }
}

impl Stage for FinetuneConfig {
    fn name(&self) -> &'static str {
        "finetune"
    }

    fn check(&self) -> Result<()> {
        self.train.check()
    }

    fn apply(&self, l: &mut Loaded, ctx: &mut Ctx) -> Result<Box<dyn Report>> {
        self.check()?;
        run(l, None, &self.train, ctx)
    }
}

/// The student in a cell (the engine's hooks borrow it in turn) and how trained weights reach it.
struct Student<'a, 'l> {
    cell: RefCell<&'l mut Loaded>,
    write_back: &'a dyn Fn(&mut Model) -> whittle_train::Result<()>,
    output: &'a Path,
}

impl Student<'_, '_> {
    /// Trains `obj` with evaluation by a [`QualityProbe`] (lower is better: encoders' Spearman is negated),
    /// the best student saved to `output`, and each step's line as a note.
    fn train(&self, obj: &dyn Objective, o: &TrainOptions, a: &TrainConfig, ctx: &Ctx) -> Result<Outcome> {
        let max_time = a.max_time.as_deref().map(parse_time).transpose()?;
        let probe = QualityProbe::new(&self.cell.borrow(), a.eval_windows)?;
        let to_train = |e: crate::Error| whittle_train::Error::Hook(Box::new(e));
        let mut eval = || -> whittle_train::Result<f64> {
            let mut l = self.cell.borrow_mut();
            (self.write_back)(&mut l.model)?;
            let q = probe.measure(&l).map_err(to_train)?;
            Ok(if q.lower_is_better { q.value } else { -q.value })
        };
        let mut save_best = || -> whittle_train::Result<()> {
            let mut l = self.cell.borrow_mut();
            (self.write_back)(&mut l.model)?;
            whittle_models::save::save_hf_dir(&l, self.output, whittle_core::DType::F32)?;
            Ok(())
        };
        let t0 = std::time::Instant::now();
        let mut on_step = |l: &StepLog, max: usize| {
            let el = t0.elapsed().as_secs_f64();
            let eta = el / l.step.max(1) as f64 * max.saturating_sub(l.step) as f64;
            let ev = l.eval.map_or(String::new(), |e| format!("  eval {e:.4}"));
            ctx.note(&format!(
                "step {:>5}/{max}  loss {:.4}  ce {:.4}  kd {:.4}  hid {:.4}  |g| {:.3}  lr {:.2e}  {:.0} tok/s  {:.0}s ETA {:.0}s{ev}",
                l.step, l.loss, l.ce, l.kd, l.hidden, l.grad_norm, l.lr, l.tokens_per_s, el, eta
            ));
        };
        let hooks = Hooks { eval: &mut eval, save_best: &mut save_best, on_step: &mut on_step };
        Ok(train(obj, o, &a.ckpt(), a.resume, max_time, a.stop_at, hooks)?)
    }
}

/// Trains the student `l` (from the teacher with `d`, on hard labels without), then loads the best student.
fn run(l: &mut Loaded, d: Option<(&DistillConfig, &Loaded)>, a: &TrainConfig, ctx: &Ctx) -> Result<Box<dyn Report>> {
    let what = if d.is_some() { "distill" } else { "finetune" };
    let ctx_len = l.model.max_positions();
    if a.seq_len > ctx_len {
        return Err(InvalidOption::new(
            "seq_len",
            a.seq_len,
            format!("longer than the model's context of {ctx_len} positions"),
        )
        .into());
    }
    let (outcome, metric) = match &l.model {
        Model::Llama(_) => run_llama(l, d, a, ctx)?,
        Model::Bert(_) => match d {
            Some((_, t)) => run_bert(l, t, a, ctx)?,
            None => bail!("finetune trains decoders on text; encoders are distilled from a teacher's embeddings (whittle distill)"),
        },
    };
    if outcome.best_eval.is_some() && a.output.exists() {
        *l = open_for_training(&a.output.display().to_string(), l.model.run_config())?;
    }
    Ok(Box::new(TrainReport { what, outcome, metric, output: a.output.clone() }))
}

fn run_llama(
    l: &mut Loaded,
    d: Option<(&DistillConfig, &Loaded)>,
    a: &TrainConfig,
    ctx: &Ctx,
) -> Result<(Outcome, String)> {
    let Model::Llama(sm) = &l.model else { unreachable!("decoders only") };
    let teacher = d.and_then(|(_, t)| match &t.model {
        Model::Llama(m) => Some(m),
        Model::Bert(_) => None,
    });
    let (src, text) = data::read_text(a.data.as_deref(), data::WIKI_VALID)?;
    let ids = whittle_models::text::encode_prompt(l, &text, false)?;
    let batch = a.batch.unwrap_or(4);
    let windows = Windows::new(&ids, a.seq_len, batch, a.seed, &src)?;
    let loss = match d {
        Some((d, _)) => {
            let (ls, lt) = (sm.blocks.len(), teacher.map_or(0, |t| t.blocks.len()));
            let hidden_map = match &d.hidden_map {
                Some(s) => parse_hidden_map(s, ls, lt)?,
                None if d.hidden_weight > 0.0 => (0..ls).map(|i| (i, ((i + 1) * lt).div_ceil(ls) - 1)).collect(),
                None => Vec::new(),
            };
            LossOptions { alpha: d.alpha, temperature: d.temperature, hidden_map, hidden_weight: d.hidden_weight }
        }
        None => LossOptions { alpha: 0.0, temperature: 1.0, hidden_map: Vec::new(), hidden_weight: 0.0 },
    };
    let o = a.options(batch, 2e-4, loss)?;
    let s = TrainLlama::from_model(sm, a.seq_len)?;
    ctx.note(&format!(
        "{}: {} windows of {} tokens from {src}; checkpoints in {}",
        if d.is_some() { "distill" } else { "finetune" },
        windows.len(),
        a.seq_len + 1,
        a.ckpt().display()
    ));
    let obj = LlamaObjective { student: &s, teacher, data: &windows, batch, loss: &o.loss };
    let write_back = |m: &mut Model| match m {
        Model::Llama(m) => s.write_back(m),
        Model::Bert(_) => Ok(()),
    };
    let student = Student { cell: RefCell::new(l), write_back: &write_back, output: &a.output };
    let out = student.train(&obj, &o, a, ctx)?;
    Ok((out, format!("PPL ({} WikiText-2 test windows)", a.eval_windows)))
}

fn run_bert(l: &mut Loaded, t: &Loaded, a: &TrainConfig, ctx: &Ctx) -> Result<(Outcome, String)> {
    let Model::Bert(sm) = &l.model else { unreachable!("encoders only") };
    let s = TrainBert::from_model(sm, &l.shared_blocks)?;
    let sents = encoder_sentences(a.data.as_deref())?;
    let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
    ctx.note(&format!("distill: embedding {} sentences with the teacher ...", refs.len()));
    let targets = whittle_models::text::embed_texts(t, &refs, 128, 32)?;
    let tok = whittle_models::text::truncating(&l.tokenizer, 128)?;
    let enc = tok.encode_batch(refs, true).map_err(|e| crate::Error::Config(format!("tokenizing: {e}")))?;
    let sentences: Vec<(Vec<u32>, Vec<u32>)> =
        enc.iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).collect();
    let batch = a.batch.unwrap_or(32);
    if sentences.len() < batch {
        bail!("{} sentences: fewer than one batch of {batch}", sentences.len());
    }
    let loss = LossOptions { alpha: 1.0, temperature: 1.0, hidden_map: Vec::new(), hidden_weight: 1.0 };
    let o = a.options(batch, 1e-4, loss)?;
    let obj = SentenceObjective { student: &s, sentences, targets, batch, seed: a.seed, mse_weight: 1.0 };
    let write_back = |m: &mut Model| match m {
        Model::Bert(m) => s.write_back(m),
        Model::Llama(_) => Ok(()),
    };
    let student = Student { cell: RefCell::new(l), write_back: &write_back, output: &a.output };
    Ok((student.train(&obj, &o, a, ctx)?, "−STS-B test Spearman".to_string()))
}

/// The default encoder distillation text: STS-B dev sentences, SST-2 dev sentences and WikiText-2 valid
/// lines (headings skipped), or one sentence per line of `path`.
fn encoder_sentences(path: Option<&Path>) -> Result<Vec<String>> {
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

/// How training ended and its history.
pub struct TrainReport {
    what: &'static str,
    pub outcome: Outcome,
    pub metric: String,
    output: PathBuf,
}

impl Report for TrainReport {
    fn to_json(&self) -> serde_json::Value {
        let o = &self.outcome;
        serde_json::json!({ "stop": o.stop, "steps": o.steps, "best_eval": o.best_eval, "metric": self.metric, "history": o.history })
    }

    fn summary(&self) -> Vec<String> {
        let o = &self.outcome;
        vec![format!(
            "{}: stopped ({:?}) after {} steps; best eval {} = {}; wrote {}",
            self.what,
            o.stop,
            o.steps,
            self.metric,
            o.best_eval.map_or("-".into(), |e| format!("{e:.4}")),
            self.output.display()
        )]
    }
}
