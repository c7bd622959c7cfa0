//! Unstructured and N:M pruning of a whole model: every block Linear (embeddings and heads stay dense), by
//! magnitude (per layer or with one global threshold), or layer by layer on calibration text with Wanda
//! (per-channel ‖X‖₂) or SparseGPT (the layer Hessian), through the layer-wise engine that GPTQ uses: each
//! block sees the outputs of the blocks already pruned.

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;
use whittle_calib::observe::CalibOptions;
use whittle_calib::report::LayerReport;
use whittle_calib::sequential::{output_mse, run_layerwise, LayerInput};
use whittle_core::{InvalidOption, Linear, Rtn};
use whittle_models::Loaded;

use crate::prune::{self, Pattern};
use crate::{Error, Result};

/// The pruning criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Method {
    Magnitude,
    Wanda,
    SparseGpt,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "magnitude" => Ok(Self::Magnitude),
            "wanda" => Ok(Self::Wanda),
            "sparsegpt" => Ok(Self::SparseGpt),
            _ => Err(InvalidOption::new("method", s, "valid: magnitude, wanda, sparsegpt").into()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Magnitude => "magnitude",
            Self::Wanda => "wanda",
            Self::SparseGpt => "sparsegpt",
        }
    }
}

/// Options of [`prune_model`].
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub method: Method,
    /// Fraction of each layer's weights removed (unstructured; N:M patterns fix it at 1 − N/M).
    pub sparsity: f64,
    pub pattern: Pattern,
    /// Magnitude only: one threshold over all block Linears instead of one per layer.
    pub global: bool,
    /// SparseGPT dampening (fraction of the Hessian's mean diagonal).
    pub damp: f64,
    /// SparseGPT: quantize the kept weights in the same pass (stored dequantized).
    pub quant: Option<Rtn>,
    /// Store the pruned Linears without their zeros ([`whittle_core::sparse`]) instead of dense.
    pub sparse: bool,
}

/// The pass's report: per layer (`scheme` says the method and pattern, `note` the sparsity reached) and totals.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub method: &'static str,
    pub pattern: String,
    pub layers: Vec<LayerReport>,
    /// Parameters of the pruned Linears, and how many of them are now zero.
    pub params: usize,
    pub zeros: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Bits per weight of the pruned layer stored sparse (f32 values).
fn stored_bpw(p: &[f32], k: usize, pattern: Pattern) -> f64 {
    let nm = match pattern {
        Pattern::NM { n, m } => Some((n, m)),
        Pattern::Unstructured => None,
    };
    match whittle_core::sparse::SparseLinear::new(p, p.len() / k.max(1), k, nm) {
        Ok(s) => 8.0 * s.storage_bytes() as f64 / p.len().max(1) as f64,
        Err(_) => 32.0,
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_report(
    name: &str,
    o: &PruneOptions,
    w: &[f32],
    p: &[f32],
    k: usize,
    secs: f64,
    out_mse: Option<f64>,
) -> LayerReport {
    let zeros = p.iter().filter(|v| **v == 0.0).count();
    LayerReport {
        name: name.into(),
        scheme: format!("{} {}", o.method.name(), o.pattern),
        params: w.len(),
        bpw: if o.sparse { stored_bpw(p, k, o.pattern) } else { 32.0 },
        weight_rmse: whittle_calib::report::rmse(w, p),
        seconds: secs,
        output_mse: out_mse,
        rtn_output_mse: None,
        note: format!("{:.1}% zeros", 100.0 * zeros as f64 / w.len().max(1) as f64),
    }
}

/// The pruned weights `p` of `lin`, sparse (N:M when the pattern is) or dense as `o` asks.
fn store(p: Vec<f32>, m: usize, k: usize, lin: &Linear, o: &PruneOptions) -> Result<Linear> {
    let (w, bias) = (Tensor::from_vec(p, (m, k), &lin.device())?, lin.bias.clone());
    if !o.sparse {
        return Ok(Linear::dense(w, bias)?.inheriting(lin));
    }
    let nm = match o.pattern {
        Pattern::NM { n, m } => Some((n, m)),
        Pattern::Unstructured => None,
    };
    Ok(Linear::sparse(&w, nm, bias)?.inheriting(lin))
}

/// Prunes every block Linear of `l` (see the module doc). `text`/`co` are the calibration text (Wanda,
/// SparseGPT).
pub fn prune_model(
    l: &mut Loaded,
    o: &PruneOptions,
    text: &str,
    co: &CalibOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<PruneReport> {
    let t0 = Instant::now();
    if !(0.0..1.0).contains(&o.sparsity) {
        return Err(Error::bad_sparsity(o.sparsity));
    }
    if o.quant.is_some() && o.method != Method::SparseGpt {
        return Err(Error::Usage(
            "option `then_quantize` needs option `method` sparsegpt (pruning and GPTQ in one pass)".into(),
        ));
    }
    let mut layers = Vec::new();
    let mut tokens = 0;
    match o.method {
        Method::Magnitude => {
            let thr = if o.global {
                if o.pattern != Pattern::Unstructured {
                    return Err(
                        InvalidOption::new("scope", "global", "applies to unstructured sparsity, not N:M").into()
                    );
                }
                let ws: Vec<Vec<f32>> = l
                    .model
                    .block_linears()
                    .into_iter()
                    .map(|(_, lin)| Ok(lin.dequantize()?.flatten_all()?.to_vec1()?))
                    .collect::<Result<_>>()?;
                let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
                Some(prune::global_threshold(&refs, o.sparsity)?)
            } else {
                None
            };
            let mut lins: Vec<(String, &mut Linear)> = l.model.block_linears_mut();
            let total = lins.len();
            for (i, (name, lin)) in lins.iter_mut().enumerate() {
                let ts = Instant::now();
                let (m, k) = (lin.out_features(), lin.in_features());
                let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
                let p = match thr {
                    Some(t) => prune::threshold(&w, t),
                    None => prune::magnitude(&w, m, k, o.sparsity, o.pattern, name)?,
                };
                layers.push(layer_report(name, o, &w, &p, k, ts.elapsed().as_secs_f64(), None));
                **lin = store(p, m, k, lin, o)?;
                progress(i + 1, total);
            }
        }
        Method::Wanda | Method::SparseGpt => {
            let hessian = o.method == Method::SparseGpt;
            let solve = |name: &str, lin: &Linear, x: &LayerInput| -> Result<_> {
                let ts = Instant::now();
                let (m, k) = (lin.out_features(), lin.in_features());
                let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
                let p = if hessian {
                    let h = x.hessian.expect("the engine observes Hessians for SparseGPT");
                    prune::sparsegpt(&w, m, k, h, o.sparsity, o.pattern, o.damp, o.quant, name)?
                } else {
                    prune::wanda(&w, m, k, &x.stats.sumsq, o.sparsity, o.pattern, name)?
                };
                let mse = match x.hessian {
                    Some(h) => Some(output_mse(&w, &p, m, k, h)?),
                    None => None,
                };
                let r = layer_report(name, o, &w, &p, k, ts.elapsed().as_secs_f64(), mse);
                let new = store(p, m, k, lin, o)?;
                Ok(Some((new, r)))
            };
            let r = run_layerwise(l, text, co, hessian, solve, &mut progress)?;
            tokens = r.tokens;
            layers = r.report.layers;
        }
    }
    let params = layers.iter().map(|r| r.params).sum();
    let zeros = l
        .model
        .block_linears()
        .into_iter()
        .map(|(_, lin)| -> Result<usize> {
            let w: Vec<f32> = lin.dequantize()?.flatten_all()?.to_vec1()?;
            Ok(w.iter().filter(|v| **v == 0.0).count())
        })
        .sum::<Result<usize>>()?;
    Ok(PruneReport {
        method: o.method.name(),
        pattern: o.pattern.to_string(),
        layers,
        params,
        zeros,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The sparse kernel against the dense one on this model's own pruned Linears, through `Linear::forward`:
/// every sparse block Linear once per pass at 1 row (decoding: weights come from memory), and the first
/// block's at `prefill_rows` rows (prefill: bound by arithmetic). Medians of several passes.
#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    pub layers: usize,
    pub decode_dense_ms: f64,
    pub decode_sparse_ms: f64,
    pub prefill_rows: usize,
    pub prefill_dense_ms: f64,
    pub prefill_sparse_ms: f64,
}

impl KernelCheck {
    /// Sparse time over dense time (below 1: the sparse kernel is faster).
    pub fn decode_ratio(&self) -> f64 {
        self.decode_sparse_ms / self.decode_dense_ms
    }

    pub fn prefill_ratio(&self) -> f64 {
        self.prefill_sparse_ms / self.prefill_dense_ms
    }
}

/// Measures [`KernelCheck`] on `l`'s sparse block Linears; `None` when it has none.
pub fn kernel_check(l: &Loaded, prefill_rows: usize) -> Result<Option<KernelCheck>> {
    let sparse: Vec<(String, &Linear)> =
        l.model.block_linears().into_iter().filter(|(_, lin)| lin.is_sparse()).collect();
    if sparse.is_empty() {
        return Ok(None);
    }
    let dense: Vec<Linear> = sparse
        .iter()
        .map(|(_, s)| Ok(Linear::dense(s.dequantize()?, s.bias.clone())?.inheriting(s)))
        .collect::<Result<_>>()?;
    let first = sparse[0].0.split('.').take(3).collect::<Vec<_>>().join(".");
    let median_ms = |layers: &[&Linear], rows: usize, reps: usize| -> Result<f64> {
        let xs: Vec<Tensor> = layers
            .iter()
            .map(|lin| Tensor::randn(0f32, 1.0, (rows, lin.in_features()), &lin.device()))
            .collect::<candle_core::Result<_>>()?;
        let mut times = Vec::new();
        for rep in 0..=reps {
            let t = Instant::now();
            for (lin, x) in layers.iter().zip(&xs) {
                lin.forward(x)?;
            }
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let s_all: Vec<&Linear> = sparse.iter().map(|(_, s)| *s).collect();
    let d_all: Vec<&Linear> = dense.iter().collect();
    let in_first = |i: &usize| sparse[*i].0.starts_with(&format!("{first}."));
    let s_first: Vec<&Linear> = (0..sparse.len()).filter(in_first).map(|i| s_all[i]).collect();
    let d_first: Vec<&Linear> = (0..sparse.len()).filter(in_first).map(|i| d_all[i]).collect();
    Ok(Some(KernelCheck {
        layers: sparse.len(),
        decode_dense_ms: median_ms(&d_all, 1, 7)?,
        decode_sparse_ms: median_ms(&s_all, 1, 7)?,
        prefill_rows,
        prefill_dense_ms: median_ms(&d_first, prefill_rows, 5)?,
        prefill_sparse_ms: median_ms(&s_first, prefill_rows, 5)?,
    }))
}
