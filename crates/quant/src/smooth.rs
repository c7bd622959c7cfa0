//! SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights. For every group of Linears
//! reading the same input X, per input channel j: `s_j = max|X_j|^α / max|W_:,j|^(1−α)`; the consumers'
//! columns are multiplied by `s_j` and the op that produced X is divided by it, so the float model computes
//! the same function while X's channels become even (int8 per token then loses less).
//!
//! Where the divisions go (exact rewrites):
//! - LLaMA: q/k/v ← `input_layernorm` weight; gate/up ← `post_attention_layernorm` weight; down ← the rows of
//!   `up_proj` (`silu(gate)·up` is linear in up).
//! - BERT (post-LayerNorm: each LayerNorm output is also the residual, so it cannot absorb scales):
//!   `attention.output.dense` ← the rows of `attention.self.value`. The others are not smoothed.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;
use whittle_core::observe::ActStats;
use whittle_core::{InvalidOption, Linear};
use whittle_models::bert::BertBlock;
use whittle_models::llama::LlamaBlock;
use whittle_models::BlockLayout;
use whittle_models::Model;

use crate::{Error, Result};

/// What smoothing did to one group of Linears.
#[derive(Debug, Clone, Serialize)]
pub struct SmoothReport {
    /// The consumers, e.g. `model.layers.3.mlp.down_proj`.
    pub layers: Vec<String>,
    /// max |X| before and after (the per-token quantization range the outliers set).
    pub act_absmax_before: f32,
    pub act_absmax_after: f32,
}

/// The scales of one group: `s_j` from the input's per-channel max and the consumers' column maxima.
fn scales(x_absmax: &[f32], consumers: &[&Linear], alpha: f32) -> Result<Vec<f32>> {
    let mut wmax = vec![0f32; x_absmax.len()];
    for l in consumers {
        let w = l.dequantize()?.abs()?.max(0)?; // (in,)
        for (m, v) in wmax.iter_mut().zip(w.to_vec1::<f32>()?) {
            *m = m.max(v);
        }
    }
    Ok(x_absmax
        .iter()
        .zip(&wmax)
        .map(|(&a, &w)| if a <= 0.0 || w <= 0.0 { 1.0 } else { (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5) })
        .collect())
}

/// Multiplies the columns of `l` by `s`.
pub(crate) fn scale_columns(l: &Linear, s: &Tensor) -> Result<Linear> {
    let w = l.dequantize()?.broadcast_mul(&s.unsqueeze(0)?)?;
    Ok(Linear::dense(w, l.bias.clone())?.inheriting(l))
}

/// Divides the rows (outputs) of `l` by `s`.
pub(crate) fn divide_rows(l: &Linear, s: &Tensor) -> Result<Linear> {
    let w = l.dequantize()?.broadcast_div(&s.unsqueeze(1)?)?;
    let b = match &l.bias {
        Some(b) => Some(b.div(s)?),
        None => None,
    };
    Ok(Linear::dense(w, b)?.inheriting(l))
}

/// The statistics of layers whose inputs were divided per channel by `s`: maxima, sums of squares and
/// sample rows follow; the histograms no longer apply (marked stale).
pub(crate) fn rescale_stats(stats: &mut BTreeMap<String, ActStats>, names: &[String], s: &[f32]) {
    for n in names {
        if let Some(st) = stats.get_mut(n) {
            for (j, &sj) in s.iter().enumerate() {
                st.absmax[j] /= sj;
                st.sumsq[j] /= (sj as f64) * (sj as f64);
            }
            let k = st.k;
            for (i, v) in st.sample.iter_mut().enumerate() {
                *v /= s[i % k];
            }
            st.range = 0.0; // histogram stale
        }
    }
}

fn stat<'a>(stats: &'a BTreeMap<String, ActStats>, name: &str) -> Result<&'a ActStats> {
    stats
        .get(name)
        .filter(|s| s.rows > 0)
        .ok_or_else(|| Error::Unsupported(format!("option `smoothquant`: no calibration statistics for `{name}`")))
}

/// Applies SmoothQuant with strength `alpha` ∈ [0, 1] to `model`, using calibration `stats` (which are
/// updated to describe the smoothed inputs: per-channel maxima, sums of squares and sample rows; the
/// histograms no longer apply).
pub fn smooth(model: &mut Model, stats: &mut BTreeMap<String, ActStats>, alpha: f32) -> Result<Vec<SmoothReport>> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(InvalidOption::new("smoothquant", alpha, "alpha must be in [0, 1]").into());
    }
    let dev = model.device().clone();
    let mut reports = Vec::new();
    let mut record = |stats: &mut BTreeMap<String, ActStats>, names: Vec<String>, s: &[f32]| {
        let before = stats[&names[0]].absmax.iter().fold(0f32, |a, &b| a.max(b));
        rescale_stats(stats, &names, s);
        let after = stats[&names[0]].absmax.iter().fold(0f32, |a, &b| a.max(b));
        reports.push(SmoothReport { layers: names, act_absmax_before: before, act_absmax_after: after });
    };
    match model {
        Model::Llama(m) => {
            for (i, b) in m.blocks.iter_mut().enumerate() {
                let p = LlamaBlock::prefix(i);
                if [&b.q, &b.k, &b.v, &b.gate, &b.up, &b.down].iter().any(|l| l.is_quantized()) {
                    return Err(Error::Unsupported(format!("option `smoothquant`: block {p} is already quantized")));
                }
                // q/k/v ← input_layernorm
                let s = scales(&stat(stats, &format!("{p}self_attn.q_proj"))?.absmax, &[&b.q, &b.k, &b.v], alpha)?;
                let st = Tensor::from_vec(s.clone(), s.len(), &dev)?;
                b.attn_norm.weight = b.attn_norm.weight.div(&st)?;
                b.q = scale_columns(&b.q, &st)?;
                b.k = scale_columns(&b.k, &st)?;
                b.v = scale_columns(&b.v, &st)?;
                let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{p}self_attn.{n}")).to_vec();
                record(stats, names, &s);
                // gate/up ← post_attention_layernorm
                let s = scales(&stat(stats, &format!("{p}mlp.gate_proj"))?.absmax, &[&b.gate, &b.up], alpha)?;
                let st = Tensor::from_vec(s.clone(), s.len(), &dev)?;
                b.mlp_norm.weight = b.mlp_norm.weight.div(&st)?;
                b.gate = scale_columns(&b.gate, &st)?;
                b.up = scale_columns(&b.up, &st)?;
                record(stats, vec![format!("{p}mlp.gate_proj"), format!("{p}mlp.up_proj")], &s);
                // down ← up_proj rows
                let s = scales(&stat(stats, &format!("{p}mlp.down_proj"))?.absmax, &[&b.down], alpha)?;
                let st = Tensor::from_vec(s.clone(), s.len(), &dev)?;
                b.up = divide_rows(&b.up, &st)?;
                b.down = scale_columns(&b.down, &st)?;
                record(stats, vec![format!("{p}mlp.down_proj")], &s);
            }
        }
        Model::Bert(m) => {
            // Post-LayerNorm blocks: a LayerNorm's output is also the residual, so dividing it would change
            // the model. The one exact place is attention's output projection, whose input channels are the
            // value projection's outputs (attention mixes positions, not channels).
            for (i, b) in m.blocks.iter_mut().enumerate() {
                let p = BertBlock::prefix(i);
                if b.value.is_quantized() || b.attn_out.is_quantized() {
                    return Err(Error::Unsupported(format!("option `smoothquant`: block {p} is already quantized")));
                }
                let name = format!("{p}attention.output.dense");
                let s = scales(&stat(stats, &name)?.absmax, &[&b.attn_out], alpha)?;
                let st = Tensor::from_vec(s.clone(), s.len(), &dev)?;
                b.value = divide_rows(&b.value, &st)?;
                b.attn_out = scale_columns(&b.attn_out, &st)?;
                record(stats, vec![name], &s);
            }
        }
    }
    Ok(reports)
}
