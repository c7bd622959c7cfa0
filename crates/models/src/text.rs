//! Text in, tensors out: batching for encoders and prompt encoding for decoders.

use candle_core::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use crate::nn::{mean_pool_normalize, mean_pool_normalize_packed};
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

/// How an encoder batch is laid out for the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// The real tokens of every sequence one after another (no pad rows): the Linears, LayerNorms and GELU
    /// see only real tokens, attention runs per sequence on its own length ([`crate::bert::Bert::forward_packed`]).
    #[default]
    Packed,
    /// Right-padded to the longest sequence of the batch, as transformers and ONNX Runtime run it.
    Padded,
}

/// How [`embed_texts_with`] batches texts.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// Token cap per text, special tokens included (capped again at the model's positions).
    pub max_len: usize,
    /// Texts per forward pass.
    pub batch: usize,
    pub layout: Layout,
    /// Tokenize every text first, then form the batches from texts of similar lengths (shortest first);
    /// embeddings come back in the texts' order. Off: batches of consecutive texts, in order of arrival.
    pub sort_by_length: bool,
}

impl EmbedOptions {
    /// Packed batches of `batch` consecutive texts.
    pub fn new(max_len: usize, batch: usize) -> Self {
        Self { max_len, batch, layout: Layout::Packed, sort_by_length: false }
    }
}

/// Sentence embeddings (mean pooling + L2 normalisation) of an encoder, `batch` consecutive texts at a time,
/// packed ([`EmbedOptions::new`]).
pub fn embed_texts(l: &Loaded, texts: &[&str], max_len: usize, batch: usize) -> Result<Vec<Vec<f32>>> {
    embed_texts_with(l, texts, &EmbedOptions::new(max_len, batch))
}

/// Sentence embeddings (mean pooling + L2 normalisation) of an encoder, batched as `o` says; the rows come
/// back in the order of `texts`.
pub fn embed_texts_with(l: &Loaded, texts: &[&str], o: &EmbedOptions) -> Result<Vec<Vec<f32>>> {
    let Model::Bert(m) = &l.model else {
        return Err(Error::Usage(format!("`embed` needs an encoder; this model is a {} decoder", l.model.family())));
    };
    if o.max_len == 0 {
        return Err(Error::Usage("a token cap (max_len) of 0 leaves nothing to embed".into()));
    }
    let max_len = o.max_len.min(m.config.max_position_embeddings);
    let mut cached = l.truncating.lock().unwrap_or_else(|e| e.into_inner());
    if cached.as_ref().is_none_or(|(n, _)| *n != max_len) {
        *cached = Some((max_len, truncating(&l.tokenizer, max_len)?));
    }
    let tok = &cached.as_ref().expect("set above").1;
    let batch = o.batch.max(1);
    if !o.sort_by_length {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch) {
            let enc = tok.encode_batch(chunk.to_vec(), true).map_err(|e| Error::Tokenize(e.to_string()))?;
            let rows: Vec<Row> = enc.iter().map(|e| (e.get_ids(), e.get_type_ids())).collect();
            out.extend(embed_rows(m, &rows, o.layout)?);
        }
        return Ok(out);
    }
    let enc = tok.encode_batch(texts.to_vec(), true).map_err(|e| Error::Tokenize(e.to_string()))?;
    let mut order: Vec<usize> = (0..enc.len()).collect();
    order.sort_by_key(|&i| enc[i].len()); // stable: equal lengths keep their order
    let mut out = vec![Vec::new(); texts.len()];
    for idx in order.chunks(batch) {
        let rows: Vec<Row> = idx.iter().map(|&i| (enc[i].get_ids(), enc[i].get_type_ids())).collect();
        for (&i, e) in idx.iter().zip(embed_rows(m, &rows, o.layout)?) {
            out[i] = e;
        }
    }
    Ok(out)
}

/// One sequence's token ids and token type ids.
type Row<'a> = (&'a [u32], &'a [u32]);

/// Embeddings of one batch of token rows, in their order.
fn embed_rows(m: &crate::bert::Bert, rows: &[Row], layout: Layout) -> Result<Vec<Vec<f32>>> {
    let dev = whittle_core::backend::cpu::device();
    match layout {
        Layout::Packed => {
            let mut cu = Vec::with_capacity(rows.len() + 1);
            cu.push(0);
            let (mut ids, mut types) = (Vec::new(), Vec::new());
            for (i, t) in rows {
                ids.extend_from_slice(i);
                types.extend_from_slice(t);
                cu.push(ids.len());
            }
            let n = ids.len();
            let (ids, types) = (Tensor::from_vec(ids, n, &dev)?, Tensor::from_vec(types, n, &dev)?);
            let h = m.forward_packed(&ids, &types, &cu)?; // (N, C)
            mean_pool_normalize_packed(&h, &cu) // S rows of C
        }
        Layout::Padded => {
            let b = pad_rows(rows)?;
            let h = m.forward(&b.ids, &b.type_ids, &b.mask)?; // (B, T, C)
            Ok(mean_pool_normalize(&h, &b.mask)?.to_vec2::<f32>()?) // (B, C)
        }
    }
}

/// Rows right-padded to the longest (mask 1 on real tokens).
fn pad_rows(rows: &[Row]) -> Result<Batch> {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(1);
    let b = rows.len();
    let (mut ids, mut types, mut mask) = (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
    for (r, (i, ty)) in rows.iter().enumerate() {
        let n = i.len();
        ids[r * t..r * t + n].copy_from_slice(i);
        types[r * t..r * t + n].copy_from_slice(ty);
        mask[r * t..r * t + n].fill(1);
    }
    let dev = whittle_core::backend::cpu::device();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &dev)?,
        type_ids: Tensor::from_vec(types, (b, t), &dev)?,
        mask: Tensor::from_vec(mask, (b, t), &dev)?,
        lengths: rows.iter().map(|r| r.0.len()).collect(),
    })
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

/// A padded encoder batch from token ids as given (no special tokens added), right-padded to the longest.
pub fn batch_from_ids(rows: &[&[u32]]) -> Result<Batch> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let b = rows.len();
    let (mut ids, mut mask) = (vec![0u32; b * t], vec![0u32; b * t]);
    for (r, row) in rows.iter().enumerate() {
        ids[r * t..r * t + row.len()].copy_from_slice(row);
        mask[r * t..r * t + row.len()].iter_mut().for_each(|m| *m = 1);
    }
    let dev = whittle_core::backend::cpu::device();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), &dev)?,
        type_ids: Tensor::zeros((b, t), candle_core::DType::U32, &dev)?,
        mask: Tensor::from_vec(mask, (b, t), &dev)?,
        lengths: rows.iter().map(|r| r.len()).collect(),
    })
}

/// Sentence embeddings (mean pooling + L2 normalisation) of one batch of token-id rows, in their order.
/// Rows longer than the model's positions are an error.
pub fn embed_ids(l: &Loaded, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
    let Model::Bert(m) = &l.model else {
        return Err(Error::Usage(format!("embeddings need an encoder; this model is a {} decoder", l.model.family())));
    };
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let vocab = m.config.vocab_size as u32;
    if let Some(bad) = rows.iter().flat_map(|r| r.iter()).find(|&&id| id >= vocab) {
        return Err(Error::Usage(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let zeros: Vec<Vec<u32>> = rows.iter().map(|r| vec![0u32; r.len()]).collect();
    let rows: Vec<Row> = rows.iter().zip(&zeros).map(|(r, z)| (*r, z.as_slice())).collect();
    embed_rows(m, &rows, Layout::Packed)
}

/// One message of a chat.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A model's chat template, compiled once: the Jinja template it ships (rendered with minijinja and Python
/// string methods, as transformers' `apply_chat_template` does), or ChatML when it ships none.
pub struct ChatTemplate {
    env: Option<minijinja::Environment<'static>>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The template of `l` (ChatML if it has none); an unparsable template is an error naming it.
    pub fn of(l: &Loaded) -> Result<Self> {
        let tok_text = |id: Option<u32>| id.and_then(|i| l.tokenizer.id_to_token(i)).unwrap_or_default();
        let bos = tok_text(l.bos_token_id);
        let eos = tok_text(l.eos_token_ids.first().copied());
        let env = match &l.chat_template {
            None => None,
            Some(src) => {
                let mut env = minijinja::Environment::new();
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
                });
                env.add_template_owned("chat", src.clone())
                    .map_err(|e| Error::Usage(format!("the model's chat template does not parse: {e}")))?;
                Some(env)
            }
        };
        Ok(Self { env, bos, eos })
    }

    /// Whether the model ships a template (else ChatML is used).
    pub fn is_model_template(&self) -> bool {
        self.env.is_some()
    }

    /// The prompt text for `messages`, ending with the assistant's turn when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let Some(env) = &self.env else {
            let mut s: String =
                messages.iter().map(|m| format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content)).collect();
            if add_generation_prompt {
                s.push_str("<|im_start|>assistant\n");
            }
            return Ok(s);
        };
        let t = env.get_template("chat").map_err(|e| Error::Usage(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Usage(format!("rendering the chat template: {e}")))
    }
}
