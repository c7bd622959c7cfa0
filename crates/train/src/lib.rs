//! whittle-train: knowledge distillation and fine-tuning of LLaMA students on CPU, on candle autograd.
//!
//! - [`llama::TrainLlama`]: the student with `Var` weights and a forward pass made of differentiable ops.
//! - [`AdamW`]: decoupled weight decay, bias-corrected moments, global-norm clipping; its state is saved
//!   with every checkpoint so a resumed run continues exactly.
//! - [`train`]: fixed-length token windows from a text file in a seeded order, warm-up + cosine or linear
//!   decay, gradient accumulation, losses (soft-target KD with temperature, hard-label cross-entropy,
//!   hidden-state MSE through a layer map), evaluation and checkpoints every N steps, resuming (option `resume`), stops on
//!   max steps, max time, a plateau or a non-finite loss (keeping the last good checkpoint).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var, D};
use serde::{Deserialize, Serialize};
use whittle_core::InvalidOption;
use whittle_models::llama::Llama;
use whittle_models::Model;

pub mod bert;
pub mod llama;

use llama::{log_softmax, TrainLlama};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    /// A caller's hook (evaluation, saving the best model) failed; its own error, typed.
    #[error(transparent)]
    Hook(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Option(#[from] InvalidOption),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("step {step}: the loss is {loss} (learning rate too high?); stopped, the last good checkpoint is kept")]
    NonFinite { step: usize, loss: f64 },
    #[error(transparent)]
    Core(#[from] whittle_core::Error),
    #[error(transparent)]
    Model(#[from] whittle_models::Error),
    #[error(transparent)]
    Formats(#[from] whittle_formats::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// AdamW (Loshchilov & Hutter) with its moments kept per parameter.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: usize,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[&Var], weight_decay: f64) -> Result<Self> {
        let z = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: vars.iter().map(z).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(z).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with gradients `grads` (one per var, already averaged), clipped to global norm `clip`.
    /// Returns the gradient norm before clipping. Weight decay applies to matrices, not norms.
    pub fn update(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64, clip: Option<f64>) -> Result<f64> {
        let norm =
            grads.iter().map(|g| Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)).sum::<Result<f64>>()?.sqrt();
        let scale = match clip {
            Some(c) if norm > c => c / norm,
            _ => 1.0,
        };
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            let decay = if w.rank() >= 2 { self.weight_decay } else { 0.0 };
            var.set(&((w * (1.0 - lr * decay))? - (upd * lr)?)?)?;
        }
        Ok(norm)
    }
}

/// What the student learns from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossOptions {
    /// Weight of the soft-target KD term (the rest goes to hard-label cross-entropy); 0 = fine-tuning.
    pub alpha: f64,
    pub temperature: f64,
    /// Student block → teacher block pairs for hidden-state MSE (same widths), with its weight.
    pub hidden_map: Vec<(usize, usize)>,
    pub hidden_weight: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub seq_len: usize,
    pub batch: usize,
    pub accum: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: usize,
    /// `cosine` or `linear` decay after warm-up.
    pub decay: String,
    pub weight_decay: f64,
    pub clip: Option<f64>,
    pub max_steps: usize,
    pub seed: u64,
    pub eval_every: usize,
    pub ckpt_every: usize,
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: usize,
    pub loss: LossOptions,
}

impl TrainOptions {
    pub fn check(&self) -> Result<()> {
        let bad = |option, value: &dyn std::fmt::Display, reason| Err(InvalidOption::new(option, value, reason).into());
        if self.seq_len < 2 || self.batch == 0 || self.accum == 0 {
            return Err(Error::Usage("option `seq_len` must be ≥ 2, option `batch` and option `accum` ≥ 1".into()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", &self.lr, "must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.loss.alpha) {
            return bad("alpha", &self.loss.alpha, "must be in [0, 1]");
        }
        if !(self.loss.temperature.is_finite() && self.loss.temperature > 0.0) {
            return bad("temperature", &self.loss.temperature, "must be positive");
        }
        if !matches!(self.decay.as_str(), "cosine" | "linear") {
            return bad("decay", &self.decay, "valid: cosine, linear");
        }
        if self.max_steps == 0 || self.eval_every == 0 || self.ckpt_every == 0 {
            return Err(Error::Usage(
                "option `max_steps`, option `eval_every` and option `ckpt_every` must be ≥ 1".into(),
            ));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warm-up, then cosine or linear decay to min_lr_ratio·lr.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.max_steps.saturating_sub(self.warmup)).max(1) as f64;
        let p = ((step - self.warmup) as f64 / span).min(1.0);
        let f = if self.decay == "linear" { 1.0 - p } else { 0.5 * (1.0 + (std::f64::consts::PI * p).cos()) };
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * f)
    }
}

/// Token windows of `seq_len + 1` (inputs and next-token targets) cut from `ids`, visited in a seeded
/// order that depends only on (seed, epoch), so step s always sees the same batch.
pub struct Windows {
    windows: Vec<Vec<u32>>,
    seed: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Item of global position `i` over `n` items visited epoch by epoch (epoch = i / n), each epoch in a
/// Fisher–Yates order seeded by (seed, epoch).
pub(crate) fn shuffled(n: usize, seed: u64, i: usize) -> usize {
    let epoch = (i / n) as u64;
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = splitmix(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    for j in (1..n).rev() {
        s = splitmix(s);
        order.swap(j, (s % (j as u64 + 1)) as usize);
    }
    order[i % n]
}

impl Windows {
    pub fn new(ids: &[u32], seq_len: usize, batch: usize, seed: u64, source: &str) -> Result<Self> {
        let windows: Vec<Vec<u32>> = ids.chunks_exact(seq_len + 1).map(|c| c.to_vec()).collect();
        if windows.len() < batch {
            return Err(Error::Usage(format!(
                "{source}: {} tokens make {} windows of {} — fewer than one batch of {batch}",
                ids.len(),
                windows.len(),
                seq_len + 1
            )));
        }
        Ok(Self { windows, seed })
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    fn index(&self, i: usize) -> usize {
        shuffled(self.windows.len(), self.seed, i)
    }

    /// (inputs (B, T), targets (B, T)) of micro-batch `mb`.
    pub fn batch(&self, mb: usize, batch: usize) -> Result<(Tensor, Tensor)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for j in 0..batch {
            let w = &self.windows[self.index(mb * batch + j)];
            x.extend_from_slice(&w[..w.len() - 1]);
            y.extend_from_slice(&w[1..]);
        }
        let t = self.windows[0].len() - 1;
        let dev = &whittle_core::backend::cpu::device();
        Ok((Tensor::from_vec(x, (batch, t), dev)?, Tensor::from_vec(y, (batch, t), dev)?))
    }
}

/// The teacher's logits and selected hidden states (after blocks `layers`) on `ids`, no gradients.
pub fn teacher_outputs(t: &Llama, ids: &Tensor, layers: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
    let (_, len) = ids.dims2()?;
    let (cos, sin, mask) = t.block_inputs(len)?;
    let mut x = t.embed(ids)?;
    let mut hidden = Vec::new();
    for (i, blk) in t.blocks.iter().enumerate() {
        x = blk.forward(&x, &cos, &sin, mask.as_ref(), &mut None, t.config.head_dim)?;
        if layers.contains(&i) {
            hidden.push((i, x.clone()));
        }
    }
    let logits = t.lm_head.forward(&t.norm.forward(&x)?)?;
    let hidden = layers
        .iter()
        .map(|l| hidden.iter().find(|(i, _)| i == l).map(|(_, h)| h.clone()).expect("block run"))
        .collect();
    Ok((hidden, logits))
}

/// The loss terms of one micro-batch (mean per token), each a scalar tensor.
pub struct Terms {
    pub total: Tensor,
    pub ce: f64,
    pub kd: f64,
    pub hidden: f64,
}

/// Hard-label CE, soft-target KD (KL(p_t ‖ p_s) at temperature T, × T²) and hidden MSE (relative to the
/// teacher's hidden-state energy), blended.
pub fn losses(student: &TrainLlama, teacher: Option<&Llama>, x: &Tensor, y: &Tensor, o: &LossOptions) -> Result<Terms> {
    let (hs, logits) = student.forward(x)?;
    let v = logits.dim(D::Minus1)?;
    let flat = logits.reshape(((), v))?;
    let ce = log_softmax(&flat)?.gather(&y.flatten_all()?.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    let mut total = (&ce * (1.0 - o.alpha))?;
    let (mut kd_v, mut hid_v) = (0.0, 0.0);
    if let Some(t) = teacher {
        let tl: Vec<usize> = o.hidden_map.iter().map(|p| p.1).collect();
        let (th, tlogits) = teacher_outputs(t, x, &tl)?;
        if o.alpha > 0.0 {
            let temp = o.temperature;
            let pt_log = log_softmax(&(tlogits.reshape(((), v))? / temp)?)?.detach();
            let pt = pt_log.exp()?;
            let ps_log = log_softmax(&(&flat / temp)?)?;
            let kl = (pt * (pt_log - ps_log)?)?.sum(1)?.mean_all()?;
            let kd = (kl * (temp * temp))?;
            kd_v = kd.to_scalar::<f32>()? as f64;
            total = (total + (kd * o.alpha)?)?;
        }
        if !o.hidden_map.is_empty() && o.hidden_weight > 0.0 {
            let mut acc: Option<Tensor> = None;
            for ((s, _), h_t) in o.hidden_map.iter().zip(&th) {
                // Relative to the teacher's energy, so that blocks (and models) with large residual
                // streams do not dominate: ‖h_s − h_t‖² / ‖h_t‖².
                let h_t = h_t.detach();
                let e = h_t.sqr()?.mean_all()?.to_scalar::<f32>()?.max(1e-12) as f64;
                let d = ((&hs[*s] - h_t)?.sqr()?.mean_all()? / e)?;
                acc = Some(match acc {
                    Some(a) => (a + d)?,
                    None => d,
                });
            }
            let hid = (acc.expect("non-empty map") / o.hidden_map.len() as f64)?;
            hid_v = hid.to_scalar::<f32>()? as f64;
            total = (total + (hid * o.hidden_weight)?)?;
        }
    }
    Ok(Terms { ce: ce.to_scalar::<f32>()? as f64, kd: kd_v, hidden: hid_v, total })
}

/// What [`train`] optimises: the trainable tensors and the loss of any micro-batch (by global index, so
/// that step s always sees the same data and a resumed run repeats an uninterrupted one).
pub trait Objective {
    fn vars(&self) -> Vec<(String, &Var)>;
    fn loss(&self, mb: usize) -> Result<Terms>;
}

/// A LLaMA student on token windows, from a teacher's logits (and hidden states) or hard labels alone.
pub struct LlamaObjective<'a> {
    pub student: &'a TrainLlama,
    pub teacher: Option<&'a Llama>,
    pub data: &'a Windows,
    pub batch: usize,
    pub loss: &'a LossOptions,
}

impl Objective for LlamaObjective<'_> {
    fn vars(&self) -> Vec<(String, &Var)> {
        self.student.vars()
    }

    fn loss(&self, mb: usize) -> Result<Terms> {
        let (x, y) = self.data.batch(mb, self.batch)?;
        losses(self.student, self.teacher, &x, &y, self.loss)
    }
}

/// One line of the loss curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub ce: f64,
    pub kd: f64,
    pub hidden: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<f64>,
}

/// What a checkpoint directory holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CkptState {
    pub step: usize,
    pub options: TrainOptions,
    /// (name, shape) of every trainable tensor: a resume refuses another student.
    pub signature: Vec<(String, Vec<usize>)>,
    pub best_eval: Option<f64>,
    pub evals_since_best: usize,
    pub history: Vec<StepLog>,
}

fn signature(s: &dyn Objective) -> Vec<(String, Vec<usize>)> {
    s.vars().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.to_path_buf(), err }
}

/// Writes student weights, AdamW moments and state to `dir`, atomically (temp dir, then rename).
pub fn save_checkpoint(dir: &Path, s: &dyn Objective, opt: &AdamW, st: &CkptState) -> Result<()> {
    whittle_formats::hf::write_dir_atomic(dir, |tmp| {
        let vars = s.vars();
        let named = |f: &dyn Fn(usize, &Var) -> Tensor| -> Vec<(String, Tensor)> {
            vars.iter().enumerate().map(|(i, (n, v))| (n.clone(), f(i, v))).collect()
        };
        whittle_formats::hf::write_safetensors(
            &tmp.join("weights.safetensors"),
            &named(&|_, v| v.as_tensor().clone()),
            None,
        )?;
        whittle_formats::hf::write_safetensors(
            &tmp.join("adam_m.safetensors"),
            &named(&|i, _| opt.m[i].clone()),
            None,
        )?;
        whittle_formats::hf::write_safetensors(
            &tmp.join("adam_v.safetensors"),
            &named(&|i, _| opt.v[i].clone()),
            None,
        )?;
        let json = serde_json::to_string_pretty(st).expect("state serializes");
        std::fs::write(tmp.join("state.json"), json)
            .map_err(|e| whittle_formats::Error::Io { path: tmp.join("state.json"), err: e })?;
        Ok(())
    })?;
    Ok(())
}

/// Loads a checkpoint into `s` and `opt`, refusing one written for another student.
pub fn load_checkpoint(dir: &Path, s: &dyn Objective, opt: &mut AdamW) -> Result<CkptState> {
    let bad = |msg: String| Error::Checkpoint { path: dir.to_path_buf(), msg };
    let sp = dir.join("state.json");
    let st: CkptState = serde_json::from_str(&std::fs::read_to_string(&sp).map_err(io(&sp))?)
        .map_err(|e| bad(format!("state.json: {e}")))?;
    let mine = signature(s);
    if st.signature != mine {
        let diff = st.signature.iter().zip(&mine).find(|(a, b)| a != b);
        let what = diff.map_or("a different number of tensors".to_string(), |(a, b)| {
            format!("{} {:?} vs the student's {} {:?}", a.0, a.1, b.0, b.1)
        });
        return Err(bad(format!("written for a different student ({what})")));
    }
    let read = |f: &str| -> Result<HashMap<String, Tensor>> {
        candle_core::safetensors::load(dir.join(f), &whittle_core::backend::cpu::device())
            .map_err(|e| bad(format!("{f}: {e}")))
    };
    let (w, m, v) = (read("weights.safetensors")?, read("adam_m.safetensors")?, read("adam_v.safetensors")?);
    for (i, (n, var)) in s.vars().into_iter().enumerate() {
        let get =
            |h: &HashMap<String, Tensor>, f: &str| h.get(&n).cloned().ok_or_else(|| bad(format!("{f} lacks {n}")));
        var.set(&get(&w, "weights")?)?;
        opt.m[i] = get(&m, "adam_m")?;
        opt.v[i] = get(&v, "adam_v")?;
    }
    opt.step = st.step;
    Ok(st)
}

/// Why training stopped.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub enum Stop {
    MaxSteps,
    /// `max_time` or `stop_at` reached.
    MaxTime,
    Plateau,
}

pub struct Outcome {
    pub stop: Stop,
    pub history: Vec<StepLog>,
    pub best_eval: Option<f64>,
    pub steps: usize,
}

/// Hooks the caller provides: evaluation (lower is better, e.g. PPL), saving the best student, progress.
pub struct Hooks<'a> {
    pub eval: &'a mut dyn FnMut() -> Result<f64>,
    pub save_best: &'a mut dyn FnMut() -> Result<()>,
    pub on_step: &'a mut dyn FnMut(&StepLog, usize),
}

/// Trains `s` per `o`; checkpoints into `ckpt` every `ckpt_every`
/// steps and at the end; with `resume`, continues from the checkpoint there. Stops at `max_steps`, after
/// `max_time` seconds or at step `stop_at` (the schedule still spans max_steps), on a plateau, or on a non-finite loss (an error, after which the last checkpoint
/// on disk is the last good state).
pub fn train(
    s: &dyn Objective,
    o: &TrainOptions,
    ckpt: &Path,
    resume: bool,
    max_time: Option<f64>,
    stop_at: Option<usize>,
    hooks: Hooks,
) -> Result<Outcome> {
    o.check()?;
    let vars: Vec<&Var> = s.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(&vars, o.weight_decay)?;
    let mut st = if resume && ckpt.join("state.json").exists() {
        let st = load_checkpoint(ckpt, s, &mut opt)?;
        if st.options != *o {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                msg: "written with other training options (seq-len, batch, lr, seed, losses…): resume with the same flags".into(),
            });
        }
        st
    } else {
        CkptState {
            step: 0,
            options: o.clone(),
            signature: signature(s),
            best_eval: None,
            evals_since_best: 0,
            history: Vec::new(),
        }
    };
    let t0 = Instant::now();
    let mut stop = Stop::MaxSteps;
    while st.step < o.max_steps {
        if max_time.is_some_and(|m| t0.elapsed().as_secs_f64() >= m) || stop_at.is_some_and(|s| st.step >= s) {
            stop = Stop::MaxTime;
            break;
        }
        let ts = Instant::now();
        let step = st.step;
        let lr = o.lr_at(step);
        let mut sums: Option<Vec<Tensor>> = None;
        let (mut loss, mut ce, mut kd, mut hid) = (0.0, 0.0, 0.0, 0.0);
        for a in 0..o.accum {
            let t = s.loss(step * o.accum + a)?;
            let lv = t.total.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Err(Error::NonFinite { step, loss: lv });
            }
            let g = (t.total / o.accum as f64)?.backward()?;
            let gs: Vec<Tensor> = vars
                .iter()
                .map(|v| g.get(v.as_tensor()).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().expect("zeros")))
                .collect();
            sums = Some(match sums {
                None => gs,
                Some(prev) => prev.iter().zip(&gs).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?,
            });
            loss += lv / o.accum as f64;
            ce += t.ce / o.accum as f64;
            kd += t.kd / o.accum as f64;
            hid += t.hidden / o.accum as f64;
        }
        let grad_norm = opt.update(&vars, &sums.expect("accum ≥ 1"), lr, o.clip)?;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { step, loss: grad_norm });
        }
        st.step += 1;
        let tokens = (o.batch * o.accum * o.seq_len) as f64;
        let mut log = StepLog {
            step: st.step,
            lr,
            loss,
            ce,
            kd,
            hidden: hid,
            grad_norm,
            tokens_per_s: tokens / ts.elapsed().as_secs_f64(),
            eval: None,
        };
        if st.step % o.eval_every == 0 || st.step == o.max_steps {
            let e = (hooks.eval)()?;
            log.eval = Some(e);
            if st.best_eval.is_none_or(|b| e < b) {
                st.best_eval = Some(e);
                st.evals_since_best = 0;
                (hooks.save_best)()?;
            } else {
                st.evals_since_best += 1;
            }
        }
        (hooks.on_step)(&log, o.max_steps);
        st.history.push(log);
        if st.step % o.ckpt_every == 0 || st.step == o.max_steps {
            save_checkpoint(ckpt, s, &opt, &st)?;
        }
        if o.patience > 0 && st.evals_since_best >= o.patience {
            stop = Stop::Plateau;
            break;
        }
    }
    if stop != Stop::MaxSteps {
        save_checkpoint(ckpt, s, &opt, &st)?;
    }
    Ok(Outcome { stop, best_eval: st.best_eval, steps: st.step, history: st.history })
}

/// First-order Taylor saliency |w·∂L/∂w| of every block Linear of `m` (key: the Linear's HF name), with
/// the gradient of the next-token cross-entropy summed over `batches` micro-batches of `data`.
pub fn taylor_saliency(
    m: &Llama,
    data: &Windows,
    batches: usize,
    batch: usize,
) -> Result<std::collections::BTreeMap<String, Vec<f32>>> {
    let seq_len = data.batch(0, 1)?.0.dim(1)?;
    let s = TrainLlama::from_model(m, seq_len)?;
    let lo = LossOptions { alpha: 0.0, temperature: 1.0, hidden_map: Vec::new(), hidden_weight: 0.0 };
    let vars = s.vars();
    let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
    for mb in 0..batches.max(1) {
        let (x, y) = data.batch(mb, batch)?;
        let g = losses(&s, None, &x, &y, &lo)?.total.backward()?;
        for (acc, (_, v)) in sums.iter_mut().zip(&vars) {
            if let Some(gv) = g.get(v.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + gv)?,
                    None => gv.clone(),
                });
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for (acc, (name, v)) in sums.into_iter().zip(vars) {
        let Some(g) = acc else { continue };
        if v.as_tensor().rank() == 2 && Model::is_block_linear(&name) {
            let sal: Vec<f32> = (v.as_tensor() * g)?.abs()?.flatten_all()?.to_vec1()?;
            out.insert(name.trim_end_matches(".weight").to_string(), sal);
        }
    }
    Ok(out)
}
