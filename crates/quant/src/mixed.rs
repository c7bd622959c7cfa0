//! Mixed precision: how much each Linear costs when it alone is quantized, and a per-layer choice of
//! grouped-integer formats (int 8/4/3/2) that minimises the predicted loss under a bits-per-weight budget
//! (option `target_bpw` of `quantize`, in the spirit of NVIDIA ModelOpt's AutoQuantize and llama.cpp's
//! target bits per weight).
//!
//! **Sensitivity = measured KL × diagonal-Hessian proxy.** For every block Linear `l`:
//! 1. `kl_l`: quantize `l` alone at a probe format (int3 by default), run the calibration windows from `l`'s
//!    block to the logits, and measure KL(base ‖ model) per token. This is measured, not modelled, because a
//!    weight error's effect on the logits depends on where the layer sits (block 0's down_proj and block 29's
//!    differ by orders of magnitude for the same output error), which no per-layer proxy captures.
//! 2. `e_l(c)`: for each candidate format `c`, the layer's expected output error under a diagonal Hessian,
//!    Σ_i Σ_j E[x_j²]·(W_ij − Ŵ_ij)² (E[x²] is llama.cpp's importance statistic, from the same pass).
//! 3. The predicted KL of `l` at `c` is `kl_l · e_l(c) / e_l(probe)`: the measured cost at the probe,
//!    extrapolated to other bit widths by the proxy (second order: KL grows with the squared output error).
//!
//! Predicted costs are summed over layers (the additivity assumption of every per-layer allocator) and the
//! multiple-choice knapsack "one format per layer, Σ params·bpw ≤ budget" is solved by Lagrangian relaxation
//! (bisection on the price of a bit), then greedy upgrades into the leftover budget.
//!
//! Cost: one float pass storing every block's input, then one partial forward per Linear (from its block).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use whittle_calib::allocate;
use whittle_core::observe::ActStats;
use whittle_core::{InvalidOption, Linear, Rtn};
use whittle_models::llama::LlamaBlock;
use whittle_models::BlockLayout;
use whittle_models::{Loaded, Model};

use crate::{group_for, Error, Result};
use whittle_calib::observe::{decoder_windows, CalibOptions};

/// One candidate format of one layer, with its proxy error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CandidateCost {
    pub bits: u32,
    /// The format's name as stored (`w4a16-g64-asym`).
    pub format: String,
    pub bpw: f64,
    /// Σ_i Σ_j E[x_j²]·(W_ij − Ŵ_ij)² / rows: the mean squared output error under a diagonal Hessian.
    pub proxy: f64,
    /// Predicted KL(base ‖ model) per token with only this layer in this format.
    pub predicted_kl: f64,
}

/// One Linear's sensitivity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerSensitivity {
    pub name: String,
    /// (out, in) features.
    pub shape: [usize; 2],
    pub probe_bits: u32,
    /// Measured KL(base ‖ model) per token with only this layer at the probe format.
    pub probe_kl: f64,
    pub candidates: Vec<CandidateCost>,
}

/// `whittle sensitivity`'s output (also what `quantize` reads with options `target_bpw` and `sensitivity`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sensitivity {
    /// How the costs were obtained, in words.
    pub method: String,
    pub calib: String,
    pub tokens: usize,
    pub group_size: usize,
    pub zero_point: bool,
    pub seconds: f64,
    pub layers: Vec<LayerSensitivity>,
}

/// Options of [`sensitivity`].
#[derive(Debug, Clone)]
pub struct SensitivityOptions {
    /// Candidate bit widths (each with `group_size` and `zero_point`).
    pub candidates: Vec<u32>,
    pub probe_bits: u32,
    pub group_size: usize,
    pub zero_point: bool,
}

impl Default for SensitivityOptions {
    fn default() -> Self {
        Self { candidates: vec![8, 4, 3, 2], probe_bits: 3, group_size: 64, zero_point: false }
    }
}

pub const METHOD: &str = "KL(base || model) per token measured with the layer alone at the probe format, \
scaled to each candidate by the diagonal-Hessian output error sum_j E[x_j^2] (W - W_q)_ij^2";

/// Mean KL(p ‖ q) per row between logits `base` (as log-probabilities) and `logits`.
fn kl_rows(base_logp: &[f32], logits: &[f32], vocab: usize) -> f64 {
    let mut total = 0f64;
    for (lp, z) in base_logp.chunks_exact(vocab).zip(logits.chunks_exact(vocab)) {
        let lq = log_softmax(z);
        total += lp.iter().zip(&lq).map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64)).sum::<f64>().max(0.0);
    }
    total / (base_logp.len() / vocab).max(1) as f64
}

fn log_softmax(z: &[f32]) -> Vec<f32> {
    let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// Σ_j d_j Σ_i (w_ij − q_ij)² / m: the mean squared output error of a layer under a diagonal Hessian `d`
/// (E[x_j²] per input channel).
pub fn proxy_error(w: &[f32], wq: &[f32], k: usize, d: &[f64]) -> f64 {
    let m = w.len() / k;
    let mut e = 0f64;
    for (rw, rq) in w.chunks_exact(k).zip(wq.chunks_exact(k)) {
        for j in 0..k {
            let x = (rw[j] - rq[j]) as f64;
            e += d[j] * x * x;
        }
    }
    e / m.max(1) as f64
}

/// The grouped format `bits` gets on a layer of input width `k`.
fn format(bits: u32, o: &SensitivityOptions, k: usize, name: &str) -> Result<Rtn> {
    let (group, _) = group_for(o.group_size, k, name)?;
    Ok(Rtn { bits, group, zero_point: o.zero_point })
}

/// Measures every block Linear of a LLaMA model on `text` (see the module doc).
pub fn sensitivity(
    l: &mut Loaded,
    text: &str,
    co: &CalibOptions,
    o: &SensitivityOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Sensitivity> {
    let t0 = Instant::now();
    if o.candidates.is_empty() || o.candidates.iter().chain([&o.probe_bits]).any(|b| ![2, 3, 4, 8].contains(b)) {
        return Err(Error::Unsupported(format!(
            "sensitivity: candidate and probe bit widths must be among 8, 4, 3, 2 (got {:?}, probe {})",
            o.candidates, o.probe_bits
        )));
    }
    if !matches!(l.model, Model::Llama(_)) {
        return Err(Error::Unsupported(
            "sensitivity: implemented for LLaMA decoders (KL of the next-token distribution)".into(),
        ));
    }
    let windows = decoder_windows(l, text, co)?;
    let Model::Llama(m) = &mut l.model else { unreachable!("checked above") };
    let t = co.seq_len;
    let (cos, sin, mask) = m.block_inputs(t)?;
    let hd = m.config.head_dim;
    let nb = m.blocks.len();
    let vocab = m.config.vocab_size;

    // Float pass: every block's input per window, E[x²] of every Linear, the base log-probabilities.
    let mut observers = Vec::new();
    for blk in m.blocks.iter_mut() {
        observers.push(blk.linears_mut().map(|(_, lin)| lin.observe_with(ActStats::new(lin.in_features()))));
    }
    let mut inputs: Vec<Vec<Tensor>> = vec![Vec::with_capacity(windows.len()); nb]; // [block][window] (1, T, C)
    let mut base_logp: Vec<Vec<f32>> = Vec::new(); // [window] (T·V)
    for w in &windows {
        let mut x = m.embed(&Tensor::new(w.as_slice(), m.embed_tokens.device())?.unsqueeze(0)?)?;
        for (bi, blk) in m.blocks.iter().enumerate() {
            inputs[bi].push(x.clone());
            x = blk.forward(&x, &cos, &sin, mask.as_ref(), &mut None, hd)?;
        }
        let z: Vec<f32> = m.lm_head.forward(&m.norm.forward(&x)?)?.flatten_all()?.to_vec1()?;
        base_logp.push(z.chunks_exact(vocab).flat_map(log_softmax).collect());
    }
    for blk in m.blocks.iter_mut() {
        for (_, lin) in blk.linears_mut() {
            lin.unobserve();
        }
    }
    let diag: Vec<[Vec<f64>; 7]> = observers
        .into_iter()
        .map(|obs| {
            obs.map(|h| {
                let s = h.lock().expect("observer");
                s.sumsq.iter().map(|v| v / s.rows.max(1) as f64).collect()
            })
        })
        .collect();

    let total = nb * 7;
    let mut layers = Vec::with_capacity(total);
    for (bi, block_diag) in diag.iter().enumerate() {
        for (li, d) in block_diag.iter().enumerate() {
            let (lname, orig) = {
                let (n, lin) = m.blocks[bi].linears()[li];
                (format!("{}{n}", LlamaBlock::prefix(bi)), lin.clone())
            };
            let (mo, k) = (orig.out_features(), orig.in_features());
            if !k.is_multiple_of(32) {
                // No grouped format fits (the quantizer keeps such layers as they are): nothing to choose.
                progress(bi * 7 + li + 1, total);
                continue;
            }
            let w: Vec<f32> = orig.dequantize()?.flatten_all()?.to_vec1()?;
            if w.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(lname));
            }
            let mut candidates = Vec::new();
            let mut probe_proxy = 0.0;
            let mut probe_w = Vec::new();
            for &bits in o.candidates.iter().chain(std::iter::once(&o.probe_bits)) {
                let rtn = format(bits, o, k, &lname)?;
                let wq = rtn.quantize(&w, mo, k).dequantize();
                let proxy = proxy_error(&w, &wq, k, d);
                if bits == o.probe_bits && probe_w.is_empty() {
                    probe_proxy = proxy;
                    probe_w = wq.clone();
                }
                if candidates.len() < o.candidates.len() {
                    candidates.push(CandidateCost {
                        bits,
                        format: rtn.name(),
                        bpw: rtn.bpw(),
                        proxy,
                        predicted_kl: 0.0,
                    });
                }
            }
            // The probe: this layer alone in the probe format (run densely, so only the weights differ).
            let probe = Linear::dense(Tensor::from_vec(probe_w, (mo, k), &orig.device())?, orig.bias.clone())?
                .inheriting(&orig);
            *m.blocks[bi].linears_mut()[li].1 = probe;
            let mut kl = 0.0;
            for (wi, x0) in inputs[bi].iter().enumerate() {
                let mut x = x0.clone();
                for blk in &m.blocks[bi..] {
                    x = blk.forward(&x, &cos, &sin, mask.as_ref(), &mut None, hd)?;
                }
                let z: Vec<f32> = m.lm_head.forward(&m.norm.forward(&x)?)?.flatten_all()?.to_vec1()?;
                kl += kl_rows(&base_logp[wi], &z, vocab);
            }
            *m.blocks[bi].linears_mut()[li].1 = orig;
            let probe_kl = kl / windows.len() as f64;
            for c in candidates.iter_mut() {
                c.predicted_kl = if probe_proxy > 0.0 { probe_kl * c.proxy / probe_proxy } else { 0.0 };
            }
            layers.push(LayerSensitivity {
                name: lname,
                shape: [mo, k],
                probe_bits: o.probe_bits,
                probe_kl,
                candidates,
            });
            progress(layers.len(), total);
        }
    }
    Ok(Sensitivity {
        method: METHOD.into(),
        calib: co.source.clone(),
        tokens: windows.len() * t,
        group_size: o.group_size,
        zero_point: o.zero_point,
        seconds: t0.elapsed().as_secs_f64(),
        layers,
    })
}

impl Sensitivity {
    /// Checks that this file describes `model`: the same block Linears with the same shapes.
    pub fn check_matches(&self, model: &Model, file: &str) -> Result<()> {
        let lin: BTreeMap<String, [usize; 2]> =
            model.linears().into_iter().map(|(n, l)| (n, [l.out_features(), l.in_features()])).collect();
        for s in &self.layers {
            match lin.get(&s.name) {
                None => {
                    return Err(Error::Unsupported(format!(
                        "sensitivity file {file}: layer `{}` is not in this model (a file from another model?)",
                        s.name
                    )))
                }
                Some(sh) if *sh != s.shape => {
                    return Err(Error::Unsupported(format!(
                        "sensitivity file {file}: layer `{}` is {}×{} there but {}×{} in this model",
                        s.name, s.shape[0], s.shape[1], sh[0], sh[1]
                    )))
                }
                _ => {}
            }
        }
        if self.layers.is_empty() {
            return Err(Error::Unsupported(format!("sensitivity file {file} lists no layers")));
        }
        Ok(())
    }
}

/// One layer's choice.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub name: String,
    pub bits: u32,
    pub format: String,
    pub bpw: f64,
    pub predicted_kl: f64,
}

/// The chosen map with its totals.
#[derive(Debug, Clone, Serialize)]
pub struct Allocation {
    pub target_bpw: f64,
    pub bpw: f64,
    pub predicted_kl: f64,
    pub choices: Vec<Choice>,
}

/// Picks one candidate per layer of `s` (layers in `skip` are left out: overrides decide them) minimising
/// the summed predicted KL with Σ params·bpw ≤ `target_bpw`·Σ params.
pub fn allocate(s: &Sensitivity, target_bpw: f64, skip: impl Fn(&str) -> bool) -> Result<Allocation> {
    let layers: Vec<&LayerSensitivity> = s.layers.iter().filter(|l| !skip(&l.name)).collect();
    if layers.is_empty() {
        return Err(Error::Unsupported(
            "option `target_bpw`: every layer is fixed by option `override`; nothing to allocate".into(),
        ));
    }
    let params: Vec<f64> = layers.iter().map(|l| (l.shape[0] * l.shape[1]) as f64).collect();
    let total: f64 = params.iter().sum();
    let budget = target_bpw * total;
    let bits_of = |pick: &[usize]| -> f64 {
        pick.iter().zip(&layers).zip(&params).map(|((&c, l), p)| l.candidates[c].bpw * p).sum()
    };
    let smallest: Vec<usize> = layers
        .iter()
        .map(|l| {
            (0..l.candidates.len()).min_by(|&a, &b| l.candidates[a].bpw.total_cmp(&l.candidates[b].bpw)).unwrap_or(0)
        })
        .collect();
    let min_bpw = bits_of(&smallest) / total;
    if !target_bpw.is_finite() || target_bpw + 1e-9 < min_bpw {
        let reason =
            format!("below the smallest candidate mix ({min_bpw:.3} bpw with every layer at its smallest format)");
        return Err(InvalidOption::new("target_bpw", target_bpw, reason).into());
    }
    // For a price λ per bit, each layer picks argmin predicted_kl + λ·params·bpw.
    let pick_at = |lambda: f64| -> Vec<usize> {
        layers
            .iter()
            .zip(&params)
            .map(|(l, p)| {
                (0..l.candidates.len())
                    .min_by(|&a, &b| {
                        let ca = l.candidates[a].predicted_kl + lambda * p * l.candidates[a].bpw;
                        let cb = l.candidates[b].predicted_kl + lambda * p * l.candidates[b].bpw;
                        ca.total_cmp(&cb).then(l.candidates[a].bpw.total_cmp(&l.candidates[b].bpw))
                    })
                    .unwrap_or(0)
            })
            .collect()
    };
    let mut pick = pick_at(0.0);
    if bits_of(&pick) > budget {
        let search = allocate::Search { start: 1e-12, cap: 1e30, iterations: 100 };
        pick = allocate::fit(pick_at, |p: &Vec<usize>| bits_of(p), budget, search).unwrap_or_else(|_| smallest.clone());
        // Greedy upgrades into what is left: best KL saved per extra bit first.
        loop {
            let used = bits_of(&pick);
            let mut best: Option<(usize, usize, f64)> = None;
            for (li, l) in layers.iter().enumerate() {
                let cur = &l.candidates[pick[li]];
                for (ci, c) in l.candidates.iter().enumerate() {
                    let extra = (c.bpw - cur.bpw) * params[li];
                    let gain = cur.predicted_kl - c.predicted_kl;
                    if extra > 0.0 && gain > 0.0 && used + extra <= budget {
                        let r = gain / extra;
                        if best.is_none_or(|b| r > b.2) {
                            best = Some((li, ci, r));
                        }
                    }
                }
            }
            match best {
                Some((li, ci, _)) => pick[li] = ci,
                None => break,
            }
        }
    }
    let choices: Vec<Choice> = layers
        .iter()
        .zip(&pick)
        .map(|(l, &c)| {
            let cc = &l.candidates[c];
            Choice {
                name: l.name.clone(),
                bits: cc.bits,
                format: cc.format.clone(),
                bpw: cc.bpw,
                predicted_kl: cc.predicted_kl,
            }
        })
        .collect();
    Ok(Allocation {
        target_bpw,
        bpw: bits_of(&pick) / total,
        predicted_kl: choices.iter().map(|c| c.predicted_kl).sum(),
        choices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, m: usize, k: usize, kl: [f64; 4]) -> LayerSensitivity {
        let bits = [8, 4, 3, 2];
        LayerSensitivity {
            name: name.into(),
            shape: [m, k],
            probe_bits: 3,
            probe_kl: kl[2],
            candidates: (0..4)
                .map(|i| CandidateCost {
                    bits: bits[i],
                    format: format!("w{}", bits[i]),
                    bpw: bits[i] as f64 + 0.5,
                    proxy: kl[i],
                    predicted_kl: kl[i],
                })
                .collect(),
        }
    }

    fn sens(layers: Vec<LayerSensitivity>) -> Sensitivity {
        Sensitivity {
            method: METHOD.into(),
            calib: "test".into(),
            tokens: 0,
            group_size: 64,
            zero_point: false,
            seconds: 0.0,
            layers,
        }
    }

    /// The budget holds, the sensitive layer gets the bits, and the result matches brute force.
    #[test]
    fn allocation_meets_budget_and_matches_brute_force() {
        let s = sens(vec![
            layer("a", 64, 64, [0.0, 1.0, 4.0, 16.0]),
            layer("b", 64, 64, [0.0, 0.01, 0.04, 0.16]),
            layer("c", 64, 128, [0.0, 0.1, 0.5, 3.0]),
        ]);
        for target in [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 8.5] {
            let a = allocate(&s, target, |_| false).unwrap();
            assert!(a.bpw <= target + 1e-9, "{target}: {}", a.bpw);
            // Brute force over 4³ choices.
            let p = [4096.0, 4096.0, 8192.0];
            let mut best = f64::INFINITY;
            for i in 0..64usize {
                let c = [i % 4, (i / 4) % 4, i / 16];
                let bits: f64 = (0..3).map(|l| s.layers[l].candidates[c[l]].bpw * p[l]).sum::<f64>() / 16384.0;
                if bits <= target + 1e-9 {
                    best = best.min((0..3).map(|l| s.layers[l].candidates[c[l]].predicted_kl).sum());
                }
            }
            assert!(
                (a.predicted_kl - best).abs() <= 1e-9 + 0.05 * best,
                "{target}: {} vs optimum {best}",
                a.predicted_kl
            );
        }
        let a = allocate(&s, 3.5, |_| false).unwrap();
        let bits = |n: &str| a.choices.iter().find(|c| c.name == n).unwrap().bits;
        assert!(bits("a") > bits("b"), "the sensitive layer gets more bits");
    }

    #[test]
    fn budget_below_smallest_and_all_skipped_are_errors() {
        let s = sens(vec![layer("a", 8, 8, [0.0, 1.0, 2.0, 3.0])]);
        let e = allocate(&s, 2.0, |_| false).unwrap_err().to_string();
        assert!(e.contains("option `target_bpw` 2") && e.contains("2.500"), "{e}");
        assert!(allocate(&s, 4.0, |_| true).unwrap_err().to_string().contains("option `override`"));
    }

    #[test]
    fn proxy_error_weights_channels() {
        let w = [1.0f32, 1.0, 1.0, 1.0];
        let q = [0.0f32, 1.0, 1.0, 0.0];
        // Row 0 errs on channel 0 (weight 10), row 1 on channel 1 (weight 1): (10 + 1) / 2.
        assert_eq!(proxy_error(&w, &q, 2, &[10.0, 1.0]), 5.5);
    }

    #[test]
    fn kl_of_identical_logits_is_zero() {
        let z = [1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
        let lp: Vec<f32> = z.chunks(3).flat_map(log_softmax).collect();
        assert!(kl_rows(&lp, &z, 3).abs() < 1e-7);
        assert!(kl_rows(&lp, &[3.0, 2.0, 1.0, 0.5, 0.5, 0.5], 3) > 0.1);
    }
}
