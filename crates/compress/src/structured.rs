//! Structured pruning that really removes parameters: whole attention heads (for grouped-query attention,
//! whole KV groups with their query heads), FFN neurons (rows of gate/up — BERT's intermediate — and the
//! matching columns of down / BERT's output) and whole blocks. The pruned model is smaller and faster in every
//! runtime that reads it, its blocks may have different widths (the loader reads each block's widths from its
//! tensors), and it saves and reloads like any other model.
//!
//! Importance of a unit (LLM-Pruner's and Wanda's per-channel criteria):
//! - `l2` / `l1`: the norm of every weight the unit owns (rows of q/k/v and columns of o for a head; the row of
//!   gate and up and the column of down for a neuron) — the seed's `ln_structured`;
//! - `taylor`: Σ |w·∂L/∂w| over the same weights, the gradient from the language-modelling loss on
//!   calibration text (LLM-Pruner's first-order criterion);
//! - `activation`: Σ_i |W_out[i, c]|·‖X_c‖₂ over the unit's input channels c of the projection it feeds
//!   (o_proj for heads, down_proj for neurons), with ‖X_c‖₂ from calibration text: Wanda's score, summed over
//!   the unit.
//!
//! Blocks are ranked by their influence on calibration text, 1 − mean cos(x_in, x_out) over tokens (ShortGPT's
//! Block Influence): the blocks that change the residual stream least go first.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::Serialize;
use whittle_core::observe::ActStats;
use whittle_core::{InvalidOption, Linear};
use whittle_models::bert::BertBlock;
use whittle_models::llama::LlamaBlock;
use whittle_models::BlockLayout;
use whittle_models::Model;

use crate::{Error, Result};

/// How unit importance is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Importance {
    L1,
    L2,
    /// Wanda-style |W|·‖X‖ on calibration inputs (needs activation statistics).
    Activation,
    /// First-order Taylor, Σ |w·∂L/∂w| over the unit's weights with the gradient of the language-modelling
    /// loss on calibration text (LLM-Pruner's element-wise criterion; needs the saliency of every weight).
    Taylor,
}

impl Importance {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "l1" => Ok(Self::L1),
            "l2" => Ok(Self::L2),
            "activation" | "wanda" => Ok(Self::Activation),
            "taylor" => Ok(Self::Taylor),
            _ => Err(InvalidOption::new("importance", s, "valid: l2, l1, activation, taylor").into()),
        }
    }
}

/// What to remove: fractions of each block's heads (KV groups) and FFN neurons, and a number of whole blocks
/// (or the explicit list `drop_layers`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Structured {
    pub heads: f64,
    pub ffn: f64,
    pub layers: usize,
    pub drop_layers: Vec<usize>,
}

impl Structured {
    /// Parses `heads=0.25,ffn=0.3,layers=2` (any subset).
    pub fn parse(s: &str) -> Result<Self> {
        let mut out = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                InvalidOption::new(
                    "structured",
                    format!("`{part}`"),
                    "expected KEY=VALUE (heads=0.25,ffn=0.3,layers=2)",
                )
            })?;
            let frac = |v: &str| -> Result<f64> {
                let f: f64 =
                    v.parse().map_err(|_| InvalidOption::new("structured", format!("{k}={v}"), "not a number"))?;
                if !(0.0..1.0).contains(&f) {
                    return Err(InvalidOption::new("structured", format!("{k}={v}"), "a fraction in [0, 1)").into());
                }
                Ok(f)
            };
            match k {
                "heads" => out.heads = frac(v)?,
                "ffn" => out.ffn = frac(v)?,
                "layers" => {
                    out.layers = v
                        .parse()
                        .map_err(|_| InvalidOption::new("structured", format!("layers={v}"), "a whole number"))?
                }
                _ => {
                    return Err(
                        InvalidOption::new("structured", format!("`{k}`"), "valid keys are heads, ffn, layers").into()
                    )
                }
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.heads == 0.0 && self.ffn == 0.0 && self.layers == 0 && self.drop_layers.is_empty()
    }
}

/// What happened to one block.
#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    /// Index in the original model.
    pub block: usize,
    pub dropped: bool,
    pub heads_before: usize,
    pub heads_after: usize,
    pub kv_heads_before: usize,
    pub kv_heads_after: usize,
    pub ffn_before: usize,
    pub ffn_after: usize,
    pub params_before: usize,
    pub params_after: usize,
    /// Block influence on the calibration text, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub influence: Option<f64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Per block, and the totals of the block Linears.
#[derive(Debug, Clone, Serialize)]
pub struct StructuredReport {
    pub blocks: Vec<BlockReport>,
    pub params_before: usize,
    pub params_after: usize,
}

fn weights(l: &Linear) -> Result<Vec<f32>> {
    Ok(l.dequantize()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Rows `keep` of `l` (and of its bias), as a dense Linear.
pub fn keep_rows(l: &Linear, keep: &[usize]) -> Result<Linear> {
    let idx = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), &l.device())?;
    let w = l.dequantize()?.to_dtype(DType::F32)?.index_select(&idx, 0)?;
    let b = match &l.bias {
        Some(b) => Some(b.index_select(&idx, 0)?),
        None => None,
    };
    Ok(Linear::dense(w, b)?.inheriting(l))
}

/// Columns `keep` of `l` (its bias unchanged), as a dense Linear.
pub fn keep_cols(l: &Linear, keep: &[usize]) -> Result<Linear> {
    let idx = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), &l.device())?;
    let w = l.dequantize()?.to_dtype(DType::F32)?.index_select(&idx, 1)?.contiguous()?;
    Ok(Linear::dense(w, l.bias.clone())?.inheriting(l))
}

/// Σ over `rows` of ‖row‖ (l1 or squared l2) of the (m × k) matrix `w`.
fn row_norm(w: &[f32], k: usize, rows: impl Iterator<Item = usize>, imp: Importance) -> f64 {
    rows.map(|r| w[r * k..(r + 1) * k].iter().map(|&v| norm_term(v, imp)).sum::<f64>()).sum()
}

/// Σ over `cols` of a column norm of `w` (m × k), each entry weighted by `scale[c]` (‖X_c‖ for activation).
fn col_norm(w: &[f32], k: usize, cols: &[usize], imp: Importance, scale: Option<&[f64]>) -> f64 {
    let m = w.len() / k;
    let mut s = 0f64;
    for r in 0..m {
        for &c in cols {
            let v = w[r * k + c];
            s += match (imp, scale) {
                (Importance::Activation, Some(x)) => (v.abs() as f64) * x[c],
                _ => norm_term(v, imp),
            };
        }
    }
    s
}

fn norm_term(v: f32, imp: Importance) -> f64 {
    match imp {
        Importance::L1 => v.abs() as f64,
        _ => (v as f64) * (v as f64),
    }
}

/// Indices of the `n_keep` highest scores, in their original order.
fn top(scores: &[f64], n_keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep: Vec<usize> = idx[..n_keep].to_vec();
    keep.sort_unstable();
    keep
}

/// How many of `n` units remain after removing the fraction `f` (rounded), never fewer than one; with a note
/// when the floor of one applied.
fn remaining(n: usize, f: f64, what: &str) -> (usize, String) {
    let remove = (n as f64 * f).round() as usize;
    if remove >= n && n > 0 {
        return (1, format!("removing {f} of {n} {what} would leave none: kept 1"));
    }
    (n - remove, String::new())
}

/// ‖X_c‖₂ per input channel of `name` from calibration statistics.
fn xnorm(stats: Option<&BTreeMap<String, ActStats>>, name: &str, imp: Importance) -> Result<Option<Vec<f64>>> {
    if imp != Importance::Activation {
        return Ok(None);
    }
    let s = stats.and_then(|s| s.get(name)).ok_or_else(|| {
        InvalidOption::new("importance", "activation", format!("no calibration statistics for `{name}`"))
    })?;
    Ok(Some(s.sumsq.iter().map(|v| v.sqrt()).collect()))
}

/// Importance scores of one block's units: (KV groups or heads, FFN neurons).
fn scores(
    model: &Model,
    bi: usize,
    imp: Importance,
    stats: Option<&BTreeMap<String, ActStats>>,
    saliency: Option<&BTreeMap<String, Vec<f32>>>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    // Taylor: the norms below run over |w·g| instead of w, as l1.
    let weights = |l: &Linear, name: String| -> Result<Vec<f32>> {
        if imp != Importance::Taylor {
            return weights(l);
        }
        let s = saliency
            .and_then(|s| s.get(&name))
            .ok_or_else(|| InvalidOption::new("importance", "taylor", format!("no gradient saliency for `{name}`")))?;
        if s.len() != l.in_features() * l.out_features() {
            return Err(
                InvalidOption::new("importance", "taylor", format!("saliency of `{name}` has the wrong size")).into()
            );
        }
        Ok(s.clone())
    };
    let imp = if imp == Importance::Taylor { Importance::L1 } else { imp };
    match model {
        Model::Llama(m) => {
            let (b, hd, p) = (&m.blocks[bi], m.config.head_dim, LlamaBlock::prefix(bi));
            let (h0, kv0, f0) = (b.n_head, b.n_kv_head, b.gate.out_features());
            // KV group g owns KV head g and query heads g·rep .. (g+1)·rep (the order of the attention's repeat).
            let rep = h0 / kv0;
            let n = |s: &str| format!("{p}{s}");
            let (wq, wk) = (weights(&b.q, n("self_attn.q_proj"))?, weights(&b.k, n("self_attn.k_proj"))?);
            let (wv, wo) = (weights(&b.v, n("self_attn.v_proj"))?, weights(&b.o, n("self_attn.o_proj"))?);
            let c = b.q.in_features();
            let xo = xnorm(stats, &format!("{p}self_attn.o_proj"), imp)?;
            let heads = (0..kv0)
                .map(|g| {
                    let qrows = g * rep * hd..(g + 1) * rep * hd;
                    let ocols: Vec<usize> = qrows.clone().collect();
                    match imp {
                        Importance::Activation => col_norm(&wo, h0 * hd, &ocols, imp, xo.as_deref()),
                        _ => {
                            row_norm(&wq, c, qrows, imp)
                                + row_norm(&wk, c, g * hd..(g + 1) * hd, imp)
                                + row_norm(&wv, c, g * hd..(g + 1) * hd, imp)
                                + col_norm(&wo, h0 * hd, &ocols, imp, None)
                        }
                    }
                })
                .collect();
            let (wg, wu) = (weights(&b.gate, n("mlp.gate_proj"))?, weights(&b.up, n("mlp.up_proj"))?);
            let wd = weights(&b.down, n("mlp.down_proj"))?;
            let xd = xnorm(stats, &format!("{p}mlp.down_proj"), imp)?;
            let ffn = (0..f0)
                .map(|j| match imp {
                    Importance::Activation => col_norm(&wd, f0, &[j], imp, xd.as_deref()),
                    _ => {
                        row_norm(&wg, c, j..j + 1, imp)
                            + row_norm(&wu, c, j..j + 1, imp)
                            + col_norm(&wd, f0, &[j], imp, None)
                    }
                })
                .collect();
            Ok((heads, ffn))
        }
        Model::Bert(m) => {
            let (b, hd, p) = (&m.blocks[bi], m.config.head_dim, BertBlock::prefix(bi));
            if b.query.out_features() != b.value.out_features() {
                return Err(Error::Usage(format!(
                    "block {bi} has low-rank attention (queries and keys of {} values per head): prune heads before `lowrank` with option `attention_rank`",
                    b.query.out_features() / b.n_head
                )));
            }
            let (h0, f0) = (b.n_head, b.intermediate.out_features());
            let n = |s: &str| format!("{p}{s}");
            let (wq, wk) = (weights(&b.query, n("attention.self.query"))?, weights(&b.key, n("attention.self.key"))?);
            let wv = weights(&b.value, n("attention.self.value"))?;
            let wo = weights(&b.attn_out, n("attention.output.dense"))?;
            let c = b.query.in_features();
            let xo = xnorm(stats, &format!("{p}attention.output.dense"), imp)?;
            let heads = (0..h0)
                .map(|h| {
                    let rows = h * hd..(h + 1) * hd;
                    let cols: Vec<usize> = rows.clone().collect();
                    match imp {
                        Importance::Activation => col_norm(&wo, h0 * hd, &cols, imp, xo.as_deref()),
                        _ => {
                            row_norm(&wq, c, rows.clone(), imp)
                                + row_norm(&wk, c, rows.clone(), imp)
                                + row_norm(&wv, c, rows, imp)
                                + col_norm(&wo, h0 * hd, &cols, imp, None)
                        }
                    }
                })
                .collect();
            let (wi, wo2) =
                (weights(&b.intermediate, n("intermediate.dense"))?, weights(&b.output, n("output.dense"))?);
            let xd = xnorm(stats, &format!("{p}output.dense"), imp)?;
            let ffn = (0..f0)
                .map(|j| match imp {
                    Importance::Activation => col_norm(&wo2, f0, &[j], imp, xd.as_deref()),
                    _ => row_norm(&wi, c, j..j + 1, imp) + col_norm(&wo2, f0, &[j], imp, None),
                })
                .collect();
            Ok((heads, ffn))
        }
    }
}

/// How many units each block keeps when the fraction `f` of all units goes: per block (`global` false,
/// rounded, at least one), or by one threshold over every block's scores (at least one per block).
fn keep_counts(scores: &[Vec<f64>], f: f64, global: bool, what: &str, notes: &mut [Vec<String>]) -> Vec<usize> {
    if f == 0.0 {
        return scores.iter().map(Vec::len).collect();
    }
    if !global {
        return scores
            .iter()
            .zip(notes.iter_mut())
            .map(|(s, n)| {
                let (k, note) = remaining(s.len(), f, what);
                if !note.is_empty() {
                    n.push(note);
                }
                k
            })
            .collect();
    }
    let mut all: Vec<(f64, usize)> =
        scores.iter().enumerate().flat_map(|(b, s)| s.iter().map(move |&v| (v, b))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut keep: Vec<usize> = scores.iter().map(Vec::len).collect();
    let mut to_remove = (all.len() as f64 * f).round() as usize;
    for (_, b) in all {
        if to_remove == 0 {
            break;
        }
        if keep[b] > 1 {
            keep[b] -= 1;
            to_remove -= 1;
        } else if notes[b].is_empty() {
            notes[b].push(format!("kept its last of the {what}"));
        }
    }
    keep
}

/// Removes heads and FFN neurons of every block by importance (per block, or with one ranking over all
/// blocks when `global`), then the blocks in `drop` (original indices). `stats` are activation statistics by
/// Linear name (for [`Importance::Activation`]); `influence` the block influences, reported beside each block.
pub fn prune_structured(
    model: &mut Model,
    s: &Structured,
    imp: Importance,
    global: bool,
    stats: Option<&BTreeMap<String, ActStats>>,
    drop: &[usize],
    influence: Option<&[f64]>,
) -> Result<StructuredReport> {
    prune_structured_with(model, s, imp, global, stats, None, drop, influence)
}

/// Checks a list of blocks to remove against a model of `nb` blocks: each exists, none twice, one stays.
/// Cheap: callers run it before any calibration.
pub fn check_drop(nb: usize, drop: &[usize]) -> Result<()> {
    if let Some(&b) = drop.iter().find(|&&b| b >= nb) {
        return Err(
            InvalidOption::new("drop_layers", b, format!("the model has blocks 0..{}", nb.saturating_sub(1))).into()
        );
    }
    let mut uniq = drop.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.len() != drop.len() {
        return Err(InvalidOption::new("drop_layers", format!("{drop:?}"), "a block is named twice").into());
    }
    if uniq.len() >= nb {
        return Err(Error::Usage(format!(
            "dropping {} of {nb} blocks would leave none; at least one must stay",
            uniq.len()
        )));
    }
    Ok(())
}

/// [`prune_structured`] with the per-weight saliency |w·∂L/∂w| (HF Linear name → row-major values) that
/// [`Importance::Taylor`] needs.
#[allow(clippy::too_many_arguments)]
pub fn prune_structured_with(
    model: &mut Model,
    s: &Structured,
    imp: Importance,
    global: bool,
    stats: Option<&BTreeMap<String, ActStats>>,
    saliency: Option<&BTreeMap<String, Vec<f32>>>,
    drop: &[usize],
    influence: Option<&[f64]>,
) -> Result<StructuredReport> {
    let nb = model.n_blocks();
    check_drop(nb, drop)?;
    let mut uniq = drop.to_vec();
    uniq.sort_unstable();
    let (mut hs, mut fs) = (Vec::new(), Vec::new());
    for bi in 0..nb {
        let (h, f) = scores(model, bi, imp, stats, saliency)?;
        hs.push(h);
        fs.push(f);
    }
    let mut notes: Vec<Vec<String>> = vec![Vec::new(); nb];
    let keep_h = keep_counts(&hs, s.heads, global, "KV groups / heads", &mut notes);
    let keep_f = keep_counts(&fs, s.ffn, global, "FFN neurons", &mut notes);
    let (dims_before, params_before) = (model.block_dims(), model.block_params());
    match model {
        Model::Llama(m) => {
            let hd = m.config.head_dim;
            for (bi, b) in m.blocks.iter_mut().enumerate() {
                let (h0, kv0, f0) = (b.n_head, b.n_kv_head, b.gate.out_features());
                let rep = h0 / kv0;
                if keep_h[bi] < kv0 {
                    let groups = top(&hs[bi], keep_h[bi]);
                    let qrows: Vec<usize> = groups.iter().flat_map(|&g| g * rep * hd..(g + 1) * rep * hd).collect();
                    let kvrows: Vec<usize> = groups.iter().flat_map(|&g| g * hd..(g + 1) * hd).collect();
                    b.q = keep_rows(&b.q, &qrows)?;
                    b.k = keep_rows(&b.k, &kvrows)?;
                    b.v = keep_rows(&b.v, &kvrows)?;
                    b.o = keep_cols(&b.o, &qrows)?;
                    b.n_kv_head = groups.len();
                    b.n_head = groups.len() * rep;
                }
                if keep_f[bi] < f0 {
                    let keep = top(&fs[bi], keep_f[bi]);
                    b.gate = keep_rows(&b.gate, &keep)?;
                    b.up = keep_rows(&b.up, &keep)?;
                    b.down = keep_cols(&b.down, &keep)?;
                }
            }
        }
        Model::Bert(m) => {
            let hd = m.config.head_dim;
            for (bi, b) in m.blocks.iter_mut().enumerate() {
                let (h0, f0) = (b.n_head, b.intermediate.out_features());
                if keep_h[bi] < h0 {
                    let heads = top(&hs[bi], keep_h[bi]);
                    let rows: Vec<usize> = heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
                    b.query = keep_rows(&b.query, &rows)?;
                    b.key = keep_rows(&b.key, &rows)?;
                    b.value = keep_rows(&b.value, &rows)?;
                    b.attn_out = keep_cols(&b.attn_out, &rows)?;
                    b.n_head = heads.len();
                }
                if keep_f[bi] < f0 {
                    let keep = top(&fs[bi], keep_f[bi]);
                    b.intermediate = keep_rows(&b.intermediate, &keep)?;
                    b.output = keep_cols(&b.output, &keep)?;
                }
            }
        }
    }
    let (dims_after, params_after) = (model.block_dims(), model.block_params());
    let mut blocks: Vec<BlockReport> = (0..nb)
        .map(|bi| {
            let (b0, b1) = (dims_before[bi], dims_after[bi]);
            BlockReport {
                block: bi,
                dropped: false,
                heads_before: b0.n_head,
                heads_after: b1.n_head,
                kv_heads_before: b0.n_kv_head,
                kv_heads_after: b1.n_kv_head,
                ffn_before: b0.ffn,
                ffn_after: b1.ffn,
                params_before: params_before[bi],
                params_after: params_after[bi],
                influence: influence.map(|i| i[bi]),
                note: notes[bi].join("; "),
            }
        })
        .collect();
    match model {
        Model::Llama(m) => m.config.num_layers = drop_blocks(&mut m.blocks, &uniq),
        Model::Bert(m) => m.config.num_layers = drop_blocks(&mut m.blocks, &uniq),
    }
    for b in blocks.iter_mut() {
        if uniq.contains(&b.block) {
            b.dropped = true;
            b.params_after = 0;
        }
    }
    // Totals over the original blocks (before) and the kept ones (after).
    let params_before = blocks.iter().map(|b| b.params_before).sum();
    let params_after = blocks.iter().map(|b| b.params_after).sum();
    Ok(StructuredReport { blocks, params_before, params_after })
}

/// Removes the blocks at (original) indices `drop`; returns how many remain.
fn drop_blocks<B>(blocks: &mut Vec<B>, drop: &[usize]) -> usize {
    let mut i = 0;
    blocks.retain(|_| {
        i += 1;
        !drop.contains(&(i - 1))
    });
    blocks.len()
}

/// The `n` blocks with the least influence 1 − mean cos(x_in, x_out), given per-block influences.
pub fn least_influential(influence: &[f64], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..influence.len()).collect();
    idx.sort_by(|&a, &b| influence[a].total_cmp(&influence[b]).then(a.cmp(&b)));
    let mut out: Vec<usize> = idx.into_iter().take(n).collect();
    out.sort_unstable();
    out
}

/// Block influence: 1 − mean over tokens of cos(x_in, x_out) for each block, on decoder windows `inputs`
/// (each (1, T, C) embeddings), run through the float model.
pub fn block_influence_llama(m: &whittle_models::llama::Llama, inputs: &[Tensor]) -> Result<Vec<f64>> {
    let t = inputs.first().map_or(0, |x| x.dim(1).unwrap_or(0));
    let (cos, sin, mask) = m.block_inputs(t)?;
    let mut sum = vec![0f64; m.blocks.len()];
    let mut n = 0usize;
    for x0 in inputs {
        let mut x = x0.clone();
        for (bi, b) in m.blocks.iter().enumerate() {
            let y = b.forward(&x, &cos, &sin, mask.as_ref(), &mut None, m.config.head_dim)?;
            let dot = (&x * &y)?.sum(2)?;
            let nx = x.sqr()?.sum(2)?.sqrt()?;
            let ny = y.sqr()?.sum(2)?.sqrt()?;
            let c: Vec<f32> = (dot / (nx * ny)?.clamp(1e-12, f64::MAX)?)?.flatten_all()?.to_vec1()?;
            sum[bi] += c.iter().map(|&v| 1.0 - v as f64).sum::<f64>();
            x = y;
        }
        n += t;
    }
    Ok(sum.into_iter().map(|s| s / n.max(1) as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_structured_and_bad_values() {
        let s = Structured::parse("heads=0.25,ffn=0.3,layers=2").unwrap();
        assert_eq!((s.heads, s.ffn, s.layers), (0.25, 0.3, 2));
        for bad in ["heads=1.0", "ffn=-0.1", "layers=x", "depth=2", "heads"] {
            let e = Structured::parse(bad).unwrap_err().to_string();
            assert!(e.contains("option `structured`"), "{bad}: {e}");
        }
    }

    #[test]
    fn top_keeps_the_highest_in_order() {
        assert_eq!(top(&[0.1, 5.0, 3.0, 0.2], 2), vec![1, 2]);
        assert_eq!(least_influential(&[0.3, 0.1, 0.2, 0.5], 2), vec![1, 2]);
        assert_eq!(remaining(3, 0.9, "KV groups").0, 1);
        assert_eq!(remaining(3, 0.25, "KV groups"), (2, String::new()));
        // Global: the lowest scores anywhere go first, each block keeps at least one.
        let sc = vec![vec![1.0, 2.0, 3.0], vec![10.0, 20.0, 30.0]];
        let mut notes = vec![Vec::new(); 2];
        assert_eq!(keep_counts(&sc, 0.5, true, "heads", &mut notes), vec![1, 2]);
        assert_eq!(keep_counts(&sc, 0.34, false, "heads", &mut notes), vec![2, 2]);
    }
}
