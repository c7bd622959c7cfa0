//! The encoder's engine: one thread that runs embedding inputs in dynamic batches under a token budget.
//!
//! Inputs arrive one per job (a request with several inputs sends several). The engine takes everything
//! waiting as one round, sorts it by length and cuts it into the batches that cost least by an estimate of
//! real tokens plus a fixed cost per forward ([`plan`]), each within `max_batch_tokens` tokens: batches run
//! packed (`text::embed_ids`: only the real tokens enter the Linears, attention per input on its own
//! length), so a long input costs its own tokens, not the others' padding; a round finishes before the next
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

/// Sorts a round by length and runs it in the batches [`plan`] cuts it into.
fn run_round(l: &Loaded, mut jobs: Vec<EmbedJob>, budget: usize, m: &Metrics) {
    let before = jobs.len();
    jobs.retain(|j| !j.reply.is_closed());
    if jobs.len() < before {
        m.cancelled.with_label_values(&["client_gone"]).inc_by((before - jobs.len()) as u64);
    }
    jobs.sort_by_key(|j| j.ids.len());
    let lengths: Vec<usize> = jobs.iter().map(|j| j.ids.len()).collect();
    let mut jobs = jobs.into_iter();
    for n in plan(&lengths, budget) {
        // Shortest first: their clients have their answers (and send their next requests) while the
        // longer batches run.
        run_batch(l, jobs.by_ref().take(n).collect(), m);
    }
}

/// What one forward costs beyond its tokens, in tokens' worth of work: MiniLM w8a8 on the project's 2-core
/// machine embeds a lone ~11-token sentence in 1.26 ms and batches at about 0.063 ms per token, so a
/// forward's fixed cost (dispatch, per-op thread-pool barriers, pooling) is about 9 tokens.
pub const FORWARD_OVERHEAD_TOKENS: usize = 8;

/// Cuts a round of inputs sorted by length (`lengths`, ascending) into consecutive batches, returning
/// their sizes, so that the estimated work Σ (FORWARD_OVERHEAD_TOKENS + Σ lengths) is least and no batch
/// holds more than `budget` tokens (a single input always forms a batch).
///
/// Batches run packed, so an input costs its own tokens whichever batch it joins and the least work is the
/// fewest forwards under the budget. (With padded batches, 16 random STS-B sentences padded to their
/// longest cost 32 tokens each against 14 real ones, and this plan split rounds by length.) An exact
/// dynamic programme over the cut points: `best[j]` is the least cost of the first `j` inputs, the last
/// batch being `i..j`.
pub fn plan(lengths: &[usize], budget: usize) -> Vec<usize> {
    let n = lengths.len();
    let mut best = vec![usize::MAX; n + 1];
    let mut cut = vec![0usize; n + 1];
    best[0] = 0;
    for j in 1..=n {
        let mut tokens = 0usize;
        for i in (0..j).rev() {
            tokens += lengths[i];
            let rows = j - i;
            if rows > 1 && tokens > budget {
                break; // more rows only add tokens
            }
            let cost = best[i].saturating_add(FORWARD_OVERHEAD_TOKENS + tokens);
            if cost < best[j] {
                best[j] = cost;
                cut[j] = i;
            }
        }
    }
    let mut sizes = Vec::new();
    let mut j = n;
    while j > 0 {
        sizes.push(j - cut[j]);
        j = cut[j];
    }
    sizes.reverse();
    sizes
}

fn run_batch(l: &Loaded, jobs: Vec<EmbedJob>, m: &Metrics) {
    let t0 = Instant::now();
    for j in &jobs {
        m.queue_time.observe(t0.duration_since(j.enqueued).as_secs_f64());
    }
    m.batch_size.observe(jobs.len() as f64);
    m.batch_tokens.observe(jobs.iter().map(|j| j.ids.len()).sum::<usize>() as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimated work of cutting `lengths` into batches of `sizes`.
    fn cost(lengths: &[usize], sizes: &[usize]) -> usize {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                at += n;
                FORWARD_OVERHEAD_TOKENS + lengths[at - n..at].iter().sum::<usize>()
            })
            .sum()
    }

    #[test]
    fn plan_runs_a_round_in_the_fewest_packed_batches() {
        // Equal lengths: one batch.
        assert_eq!(plan(&[10; 16], 4096), vec![16]);
        // One long input among short ones joins them: packed, it costs only its own tokens.
        let mut l = vec![10; 15];
        l.push(60);
        assert_eq!(plan(&l, 4096), vec![16]);
        // The budget counts real tokens: 15 × 10 + 60 = 210 > 200 splits off the long one.
        assert_eq!(plan(&l, 200), vec![15, 1]);
        // An input over the budget still runs, alone.
        assert_eq!(plan(&[5, 500], 100), vec![1, 1]);
        assert!(plan(&[], 4096).is_empty());
    }

    #[test]
    fn plan_keeps_the_budget_and_is_no_worse_than_any_simple_cut() {
        // Lengths of a random round (an LCG), sorted as the engine sorts them.
        let mut s = 7u64;
        for round in 0..200 {
            let n = 1 + round % 40;
            let mut l: Vec<usize> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    4 + (s >> 33) as usize % 120
                })
                .collect();
            l.sort();
            let budget = 64 + round * 7;
            let p = plan(&l, budget);
            assert_eq!(p.iter().sum::<usize>(), n, "every input runs once");
            let mut at = 0;
            for &k in &p {
                at += k;
                let tokens: usize = l[at - k..at].iter().sum();
                assert!(k == 1 || tokens <= budget, "a batch of {k} inputs, {tokens} tokens, over the budget {budget}");
            }
            // No worse than one input per batch, or the greedy fill up to the budget.
            assert!(cost(&l, &p) <= cost(&l, &vec![1; n]));
            let mut greedy = vec![];
            let (mut rows, mut tokens) = (0, 0);
            for &x in &l {
                if rows > 0 && tokens + x > budget {
                    greedy.push(rows);
                    rows = 0;
                    tokens = 0;
                }
                rows += 1;
                tokens += x;
            }
            greedy.push(rows);
            assert!(cost(&l, &p) <= cost(&l, &greedy), "plan {p:?} costs more than greedy {greedy:?}");
        }
    }
}
