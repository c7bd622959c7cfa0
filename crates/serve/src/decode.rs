//! The decoder's engine: continuous batching on one thread.
//!
//! Every iteration (a "step") the engine
//! 1. admits waiting requests into the running batch (up to `max_concurrent` sequences), each with its own
//!    `KvCache` and sampler;
//! 2. drops sequences whose client has gone (the event channel is closed: a disconnect, or the HTTP side
//!    found a stop string) or whose request timeout has passed;
//! 3. prefills one chunk of at most `prefill_chunk` prompt tokens of one new sequence, so a long prompt
//!    delays the running streams by one chunk per step rather than by the whole prompt;
//! 4. runs one decoding step of every sequence past its prompt together ([`Llama::forward_step`]: the
//!    Linears read their weights once for all rows), samples each row with its own settings and sends the
//!    token to its client.
//!
//! Sequences join and leave between any two steps.

use std::collections::VecDeque;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot};
use whittle_models::generate::{sample, Sampling};
use whittle_models::llama::{KvCache, Llama};
use whittle_models::{Loaded, Model};

use crate::metrics::Metrics;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token (or, decided on the HTTP side, a stop string).
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a sequence's client receives, in order.
#[derive(Debug)]
pub enum GenEvent {
    Token(u32),
    Done(Finish),
    /// The request timeout passed.
    Timeout,
    Error(String),
}

/// One generation request.
pub struct GenJob {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end the sequence (not sent).
    pub eos: Vec<u32>,
    pub arrived: Instant,
    pub deadline: Instant,
    pub events: mpsc::UnboundedSender<GenEvent>,
}

pub enum GenMsg {
    Job(GenJob),
    /// Run a real one-token forward pass and say whether it worked (`/health`).
    Health(oneshot::Sender<Result<(), String>>),
}

/// Engine limits.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_concurrent: usize,
    pub prefill_chunk: usize,
}

struct Seq {
    job: GenJob,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The last token chosen, to be fed at the next step.
    last: u32,
    generated: usize,
    rng: StdRng,
    admitted: Instant,
    last_token_at: Option<Instant>,
    /// Sent `Done` or `Error`; leaves the batch at the end of the step.
    done: bool,
}

impl Seq {
    fn decoding(&self) -> bool {
        !self.done && self.prefilled == self.job.prompt.len() && self.generated > 0
    }
}

/// Runs until every sender is gone and the running batch has drained.
pub fn run(l: Arc<Loaded>, rx: Receiver<GenMsg>, lim: DecodeLimits, m: Arc<Metrics>) {
    let Model::Llama(model) = &l.model else { return };
    let mut waiting: VecDeque<GenJob> = VecDeque::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut open = true;
    loop {
        // 1. Messages: block only when there is nothing to do.
        if running.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(msg) => handle(msg, model, &mut waiting),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(msg) => handle(msg, model, &mut waiting),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while running.len() < lim.max_concurrent.max(1) {
            let Some(job) = waiting.pop_front() else { break };
            m.queue_depth.dec();
            if job.events.is_closed() {
                m.cancelled.with_label_values(&["client_gone"]).inc();
                continue;
            }
            let now = Instant::now();
            m.queue_time.observe(now.duration_since(job.arrived).as_secs_f64());
            running.push(Seq {
                cache: KvCache::new(model.blocks.len()),
                prefilled: 0,
                last: 0,
                generated: 0,
                rng: StdRng::seed_from_u64(job.sampling.seed),
                admitted: now,
                last_token_at: None,
                done: false,
                job,
            });
        }
        // 2. Leave: clients gone, time out.
        let now = Instant::now();
        running.retain(|s| {
            if s.job.events.is_closed() {
                m.cancelled.with_label_values(&["client_gone"]).inc();
                return false;
            }
            if now >= s.job.deadline {
                m.cancelled.with_label_values(&["timeout"]).inc();
                let _ = s.job.events.send(GenEvent::Timeout);
                return false;
            }
            true
        });
        m.running_sequences.set(running.len() as i64);
        if running.is_empty() {
            continue;
        }
        // 3. One prefill chunk of the oldest sequence still reading its prompt.
        let mut step_tokens = 0;
        if let Some(i) = running.iter().position(|s| s.prefilled < s.job.prompt.len()) {
            step_tokens += prefill_chunk(model, &mut running[i], lim.prefill_chunk, &m);
        }
        // 4. One decoding step of every sequence past its prompt.
        let idx: Vec<usize> = (0..running.len()).filter(|&i| running[i].decoding()).collect();
        if !idx.is_empty() {
            step_tokens += idx.len();
            m.batch_size.observe(idx.len() as f64);
            decode_step(model, &mut running, &idx, &m);
        }
        m.batch_tokens.observe(step_tokens as f64);
        running.retain(|s| !s.done);
        m.running_sequences.set(running.len() as i64);
    }
}

fn handle(msg: GenMsg, model: &Llama, waiting: &mut VecDeque<GenJob>) {
    match msg {
        GenMsg::Job(j) => waiting.push_back(j),
        GenMsg::Health(tx) => {
            let _ = tx.send(health_check(model));
        }
    }
}

/// A one-token forward pass from an empty cache; the logits must be finite.
pub fn health_check(model: &Llama) -> Result<(), String> {
    let run = || -> whittle_models::Result<bool> {
        let ids = Tensor::new(&[0u32], model.embed_tokens.device())?.unsqueeze(0)?; // (1, 1)
        let logits: Vec<f32> =
            model.forward_last(&ids, &mut KvCache::new(model.blocks.len()))?.squeeze(0)?.to_vec1()?;
        Ok(!logits.is_empty() && logits.iter().all(|x| x.is_finite()))
    };
    match run() {
        Ok(true) => Ok(()),
        Ok(false) => Err("the forward pass returned non-finite logits".into()),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn finish(s: &mut Seq, why: Finish, m: &Metrics) {
    let _ = s.job.events.send(GenEvent::Done(why));
    m.inference_time.observe(s.admitted.elapsed().as_secs_f64());
    s.done = true;
}

fn fail(s: &mut Seq, e: impl std::fmt::Display) {
    let _ = s.job.events.send(GenEvent::Error(format!("{e:#}")));
    s.done = true;
}

/// Sends the chosen token (or ends the sequence) and records its timing.
fn emit(s: &mut Seq, tok: u32, m: &Metrics) {
    let now = Instant::now();
    match s.last_token_at {
        None => m.time_to_first_token.observe(now.duration_since(s.job.arrived).as_secs_f64()),
        Some(t) => m.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
    }
    s.last_token_at = Some(now);
    s.generated += 1;
    s.last = tok;
    m.generated_tokens.inc();
    if s.job.eos.contains(&tok) {
        return finish(s, Finish::Stop, m);
    }
    let _ = s.job.events.send(GenEvent::Token(tok));
    if s.generated >= s.job.max_tokens {
        finish(s, Finish::Length, m);
    }
}

/// Feeds up to `chunk` prompt tokens of `s`; after the last one, picks its first token. Returns the tokens fed.
fn prefill_chunk(model: &Llama, s: &mut Seq, chunk: usize, m: &Metrics) -> usize {
    let (from, total) = (s.prefilled, s.job.prompt.len());
    let to = (from + chunk.max(1)).min(total);
    let run = |cache: &mut KvCache| -> whittle_models::Result<Vec<f32>> {
        let ids = Tensor::new(&s.job.prompt[from..to], model.embed_tokens.device())?.unsqueeze(0)?; // (1, T)
        Ok(model.forward_last(&ids, cache)?.squeeze(0)?.to_vec1()?) // (V)
    };
    let mut cache = std::mem::take(&mut s.cache);
    let out = run(&mut cache);
    s.cache = cache;
    match out {
        Ok(row) => {
            s.prefilled = to;
            if to == total {
                let tok = sample(&row, &s.job.sampling, &mut s.rng);
                emit(s, tok, m);
            }
        }
        Err(e) => fail(s, e),
    }
    to - from
}

/// One decoding step of the sequences at `idx` (all past their prompts).
fn decode_step(model: &Llama, running: &mut [Seq], idx: &[usize], m: &Metrics) {
    let toks: Vec<u32> = idx.iter().map(|&i| running[i].last).collect();
    let logits = {
        let mut caches: Vec<&mut KvCache> =
            running.iter_mut().enumerate().filter(|(i, _)| idx.contains(i)).map(|(_, s)| &mut s.cache).collect();
        model.forward_step(&toks, &mut caches).and_then(|t| Ok(t.to_vec2::<f32>()?))
    };
    match logits {
        Ok(rows) => {
            for (&i, row) in idx.iter().zip(rows) {
                let s = &mut running[i];
                let tok = sample(&row, &s.job.sampling, &mut s.rng);
                emit(s, tok, m);
            }
        }
        Err(e) => {
            for &i in idx {
                fail(&mut running[i], &e);
            }
        }
    }
}
