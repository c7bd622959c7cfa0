//! Autoregressive decoding with a KV cache: prefill the prompt once, then one token at a time.
//! Greedy when `temperature == 0`, else temperature + top-k + top-p (nucleus) sampling with a seed.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::llama::{KvCache, Llama};
use crate::Result;

/// How the next token is picked.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1.0 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 42 }
    }
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks a token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let t = s.temperature as f32;
    let maxl = logits[idx[0]];
    let mut p: Vec<f64> = idx.iter().map(|&i| (((logits[i] - maxl) / t) as f64).exp()).collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (i, x) in p.iter().enumerate() {
            acc += x;
            if acc >= s.top_p {
                keep = i + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
    }
    let z: f64 = p.iter().sum();
    let mut r = rng.random::<f64>() * z;
    for (i, x) in p.iter().enumerate() {
        r -= x;
        if r <= 0.0 {
            return idx[i] as u32;
        }
    }
    idx[p.len() - 1] as u32
}

/// Refuses a prompt of `prompt` tokens plus `n` new ones past the model's positions (the attention and KV
/// cache would grow without bound, and RoPE was never trained there).
pub fn check_context(m: &Llama, prompt: usize, n: usize) -> Result<()> {
    let context = m.config.max_position_embeddings;
    if prompt.saturating_add(n) > context {
        return Err(crate::Error::ContextTooLong { prompt, new: n, context });
    }
    Ok(())
}

/// The prompt cut to fit `n` new tokens in the model's context: its last tokens, with a leading BOS (`bos`)
/// kept first. `None` when not even the BOS and one prompt token fit.
pub fn truncate_prompt(m: &Llama, prompt: &[u32], n: usize, bos: Option<u32>) -> Option<Vec<u32>> {
    let room = m.config.max_position_embeddings.checked_sub(n)?;
    if prompt.len() <= room {
        return Some(prompt.to_vec());
    }
    let keep_bos = bos.is_some() && prompt.first() == bos.as_ref();
    let tail = room.checked_sub(keep_bos as usize).filter(|&t| t > 0)?;
    let mut out = Vec::with_capacity(room);
    if keep_bos {
        out.push(prompt[0]);
    }
    out.extend_from_slice(&prompt[prompt.len() - tail..]);
    Some(out)
}

/// Generates up to `n` tokens after `prompt`, stopping early at any of `eos`. Calls `on_token` as
/// each token is chosen (for streaming).
pub fn generate(
    m: &Llama,
    prompt: &[u32],
    n: usize,
    eos: &[u32],
    s: &Sampling,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    check_context(m, prompt.len(), n)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let mut cache = KvCache::new(m.blocks.len());
    let mut out = Vec::with_capacity(n);
    if n == 0 || prompt.is_empty() {
        return Ok(out);
    }
    let mut input = Tensor::new(prompt, m.embed_tokens.device())?.unsqueeze(0)?; // (1, T)
    for _ in 0..n {
        let logits = m.forward_last(&input, &mut cache)?; // (1, V)
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let next = sample(&row, s, &mut rng);
        out.push(next);
        on_token(next);
        if eos.contains(&next) {
            break;
        }
        input = Tensor::new(&[next], m.embed_tokens.device())?.unsqueeze(0)?; // (1, 1)
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 1);
        let s = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 7 };
        let draw = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..50).map(|_| sample(&logits, &s, &mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same tokens");
        assert!(a.iter().all(|&t| t == 1 || t == 2), "top-k = 2 keeps tokens 1 and 2 only");
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 0.3, seed: 7 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        assert!((0..50).all(|_| sample(&logits, &s, &mut rng) == 1), "top-p 0.3 keeps the argmax only");
    }
}
