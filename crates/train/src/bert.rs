//! A BERT encoder with `Var` weights and a differentiable forward pass (LayerNorm and softmax written out:
//! candle's fused ones have no backward), and the sentence-embedding objective: the student's mean-pooled,
//! normalised embedding should match the teacher's (1 − cosine + MSE; no labels needed).

use candle_core::{DType, Tensor, Var, D};
use whittle_core::Linear;
use whittle_models::bert::{Bert, BertBlock};
use whittle_models::BlockLayout;

use crate::llama::softmax;
use crate::{Objective, Result, Terms};

#[derive(Clone)]
pub struct TLinear {
    pub w: Var,
    pub b: Option<Var>,
}

impl TLinear {
    fn new(l: &Linear) -> Result<Self> {
        Ok(Self {
            w: Var::from_tensor(&l.dequantize()?.to_dtype(DType::F32)?)?,
            b: l.bias.as_ref().map(|b| Var::from_tensor(&b.to_dtype(DType::F32)?)).transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.w.as_tensor().t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b.as_tensor())?,
            None => y,
        })
    }

    fn to_linear(&self) -> Result<Linear> {
        Ok(Linear::dense(self.w.as_tensor().detach(), self.b.as_ref().map(|b| b.as_tensor().detach()))?)
    }
}

#[derive(Clone)]
pub struct TNorm {
    pub w: Var,
    pub b: Var,
    pub eps: f64,
}

impl TNorm {
    fn new(n: &whittle_models::nn::LayerNorm) -> Result<Self> {
        Ok(Self { w: Var::from_tensor(&n.weight)?, b: Var::from_tensor(&n.bias)?, eps: n.eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mu = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mu)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.w)?.broadcast_add(&self.b)?)
    }
}

#[derive(Clone)]
pub struct TBertBlock {
    pub n_head: usize,
    pub q: TLinear,
    pub k: TLinear,
    pub v: TLinear,
    pub o: TLinear,
    pub ln1: TNorm,
    pub inter: TLinear,
    pub out: TLinear,
    pub ln2: TNorm,
}

pub struct TrainBert {
    pub word: Var,
    /// The second factor of a factorised word embedding (see `BertEmbeddings::word_v`).
    pub word_v: Option<Var>,
    pub position: Var,
    pub token_type: Var,
    pub emb_norm: TNorm,
    pub blocks: Vec<TBertBlock>,
    pub head_dim: usize,
    /// Blocks that use another block's weights (the same `Var`s: their gradients add up), block → leader.
    pub shared: std::collections::BTreeMap<usize, usize>,
}

impl TrainBert {
    /// Trainable copies of `m`'s weights; blocks in `shared` (block → leader) train the leader's weights.
    pub fn from_model(m: &Bert, shared: &std::collections::BTreeMap<usize, usize>) -> Result<Self> {
        let e = &m.embeddings;
        let mut blocks: Vec<TBertBlock> = m
            .blocks
            .iter()
            .map(|b| {
                Ok(TBertBlock {
                    n_head: b.n_head,
                    q: TLinear::new(&b.query)?,
                    k: TLinear::new(&b.key)?,
                    v: TLinear::new(&b.value)?,
                    o: TLinear::new(&b.attn_out)?,
                    ln1: TNorm::new(&b.attn_norm)?,
                    inter: TLinear::new(&b.intermediate)?,
                    out: TLinear::new(&b.output)?,
                    ln2: TNorm::new(&b.out_norm)?,
                })
            })
            .collect::<Result<_>>()?;
        for (&b, &leader) in shared {
            blocks[b] = blocks[leader].clone();
        }
        Ok(Self {
            word: Var::from_tensor(&e.word)?,
            word_v: e.word_v.as_ref().map(Var::from_tensor).transpose()?,
            position: Var::from_tensor(&e.position)?,
            token_type: Var::from_tensor(&e.token_type)?,
            emb_norm: TNorm::new(&e.norm)?,
            blocks,
            head_dim: m.config.head_dim,
            shared: shared.clone(),
        })
    }

    pub fn vars(&self) -> Vec<(String, &Var)> {
        let mut v = match &self.word_v {
            Some(wv) => vec![
                ("embeddings.word_embeddings.weight_u".to_string(), &self.word),
                ("embeddings.word_embeddings.weight_v".to_string(), wv),
            ],
            None => vec![("embeddings.word_embeddings.weight".to_string(), &self.word)],
        };
        v.extend([
            ("embeddings.position_embeddings.weight".into(), &self.position),
            ("embeddings.token_type_embeddings.weight".into(), &self.token_type),
            ("embeddings.LayerNorm.weight".into(), &self.emb_norm.w),
            ("embeddings.LayerNorm.bias".into(), &self.emb_norm.b),
        ]);
        for (i, b) in self.blocks.iter().enumerate().filter(|(i, _)| !self.shared.contains_key(i)) {
            let p = BertBlock::prefix(i);
            for (n, l) in [
                ("attention.self.query", &b.q),
                ("attention.self.key", &b.k),
                ("attention.self.value", &b.v),
                ("attention.output.dense", &b.o),
                ("intermediate.dense", &b.inter),
                ("output.dense", &b.out),
            ] {
                v.push((format!("{p}{n}.weight"), &l.w));
                if let Some(bb) = &l.b {
                    v.push((format!("{p}{n}.bias"), bb));
                }
            }
            for (n, ln) in [("attention.output.LayerNorm", &b.ln1), ("output.LayerNorm", &b.ln2)] {
                v.push((format!("{p}{n}.weight"), &ln.w));
                v.push((format!("{p}{n}.bias"), &ln.b));
            }
        }
        v
    }

    /// Writes the trained weights into `m`.
    pub fn write_back(&self, m: &mut Bert) -> Result<()> {
        let t = |v: &Var| v.as_tensor().detach();
        let e = &mut m.embeddings;
        (e.word, e.position, e.token_type) = (t(&self.word), t(&self.position), t(&self.token_type));
        e.word_v = self.word_v.as_ref().map(t);
        (e.norm.weight, e.norm.bias) = (t(&self.emb_norm.w), t(&self.emb_norm.b));
        for (b, tb) in m.blocks.iter_mut().zip(&self.blocks) {
            b.query = tb.q.to_linear()?;
            b.key = tb.k.to_linear()?;
            b.value = tb.v.to_linear()?;
            b.attn_out = tb.o.to_linear()?;
            b.intermediate = tb.inter.to_linear()?;
            b.output = tb.out.to_linear()?;
            (b.attn_norm.weight, b.attn_norm.bias) = (t(&tb.ln1.w), t(&tb.ln1.b));
            (b.out_norm.weight, b.out_norm.bias) = (t(&tb.ln2.w), t(&tb.ln2.b));
        }
        Ok(())
    }

    /// Mean-pooled, L2-normalised sentence embeddings (B, C) of a padded batch (mask 1 = token).
    pub fn embed(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let word = self.word.as_tensor().index_select(&ids.flatten_all()?, 0)?; // (B·T, r or C)
        let word = match &self.word_v {
            Some(v) => word.matmul(v.as_tensor())?,
            None => word,
        };
        let c = word.dim(1)?;
        let word = word.reshape((b, t, c))?;
        let typ = self.token_type.as_tensor().index_select(&type_ids.flatten_all()?, 0)?.reshape((b, t, c))?;
        let pos = self.position.as_tensor().narrow(0, 0, t)?.unsqueeze(0)?;
        let mut x = self.emb_norm.forward(&(word + typ)?.broadcast_add(&pos)?)?;
        let m = mask.to_dtype(DType::F32)?; // (B, T)
        let add = ((1.0 - &m)? * -1e9)?.reshape((b, 1, 1, t))?;
        let hd = self.head_dim;
        for blk in &self.blocks {
            let h = blk.n_head;
            // Queries and keys may have fewer values per head than the values (low-rank attention).
            let split = |y: Tensor| -> Result<Tensor> {
                let d = y.dim(2)? / h;
                Ok(y.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (split(blk.q.forward(&x)?)?, split(blk.k.forward(&x)?)?, split(blk.v.forward(&x)?)?);
            let att = (q.matmul(&k.t()?)? / (q.dim(3)? as f64).sqrt())?.broadcast_add(&add)?;
            let a = softmax(&att)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * hd))?;
            x = blk.ln1.forward(&(blk.o.forward(&a)? + &x)?)?;
            let f = blk.inter.forward(&x)?.gelu_erf()?;
            x = blk.ln2.forward(&(blk.out.forward(&f)? + &x)?)?;
        }
        let m3 = m.unsqueeze(2)?; // (B, T, 1)
        let pooled = x.broadcast_mul(&m3)?.sum(1)?.broadcast_div(&m3.sum(1)?)?; // (B, C)
        let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(pooled.broadcast_div(&(norm + 1e-12)?)?)
    }
}

/// Sentences (pre-tokenised, in a seeded order) with the teacher's embeddings as targets.
pub struct SentenceObjective<'a> {
    pub student: &'a TrainBert,
    /// Token ids, type ids per sentence.
    pub sentences: Vec<(Vec<u32>, Vec<u32>)>,
    /// The teacher's normalised embedding of each sentence.
    pub targets: Vec<Vec<f32>>,
    pub batch: usize,
    pub seed: u64,
    /// Weight of the MSE term next to 1 − cosine.
    pub mse_weight: f64,
}

impl Objective for SentenceObjective<'_> {
    fn vars(&self) -> Vec<(String, &Var)> {
        self.student.vars()
    }

    fn loss(&self, mb: usize) -> Result<Terms> {
        let n = self.sentences.len();
        let idx: Vec<usize> = (0..self.batch).map(|j| crate::shuffled(n, self.seed, mb * self.batch + j)).collect();
        let t = idx.iter().map(|&i| self.sentences[i].0.len()).max().unwrap_or(1);
        let b = idx.len();
        let (mut ids, mut types, mut mask) = (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
        for (r, &i) in idx.iter().enumerate() {
            let (id, ty) = &self.sentences[i];
            ids[r * t..r * t + id.len()].copy_from_slice(id);
            types[r * t..r * t + ty.len()].copy_from_slice(ty);
            mask[r * t..r * t + id.len()].iter_mut().for_each(|m| *m = 1);
        }
        let dev = self.student.word.device();
        let e = self.student.embed(
            &Tensor::from_vec(ids, (b, t), dev)?,
            &Tensor::from_vec(types, (b, t), dev)?,
            &Tensor::from_vec(mask, (b, t), dev)?,
        )?;
        let c = e.dim(1)?;
        let target: Vec<f32> = idx.iter().flat_map(|&i| self.targets[i].iter().copied()).collect();
        let target = Tensor::from_vec(target, (b, c), dev)?;
        let cos = (1.0 - (&e * &target)?.sum(1)?.mean_all()?)?;
        let mse = (&e - &target)?.sqr()?.mean_all()?;
        let total = (&cos + (&mse * self.mse_weight)?)?;
        Ok(Terms { ce: 0.0, kd: cos.to_scalar::<f32>()? as f64, hidden: mse.to_scalar::<f32>()? as f64, total })
    }
}
