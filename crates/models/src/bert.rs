//! BERT encoders (Devlin et al. 2018, <https://arxiv.org/abs/1810.04805>), as in Hugging Face
//! `modeling_bert.py` and sentence-transformers' all-MiniLM-L6-v2: post-LayerNorm blocks, exact (erf)
//! GELU, absolute position embeddings, optional pooler.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;
use whittle_core::{Linear, RunConfig, Stored};

use crate::nn::{attention, embed, LayerNorm};
use crate::weights::Weights;
use crate::{Error, Result};

/// `config.json` as Hugging Face writes it for `model_type: bert`.
#[derive(Debug, Clone, Deserialize)]
pub struct HfBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}

/// Resolved BERT configuration.
#[derive(Debug, Clone)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Heads of an unpruned block; blocks carry their own count.
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Width of one attention head (hidden / heads in the original model).
    pub head_dim: usize,
}

impl BertConfig {
    pub fn from_hf(c: &HfBertConfig, path: &Path) -> Result<Self> {
        let field = |f: &str, msg: String| Error::Config { path: path.into(), field: f.into(), msg };
        if c.hidden_act != "gelu" {
            return Err(field("hidden_act", format!("`{}` is not supported (only the exact `gelu`)", c.hidden_act)));
        }
        if let Some(p) = &c.position_embedding_type {
            if p != "absolute" {
                return Err(field("position_embedding_type", format!("`{p}` is not supported (only `absolute`)")));
            }
        }
        for (name, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("max_position_embeddings", c.max_position_embeddings),
            ("type_vocab_size", c.type_vocab_size),
        ] {
            // hidden_size 0 divided every head count and reached a division by zero (found by scripts/fuzz.sh).
            if v == 0 {
                return Err(field(name, "must be at least 1".into()));
            }
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(field(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", c.num_attention_heads, c.hidden_size),
            ));
        }
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            max_position_embeddings: c.max_position_embeddings,
            type_vocab_size: c.type_vocab_size,
            layer_norm_eps: c.layer_norm_eps,
            head_dim: c.hidden_size / c.num_attention_heads,
        })
    }

    /// The `config.json` that reproduces this model in transformers.
    pub fn to_hf_json(&self, blocks: &[BertBlock]) -> serde_json::Value {
        // The head count that gives back head_dim (hidden / heads): pruned blocks with fewer heads take their
        // widths from their tensors when loaded.
        let heads = if blocks.iter().all(|b| b.value.out_features() == self.hidden_size) {
            blocks.first().map_or(self.num_heads, |b| b.n_head)
        } else {
            self.hidden_size / self.head_dim
        };
        let inter = blocks.first().map_or(self.intermediate_size, |b| b.intermediate.out_features());
        serde_json::json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": blocks.len(),
            "num_attention_heads": heads,
            "intermediate_size": inter,
            "hidden_act": "gelu",
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        })
    }
}

/// Word, position and token-type embeddings followed by LayerNorm.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    /// (V, C), or (V, r) when `word_v` factorises it (ALBERT's factorised embedding: row i is `word[i] · word_v`).
    pub word: Tensor,
    /// (r, C): the second factor of a factorised word embedding.
    pub word_v: Option<Tensor>,
    pub position: Tensor,   // (P, C)
    pub token_type: Tensor, // (types, C)
    pub norm: LayerNorm,
}

impl BertEmbeddings {
    /// The word embeddings of `ids` (B, T): (B, T, C), through the factorisation when there is one.
    pub fn word_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let x = embed(&self.word, ids)?;
        Ok(match &self.word_v {
            Some(v) => x.broadcast_matmul(v)?,
            None => x,
        })
    }

    /// The full (V, C) word embedding table (the product when factorised).
    pub fn word_table(&self) -> Result<Tensor> {
        Ok(match &self.word_v {
            Some(v) => self.word.matmul(v)?,
            None => self.word.clone(),
        })
    }
}

/// One post-LN encoder block.
#[derive(Debug, Clone)]
pub struct BertBlock {
    pub n_head: usize,
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attn_out: Linear,
    pub attn_norm: LayerNorm,
    pub intermediate: Linear,
    pub output: Linear,
    pub out_norm: LayerNorm,
}

/// Which keys each row of a batch attends to.
pub enum AttnMask<'a> {
    /// Right-padded rows: the real length of each (the fused attention kernel).
    Lengths(&'a [usize]),
    /// Any pattern: (B, 1, 1, T), 0 where attended and the most negative f32 elsewhere.
    Additive(Tensor),
    /// Packed sequences in one row (B = 1, T = N real tokens, no padding): sequence s is tokens
    /// `cu_seqlens[s]..cu_seqlens[s + 1]` and attends to itself only (variable-length attention).
    Packed(&'a [usize]),
}

impl BertBlock {
    /// This block's widths (heads, KV heads, head size, FFN neurons).
    pub fn dims(&self, head_dim: usize) -> crate::BlockDims {
        crate::BlockDims {
            n_head: self.n_head,
            n_kv_head: self.n_head,
            head_dim,
            ffn: self.intermediate.out_features(),
        }
    }

    /// # Shapes
    /// - `x`: (B, T, C); returns (B, T, C)
    pub fn forward(&self, x: &Tensor, mask: &AttnMask, head_dim: usize) -> Result<Tensor> {
        let a = self.mix(x, mask, head_dim)?;
        let x = self.attn_norm.forward_residual(&self.attn_out.forward(&a)?, x)?; // (B, T, C)
        let m = whittle_core::ops::gelu_erf(&self.intermediate.forward(&x)?)?; // (B, T, I)
        self.out_norm.forward_residual(&self.output.forward(&m)?, &x) // (B, T, C)
    }

    /// The forward in the stages of the layer-wise engine, each ending at the input of the next Linears:
    /// stage 0 maps the block input `x` to query/key/value's input (`x` itself), 1 that to the attention
    /// output's, 2 to the intermediate's (the normalised residual, which becomes `x`), 3 to the output's, and
    /// 4 finishes `x` (the block output) and returns `None`.
    pub fn stage(
        &self,
        s: usize,
        x: &mut Tensor,
        input: Option<&Tensor>,
        mask: &AttnMask,
        head_dim: usize,
    ) -> Result<Option<Tensor>> {
        let input = || input.ok_or_else(|| Error::Usage(format!("stage {s} of a BERT block needs its input")));
        Ok(match s {
            0 => Some(x.clone()),
            1 => Some(self.mix(input()?, mask, head_dim)?),
            2 => {
                *x = self.attn_norm.forward_residual(&self.attn_out.forward(input()?)?, x)?;
                Some(x.clone())
            }
            3 => Some(whittle_core::ops::gelu_erf(&self.intermediate.forward(input()?)?)?),
            _ => {
                *x = self.out_norm.forward_residual(&self.output.forward(input()?)?, x)?;
                None
            }
        })
    }

    /// Self-attention from `x` (B, T, C) to the attention output's input (B, T, H·D).
    fn mix(&self, x: &Tensor, mask: &AttnMask, head_dim: usize) -> Result<Tensor> {
        let (b, t, _c) = x.dims3()?;
        let h = self.n_head;
        // Low-rank attention: queries and keys of `dq` < head_dim values per head.
        let dq = self.query.out_features() / h;
        let split = |y: Tensor, d: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?) // (B, H, T, D)
        };
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_shared(&[&self.query, &self.key, &self.value], x)?.try_into().expect("three outputs");
        Ok(match mask {
            AttnMask::Lengths(lens) => whittle_core::ops::encoder_attention(&q, &k, &v, h, lens)?, // (B, T, H*D)
            AttnMask::Packed(cu) => {
                if b != 1 {
                    return Err(Error::Usage(format!("packed sequences run as one row of tokens, not {b} rows")));
                }
                whittle_core::ops::varlen_attention(&q, &k, &v, h, cu)? // (1, N, H*D)
            }
            AttnMask::Additive(mask) => {
                let (q, k, v) = (split(q, dq)?, split(k, dq)?, split(v, head_dim)?);
                let a = attention(&q, &k, &v, Some(mask))?; // (B, H, T, D)
                a.transpose(1, 2)?.reshape((b, t, h * head_dim))? // (B, T, H*D)
            }
        })
    }

    pub fn linears(&self) -> [(&'static str, &Linear); 6] {
        [
            ("attention.self.query", &self.query),
            ("attention.self.key", &self.key),
            ("attention.self.value", &self.value),
            ("attention.output.dense", &self.attn_out),
            ("intermediate.dense", &self.intermediate),
            ("output.dense", &self.output),
        ]
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 6] {
        [
            ("attention.self.query", &mut self.query),
            ("attention.self.key", &mut self.key),
            ("attention.self.value", &mut self.value),
            ("attention.output.dense", &mut self.attn_out),
            ("intermediate.dense", &mut self.intermediate),
            ("output.dense", &mut self.output),
        ]
    }
}

/// Stages: query/key/value read the block input, the attention output the attention's mix, intermediate the
/// normalised residual, output the GELU activations.
impl crate::layout::BlockLayout for BertBlock {
    const STAGES: &'static [&'static [&'static str]] = &[
        &["attention.self.query", "attention.self.key", "attention.self.value"],
        &["attention.output.dense"],
        &["intermediate.dense"],
        &["output.dense"],
    ];
    const PREFIX: &'static str = "encoder.layer.";
}

/// A BERT encoder: embeddings, blocks and an optional pooler (dense + tanh on [CLS]).
#[derive(Debug, Clone)]
pub struct Bert {
    pub config: BertConfig,
    pub embeddings: BertEmbeddings,
    pub blocks: Vec<BertBlock>,
    pub pooler: Option<Linear>,
    /// How the model runs ([`crate::Model::set_run_config`]).
    pub run: RunConfig,
}

impl Bert {
    /// Builds the model from HF-named tensors (an optional `bert.` prefix is accepted).
    pub fn load(config: BertConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let p =
            if ["weight", "weight_u"].iter().any(|t| w.src.contains(&format!("bert.embeddings.word_embeddings.{t}"))) {
                "bert."
            } else {
                ""
            };
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.get(&format!("{p}{name}.weight"), &[c.hidden_size])?,
                bias: w.get(&format!("{p}{name}.bias"), &[c.hidden_size])?,
                eps: c.layer_norm_eps,
            })
        };
        // `.weight_u` (V, r) + `.weight_v` (r, C): a factorised word embedding.
        let we = format!("{p}embeddings.word_embeddings");
        let (word, word_v) = if w.contains(&format!("{we}.weight_u")) {
            let u = w.get(&format!("{we}.weight_u"), &[c.vocab_size, 0])?;
            let v = w.get(&format!("{we}.weight_v"), &[u.dim(1)?, c.hidden_size])?;
            (u, Some(v))
        } else {
            (w.get(&format!("{we}.weight"), &[c.vocab_size, c.hidden_size])?, None)
        };
        let embeddings = BertEmbeddings {
            word,
            word_v,
            position: w.get(
                &format!("{p}embeddings.position_embeddings.weight"),
                &[c.max_position_embeddings, c.hidden_size],
            )?,
            token_type: w
                .get(&format!("{p}embeddings.token_type_embeddings.weight"), &[c.type_vocab_size, c.hidden_size])?,
            norm: ln("embeddings.LayerNorm")?,
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let pre = format!("{p}encoder.layer.{i}.");
            // The values give the head count (pruned blocks have fewer heads); queries and keys have as many
            // heads, of head_dim values or fewer (low-rank attention, `whittle lowrank --attention-rank`).
            let v = w.linear_any(&format!("{pre}attention.self.value"), None, Some(c.hidden_size), true)?;
            let attn_width = v.out_features();
            if attn_width % c.head_dim != 0 {
                return Err(w.shape_err(
                    &format!("{pre}attention.self.value.weight"),
                    &[c.hidden_size, c.hidden_size],
                    &[attn_width, c.hidden_size],
                ));
            }
            let n_head = attn_width / c.head_dim;
            let q = w.linear_any(&format!("{pre}attention.self.query"), None, Some(c.hidden_size), true)?;
            let qw = q.out_features();
            if qw % n_head != 0 || qw > attn_width {
                return Err(w.shape_err(
                    &format!("{pre}attention.self.query.weight"),
                    &[attn_width, c.hidden_size],
                    &[qw, c.hidden_size],
                ));
            }
            let k = w.linear(&format!("{pre}attention.self.key"), qw, c.hidden_size, true)?;
            let o = w.linear(&format!("{pre}attention.output.dense"), c.hidden_size, attn_width, true)?;
            let inter = w.linear_any(&format!("{pre}intermediate.dense"), None, Some(c.hidden_size), true)?;
            let out = w.linear(&format!("{pre}output.dense"), c.hidden_size, inter.out_features(), true)?;
            blocks.push(BertBlock {
                n_head,
                query: q,
                key: k,
                value: v,
                attn_out: o,
                attn_norm: ln(&format!("encoder.layer.{i}.attention.output.LayerNorm"))?,
                intermediate: inter,
                output: out,
                out_norm: ln(&format!("encoder.layer.{i}.output.LayerNorm"))?,
            });
        }
        let pooler = if w.src.contains(&format!("{p}pooler.dense.weight")) {
            Some(w.linear(&format!("{p}pooler.dense"), c.hidden_size, c.hidden_size, true)?)
        } else {
            None
        };
        Ok(Self { config, embeddings, blocks, pooler, run: RunConfig::default() })
    }

    /// Word + token-type + position embeddings after LayerNorm: the input of block 0.
    ///
    /// # Shapes
    /// - `ids`, `type_ids`: (B, T) u32; returns (B, T, C)
    pub fn embed(&self, ids: &Tensor, type_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let e = &self.embeddings;
        let pos = e.position.narrow(0, 0, t)?.unsqueeze(0)?; // (1, T, C)
        let x = (e.word_rows(ids)? + embed(&e.token_type, type_ids)?)?.broadcast_add(&pos)?;
        e.norm.forward(&x)
    }

    /// Last hidden states.
    ///
    /// # Shapes
    /// - `ids`, `type_ids`, `mask`: (B, T) u32 (mask 1 = real token); returns (B, T, C)
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Usage(format!(
                "sequence of {t} tokens is longer than max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let mut x = self.embed(ids, type_ids)?; // (B, T, C)
                                                // A right-padded mask (1…1 0…0 per row) takes the fused attention kernel; any other mask becomes an
                                                // additive one: 0 where attended, the most negative f32 where padded (as transformers does).
        let rows: Vec<Vec<u32>> = mask.to_dtype(DType::U32)?.to_vec2()?;
        let prefix = rows.iter().all(|r| r.windows(2).all(|w| w[0] >= w[1]) && r.iter().all(|&v| v <= 1));
        let lens: Vec<usize> = rows.iter().map(|r| r.iter().filter(|&&v| v == 1).count()).collect();
        let mask = if prefix {
            AttnMask::Lengths(&lens)
        } else {
            let m = mask.to_dtype(DType::F32)?;
            AttnMask::Additive(((1.0 - m)? * f32::MIN as f64)?.unsqueeze(1)?.unsqueeze(1)?)
            // (B, 1, 1, T)
        };
        for blk in &self.blocks {
            x = blk.forward(&x, &mask, self.config.head_dim)?;
        }
        Ok(x)
    }

    /// Last hidden states of packed sequences: the real tokens of every sequence one after another, no
    /// padding. The Linears, LayerNorms and GELU run on the N real tokens only; attention runs per sequence on
    /// its own length, and positions restart at 0 for each sequence. Per sequence this is [`Self::forward`]
    /// on a batch padded to the longest, up to the Linears' summation order.
    ///
    /// # Shapes
    /// - `ids`, `type_ids`: (N,) u32; `cu_seqlens`: S + 1 offsets from 0 to N; returns (N, C)
    pub fn forward_packed(&self, ids: &Tensor, type_ids: &Tensor, cu_seqlens: &[usize]) -> Result<Tensor> {
        let n = ids.dims1()?;
        if type_ids.dims1()? != n {
            return Err(Error::Usage(format!("{n} token ids but {} token type ids", type_ids.dims1()?)));
        }
        if cu_seqlens.first() != Some(&0) || cu_seqlens.last() != Some(&n) || cu_seqlens.windows(2).any(|w| w[0] > w[1])
        {
            return Err(Error::Usage(format!(
                "sequence offsets {cu_seqlens:?} do not run from 0 to the {n} packed tokens without decreasing"
            )));
        }
        let max_pos = self.config.max_position_embeddings;
        if let Some(t) = cu_seqlens.windows(2).map(|w| w[1] - w[0]).find(|&t| t > max_pos) {
            return Err(Error::Usage(format!(
                "sequence of {t} tokens is longer than max_position_embeddings {max_pos}"
            )));
        }
        let c = self.config.hidden_size;
        if n == 0 {
            return Ok(Tensor::zeros((0, c), DType::F32, self.embeddings.position.device())?);
        }
        // Each token's position within its own sequence.
        let pos: Vec<u32> = cu_seqlens.windows(2).flat_map(|w| 0..(w[1] - w[0]) as u32).collect();
        let pos = Tensor::from_vec(pos, n, ids.device())?;
        let e = &self.embeddings;
        let ids2 = ids.unsqueeze(0)?; // (1, N)
        let x = ((e.word_rows(&ids2)? + embed(&e.token_type, &type_ids.unsqueeze(0)?)?)?
            + e.position.index_select(&pos, 0)?.unsqueeze(0)?)?; // (1, N, C)
        let mut x = e.norm.forward(&x)?;
        let mask = AttnMask::Packed(cu_seqlens);
        for blk in &self.blocks {
            x = blk.forward(&x, &mask, self.config.head_dim)?; // (1, N, C)
        }
        Ok(x.squeeze(0)?) // (N, C)
    }

    /// Every parameter with its HF name, in HF order (for saving).
    pub fn named_tensors(&self) -> Result<Vec<(String, Stored)>> {
        let e = &self.embeddings;
        let mut v = match &e.word_v {
            Some(wv) => vec![
                ("embeddings.word_embeddings.weight_u".to_string(), Stored::Tensor(e.word.clone())),
                ("embeddings.word_embeddings.weight_v".to_string(), Stored::Tensor(wv.clone())),
            ],
            None => vec![("embeddings.word_embeddings.weight".to_string(), Stored::Tensor(e.word.clone()))],
        };
        v.extend([
            ("embeddings.position_embeddings.weight".into(), Stored::Tensor(e.position.clone())),
            ("embeddings.token_type_embeddings.weight".into(), Stored::Tensor(e.token_type.clone())),
            ("embeddings.LayerNorm.weight".into(), Stored::Tensor(e.norm.weight.clone())),
            ("embeddings.LayerNorm.bias".into(), Stored::Tensor(e.norm.bias.clone())),
        ]);
        for (i, b) in self.blocks.iter().enumerate() {
            for (n, l) in b.linears() {
                push_linear(&mut v, &format!("encoder.layer.{i}.{n}"), l)?;
            }
            for (n, ln) in [("attention.output.LayerNorm", &b.attn_norm), ("output.LayerNorm", &b.out_norm)] {
                v.push((format!("encoder.layer.{i}.{n}.weight"), Stored::Tensor(ln.weight.clone())));
                v.push((format!("encoder.layer.{i}.{n}.bias"), Stored::Tensor(ln.bias.clone())));
            }
        }
        if let Some(p) = &self.pooler {
            push_linear(&mut v, "pooler.dense", p)?;
        }
        Ok(v)
    }
}

/// The stored tensors of a Linear under `name` (`name.weight`, `name.weight_scale`, `name.bias`).
pub(crate) fn push_linear(v: &mut Vec<(String, Stored)>, name: &str, l: &Linear) -> Result<()> {
    for (suffix, t) in whittle_core::codec::write(l)? {
        v.push((format!("{name}.{suffix}"), t));
    }
    Ok(())
}
