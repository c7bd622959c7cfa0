//! Small building blocks shared by the model families: norms, embeddings, attention.

use candle_core::{DType, Tensor, D};

use crate::Result;

/// LayerNorm: `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor, // (C,)
    pub bias: Tensor,   // (C,)
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?)
    }
    /// `LayerNorm(x + r)`, the post-LN residual step, fused into one kernel.
    ///
    /// # Shapes
    /// - `x`, `r`: (..., C); returns (..., C)
    pub fn forward_residual(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 && r.dtype() == DType::F32 {
            return Ok(whittle_core::ops::add_layer_norm(x, r, &self.weight, &self.bias, self.eps)?);
        }
        self.forward(&(x + r)?)
    }

    pub fn num_params(&self) -> usize {
        self.weight.elem_count() + self.bias.elem_count()
    }
}

/// RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor, // (C,)
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)?)
    }
    pub fn num_params(&self) -> usize {
        self.weight.elem_count()
    }
}

/// Rows of an embedding table.
///
/// # Shapes
/// - `table`: (V, C); `ids`: (B, T) u32; returns (B, T, C)
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let c = table.dim(1)?;
    let rows = table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?;
    // A table kept 16-bit: only the looked-up rows are widened.
    Ok(if rows.dtype() == DType::F32 { rows } else { rows.to_dtype(DType::F32)? })
}

/// Scaled dot-product attention with an additive mask.
///
/// # Shapes
/// - `q`: (B, H, T, D); `k`, `v`: (B, H, S, D); `mask`: broadcastable to (B, H, T, S), 0 or -inf/min
/// - returns (B, H, T, D)
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?; // (B, H, T, S)
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(p.matmul(&v.contiguous()?)?)
}

/// One query position against cached keys and values (decoding), fused: per head, scores = q·kᵀ/√d, softmax,
/// weighted sum of v. Grouped-query heads share their kv head (h / (H / KV)).
///
/// # Shapes
/// - `q`: (H, D); `k`, `v`: (KV, S, D); returns (H·D), heads in order (the layout `o_proj` reads)
pub fn decode_attention(q: &[f32], k: &[f32], v: &[f32], h: usize, kvh: usize, s: usize, d: usize) -> Vec<f32> {
    let rep = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; h * d];
    let mut p = vec![0f32; s];
    for hi in 0..h {
        let kv = hi / rep;
        let qh = &q[hi * d..(hi + 1) * d];
        let (kh, vh) = (&k[kv * s * d..(kv + 1) * s * d], &v[kv * s * d..(kv + 1) * s * d]);
        let mut max = f32::NEG_INFINITY;
        for (pt, kt) in p.iter_mut().zip(kh.chunks_exact(d)) {
            *pt = dot(qh, kt) * scale;
            max = max.max(*pt);
        }
        let mut sum = 0f32;
        for pt in p.iter_mut() {
            *pt = (*pt - max).exp();
            sum += *pt;
        }
        let o = &mut out[hi * d..(hi + 1) * d];
        for (pt, vt) in p.iter().zip(vh.chunks_exact(d)) {
            let w = pt / sum;
            for (a, b) in o.iter_mut().zip(vt) {
                *a += w * b;
            }
        }
    }
    out
}

/// Dot product with eight independent partial sums (so the compiler vectorizes it).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// Mean of `x` over the positions where `mask` is 1, then L2-normalised: sentence-transformers'
/// mean pooling followed by its `Normalize` module.
///
/// # Shapes
/// - `x`: (B, T, C); `mask`: (B, T) u32; returns (B, C)
pub fn mean_pool_normalize(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, T, 1)
    let sum = x.broadcast_mul(&m)?.sum(1)?; // (B, C)
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?; // (B, 1)
    let mean = sum.broadcast_div(&count)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(mean.broadcast_div(&norm)?)
}

/// [`mean_pool_normalize`] on packed sequences: the mean of each sequence's rows `cu_seqlens[s]..
/// cu_seqlens[s + 1]`, L2-normalised (with the same floors: an empty sequence gives a zero vector).
///
/// # Shapes
/// - `x`: (N, C); `cu_seqlens`: S + 1 offsets from 0 to N; returns S rows of C
pub fn mean_pool_normalize_packed(x: &Tensor, cu_seqlens: &[usize]) -> Result<Vec<Vec<f32>>> {
    let (n, c) = x.dims2()?;
    if cu_seqlens.first() != Some(&0) || cu_seqlens.last() != Some(&n) || cu_seqlens.windows(2).any(|w| w[0] > w[1]) {
        return Err(crate::Error::Usage(format!("sequence offsets {cu_seqlens:?} do not cover {n} rows")));
    }
    let rows = whittle_core::backend::cpu::with_f32_slice(x, |xs| {
        cu_seqlens
            .windows(2)
            .map(|w| {
                let mut sum = vec![0f32; c];
                for row in xs[w[0] * c..w[1] * c].chunks_exact(c) {
                    sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                let count = ((w[1] - w[0]) as f32).max(1e-9);
                sum.iter_mut().for_each(|s| *s /= count);
                let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                sum.iter_mut().for_each(|s| *s /= norm);
                sum
            })
            .collect()
    })?;
    Ok(rows)
}
