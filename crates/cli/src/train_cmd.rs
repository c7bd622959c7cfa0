//! `whittle distill` and `whittle finetune`: the training engine of `whittle-train` behind flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use whittle_models::{load, LoadOptions, Loaded, Model};
use whittle_train::llama::TrainLlama;
use whittle_train::{train, Hooks, LossOptions, StepLog, TrainOptions, Windows};

/// Flags both commands share.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Training text (default: data/wikitext-2/wiki.valid.tokens)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory: the best student by evaluation (written atomically)
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tokens per training window
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Windows per micro-batch
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation)
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Peak learning rate (AdamW)
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate (PPL on the first --eval-windows WikiText-2 test windows of 512) every N steps
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
    load(spec, &LoadOptions { tokenizer: None, dequantize: true }).with_context(|| format!("loading model `{spec}`"))
}

fn llama(l: &Loaded, what: &str) -> Result<whittle_models::llama::Llama> {
    match &l.model {
        Model::Llama(m) => Ok(m.clone()),
        _ => bail!("{what}: training supports LLaMA decoders for now (encoders: not yet)"),
    }
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
            let drop: Vec<usize> = (0..n).filter(|i| !keep.contains(i)).collect();
            if let Some(b) = keep.iter().find(|&&b| b >= n) {
                bail!("--keep-layers {b}: the teacher has blocks 0..{}", n - 1);
            }
            whittle_compress::structured::prune_structured(
                &mut student_l.model,
                &Default::default(),
                whittle_compress::structured::Importance::L2,
                false,
                None,
                &drop,
                None,
            )?;
        }
        if t.model.vocab_size() != student_l.model.vocab_size()
            || t.tokenizer.get_vocab(true) != student_l.tokenizer.get_vocab(true)
        {
            bail!("teacher and student have different vocabularies: cross-tokenizer distillation is not supported");
        }
    }
    let teacher = teacher_l.as_ref().map(|t| llama(t, "--teacher")).transpose()?;
    let mut sm = llama(&student_l, "--student")?;
    let (src, text) = whittle_eval::data::read_text(a.data.as_deref(), whittle_eval::data::WIKI_VALID)?;
    let ids = whittle_models::text::encode_prompt(&student_l, &text, false)?;
    let data = Windows::new(&ids, a.seq_len, a.batch, a.seed, &src)?;
    let loss = match distill {
        Some(d) => {
            let (ls, lt) = (sm.blocks.len(), teacher.as_ref().map_or(0, |t| t.blocks.len()));
            let hidden_map = match &d.hidden_map {
                Some(s) => s
                    .split(',')
                    .map(|p| {
                        let (x, y) =
                            p.split_once(':').with_context(|| format!("--hidden-map `{s}`: `{p}` is not S:T"))?;
                        let (x, y): (usize, usize) = (x.trim().parse()?, y.trim().parse()?);
                        if x >= ls || y >= lt {
                            bail!("--hidden-map {p}: the student has blocks 0..{}, the teacher 0..{}", ls - 1, lt - 1);
                        }
                        Ok((x, y))
                    })
                    .collect::<Result<_>>()?,
                None if d.hidden_weight > 0.0 => (0..ls).map(|i| (i, ((i + 1) * lt).div_ceil(ls) - 1)).collect(),
                None => Vec::new(),
            };
            LossOptions { alpha: d.alpha, temperature: d.temperature, hidden_map, hidden_weight: d.hidden_weight }
        }
        None => LossOptions { alpha: 0.0, temperature: 1.0, hidden_map: Vec::new(), hidden_weight: 0.0 },
    };
    let o = TrainOptions {
        seq_len: a.seq_len,
        batch: a.batch,
        accum: a.accum,
        lr: a.lr,
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
    };
    o.check()?;
    let s = TrainLlama::from_model(&sm, a.seq_len)?;
    let ckpt = a.ckpt.clone().unwrap_or_else(|| {
        let mut p = a.output.clone().into_os_string();
        p.push(".ckpt");
        PathBuf::from(p)
    });
    let (_, wiki) = whittle_eval::data::read_text(None, whittle_eval::data::WIKI_TEST)?;
    let eval_windows = a.eval_windows;
    let output = a.output.clone();
    let cell = std::cell::RefCell::new(student_l);
    let mut eval = |s: &TrainLlama| -> whittle_train::Result<f64> {
        let mut l = cell.borrow_mut();
        if let Model::Llama(m) = &mut l.model {
            s.write_back(m)?;
        }
        let o = whittle_eval::ppl::PplOptions { ctx: 512, chunks: Some(eval_windows) };
        let m = whittle_eval::ppl::perplexity(&l, &wiki, &o, None, &mut |_, _| {})
            .map_err(|e| whittle_train::Error::Usage(format!("evaluation: {e}")))?;
        Ok(m.ppl.unwrap_or(f64::NAN))
    };
    let mut save_best = |s: &TrainLlama| -> whittle_train::Result<()> {
        let mut l = cell.borrow_mut();
        if let Model::Llama(m) = &mut l.model {
            s.write_back(m)?;
        }
        whittle_models::save::save_hf_dir(&l, &output, DType::F32)?;
        Ok(())
    };
    let json = a.json;
    let t0 = std::time::Instant::now();
    let mut on_step = |l: &StepLog, max: usize| {
        let el = t0.elapsed().as_secs_f64();
        let eta = el / l.step.max(1) as f64 * max.saturating_sub(l.step) as f64;
        let ev = l.eval.map_or(String::new(), |e| format!("  eval ppl {e:.3}"));
        let line = format!(
            "step {:>5}/{max}  loss {:.4}  ce {:.4}  kd {:.4}  hid {:.4}  |g| {:.3}  lr {:.2e}  {:.0} tok/s  {:.0}s ETA {:.0}s{ev}",
            l.step, l.loss, l.ce, l.kd, l.hidden, l.grad_norm, l.lr, l.tokens_per_s, el, eta
        );
        if !json {
            eprintln!("{line}");
        }
    };
    let what = if teacher.is_some() { "distill" } else { "finetune" };
    eprintln!(
        "{what}: {} windows of {} tokens from {src}; checkpoints in {}",
        data.len(),
        a.seq_len + 1,
        ckpt.display()
    );
    let hooks = Hooks { eval: &mut eval, save_best: &mut save_best, on_step: &mut on_step };
    let out = train(&s, teacher.as_ref(), &data, &o, &ckpt, a.resume, max_time, hooks)?;
    let _ = &mut sm;
    if json {
        let v = serde_json::json!({ "stop": out.stop, "steps": out.steps, "best_eval_ppl": out.best_eval, "history": out.history });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{what}: stopped ({:?}) after {} steps; best eval PPL {} ({} WikiText-2 test windows); wrote {}",
            out.stop,
            out.steps,
            out.best_eval.map_or("-".into(), |e| format!("{e:.3}")),
            eval_windows,
            Path::new(&a.output).display()
        );
    }
    Ok(())
}
