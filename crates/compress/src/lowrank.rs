//! Low-rank factorisation of the block Linears: W (m × k) ≈ U·V with U (m × r), V (r × k), which saves
//! parameters when r < m·k / (m + k).
//!
//! Three ways to choose the factors, all one SVD of W·S truncated to rank r and undone with S⁻¹:
//! - `svd`: S = I, the best rank-r approximation of the weights;
//! - `asvd` (Yuan et al. 2023): S = diag(rms(x_j)^α), so input channels that carry large activations
//!   keep more of their weight;
//! - `svd-llm` (Wang et al. 2024): S = L, the Cholesky factor of Σ xᵀx on calibration text, so that
//!   ‖(W − W′)X‖ = ‖(W − W′)L‖ and truncating the smallest singular values minimises the output error.
//!
//! Statistics come from one calibration pass over the original model. Ranks: one per layer (option `rank`),
//! from the singular-value energy (option `energy`), or allocated over all layers to keep a fraction of the
//! parameters (option `ratio`): minimise Σ (relative truncation loss) under the parameter budget by a
//! Lagrangian search, where a layer may also stay dense — it is never factorised where that saves nothing.

use std::time::Instant;

use candle_core::Tensor;
use faer::{Mat, Side};
use rayon::prelude::*;
use serde::Serialize;
use whittle_calib::allocate;
use whittle_calib::observe::{calibrate_with, CalibOptions};
use whittle_core::backend::cpu;
use whittle_core::observe::ActStats;
use whittle_core::{InvalidOption, Linear};
use whittle_models::{Loaded, Model};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Method {
    Svd,
    Asvd,
    SvdLlm,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "svd" => Ok(Self::Svd),
            "asvd" => Ok(Self::Asvd),
            "svd-llm" => Ok(Self::SvdLlm),
            _ => Err(InvalidOption::new("method", s, "valid: svd, asvd, svd-llm").into()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Svd => "svd",
            Self::Asvd => "asvd",
            Self::SvdLlm => "svd-llm",
        }
    }
}

/// How ranks are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Keep this fraction of the block Linears' parameters, in (0, 1].
    Ratio(f64),
    /// Per layer, the smallest rank keeping this fraction of Σσ², in (0, 1].
    Energy(f64),
    /// The same rank everywhere.
    Rank(usize),
}

#[derive(Debug, Clone)]
pub struct LowRankOptions {
    pub method: Method,
    pub target: Target,
    /// ASVD's exponent on the activation scale.
    pub alpha: f64,
    /// SVD-LLM dampening, a fraction of the mean diagonal of Σ xᵀx.
    pub damp: f64,
}

/// One layer of the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerLowRank {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    /// `None`: left dense.
    pub rank: Option<usize>,
    pub params_before: usize,
    pub params_after: usize,
    /// ‖W − W′‖_F / ‖W‖_F.
    pub weight_rel_err: f64,
    /// ‖(W − W′)X‖_F / ‖WX‖_F on the calibration text.
    pub output_rel_err: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LowRankReport {
    pub method: &'static str,
    pub layers: Vec<LayerLowRank>,
    pub params_before: usize,
    pub params_after: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// The SVD of W·S with the un-whitening folded in: W ≈ Σ_i σ_i u_i v_iᵀ, where `vt` rows are v_iᵀ·S⁻¹.
struct Factored {
    sigma: Vec<f64>,
    /// m × q, column i = u_i.
    u: Mat<f64>,
    /// q × k, row i = v_iᵀ S⁻¹.
    vt: Mat<f64>,
}

/// Cholesky factor (lower) of `h + damp·mean(diag)·I`, raising the dampening ×10 up to three times.
pub(crate) fn cholesky(h: &[f64], k: usize, damp: f64, layer: &str) -> Result<Mat<f64>> {
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k.max(1) as f64;
    let mut d = damp.max(1e-6);
    for _ in 0..4 {
        let a = Mat::from_fn(k, k, |i, j| h[i * k + j] + if i == j { d * mean_diag.max(1e-12) } else { 0.0 });
        if let Ok(llt) = a.as_ref().llt(Side::Lower) {
            return Ok(llt.L().to_owned());
        }
        d *= 10.0;
    }
    Err(Error::Usage(format!(
        "layer `{layer}`: Σ xᵀx is not positive definite even with dampening {d:.1e} (too little calibration text?)"
    )))
}

/// Maps Vᵀ rows back through S⁻¹.
type Undo = Box<dyn Fn(Mat<f64>) -> Mat<f64>>;

fn factor(w: &[f32], m: usize, k: usize, st: &ActStats, o: &LowRankOptions, layer: &str) -> Result<Factored> {
    let wm = Mat::from_fn(m, k, |i, j| w[i * k + j] as f64);
    let (a, undo): (Mat<f64>, Undo) = match o.method {
        Method::Svd => (wm, Box::new(|vt| vt)),
        Method::Asvd => {
            let rows = st.rows.max(1) as f64;
            let s: Vec<f64> = st.sumsq.iter().map(|v| (v / rows).sqrt().powf(o.alpha)).collect();
            let floor = s.iter().copied().fold(0.0, f64::max) * 1e-6 + 1e-12;
            let s: Vec<f64> = s.into_iter().map(|v| v.max(floor)).collect();
            let a = Mat::from_fn(m, k, |i, j| wm[(i, j)] * s[j]);
            (a, Box::new(move |vt: Mat<f64>| Mat::from_fn(vt.nrows(), k, |i, j| vt[(i, j)] / s[j])))
        }
        Method::SvdLlm => {
            let h = st.xtx.as_ref().filter(|h| h.len() == k * k).ok_or_else(|| {
                Error::Usage(format!("layer `{layer}`: no Σ xᵀx gathered (calibration did not reach it)"))
            })?;
            let l = cholesky(h, k, o.damp, layer)?;
            let a = &wm * &l;
            // vᵀ L⁻¹ for every row vᵀ of Vᵀ: solve Lᵀ Y = V, then Yᵀ.
            let undo = move |vt: Mat<f64>| {
                let mut y = vt.transpose().to_owned();
                faer::linalg::triangular_solve::solve_upper_triangular_in_place(
                    l.as_ref().transpose(),
                    y.as_mut(),
                    faer::Par::Seq,
                );
                y.transpose().to_owned()
            };
            (a, Box::new(undo))
        }
    };
    let svd = a.as_ref().thin_svd().map_err(|e| Error::Usage(format!("layer `{layer}`: SVD failed ({e:?})")))?;
    let q = m.min(k);
    let sigma: Vec<f64> = (0..q).map(|i| svd.S()[i]).collect();
    let u = svd.U().to_owned();
    let vt = undo(svd.V().transpose().to_owned());
    Ok(Factored { sigma, u, vt })
}

/// Relative truncation loss of keeping the first `r` singular values.
fn tail_loss(sigma: &[f64], r: usize) -> f64 {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    if total <= 0.0 {
        return 0.0;
    }
    sigma[r.min(sigma.len())..].iter().map(|s| s * s).sum::<f64>() / total
}

/// The rank that saves parameters at all must be below m·k/(m+k).
fn max_useful_rank(m: usize, k: usize) -> usize {
    (m * k).div_ceil(m + k).saturating_sub(1)
}

/// Ranks per layer (`None` = dense) for `target`, from the spectra `(sigma, m, k)`.
fn choose_ranks(spectra: &[(Vec<f64>, usize, usize)], target: Target) -> Result<Vec<Option<usize>>> {
    match target {
        Target::Rank(r) => spectra
            .iter()
            .map(|(s, m, k)| {
                if r == 0 || r > s.len() {
                    return Err(InvalidOption::new(
                        "rank",
                        r,
                        format!("must be in 1..={} for a {m}×{k} layer", s.len()),
                    )
                    .into());
                }
                Ok((r <= max_useful_rank(*m, *k)).then_some(r))
            })
            .collect(),
        Target::Energy(e) => Ok(spectra
            .iter()
            .map(|(s, m, k)| {
                let r = (1..=s.len()).find(|&r| 1.0 - tail_loss(s, r) >= e - 1e-12).unwrap_or(s.len());
                (r <= max_useful_rank(*m, *k)).then_some(r)
            })
            .collect()),
        Target::Ratio(rho) => {
            let dense: usize = spectra.iter().map(|(_, m, k)| m * k).sum();
            let budget = rho * dense as f64;
            // For a price λ per parameter, each layer picks the rank (or dense) minimising loss + λ·params.
            let pick = |lambda: f64| -> Vec<Option<usize>> {
                spectra
                    .iter()
                    .map(|(s, m, k)| {
                        let mut best = (lambda * (m * k) as f64, None);
                        for r in 1..=max_useful_rank(*m, *k).min(s.len()) {
                            let c = tail_loss(s, r) + lambda * (r * (m + k)) as f64;
                            if c < best.0 {
                                best = (c, Some(r));
                            }
                        }
                        best.1
                    })
                    .collect()
            };
            let params = |ranks: &[Option<usize>]| -> f64 {
                ranks.iter().zip(spectra).map(|(r, (_, m, k))| r.map_or(m * k, |r| r * (m + k)) as f64).sum()
            };
            let search = allocate::Search { start: 1e-6, cap: 1e6, iterations: 60 };
            allocate::fit(pick, |p: &Vec<Option<usize>>| params(p), budget, search)
                .map_err(|_| InvalidOption::new("ratio", rho, "cannot reach that few parameters").into())
        }
    }
}

/// tr(D H Dᵀ) for D (m × k) row-major and H = Σ xᵀx: Σ_rows ‖D x‖² over the calibration rows (f32 GEMM;
/// it is a report, not a solver input).
fn output_energy(d: &[f64], m: usize, k: usize, h: &[f64]) -> f64 {
    let run = || -> candle_core::Result<f64> {
        let dev = &cpu::device();
        let dt = Tensor::from_vec(d.iter().map(|v| *v as f32).collect::<Vec<_>>(), (m, k), dev)?;
        let ht = Tensor::from_vec(h.iter().map(|v| *v as f32).collect::<Vec<_>>(), (k, k), dev)?;
        Ok(dt.matmul(&ht)?.mul(&dt)?.sum_all()?.to_scalar::<f32>()? as f64)
    };
    run().unwrap_or(f64::NAN)
}

/// Factorises the block Linears of `l` (see the module doc).
pub fn lowrank_model(
    l: &mut Loaded,
    o: &LowRankOptions,
    text: &str,
    co: &CalibOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<LowRankReport> {
    let t0 = Instant::now();
    match o.target {
        Target::Ratio(r) if !(r > 0.0 && r <= 1.0) => {
            return Err(InvalidOption::new("ratio", r, "must be in (0, 1]").into());
        }
        Target::Energy(r) if !(r > 0.0 && r <= 1.0) => {
            return Err(InvalidOption::new("energy", r, "must be in (0, 1]").into());
        }
        _ => {}
    }
    if !(o.damp.is_finite() && o.damp >= 0.0) {
        return Err(Error::bad_damp(o.damp));
    }
    if let Target::Rank(r) = o.target {
        let small = l.model.block_linears().into_iter().find(|(_, lin)| {
            let q = lin.out_features().min(lin.in_features());
            r == 0 || r > q
        });
        if let Some((n, lin)) = small {
            let (m, k) = (lin.out_features(), lin.in_features());
            return Err(
                InvalidOption::new("rank", r, format!("must be in 1..={} for `{n}` ({m}×{k})", m.min(k))).into()
            );
        }
    }
    // Σ xᵀx of every block Linear, from the original model (also for the output-error report).
    let cal =
        calibrate_with(l, text, co, |n, k| Model::is_block_linear(n).then(|| ActStats::hessian(k)), &mut progress)?;
    let names: Vec<(String, usize, usize)> =
        l.model.block_linears().into_iter().map(|(n, lin)| (n, lin.out_features(), lin.in_features())).collect();
    let weights: Vec<Vec<f32>> = l
        .model
        .block_linears()
        .into_iter()
        .map(|(_, lin)| Ok(lin.dequantize()?.flatten_all()?.to_vec1()?))
        .collect::<Result<_>>()?;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let factored: Vec<(Factored, f64)> = names
        .par_iter()
        .zip(&weights)
        .map(|((n, m, k), w)| {
            let ts = Instant::now();
            let f = factor(w, *m, *k, &cal.stats[n], o, n)?;
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((f, ts.elapsed().as_secs_f64()))
        })
        .collect::<Result<_>>()?;
    let spectra: Vec<(Vec<f64>, usize, usize)> =
        factored.iter().zip(&names).map(|((f, _), (_, m, k))| (f.sigma.clone(), *m, *k)).collect();
    let ranks = choose_ranks(&spectra, o.target)?;
    let mut layers = Vec::new();
    let mut lins: Vec<(String, &mut Linear)> = l.model.block_linears_mut();
    for (i, ((name, lin), ((f, secs), rank))) in lins.iter_mut().zip(factored.into_iter().zip(&ranks)).enumerate() {
        let (m, k) = (lin.out_features(), lin.in_features());
        let w = &weights[i];
        let before = m * k;
        let Some(r) = *rank else {
            layers.push(LayerLowRank {
                name: name.clone(),
                out_features: m,
                in_features: k,
                rank: None,
                params_before: before,
                params_after: before,
                weight_rel_err: 0.0,
                output_rel_err: 0.0,
                seconds: secs,
            });
            continue;
        };
        // Balanced factors: U·diag(√σ) and diag(√σ)·V′ᵀ.
        let sq: Vec<f64> = f.sigma[..r].iter().map(|s| s.sqrt()).collect();
        let u: Vec<f32> =
            (0..m).flat_map(|a| (0..r).map(move |j| (a, j))).map(|(a, j)| (f.u[(a, j)] * sq[j]) as f32).collect();
        let v: Vec<f32> =
            (0..r).flat_map(|j| (0..k).map(move |b| (j, b))).map(|(j, b)| (f.vt[(j, b)] * sq[j]) as f32).collect();
        let ut = Tensor::from_vec(u, (m, r), &lin.device())?;
        let vt = Tensor::from_vec(v, (r, k), &lin.device())?;
        let new = Linear::low_rank(ut, vt, lin.bias.clone())?.inheriting(lin);
        let approx: Vec<f32> = new.dequantize()?.flatten_all()?.to_vec1()?;
        let diff: Vec<f64> = w.iter().zip(&approx).map(|(a, b)| (*a - *b) as f64).collect();
        let wd: Vec<f64> = w.iter().map(|v| *v as f64).collect();
        let h = cal.stats[name.as_str()].xtx.as_deref().unwrap_or(&[]);
        let out_err = if h.len() == k * k {
            (output_energy(&diff, m, k, h) / output_energy(&wd, m, k, h).max(1e-30)).sqrt()
        } else {
            f64::NAN
        };
        let nw: f64 = wd.iter().map(|v| v * v).sum();
        layers.push(LayerLowRank {
            name: name.clone(),
            out_features: m,
            in_features: k,
            rank: Some(r),
            params_before: before,
            params_after: r * (m + k),
            weight_rel_err: (diff.iter().map(|v| v * v).sum::<f64>() / nw.max(1e-30)).sqrt(),
            output_rel_err: out_err,
            seconds: secs,
        });
        **lin = new;
    }
    Ok(LowRankReport {
        method: o.method.name(),
        params_before: layers.iter().map(|r| r.params_before).sum(),
        params_after: layers.iter().map(|r| r.params_after).sum(),
        layers,
        tokens: cal.tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_for(x: &[f32], k: usize) -> ActStats {
        let mut s = ActStats::hessian(k);
        s.observe(x);
        s
    }

    /// A weight with a known spectrum and inputs whose channels differ in scale.
    fn problem(m: usize, k: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
        let w: Vec<f32> =
            (0..m * k).map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * (1.0 + (i % k) as f32 / k as f32)).collect();
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 104729 % 1009) as f32 / 1009.0 - 0.5) * if i % k < 4 { 20.0 } else { 1.0 })
            .collect();
        (w, x)
    }

    fn out_err(w: &[f32], f: &Factored, r: usize, m: usize, k: usize, h: &[f64]) -> f64 {
        let mut d = vec![0f64; m * k];
        for a in 0..m {
            for b in 0..k {
                let approx: f64 = (0..r).map(|j| f.u[(a, j)] * f.sigma[j] * f.vt[(j, b)]).sum();
                d[a * k + b] = w[a * k + b] as f64 - approx;
            }
        }
        output_energy(&d, m, k, h)
    }

    #[test]
    fn full_rank_reconstructs_and_whitening_minimises_the_output_error() {
        let (m, k, rows) = (24, 16, 64);
        let (w, x) = problem(m, k, rows);
        let st = stats_for(&x, k);
        let h = st.xtx.clone().unwrap();
        let opts = |method| LowRankOptions { method, target: Target::Rank(4), alpha: 0.5, damp: 0.0 };
        let mut errs = Vec::new();
        for method in [Method::Svd, Method::Asvd, Method::SvdLlm] {
            let f = factor(&w, m, k, &st, &opts(method), "t").unwrap();
            assert!(
                out_err(&w, &f, k, m, k, &h)
                    < 1e-6 * output_energy(&w.iter().map(|v| *v as f64).collect::<Vec<_>>(), m, k, &h)
            );
            errs.push(out_err(&w, &f, 4, m, k, &h));
        }
        // SVD-LLM's truncation is optimal for the output error: no worse than either other method.
        assert!(errs[2] <= errs[0] * (1.0 + 1e-4) && errs[2] <= errs[1] * (1.0 + 1e-4), "{errs:?}");
        assert!(errs[2] < errs[0], "{errs:?}");
    }

    #[test]
    fn ranks_follow_the_target_and_never_grow_a_layer() {
        let s1: Vec<f64> = (0..16).map(|i| 1.0 / (1 + i) as f64).collect();
        let s2: Vec<f64> = vec![1.0; 16];
        let spectra = vec![(s1, 16, 32), (s2, 16, 32)];
        // 16×32: factorising saves only below rank 10.
        assert_eq!(max_useful_rank(16, 32), 10);
        assert_eq!(choose_ranks(&spectra, Target::Rank(12)).unwrap(), vec![None, None]);
        assert!(choose_ranks(&spectra, Target::Rank(17)).is_err());
        let e = choose_ranks(&spectra, Target::Energy(0.9)).unwrap();
        assert!(e[0].is_some_and(|r| r < 10) && e[1].is_none(), "{e:?}");
        // Keep 60% of the parameters: the decaying spectrum is cut, the flat one costs more to cut.
        let r = choose_ranks(&spectra, Target::Ratio(0.6)).unwrap();
        let params: usize = r.iter().map(|r| r.map_or(512, |r| r * 48)).sum();
        assert!(params as f64 <= 0.6 * 1024.0, "{r:?}");
        assert!(r[0].is_some(), "{r:?}");
    }
}
