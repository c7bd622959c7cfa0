//! Text in, tensors out: batching for encoders and prompt encoding for decoders.

use candle_core::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::nn::mean_pool_normalize;
use crate::{Error, Loaded, Model, Result};

/// A padded batch for an encoder.
pub struct Batch {
    pub ids: Tensor,      // (B, T) u32
    pub type_ids: Tensor, // (B, T) u32
    pub mask: Tensor,     // (B, T) u32, 1 = real token
    pub lengths: Vec<usize>,
}

/// A copy of `tok` that truncates to `max_len` tokens (special tokens included) and never pads.
pub fn truncating(tok: &Tokenizer, max_len: usize) -> Result<Tokenizer> {
    let mut t = tok.clone();
    t.with_padding(None);
    t.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| Error::Tokenize(e.to_string()))?;
    Ok(t)
}

/// Tokenizes `texts` with special tokens ([CLS] ... [SEP]) and pads to the longest.
pub fn encode_batch(tok: &Tokenizer, texts: &[&str]) -> Result<Batch> {
    let enc = tok.encode_batch(texts.to_vec(), true).map_err(|e| Error::Tokenize(e.to_string()))?;
    let t = enc.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
    let b = enc.len();
    let (mut ids, mut types, mut mask) = (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
    let mut lengths = Vec::with_capacity(b);
    for (r, e) in enc.iter().enumerate() {
        let n = e.len();
        ids[r * t..r * t + n].copy_from_slice(e.get_ids());
        types[r * t..r * t + n].copy_from_slice(e.get_type_ids());
        mask[r * t..r * t + n].copy_from_slice(e.get_attention_mask());
        lengths.push(n);
    }
    let dev = whittle_core::backend::cpu::device();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &dev)?,
        type_ids: Tensor::from_vec(types, (b, t), &dev)?,
        mask: Tensor::from_vec(mask, (b, t), &dev)?,
        lengths,
    })
}

/// Sentence embeddings (mean pooling + L2 normalisation) of an encoder, `batch` texts at a time.
pub fn embed_texts(l: &Loaded, texts: &[&str], max_len: usize, batch: usize) -> Result<Vec<Vec<f32>>> {
    let Model::Bert(m) = &l.model else {
        return Err(Error::Usage(format!("`embed` needs an encoder; this model is a {} decoder", l.model.family())));
    };
    if max_len == 0 {
        return Err(Error::Usage("a token cap (max_len) of 0 leaves nothing to embed".into()));
    }
    let max_len = max_len.min(m.config.max_position_embeddings);
    let mut cached = l.truncating.lock().unwrap_or_else(|e| e.into_inner());
    if cached.as_ref().is_none_or(|(n, _)| *n != max_len) {
        *cached = Some((max_len, truncating(&l.tokenizer, max_len)?));
    }
    let tok = &cached.as_ref().expect("set above").1;
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let b = encode_batch(tok, chunk)?;
        let h = m.forward(&b.ids, &b.type_ids, &b.mask)?; // (B, T, C)
        let e = mean_pool_normalize(&h, &b.mask)?; // (B, C)
        out.extend(e.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Token ids of a decoder prompt: BOS first when the model's tokenizer adds it (or `force_bos`).
pub fn encode_prompt(l: &Loaded, text: &str, force_bos: bool) -> Result<Vec<u32>> {
    let enc = l.tokenizer.encode(text, false).map_err(|e| Error::Tokenize(e.to_string()))?;
    let mut ids = Vec::with_capacity(enc.len() + 1);
    if l.add_bos || force_bos {
        if let Some(b) = l.bos_token_id {
            ids.push(b);
        }
    }
    ids.extend_from_slice(enc.get_ids());
    Ok(ids)
}

/// Text of token ids (special tokens kept out).
pub fn decode(l: &Loaded, ids: &[u32]) -> Result<String> {
    l.tokenizer.decode(ids, true).map_err(|e| Error::Tokenize(e.to_string()))
}

/// One user turn in the ChatML template (SmolLM2's), ready for the assistant's reply.
pub fn chat_prompt(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}
