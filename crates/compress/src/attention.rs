//! Low-rank attention (`whittle lowrank`, option `attention_rank`): the queries and keys of every head are
//! factorised jointly, so that the attention scores are computed in r + 1 dimensions instead of head_dim.
//!
//! Per head h, the score of query token i against key token j is
//! `(x_i Wq_hᵀ + bq_h)(x_j Wk_hᵀ + bk_h)ᵀ / √D = x_i M_h x_jᵀ + c_h·x_j + (terms of i alone)`, with
//! `M_h = Wq_hᵀ Wk_h / √D` (C × C, rank ≤ D) and `c_h = Wk_hᵀ bq_h / √D`. Terms that depend on the query
//! alone shift a whole softmax row and drop out exactly. M_h is replaced by its best rank-r approximation
//! A_h B_hᵀ in the metric of the inputs, `‖X (M_h − A Bᵀ) Xᵀ‖`: with Σ xᵀx = L Lᵀ (the query input's
//! statistic, which the keys share), that is the SVD of `Lᵀ M_h L` truncated to r and mapped back by L⁻ᵀ
//! (option `method` `svd` uses L = I). The new projections are `q′ = √(r+1)·[x A_h, 1]` and `k′ = [x B_h, c_h·x]`,
//! so the key-bias term stays exact and the kernel's 1/√(r+1) scale is undone.
//!
//! BERT-style encoders only: LLaMA rotates q and k by position (rope) between the projections and the
//! scores, which no fixed factorisation of Wq_hᵀ Wk_h survives.

use std::time::Instant;

use candle_core::Tensor;
use faer::Mat;
use rayon::prelude::*;
use serde::Serialize;
use whittle_calib::observe::{calibrate_with, CalibOptions};
use whittle_core::observe::ActStats;
use whittle_core::{InvalidOption, Linear};
use whittle_models::bert::BertBlock;
use whittle_models::BlockLayout;
use whittle_models::{Loaded, Model};

use crate::lowrank::{cholesky, Method};
use crate::{Error, Result};

/// One block of the report.
#[derive(Debug, Clone, Serialize)]
pub struct BlockAttentionRank {
    pub block: usize,
    pub heads: usize,
    /// Values per head in the scores, before (head_dim) and after (r + 1).
    pub dim_before: usize,
    pub dim_after: usize,
    /// Query + key parameters (weights and biases).
    pub params_before: usize,
    pub params_after: usize,
    /// ‖Lᵀ(M − ABᵀ)L‖_F / ‖Lᵀ M L‖_F over the heads: the relative error of the scores on calibration text.
    pub score_rel_err: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttentionRankReport {
    pub method: &'static str,
    pub rank: usize,
    pub blocks: Vec<BlockAttentionRank>,
    pub params_before: usize,
    pub params_after: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// The factorised query and key weights (rows, C) and biases of one block.
struct Factored {
    wq: Vec<f32>,
    bq: Vec<f32>,
    wk: Vec<f32>,
    bk: Vec<f32>,
    err: f64,
    seconds: f64,
}

/// One block's query weight and bias, key weight, head count and whitening factor.
type BlockInput = (Vec<f32>, Vec<f32>, Vec<f32>, usize, Option<Mat<f64>>);

/// Solves Lᵀ Y = B in place (L lower): B ← L⁻ᵀ B.
fn undo_whitening(l: &Mat<f64>, b: &mut Mat<f64>) {
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(l.as_ref().transpose(), b.as_mut(), faer::Par::Seq);
}

#[allow(clippy::too_many_arguments)]
fn factor_block(
    wq: &[f32],
    bq: &[f32],
    wk: &[f32],
    heads: usize,
    d: usize,
    c: usize,
    r: usize,
    l: Option<&Mat<f64>>,
) -> Result<Factored> {
    let t0 = Instant::now();
    let dq = r + 1;
    let s = (d as f64).sqrt();
    let up = (dq as f64).sqrt();
    let (mut nq, mut nk) = (vec![0f32; heads * dq * c], vec![0f32; heads * dq * c]);
    let (mut nbq, nbk) = (vec![0f32; heads * dq], vec![0f32; heads * dq]);
    let (mut num, mut den) = (0.0, 0.0);
    for h in 0..heads {
        let q = Mat::from_fn(d, c, |i, j| wq[(h * d + i) * c + j] as f64);
        let k = Mat::from_fn(d, c, |i, j| wk[(h * d + i) * c + j] as f64);
        let m = q.transpose() * &k * (1.0 / s); // C × C
        let a = match l {
            Some(l) => l.transpose() * &m * l,
            None => m.clone(),
        };
        let svd = a.as_ref().thin_svd().map_err(|e| Error::Usage(format!("head {h}: SVD failed ({e:?})")))?;
        let sigma: Vec<f64> = (0..c).map(|i| svd.S()[i]).collect();
        let total: f64 = sigma.iter().map(|x| x * x).sum();
        let tail: f64 = sigma[r..].iter().map(|x| x * x).sum();
        num += tail;
        den += total;
        let mut af = Mat::from_fn(c, r, |i, j| svd.U()[(i, j)] * sigma[j].sqrt());
        let mut bf = Mat::from_fn(c, r, |i, j| svd.V()[(i, j)] * sigma[j].sqrt());
        if let Some(l) = l {
            undo_whitening(l, &mut af);
            undo_whitening(l, &mut bf);
        }
        // c_h = Wk_hᵀ bq_h / √D: the key-dependent part of the query bias.
        let ch: Vec<f64> = (0..c).map(|j| (0..d).map(|i| k[(i, j)] * bq[h * d + i] as f64).sum::<f64>() / s).collect();
        for j in 0..r {
            let row = (h * dq + j) * c;
            for x in 0..c {
                nq[row + x] = (up * af[(x, j)]) as f32;
                nk[row + x] = bf[(x, j)] as f32;
            }
        }
        // The last dimension: a constant √(r+1) on the query side against c_h·x on the key side.
        nbq[h * dq + r] = up as f32;
        let row = (h * dq + r) * c;
        for x in 0..c {
            nk[row + x] = ch[x] as f32;
        }
    }
    Ok(Factored {
        wq: nq,
        bq: nbq,
        wk: nk,
        bk: nbk,
        err: (num / den.max(1e-30)).sqrt(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Factorises the queries and keys of every block of a BERT encoder jointly to rank `r` (see the module
/// doc), whitened by calibration statistics for `Method::SvdLlm` (`Method::Svd`: unwhitened).
pub fn attention_rank(
    l: &mut Loaded,
    r: usize,
    method: Method,
    damp: f64,
    text: &str,
    co: &CalibOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<AttentionRankReport> {
    let t0 = Instant::now();
    let Model::Bert(m) = &l.model else {
        return Err(Error::Usage(
            "option `attention_rank`: LLaMA rotates queries and keys by position (rope) between the projections and the scores, so they cannot be factorised jointly; factorise q_proj/k_proj one by one (option `ratio`, option `rank`)".into(),
        ));
    };
    if method == Method::Asvd {
        return Err(Error::Usage("option `attention_rank` takes option `method` svd or svd-llm".into()));
    }
    let d = m.config.head_dim;
    if r == 0 || r + 1 >= d {
        let reason = format!(
            "must be in 1..={} (the scores then use r + 1 < head_dim = {d} values per head)",
            d.saturating_sub(2)
        );
        return Err(InvalidOption::new("attention_rank", r, reason).into());
    }
    for (bi, b) in m.blocks.iter().enumerate() {
        if b.query.out_features() != b.value.out_features() {
            return Err(Error::Usage(format!("block {bi}: its attention is already low-rank")));
        }
    }
    let is_query = |n: &str| Model::is_block_linear(n) && n.ends_with(".attention.self.query");
    let (stats, tokens) = if method == Method::SvdLlm {
        let cal = calibrate_with(l, text, co, |n, k| is_query(n).then(|| ActStats::hessian(k)), &mut progress)?;
        (Some(cal.stats), cal.tokens)
    } else {
        (None, 0)
    };
    let Model::Bert(m) = &mut l.model else { unreachable!("checked above") };
    let c = m.config.hidden_size;
    let inputs: Vec<BlockInput> = m
        .blocks
        .iter()
        .enumerate()
        .map(|(bi, b)| {
            let name = format!("{}attention.self.query", BertBlock::prefix(bi));
            let v = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            let bq = match &b.query.bias {
                Some(t) => v(t.clone())?,
                None => vec![0.0; b.query.out_features()],
            };
            let l = match &stats {
                Some(s) => {
                    let h =
                        s.get(&name).and_then(|s| s.xtx.as_ref()).filter(|h| h.len() == c * c).ok_or_else(|| {
                            Error::Usage(format!("layer `{name}`: no Σ xᵀx gathered (calibration did not reach it)"))
                        })?;
                    Some(cholesky(h, c, damp, &name)?)
                }
                None => None,
            };
            Ok((v(b.query.dequantize()?)?, bq, v(b.key.dequantize()?)?, b.n_head, l))
        })
        .collect::<Result<_>>()?;
    let factored: Vec<Factored> = inputs
        .par_iter()
        .map(|(wq, bq, wk, heads, l)| factor_block(wq, bq, wk, *heads, d, c, r, l.as_ref()))
        .collect::<Result<_>>()?;
    let mut blocks = Vec::new();
    for (bi, (b, f)) in m.blocks.iter_mut().zip(factored).enumerate() {
        let rows = b.n_head * (r + 1);
        let before = b.query.num_params() + b.key.num_params() + 2 * b.query.out_features();
        let dev = b.query.device();
        let t = |w: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(w, shape, &dev);
        b.query = Linear::dense(t(f.wq, (rows, c))?, Some(Tensor::from_vec(f.bq, rows, &dev)?))?.inheriting(&b.query);
        b.key = Linear::dense(t(f.wk, (rows, c))?, Some(Tensor::from_vec(f.bk, rows, &dev)?))?.inheriting(&b.key);
        blocks.push(BlockAttentionRank {
            block: bi,
            heads: b.n_head,
            dim_before: d,
            dim_after: r + 1,
            params_before: before,
            params_after: 2 * rows * (c + 1),
            score_rel_err: f.err,
            seconds: f.seconds,
        });
    }
    Ok(AttentionRankReport {
        method: method.name(),
        rank: r,
        params_before: blocks.iter().map(|b| b.params_before).sum(),
        params_after: blocks.iter().map(|b| b.params_after).sum(),
        blocks,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At full rank (r + 1 = D + 1 > D is refused, so compare r = D − 2 against an r that captures
    /// everything): a head whose M has rank ≤ r is reproduced exactly, scores up to a per-query constant.
    #[test]
    fn exact_when_the_rank_suffices() {
        let (heads, d, c) = (2, 4, 6);
        // Weights whose per-head Wqᵀ Wk has rank 2 (two non-zero rows per head).
        let mut wq = vec![0f32; heads * d * c];
        let mut wk = vec![0f32; heads * d * c];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..c {
                    wq[(h * d + i) * c + j] = ((h * 7 + i * 3 + j) % 5) as f32 - 2.0;
                    wk[(h * d + i) * c + j] = ((h * 5 + i * 2 + j * 3) % 7) as f32 / 3.0 - 1.0;
                }
            }
        }
        let bq: Vec<f32> = (0..heads * d).map(|i| i as f32 * 0.1 - 0.3).collect();
        let bk: Vec<f32> = (0..heads * d).map(|i| 0.2 - i as f32 * 0.05).collect();
        let f = factor_block(&wq, &bq, &wk, heads, d, c, 2, None).unwrap();
        assert!(f.err < 1e-6, "{}", f.err);
        let x: Vec<Vec<f32>> =
            (0..3).map(|t| (0..c).map(|j| ((t * 11 + j * 5) % 9) as f32 / 4.0 - 1.0).collect()).collect();
        let proj = |w: &[f32], b: &[f32], dd: usize, h: usize, x: &[f32]| -> Vec<f64> {
            (0..dd)
                .map(|i| (0..c).map(|j| (w[(h * dd + i) * c + j] * x[j]) as f64).sum::<f64>() + b[h * dd + i] as f64)
                .collect()
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        for h in 0..heads {
            for i in 0..3 {
                // Scores against every key, original (/√D) and factorised (/√(r+1)); equal up to a constant.
                let s0: Vec<f64> = (0..3)
                    .map(|j| dot(&proj(&wq, &bq, d, h, &x[i]), &proj(&wk, &bk, d, h, &x[j])) / (d as f64).sqrt())
                    .collect();
                let s1: Vec<f64> = (0..3)
                    .map(|j| dot(&proj(&f.wq, &f.bq, 3, h, &x[i]), &proj(&f.wk, &f.bk, 3, h, &x[j])) / 3f64.sqrt())
                    .collect();
                let off = s0[0] - s1[0];
                for j in 1..3 {
                    assert!(
                        (s0[j] - s1[j] - off).abs() < 1e-4,
                        "head {h} query {i} key {j}: {} vs {}",
                        s0[j],
                        s1[j] + off
                    );
                }
            }
        }
    }
}
