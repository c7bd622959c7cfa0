//! AWQ (Lin et al. 2023): protect the weights that meet large activations. Per group of Linears reading the
//! same input X, per input channel j, `s_j = rms(X_j)^α`; the consumers' columns are multiplied by `s_j` before
//! rounding and the op producing X is divided by it (the same exact rewrites as SmoothQuant), so salient
//! channels get finer quantization steps. α is searched on a grid per group: the one whose rounded weights give
//! the least output error on calibration rows, ‖X·(Ŵ − W)ᵀ‖², wins (α = 0 is plain rounding, so AWQ never
//! does worse than it on those rows).
//!
//! Groups (LLaMA): q/k/v ← `input_layernorm`; gate/up ← `post_attention_layernorm`; down ← `up_proj` rows.
//! `o_proj` is left to plain rounding (with grouped-query attention its input channels are tied across heads).

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;
use whittle_core::observe::ActStats;
use whittle_core::{Linear, Rtn};
use whittle_models::llama::LlamaBlock;
use whittle_models::BlockLayout;
use whittle_models::Model;

use crate::smooth::{divide_rows, rescale_stats, scale_columns};
use crate::{Error, Result};

/// The α chosen for one group, with the output error at α = 0 (plain rounding) and at the chosen α.
#[derive(Debug, Clone, Serialize)]
pub struct AwqReport {
    pub layers: Vec<String>,
    pub alpha: f32,
    pub rtn_error: f64,
    pub awq_error: f64,
}

/// Σ over consumers of ‖X·(Ŵ − W)ᵀ‖² with Ŵ the rounded `W·diag(s)` scaled back by 1/s.
fn group_error(x: &Tensor, consumers: &[(&Linear, Rtn)], s: &[f32]) -> Result<f64> {
    let mut e = 0f64;
    for (l, rtn) in consumers {
        let (m, k) = (l.out_features(), l.in_features());
        let w: Vec<f32> = l.dequantize()?.flatten_all()?.to_vec1()?;
        let ws: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * s[i % k]).collect();
        let q = rtn.quantize(&ws, m, k).dequantize();
        let d: Vec<f32> = q.iter().enumerate().map(|(i, v)| v / s[i % k] - w[i]).collect();
        let dt = Tensor::from_vec(d, (m, k), x.device())?;
        e += x.matmul(&dt.t()?)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(e)
}

/// Searches α for one group; returns (α, scales, error at α = 0, error at α).
fn search(st: &ActStats, consumers: &[(&Linear, Rtn)], grid: usize) -> Result<(f32, Vec<f32>, f64, f64)> {
    let k = st.k;
    let x = Tensor::from_vec(st.sample.clone(), (st.sample.len() / k, k), &consumers[0].0.device())?;
    let rms: Vec<f32> = st.mean_sq().iter().map(|v| v.sqrt().max(1e-6)).collect();
    let ones = vec![1f32; k];
    let base = group_error(&x, consumers, &ones)?;
    let mut best = (0f32, ones, base);
    for i in 1..=grid {
        let a = i as f32 / grid as f32;
        let mut s: Vec<f32> = rms.iter().map(|r| r.powf(a)).collect();
        // Normalise so the scales are centred on 1 (geometric mean of max and min), as the reference does.
        let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
        let c = (lo * hi).sqrt().max(1e-12);
        s.iter_mut().for_each(|v| *v /= c);
        let e = group_error(&x, consumers, &s)?;
        if e < best.2 {
            best = (a, s, e);
        }
    }
    Ok((best.0, best.1, base, best.2))
}

/// What every group of a block shares: the block's name prefix, the format chooser and the α grid size.
type GroupCtx<'a> = (&'a str, &'a dyn Fn(&str, usize) -> Option<Rtn>, usize);

fn stat(stats: &BTreeMap<String, ActStats>, name: &str) -> Result<ActStats> {
    stats
        .get(name)
        .filter(|s| s.rows > 0 && !s.sample.is_empty())
        .cloned()
        .ok_or_else(|| Error::Unsupported(format!("option `method` awq: no calibration statistics for `{name}`")))
}

/// AWQ for Linears `ls` (named `names` under the block prefix) that read a norm's output: the norm's
/// weight takes 1/s. Skipped unless every one of them gets a grouped format.
fn norm_group(
    (p, rtn_for, grid): GroupCtx,
    norm: &mut Tensor,
    ls: &mut [&mut Linear],
    names: &[&str],
    stats: &mut BTreeMap<String, ActStats>,
    out: &mut Vec<AwqReport>,
) -> Result<()> {
    let full: Vec<String> = names.iter().map(|n| format!("{p}{n}")).collect();
    let c: Vec<(&Linear, Rtn)> =
        ls.iter().zip(&full).filter_map(|(l, n)| rtn_for(n, l.in_features()).map(|r| (&**l, r))).collect();
    if c.len() != ls.len() {
        return Ok(());
    }
    let (a, s, e0, e1) = search(&stat(stats, &full[0])?, &c, grid)?;
    let st = Tensor::from_vec(s.clone(), s.len(), norm.device())?;
    *norm = norm.div(&st)?;
    for l in ls.iter_mut() {
        **l = scale_columns(l, &st)?;
    }
    rescale_stats(stats, &full, &s);
    out.push(AwqReport { layers: full, alpha: a, rtn_error: e0, awq_error: e1 });
    Ok(())
}

/// Applies AWQ scaling to every LLaMA block whose Linears `rtn_for` maps to a grouped format; the model stays
/// a float model (quantize it afterwards with the same formats). `stats` must come from calibration on this
/// model and are updated to describe the scaled inputs.
pub fn awq(
    model: &mut Model,
    stats: &mut BTreeMap<String, ActStats>,
    rtn_for: impl Fn(&str, usize) -> Option<Rtn>,
    grid: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<AwqReport>> {
    let Model::Llama(m) = model else {
        return Err(Error::Unsupported("option `method` awq is implemented for LLaMA decoders".into()));
    };
    let dev = m.embed_tokens.device().clone();
    let mut out = Vec::new();
    let nb = m.blocks.len();
    for (i, b) in m.blocks.iter_mut().enumerate() {
        let p = LlamaBlock::prefix(i);
        // q/k/v ← input_layernorm; gate/up ← post_attention_layernorm
        let attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];
        let ctx: GroupCtx = (p.as_str(), &rtn_for, grid);
        norm_group(ctx, &mut b.attn_norm.weight, &mut [&mut b.q, &mut b.k, &mut b.v], &attn, stats, &mut out)?;
        let mlp = ["mlp.gate_proj", "mlp.up_proj"];
        norm_group(ctx, &mut b.mlp_norm.weight, &mut [&mut b.gate, &mut b.up], &mlp, stats, &mut out)?;
        // down ← up_proj rows
        let n = format!("{p}mlp.down_proj");
        if let Some(r) = rtn_for(&n, b.down.in_features()) {
            let (a, s, e0, e1) = search(&stat(stats, &n)?, &[(&b.down, r)], grid)?;
            let st = Tensor::from_vec(s.clone(), s.len(), &dev)?;
            b.up = divide_rows(&b.up, &st)?;
            b.down = scale_columns(&b.down, &st)?;
            rescale_stats(stats, std::slice::from_ref(&n), &s);
            out.push(AwqReport { layers: vec![n], alpha: a, rtn_error: e0, awq_error: e1 });
        }
        progress(i + 1, nb);
    }
    Ok(out)
}
