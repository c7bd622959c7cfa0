//! A LLaMA decoder whose weights are candle `Var`s and whose forward pass uses only ops with a backward
//! pass: candle's fused `rms_norm`, `softmax_last_dim` and rope have none (candle #2168), so RMSNorm,
//! softmax and rotary embeddings are written out here from differentiable primitives. Per-block widths
//! (heads, KV groups, FFN neurons) come from each block's own weights, so pruned students train as they are.

use candle_core::{DType, Tensor, Var, D};
use whittle_core::Linear;
use whittle_models::llama::{Llama, LlamaBlock};
use whittle_models::BlockLayout;

use crate::{Error, Result};

/// One block's trainable weights, in HF naming order.
pub struct TBlock {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub attn_norm: Var,
    pub q: Var,
    pub k: Var,
    pub v: Var,
    pub o: Var,
    pub mlp_norm: Var,
    pub gate: Var,
    pub up: Var,
    pub down: Var,
}

pub struct TrainLlama {
    pub embed: Var,
    pub blocks: Vec<TBlock>,
    pub norm: Var,
    pub eps: f64,
    pub head_dim: usize,
    /// cos / sin tables (T, D/2) and the causal mask (T, T) for the training length.
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

fn var_of(l: &Linear, name: &str) -> Result<Var> {
    if l.bias.is_some() {
        return Err(Error::Unsupported(format!("`{name}` has a bias: training supports bias-free LLaMA Linears")));
    }
    Ok(Var::from_tensor(&l.dequantize()?.to_dtype(DType::F32)?)?)
}

/// x / rms(x) · w over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// softmax over the last dimension, from exp / sum (differentiable).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// log softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?;
    Ok(s.broadcast_sub(&s.exp()?.sum_keepdim(D::Minus1)?.log()?)?)
}

/// HF's rotate-half RoPE: x·cos + rotate_half(x)·sin, with (T, D/2) tables.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?; // (T, D)
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

impl TrainLlama {
    /// Trainable copies of `m`'s weights (dequantized to f32), for sequences of `seq_len` tokens. The
    /// output head is the embedding table (tied), as in SmolLM2; untied heads are refused.
    pub fn from_model(m: &Llama, seq_len: usize) -> Result<Self> {
        if !m.config.tie_word_embeddings {
            return Err(Error::Unsupported("training needs a tied output head (lm_head = embed_tokens)".into()));
        }
        let mut blocks = Vec::new();
        for (i, b) in m.blocks.iter().enumerate() {
            let n = |s: &str| format!("{}{s}", LlamaBlock::prefix(i));
            blocks.push(TBlock {
                n_head: b.n_head,
                n_kv_head: b.n_kv_head,
                attn_norm: Var::from_tensor(&b.attn_norm.weight.to_dtype(DType::F32)?)?,
                q: var_of(&b.q, &n("self_attn.q_proj"))?,
                k: var_of(&b.k, &n("self_attn.k_proj"))?,
                v: var_of(&b.v, &n("self_attn.v_proj"))?,
                o: var_of(&b.o, &n("self_attn.o_proj"))?,
                mlp_norm: Var::from_tensor(&b.mlp_norm.weight.to_dtype(DType::F32)?)?,
                gate: var_of(&b.gate, &n("mlp.gate_proj"))?,
                up: var_of(&b.up, &n("mlp.up_proj"))?,
                down: var_of(&b.down, &n("mlp.down_proj"))?,
            });
        }
        let (cos, sin, mask) = m.block_inputs(seq_len)?;
        let mask = mask.unwrap_or(Tensor::zeros((1, 1), DType::F32, cos.device())?);
        Ok(Self {
            embed: Var::from_tensor(&m.embed_tokens.to_dtype(DType::F32)?)?,
            blocks,
            norm: Var::from_tensor(&m.norm.weight.to_dtype(DType::F32)?)?,
            eps: m.config.rms_norm_eps,
            head_dim: m.config.head_dim,
            cos,
            sin,
            mask,
        })
    }

    /// Every trainable tensor with its HF name, in a fixed order.
    pub fn vars(&self) -> Vec<(String, &Var)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, b) in self.blocks.iter().enumerate() {
            for (n, x) in [
                ("input_layernorm", &b.attn_norm),
                ("self_attn.q_proj", &b.q),
                ("self_attn.k_proj", &b.k),
                ("self_attn.v_proj", &b.v),
                ("self_attn.o_proj", &b.o),
                ("post_attention_layernorm", &b.mlp_norm),
                ("mlp.gate_proj", &b.gate),
                ("mlp.up_proj", &b.up),
                ("mlp.down_proj", &b.down),
            ] {
                v.push((format!("{}{n}.weight", LlamaBlock::prefix(i)), x));
            }
        }
        v.push(("model.norm.weight".to_string(), &self.norm));
        v
    }

    /// Writes the trained weights into `m` (dense f32 Linears; the tied head follows the embeddings).
    pub fn write_back(&self, m: &mut Llama) -> Result<()> {
        let t = |v: &Var| v.as_tensor().detach();
        m.embed_tokens = t(&self.embed);
        m.lm_head = Linear::dense(t(&self.embed), None)?.inheriting(&m.lm_head);
        m.norm.weight = t(&self.norm);
        for (b, tb) in m.blocks.iter_mut().zip(&self.blocks) {
            b.attn_norm.weight = t(&tb.attn_norm);
            b.mlp_norm.weight = t(&tb.mlp_norm);
            for (l, v) in [
                (&mut b.q, &tb.q),
                (&mut b.k, &tb.k),
                (&mut b.v, &tb.v),
                (&mut b.o, &tb.o),
                (&mut b.gate, &tb.gate),
                (&mut b.up, &tb.up),
                (&mut b.down, &tb.down),
            ] {
                *l = Linear::dense(t(v), None)?.inheriting(l);
            }
        }
        Ok(())
    }

    /// Hidden states after every block (index i = output of block i) and the logits.
    ///
    /// # Shapes
    /// - `ids`: (B, T) u32 with T = the training length; returns hidden (B, T, C) each and logits (B, T, V)
    pub fn forward(&self, ids: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let (b, t) = ids.dims2()?;
        let c = self.embed.dim(1)?;
        let mut x = self.embed.as_tensor().index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let hd = self.head_dim;
        let mut hidden = Vec::with_capacity(self.blocks.len());
        let lin = |x: &Tensor, w: &Var| -> Result<Tensor> { Ok(x.broadcast_matmul(&w.as_tensor().t()?)?) };
        for blk in &self.blocks {
            let (h, kvh) = (blk.n_head, blk.n_kv_head);
            let hx = rms_norm(&x, &blk.attn_norm, self.eps)?;
            let q = lin(&hx, &blk.q)?.reshape((b, t, h, hd))?.transpose(1, 2)?; // (B, H, T, D)
            let k = lin(&hx, &blk.k)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?; // (B, KV, T, D)
            let v = lin(&hx, &blk.v)?.reshape((b, t, kvh, hd))?.transpose(1, 2)?;
            let (q, k) = (rope(&q.contiguous()?, &cos, &sin)?, rope(&k.contiguous()?, &cos, &sin)?);
            let rep = h / kvh;
            let repeat = |z: &Tensor| -> Result<Tensor> {
                if rep == 1 {
                    return Ok(z.contiguous()?);
                }
                Ok(z.unsqueeze(2)?.expand((b, kvh, rep, t, hd))?.reshape((b, h, t, hd))?)
            };
            let (k, v) = (repeat(&k)?, repeat(&v)?);
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?; // (B, H, T, T)
            let a = softmax(&att)?.matmul(&v)?; // (B, H, T, D)
            let a = a.transpose(1, 2)?.reshape((b, t, h * hd))?;
            x = (x + lin(&a, &blk.o)?)?;
            let hx = rms_norm(&x, &blk.mlp_norm, self.eps)?;
            let g = lin(&hx, &blk.gate)?;
            let u = lin(&hx, &blk.up)?;
            x = (&x + lin(&(g.silu()? * u)?, &blk.down)?)?;
            hidden.push(x.clone());
        }
        let hn = rms_norm(&x, &self.norm, self.eps)?;
        let logits = lin(&hn, &self.embed)?;
        Ok((hidden, logits))
    }
}
