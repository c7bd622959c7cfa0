//! The encoder's engine: one thread that runs embedding inputs in dynamic batches under a token budget.
//!
//! Inputs arrive one per job (a request with several inputs sends several). The engine takes everything
//! waiting as one round, sorts it by length and cuts it into batches whose padded size (longest × rows)
//! stays within `max_batch_tokens`, so little padding enters a forward; a round finishes before the next
//! starts, so no input waits behind newer shorter ones for ever. A round waits a moment for more inputs
//! after its first (they keep arriving within `GATHER_GAP` of each other, up to `GATHER_MAX`): clients
//! answered by the last round send their next requests together, and a batch of one followed by a batch of
//! the rest would cost two forwards. Jobs whose client has gone (timeout, disconnect) are dropped before
//! they cost a forward.

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use whittle_models::{text, Loaded, Model};

use crate::metrics::Metrics;

/// The longest pause between arrivals that still gathers them into the same round.
const GATHER_GAP: Duration = Duration::from_millis(1);
/// The longest a round waits for more inputs after its first.
const GATHER_MAX: Duration = Duration::from_millis(5);

/// One input to embed.
pub struct EmbedJob {
    pub ids: Vec<u32>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

/// What the engine thread receives.
pub enum EmbedMsg {
    Job(EmbedJob),
    /// Run a real one-token forward pass and say whether it worked (`/health`).
    Health(oneshot::Sender<Result<(), String>>),
}

/// Runs until every sender is gone.
pub fn run(l: Arc<Loaded>, rx: Receiver<EmbedMsg>, max_batch_tokens: usize, m: Arc<Metrics>) {
    let mut round: Vec<EmbedJob> = Vec::new();
    loop {
        // Block for the first message of a round, then take whatever else is already waiting.
        let Ok(first) = rx.recv() else { return };
        let mut health = Vec::new();
        let mut take = |msg: EmbedMsg, round: &mut Vec<EmbedJob>| match msg {
            EmbedMsg::Job(j) => round.push(j),
            EmbedMsg::Health(h) => health.push(h),
        };
        take(first, &mut round);
        // Clients answered by the last round send their next requests within a moment: wait for them while
        // they keep coming (a gap of GATHER_GAP), at most GATHER_MAX, rather than run a batch of one and
        // make the rest wait a whole forward.
        let t0 = Instant::now();
        loop {
            for msg in rx.try_iter() {
                take(msg, &mut round);
            }
            let tokens: usize = round.iter().map(|j| j.ids.len()).sum();
            if tokens >= max_batch_tokens || t0.elapsed() >= GATHER_MAX {
                break;
            }
            match rx.recv_timeout(GATHER_GAP) {
                Ok(msg) => take(msg, &mut round),
                Err(_) => break,
            }
        }
        for h in health {
            let _ = h.send(health_check(&l));
        }
        m.queue_depth.sub(round.len() as i64);
        run_round(&l, std::mem::take(&mut round), max_batch_tokens, &m);
    }
}

/// A one-token forward pass of the encoder; its embedding must be finite.
pub fn health_check(l: &Loaded) -> Result<(), String> {
    let id = l.tokenizer.token_to_id("[CLS]").unwrap_or(0);
    let e = text::embed_ids(l, &[&[id]]).map_err(|e| format!("{e:#}"))?;
    match e.first() {
        Some(v) if !v.is_empty() && v.iter().all(|x| x.is_finite()) => Ok(()),
        _ => Err("the forward pass returned a non-finite embedding".into()),
    }
}

/// Sorts a round by length and runs it in batches of at most `budget` padded tokens.
fn run_round(l: &Loaded, mut jobs: Vec<EmbedJob>, budget: usize, m: &Metrics) {
    let before = jobs.len();
    jobs.retain(|j| !j.reply.is_closed());
    if jobs.len() < before {
        m.cancelled.with_label_values(&["client_gone"]).inc_by((before - jobs.len()) as u64);
    }
    jobs.sort_by_key(|j| j.ids.len());
    let mut batch: Vec<EmbedJob> = Vec::new();
    for j in jobs {
        // Sorted ascending: the newest row is the batch's longest, so it sets the padded size.
        if !batch.is_empty() && j.ids.len() * (batch.len() + 1) > budget {
            run_batch(l, std::mem::take(&mut batch), m);
        }
        batch.push(j);
    }
    if !batch.is_empty() {
        run_batch(l, batch, m);
    }
}

fn run_batch(l: &Loaded, jobs: Vec<EmbedJob>, m: &Metrics) {
    let t0 = Instant::now();
    for j in &jobs {
        m.queue_time.observe(t0.duration_since(j.enqueued).as_secs_f64());
    }
    let longest = jobs.iter().map(|j| j.ids.len()).max().unwrap_or(0);
    m.batch_size.observe(jobs.len() as f64);
    m.batch_tokens.observe((longest * jobs.len()) as f64);
    let rows: Vec<&[u32]> = jobs.iter().map(|j| j.ids.as_slice()).collect();
    let out = text::embed_ids(l, &rows);
    let secs = t0.elapsed().as_secs_f64();
    match out {
        Ok(vecs) => {
            for (j, v) in jobs.into_iter().zip(vecs) {
                m.inference_time.observe(secs);
                let _ = j.reply.send(Ok(v));
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            for j in jobs {
                let _ = j.reply.send(Err(msg.clone()));
            }
        }
    }
}

/// Whether `l` is an encoder this engine can serve.
pub fn is_encoder(l: &Loaded) -> bool {
    matches!(l.model, Model::Bert(_))
}
