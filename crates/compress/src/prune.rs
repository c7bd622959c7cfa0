//! Pruning solvers for one Linear's weight W (m × k, row-major: m output features, k input features).
//! Each returns the pruned weights as a new m × k matrix in which every pruned entry is exactly 0.0.
//!
//! - Magnitude: the smallest |W_ij| of each output row.
//! - Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
//!   <https://github.com/locuslab/wanda>): the smallest S_ij = |W_ij|·‖X_j‖₂ of each output row (eq. 1).
//! - SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
//!   One-Shot", <https://github.com/IST-DASLab/sparsegpt>, `SparseGPT.fasterprune`): columns left to right;
//!   each pruned (or quantized) weight's error is spread over the columns not yet visited through the upper
//!   Cholesky factor U of H⁻¹ (the OBS update, Algorithm 1), with the mask chosen per lazy block of 128
//!   columns by the OBS error w²/[U_jj]² (adaptive mask selection, §3.3) or per group of M (N:M, §3.4).
//!
//! Ties between equal scores go to the lower input index, as PyTorch's stable sort does.

use std::fmt;

use candle_core::Tensor;
use serde::Serialize;
use whittle_core::backend::cpu;
use whittle_core::Rtn;
use whittle_quant::gptq::hinv_upper;

use crate::{Error, Result};

/// Sparsity pattern: unstructured per row (`Unstructured`), or N:M — at most N nonzeros in every M
/// consecutive inputs of a row (2:4, 4:8). An N:M pattern fixes the sparsity at 1 − N/M; the solvers then
/// only validate their `sparsity` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Pattern {
    Unstructured,
    NM { n: usize, m: usize },
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Unstructured => f.write_str("unstructured"),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// Parses option `pattern`: `unstructured`, or `N:M` with 0 < N < M (`2:4`, `4:8`).
pub fn parse_pattern(s: &str) -> Result<Pattern> {
    let t = s.trim().to_ascii_lowercase();
    if t == "unstructured" {
        return Ok(Pattern::Unstructured);
    }
    let bad = || Error::BadPattern(s.to_string());
    let (a, b) = t.split_once(':').ok_or_else(bad)?;
    let n: usize = a.trim().parse().map_err(|_| bad())?;
    let m: usize = b.trim().parse().map_err(|_| bad())?;
    if n == 0 || n >= m {
        return Err(bad());
    }
    Ok(Pattern::NM { n, m })
}

fn check_sparsity(sparsity: f64) -> Result<()> {
    // `contains` is false for NaN too.
    if (0.0..1.0).contains(&sparsity) {
        Ok(())
    } else {
        Err(Error::bad_sparsity(sparsity))
    }
}

fn check_len(layer: &str, what: &'static str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape { layer: layer.to_string(), what, got, want })
    }
}

/// The N:M pattern as (kept N, group M), checked against k; `None` when unstructured.
fn nm_groups(p: Pattern, k: usize, layer: &str) -> Result<Option<(usize, usize)>> {
    match p {
        Pattern::Unstructured => Ok(None),
        Pattern::NM { n, m } => {
            if n == 0 || n >= m {
                return Err(Error::BadPattern(p.to_string()));
            }
            if !k.is_multiple_of(m) {
                return Err(Error::PatternMismatch { layer: layer.to_string(), k, n, m });
            }
            Ok(Some((n, m)))
        }
    }
}

/// Weights pruned per row by unstructured sparsity over `k` inputs: ⌊k·sparsity⌋, as the references'
/// `int(W.shape[1] * sparsity)`.
fn per_row(k: usize, sparsity: f64) -> usize {
    (k as f64 * sparsity) as usize
}

/// The indices of the `count` lowest scores (in no particular order; ties: the lower index), using `idx` as
/// scratch.
fn lowest<'a>(score: &[f64], count: usize, idx: &'a mut Vec<usize>) -> &'a [usize] {
    idx.clear();
    idx.extend(0..score.len());
    let count = count.min(score.len());
    if count > 0 && count < score.len() {
        idx.select_nth_unstable_by(count - 1, |&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
    }
    &idx[..count]
}

/// Prunes the lowest `score(row, col)` of each row (⌊k·sparsity⌋ of them), or M−N of every N:M group.
fn prune_by_score(
    w: &[f32],
    m: usize,
    k: usize,
    sparsity: f64,
    nm: Option<(usize, usize)>,
    score: impl Fn(usize, usize) -> f64,
) -> Vec<f32> {
    let mut out = w.to_vec();
    let mut s = vec![0f64; k];
    let mut idx = Vec::with_capacity(k);
    for r in 0..m {
        for (c, v) in s.iter_mut().enumerate() {
            *v = score(r, c);
        }
        let row = &mut out[r * k..(r + 1) * k];
        match nm {
            None => {
                for &c in lowest(&s, per_row(k, sparsity), &mut idx) {
                    row[c] = 0.0;
                }
            }
            Some((n, gm)) => {
                for g0 in (0..k).step_by(gm) {
                    for &j in lowest(&s[g0..g0 + gm], gm - n, &mut idx) {
                        row[g0 + j] = 0.0;
                    }
                }
            }
        }
    }
    out
}

/// Magnitude pruning of one layer: the `sparsity` fraction (⌊k·sparsity⌋ weights) of smallest |w| in each
/// output row — per row, which is what Wanda compares against — or the M−N smallest of every N:M group.
///
/// # Shapes
/// `w`: (m, k) row-major; returns (m, k).
pub fn magnitude(w: &[f32], m: usize, k: usize, sparsity: f64, p: Pattern, layer: &str) -> Result<Vec<f32>> {
    check_sparsity(sparsity)?;
    check_len(layer, "weights", w.len(), m * k)?;
    let nm = nm_groups(p, k, layer)?;
    Ok(prune_by_score(w, m, k, sparsity, nm, |r, c| w[r * k + c].abs() as f64))
}

/// Global magnitude threshold over several layers (option `scope` `global`): the |w| value below which the
/// `sparsity` fraction of all weights lies — the ⌊n·sparsity⌋-th smallest |w| of all n weights, so that
/// [`threshold`] (which zeroes |w| < t) prunes exactly that many when no |w| ties with t. 0 for no weights.
pub fn global_threshold(layers: &[&[f32]], sparsity: f64) -> Result<f32> {
    check_sparsity(sparsity)?;
    let mut a: Vec<f32> = layers.iter().flat_map(|l| l.iter().map(|v| v.abs())).collect();
    if a.is_empty() {
        return Ok(0.0);
    }
    let i = per_row(a.len(), sparsity);
    let (_, t, _) = a.select_nth_unstable_by(i, f32::total_cmp);
    Ok(*t)
}

/// Zeroes the weights with |w| < `t` (a [`global_threshold`]).
pub fn threshold(w: &[f32], t: f32) -> Vec<f32> {
    w.iter().map(|&v| if v.abs() < t { 0.0 } else { v }).collect()
}

/// Wanda: score S_ij = |W_ij| · ‖X_j‖₂, with `xnorm2[j]` = Σ over calibration rows of x_j² (so
/// ‖X_j‖₂ = sqrt(xnorm2[j])); prunes the lowest scores per output row (⌊k·sparsity⌋) or M−N per N:M group.
///
/// # Shapes
/// `w`: (m, k) row-major; `xnorm2`: (k,); returns (m, k).
pub fn wanda(
    w: &[f32],
    m: usize,
    k: usize,
    xnorm2: &[f64],
    sparsity: f64,
    p: Pattern,
    layer: &str,
) -> Result<Vec<f32>> {
    check_sparsity(sparsity)?;
    check_len(layer, "weights", w.len(), m * k)?;
    check_len(layer, "input norms", xnorm2.len(), k)?;
    if xnorm2.iter().any(|&x| !(x.is_finite() && x >= 0.0)) {
        return Err(Error::BadStats { layer: layer.to_string(), what: "input norms" });
    }
    let nm = nm_groups(p, k, layer)?;
    let xnorm: Vec<f64> = xnorm2.iter().map(|x| x.sqrt()).collect(); // ‖X_j‖₂
    Ok(prune_by_score(w, m, k, sparsity, nm, |r, c| w[r * k + c].abs() as f64 * xnorm[c]))
}

/// Columns per lazy block (the reference's `blocksize`): error updates inside a block are applied column by
/// column, those to the columns after it as one GEMM; the unstructured mask is chosen once per block.
const BLOCKSIZE: usize = 128;

/// SparseGPT: OBS mask selection with weight reconstruction. `h` is the layer Hessian 2XᵀX/n (k × k, as
/// GPTQ uses), dampened by `damp` × its mean diagonal (0.01). Unstructured: within each lazy block of 128
/// columns, each row prunes the entries with the smallest w²/[U_jj]² (U: upper Cholesky factor of H⁻¹, from
/// [`hinv_upper`]), ⌊i₂·s⌋ − ⌊i₁·s⌋ of them in block [i₁, i₂) so every row ends at exactly ⌊k·s⌋. N:M: the
/// mask is chosen every M columns, among those M, from the weights as updated so far.
///
/// `quant`: quantize the kept weights in the same pass (the paper's joint "SparseGPT + GPTQ", §3.5): each
/// column is pruned or rounded to its group's grid, and the error is propagated. A group's scale comes from
/// its kept weights as updated when the solve reaches the group (for N:M, masks of its later M-chunks are not
/// chosen yet, so those weights count too). Returns then the dequantized values (pruned = 0; a kept weight
/// nearest to the grid's 0 is 0 as well). With `quant`, blocks hold whole groups (and whole N:M groups).
///
/// Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column, as GPTQ and the reference do.
///
/// # Shapes
/// `w`: (m, k) row-major; `h`: (k, k) row-major; returns (m, k).
#[allow(clippy::too_many_arguments)]
pub fn sparsegpt(
    w: &[f32],
    m: usize,
    k: usize,
    h: &[f64],
    sparsity: f64,
    p: Pattern,
    damp: f64,
    quant: Option<Rtn>,
    layer: &str,
) -> Result<Vec<f32>> {
    Ok(solve(w, m, k, h, sparsity, p, damp, quant, layer, BLOCKSIZE)?.w)
}

/// What a SparseGPT solve produced: more than [`sparsegpt`] returns, for the tests.
#[cfg_attr(not(test), allow(dead_code))] // the mask and the grid are read by the tests only
struct Solved {
    /// (m, k) row-major: the pruned (and dequantized) weights.
    w: Vec<f32>,
    /// (m, k) row-major: true where the mask pruned.
    pruned: Vec<bool>,
    /// (m, k / group): scale and zero point (a float code) of each quantization group; empty without quant.
    scale: Vec<f32>,
    zero: Vec<f32>,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[allow(clippy::too_many_arguments)]
fn solve(
    w: &[f32],
    m: usize,
    k: usize,
    h: &[f64],
    sparsity: f64,
    p: Pattern,
    damp: f64,
    quant: Option<Rtn>,
    layer: &str,
    blocksize: usize,
) -> Result<Solved> {
    check_sparsity(sparsity)?;
    if !(damp.is_finite() && damp >= 0.0) {
        return Err(Error::bad_damp(damp));
    }
    check_len(layer, "weights", w.len(), m * k)?;
    check_len(layer, "Hessian", h.len(), k * k)?;
    let nm = nm_groups(p, k, layer)?;
    if let Some(q) = quant {
        if !(2..=8).contains(&q.bits) || q.group == 0 || !k.is_multiple_of(q.group) {
            return Err(Error::BadQuant { layer: layer.to_string(), format: q.name(), k });
        }
    }
    let g = quant.map_or(1, |q| q.group);
    let ngroups = if quant.is_some() { k / g } else { 0 };
    let mut scale = vec![0f32; m * ngroups];
    let mut zero = vec![0f32; m * ngroups];
    if m == 0 || k == 0 {
        return Ok(Solved { w: w.to_vec(), pruned: vec![false; m * k], scale, zero });
    }

    let mut h = h.to_vec();
    let dead: Vec<bool> = (0..k).map(|j| h[j * k + j] == 0.0).collect();
    for (j, _) in dead.iter().enumerate().filter(|(_, &d)| d) {
        h[j * k + j] = 1.0;
    }
    let u = &hinv_upper(&h, k, damp, layer)?[..]; // (k, k) upper, H⁻¹ = UᵀU
    drop(h);

    // A block holds whole N:M groups and whole quantization groups, so a group's mask and scale see every
    // earlier update.
    let gm = nm.map_or(1, |(_, gm)| gm);
    let unit = gm / gcd(gm, g) * g;
    let block = unit * (blocksize / unit).max(1);

    let mut wt = vec![0f32; k * m]; // (k, m) = Wᵀ: row c is column c of W
    for r in 0..m {
        for c in 0..k {
            wt[c * m + r] = if dead[c] { 0.0 } else { w[r * k + c] };
        }
    }
    let mut pruned = vec![false; k * m]; // (k, m), as wt
    let mut errs = vec![0f32; block * m]; // (block, m): e_i = (w_i − ŵ_i) / U_ii
    let mut score = vec![0f64; block.max(gm)];
    let mut idx = Vec::with_capacity(block.max(gm));
    // OBS error of pruning W[r, c] alone: w² / [H⁻¹]_cc, with the block-local [H⁻¹]_cc = U_cc² (eq. 3).
    let obs = |wt: &[f32], r: usize, c: usize| {
        let (v, d) = (wt[c * m + r] as f64, u[c * k + c]);
        v * v / (d * d)
    };

    let mut i1 = 0;
    while i1 < k {
        let i2 = (i1 + block).min(k);
        let nb = i2 - i1;
        if nm.is_none() {
            let count = per_row(i2, sparsity) - per_row(i1, sparsity);
            if count > 0 {
                for r in 0..m {
                    for (j, s) in score[..nb].iter_mut().enumerate() {
                        *s = obs(&wt, r, i1 + j);
                    }
                    for &j in lowest(&score[..nb], count, &mut idx) {
                        pruned[(i1 + j) * m + r] = true;
                    }
                }
            }
        }
        for i in i1..i2 {
            if let Some((n, gm)) = nm {
                if i.is_multiple_of(gm) {
                    for r in 0..m {
                        for (j, s) in score[..gm].iter_mut().enumerate() {
                            *s = obs(&wt, r, i + j);
                        }
                        for &j in lowest(&score[..gm], gm - n, &mut idx) {
                            pruned[(i + j) * m + r] = true;
                        }
                    }
                }
            }
            if let Some(q) = quant {
                if i.is_multiple_of(g) {
                    let gi = i / g;
                    for r in 0..m {
                        let (lo, hi, amax) =
                            Rtn::range((i..i + g).filter(|&c| !pruned[c * m + r]).map(|c| wt[c * m + r]));
                        (scale[r * ngroups + gi], zero[r * ngroups + gi]) = q.params(lo, hi, amax);
                    }
                }
            }
            let d = u[i * k + i] as f32;
            let (head, tail) = wt.split_at_mut((i + 1) * m);
            let col = &mut head[i * m..]; // (m,)
            let err = &mut errs[(i - i1) * m..(i - i1 + 1) * m]; // (m,)
            let mut any = false;
            for r in 0..m {
                let v = col[r];
                let w_hat = if pruned[i * m + r] {
                    0.0
                } else if let Some(q) = quant {
                    let gi = i / g;
                    q.round(v, scale[r * ngroups + gi], zero[r * ngroups + gi]).1
                } else {
                    v
                };
                err[r] = (v - w_hat) / d;
                any |= err[r] != 0.0;
                col[r] = w_hat;
            }
            if any {
                // Inside the block: W[:, j] −= e · U[i, j] for j in (i, i2).
                let urow = &u[i * k..(i + 1) * k];
                for j in i + 1..i2 {
                    let f = urow[j] as f32;
                    if f != 0.0 {
                        for (x, e) in tail[(j - i - 1) * m..(j - i) * m].iter_mut().zip(err.iter()) {
                            *x -= e * f;
                        }
                    }
                }
            }
        }
        if i2 < k && errs[..nb * m].iter().any(|&e| e != 0.0) {
            // After the block, as one GEMM: W[:, i2..]ᵀ −= U[i1..i2, i2..]ᵀ · E.
            let nt = k - i2;
            let ut: Vec<f32> = (i2..k).flat_map(|j| (i1..i2).map(move |i| u[i * k + j] as f32)).collect();
            let dev = &cpu::device();
            let ut = Tensor::from_vec(ut, (nt, nb), dev)?; // (nt, nb)
            let e = Tensor::from_slice(&errs[..nb * m], (nb, m), dev)?; // (nb, m)
            let upd: Vec<f32> = ut.matmul(&e)?.flatten_all()?.to_vec1()?; // (nt, m)
            for (x, d) in wt[i2 * m..].iter_mut().zip(upd) {
                *x -= d;
            }
        }
        i1 = i2;
    }

    let mut out = vec![0f32; m * k];
    let mut mask = vec![false; m * k];
    for r in 0..m {
        for c in 0..k {
            out[r * k + c] = wt[c * m + r];
            mask[r * k + c] = pruned[c * m + r];
        }
    }
    Ok(Solved { w: out, pruned: mask, scale, zero })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SparseGPT's output error on correlated inputs, at most this fraction of magnitude pruning's.
    const MAX_SPARSEGPT_VS_MAGNITUDE: f64 = 0.7;
    /// Joint pruning + quantization, at most this fraction of pruning then rounding separately.
    const MAX_JOINT_VS_SEPARATE: f64 = 1.0;
    /// A kept weight of the joint solve lies within this many codes of an integer code (f32 rounding).
    const MAX_GRID_OFF: f32 = 1e-3;
    /// Lazy blocks only reorder float operations: the 2:4 masks of block 4 and block 128 agree on at least
    /// this fraction of the weights.
    const MIN_LAZY_MASK_AGREEMENT: f64 = 0.995;
    /// The OBS update of a single pruned weight matches the constrained least-squares solution to this
    /// relative error.
    const MAX_OBS_REL_ERR: f64 = 1e-4;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    fn rand_w(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..m * k).map(|_| lcg(&mut s)).collect()
    }

    /// Calibration inputs X (n, k) with a shared component and uneven channel scales (correlated channels of
    /// different norms, as real activations have), with their Hessian 2XᵀX/n (k, k) and Σ x_j² (k,).
    struct Calib {
        n: usize,
        k: usize,
        x: Vec<f32>,
        h: Vec<f64>,
        xnorm2: Vec<f64>,
    }

    fn calib(n: usize, k: usize, seed: u64) -> Calib {
        let mut s = seed;
        let x: Vec<f32> = (0..n)
            .flat_map(|_| {
                let c = lcg(&mut s) * 3.0;
                (0..k)
                    .map(|j| {
                        let scale = 0.25 + 2.0 * ((j * 7) % 11) as f32 / 10.0;
                        scale * (c * (1.0 + (j % 5) as f32 * 0.2) + lcg(&mut s) * 0.6)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut h = vec![0f64; k * k];
        let mut xnorm2 = vec![0f64; k];
        for r in 0..n {
            let xr = &x[r * k..(r + 1) * k];
            for i in 0..k {
                xnorm2[i] += (xr[i] as f64).powi(2);
                for j in 0..k {
                    h[i * k + j] += 2.0 * (xr[i] * xr[j]) as f64 / n as f64;
                }
            }
        }
        Calib { n, k, x, h, xnorm2 }
    }

    /// ‖X(W − Ŵ)ᵀ‖²
    fn out_err(c: &Calib, w: &[f32], w_hat: &[f32], m: usize) -> f64 {
        let k = c.k;
        let mut e = 0f64;
        for r in 0..c.n {
            let xr = &c.x[r * k..(r + 1) * k];
            for o in 0..m {
                let d: f64 = (0..k).map(|j| xr[j] as f64 * (w[o * k + j] - w_hat[o * k + j]) as f64).sum();
                e += d * d;
            }
        }
        e
    }

    fn zeros(xs: &[f32]) -> usize {
        xs.iter().filter(|&&v| v == 0.0).count()
    }

    /// Every row has exactly ⌊k·s⌋ zeros (unstructured) or every N:M group exactly M−N.
    fn assert_structure(name: &str, w: &[f32], m: usize, k: usize, sparsity: f64, p: Pattern) {
        for r in 0..m {
            let row = &w[r * k..(r + 1) * k];
            match p {
                Pattern::Unstructured => {
                    assert_eq!(zeros(row), per_row(k, sparsity), "{name} row {r}: zeros at sparsity {sparsity}")
                }
                Pattern::NM { n, m: gm } => {
                    for (gi, grp) in row.chunks(gm).enumerate() {
                        assert_eq!(zeros(grp), gm - n, "{name} {p} row {r} group {gi}: {grp:?}");
                    }
                }
            }
        }
    }

    const TWO_FOUR: Pattern = Pattern::NM { n: 2, m: 4 };
    const FOUR_EIGHT: Pattern = Pattern::NM { n: 4, m: 8 };

    #[test]
    fn all_methods_give_exact_row_sparsity_and_nm_structure() {
        // k = 256: two SparseGPT blocks, so the per-block counts must add up to ⌊k·s⌋.
        let (m, k) = (12, 256);
        let w = rand_w(m, k, 1);
        let c = calib(400, k, 2);
        for (p, sparsity) in [
            (Pattern::Unstructured, 0.5),
            (Pattern::Unstructured, 0.37),
            (Pattern::Unstructured, 0.0),
            (TWO_FOUR, 0.5),
            (FOUR_EIGHT, 0.5),
        ] {
            let mag = magnitude(&w, m, k, sparsity, p, "t").unwrap();
            assert_structure("magnitude", &mag, m, k, sparsity, p);
            let wan = wanda(&w, m, k, &c.xnorm2, sparsity, p, "t").unwrap();
            assert_structure("wanda", &wan, m, k, sparsity, p);
            let sg = sparsegpt(&w, m, k, &c.h, sparsity, p, 0.01, None, "t").unwrap();
            assert_structure("sparsegpt", &sg, m, k, sparsity, p);
        }
    }

    /// Brute force over every mask that fits the pattern: magnitude keeps the one of largest Σ|w|.
    #[test]
    fn magnitude_keeps_the_largest() {
        let (m, k) = (6, 8);
        let w = rand_w(m, k, 7);
        for p in [Pattern::Unstructured, TWO_FOUR] {
            let got = magnitude(&w, m, k, 0.5, p, "t").unwrap();
            for r in 0..m {
                let row = &w[r * k..(r + 1) * k];
                let fits = |mask: u32| match p {
                    Pattern::Unstructured => mask.count_ones() == 4,
                    _ => (mask & 0xf).count_ones() == 2 && (mask >> 4).count_ones() == 2,
                };
                let kept_sum = |mask: u32| (0..k).filter(|&c| mask >> c & 1 == 1).map(|c| row[c].abs()).sum::<f32>();
                let best = (0u32..1 << k).filter(|&mm| fits(mm)).max_by(|&a, &b| kept_sum(a).total_cmp(&kept_sum(b)));
                let want: Vec<f32> = (0..k).map(|c| if best.unwrap() >> c & 1 == 1 { row[c] } else { 0.0 }).collect();
                assert_eq!(&got[r * k..(r + 1) * k], &want[..], "{p} row {r}");
            }
        }
    }

    #[test]
    fn global_threshold_matches_a_sort() {
        let layers = [rand_w(3, 50, 1), rand_w(7, 13, 2), rand_w(1, 200, 3)];
        let refs: Vec<&[f32]> = layers.iter().map(|l| &l[..]).collect();
        let mut all: Vec<f32> = layers.iter().flatten().map(|v| v.abs()).collect();
        all.sort_by(f32::total_cmp);
        for s in [0.0, 0.1, 0.5, 0.9, 0.999] {
            let t = global_threshold(&refs, s).unwrap();
            let i = (all.len() as f64 * s) as usize;
            assert_eq!(t, all[i], "sparsity {s}");
            let pruned: usize = layers.iter().map(|l| zeros(&threshold(l, t))).sum();
            assert_eq!(pruned, i, "sparsity {s}");
        }
        assert_eq!(global_threshold(&[], 0.5).unwrap(), 0.0);
    }

    #[test]
    fn wanda_with_equal_norms_is_magnitude() {
        let (m, k) = (9, 64);
        let w = rand_w(m, k, 4);
        // sqrt(4) = 2: an exact scaling, so no new ties.
        let xnorm2 = vec![4.0; k];
        for (p, s) in [(Pattern::Unstructured, 0.5), (Pattern::Unstructured, 0.8), (TWO_FOUR, 0.5), (FOUR_EIGHT, 0.5)] {
            let a = wanda(&w, m, k, &xnorm2, s, p, "t").unwrap();
            let b = magnitude(&w, m, k, s, p, "t").unwrap();
            assert_eq!(a, b, "{p} sparsity {s}");
        }
    }

    #[test]
    fn wanda_keeps_a_heavy_input_column() {
        let (m, k, heavy) = (16, 32, 5);
        let mut w = rand_w(m, k, 9);
        for r in 0..m {
            w[r * k + heavy] *= 0.01; // the smallest |w| of every row
        }
        let mut xnorm2 = vec![1.0; k];
        xnorm2[heavy] = 1e8;
        for p in [Pattern::Unstructured, TWO_FOUR] {
            let mag = magnitude(&w, m, k, 0.5, p, "t").unwrap();
            let wan = wanda(&w, m, k, &xnorm2, 0.5, p, "t").unwrap();
            for r in 0..m {
                assert_eq!(mag[r * k + heavy], 0.0, "{p} row {r}: magnitude prunes the small column");
                assert_eq!(wan[r * k + heavy], w[r * k + heavy], "{p} row {r}: wanda keeps the heavy column");
            }
        }
    }

    /// On correlated inputs of uneven norms, output error: SparseGPT < Wanda < magnitude.
    #[test]
    fn sparsegpt_beats_wanda_beats_magnitude_on_output_error() {
        let (m, k) = (32, 64);
        let w = rand_w(m, k, 21);
        let c = calib(512, k, 22);
        for p in [Pattern::Unstructured, TWO_FOUR] {
            let mag = out_err(&c, &w, &magnitude(&w, m, k, 0.5, p, "t").unwrap(), m);
            let wan = out_err(&c, &w, &wanda(&w, m, k, &c.xnorm2, 0.5, p, "t").unwrap(), m);
            let sg = out_err(&c, &w, &sparsegpt(&w, m, k, &c.h, 0.5, p, 0.01, None, "t").unwrap(), m);
            eprintln!("{p}: magnitude {mag:.1} wanda {wan:.1} sparsegpt {sg:.1}");
            assert!(wan < mag, "{p}: wanda {wan} vs magnitude {mag}");
            assert!(sg < wan, "{p}: sparsegpt {sg} vs wanda {wan}");
            assert!(sg < MAX_SPARSEGPT_VS_MAGNITUDE * mag, "{p}: sparsegpt {sg} vs magnitude {mag}");
        }
    }

    /// Joint pruning + 4-bit quantization: exactly the pattern's mask, pruned weights exactly 0, kept ones on
    /// their group's grid, and an output error no worse than pruning then rounding separately.
    #[test]
    fn sparsegpt_joint_quant_prunes_and_lies_on_the_grid() {
        let (m, k) = (32, 128);
        let w = rand_w(m, k, 31);
        let c = calib(512, k, 32);
        for rtn in [Rtn { bits: 4, group: 32, zero_point: false }, Rtn { bits: 4, group: 32, zero_point: true }] {
            for p in [Pattern::Unstructured, TWO_FOUR] {
                let j = solve(&w, m, k, &c.h, 0.5, p, 0.01, Some(rtn), "t", BLOCKSIZE).unwrap();
                let ng = k / rtn.group;
                let top = if rtn.zero_point { 15.0 } else { 7.0 };
                for r in 0..m {
                    assert_eq!(j.pruned[r * k..(r + 1) * k].iter().filter(|&&b| b).count(), k / 2, "row {r}");
                    for col in 0..k {
                        let v = j.w[r * k + col];
                        if j.pruned[r * k + col] {
                            assert_eq!(v, 0.0);
                            continue;
                        }
                        let (s, z) = (j.scale[r * ng + col / rtn.group], j.zero[r * ng + col / rtn.group]);
                        let code = if s > 0.0 { v / s + z } else { 0.0 };
                        let lo = if rtn.zero_point { 0.0 } else { -top };
                        assert!(
                            (code - code.round()).abs() < MAX_GRID_OFF && (lo..=top).contains(&code.round()),
                            "{} {p} [{r},{col}]: {v} = code {code} of scale {s}",
                            rtn.name()
                        );
                    }
                }
                if let Pattern::NM { n, m: gm } = p {
                    for grp in j.pruned.chunks(gm) {
                        assert_eq!(grp.iter().filter(|&&b| b).count(), gm - n);
                    }
                }
                let extra = zeros(&j.w) - m * k / 2;
                assert_eq!(zeros(&j.w), zeros(&sparsegpt(&w, m, k, &c.h, 0.5, p, 0.01, Some(rtn), "t").unwrap()));
                let joint = out_err(&c, &w, &j.w, m);
                let pruned = sparsegpt(&w, m, k, &c.h, 0.5, p, 0.01, None, "t").unwrap();
                let separate = out_err(&c, &w, &rtn.quantize(&pruned, m, k).dequantize(), m);
                eprintln!(
                    "{} {p}: joint {joint:.1} separate {separate:.1}; {extra} kept weights round to 0",
                    rtn.name()
                );
                assert!(
                    joint <= MAX_JOINT_VS_SEPARATE * separate,
                    "{} {p}: joint {joint} vs separate {separate}",
                    rtn.name()
                );
            }
        }
    }

    /// Sparsity 0 without quantization changes nothing: every error is 0.
    #[test]
    fn sparsegpt_at_zero_sparsity_is_the_identity() {
        let (m, k) = (8, 160);
        let w = rand_w(m, k, 41);
        let c = calib(300, k, 42);
        assert_eq!(sparsegpt(&w, m, k, &c.h, 0.0, Pattern::Unstructured, 0.01, None, "t").unwrap(), w);
    }

    /// Pruning only the first column is a single OBS step, whose update is the exact constrained
    /// least-squares solution: min (w−ŵ)ᵀH(w−ŵ) with ŵ_0 = 0 gives ŵ_S = w_S + H_SS⁻¹·H_S0·w_0.
    #[test]
    fn first_pruned_column_gets_the_obs_update() {
        let k = 8;
        let c = calib(200, k, 51);
        let mut w = rand_w(1, k, 52);
        for v in w.iter_mut() {
            *v += v.signum() * 0.5; // |w| ≥ 0.5 …
        }
        w[0] = 0.1; // … but w_0: the lowest OBS error
        let got = sparsegpt(&w, 1, k, &c.h, 0.2, Pattern::Unstructured, 0.0, None, "t").unwrap();
        assert_eq!(got[0], 0.0);
        // Solve H_SS x = H_S0 · w_0 by Gaussian elimination (H_SS is positive definite: no pivoting).
        let s = k - 1;
        let mut a: Vec<f64> = (1..k).flat_map(|i| (1..k).map(move |j| (i, j))).map(|(i, j)| c.h[i * k + j]).collect();
        let mut b: Vec<f64> = (1..k).map(|i| c.h[i * k] * w[0] as f64).collect();
        for p in 0..s {
            for i in p + 1..s {
                let f = a[i * s + p] / a[p * s + p];
                for j in p..s {
                    a[i * s + j] -= f * a[p * s + j];
                }
                b[i] -= f * b[p];
            }
        }
        for p in (0..s).rev() {
            let t: f64 = (p + 1..s).map(|j| a[p * s + j] * b[j]).sum();
            b[p] = (b[p] - t) / a[p * s + p];
        }
        // Compare the updates ŵ_S − w_S themselves, relative to the largest.
        let scale = b.iter().fold(0f64, |a, v| a.max(v.abs()));
        assert!(scale > 1e-3, "the update is not negligible: {b:?}");
        for i in 1..k {
            let delta = got[i] as f64 - w[i] as f64;
            let rel = (delta - b[i - 1]).abs() / scale;
            assert!(rel < MAX_OBS_REL_ERR, "w[{i}]: update {delta} vs {}", b[i - 1]);
        }
    }

    /// A dead input (H_jj = 0) ends as a zero column; the solve goes on.
    #[test]
    fn dead_inputs_are_zeroed() {
        let (m, k, dead) = (8, 64, 10);
        let w = rand_w(m, k, 61);
        let mut c = calib(300, k, 62);
        for j in 0..k {
            c.h[dead * k + j] = 0.0;
            c.h[j * k + dead] = 0.0;
        }
        for p in [Pattern::Unstructured, TWO_FOUR] {
            let got = sparsegpt(&w, m, k, &c.h, 0.5, p, 0.01, None, "t").unwrap();
            for r in 0..m {
                assert_eq!(got[r * k + dead], 0.0);
            }
            assert_structure("sparsegpt", &got, m, k, 0.5, p);
        }
    }

    /// For N:M the mask does not depend on the block size, so block 4 (every update column by column) and
    /// block 128 (GEMM after each block) agree but for float rounding.
    #[test]
    fn lazy_blocks_match_column_by_column() {
        let (m, k) = (24, 512);
        let w = rand_w(m, k, 71);
        let c = calib(700, k, 72);
        let a = solve(&w, m, k, &c.h, 0.5, TWO_FOUR, 0.01, None, "t", 4).unwrap();
        let b = solve(&w, m, k, &c.h, 0.5, TWO_FOUR, 0.01, None, "t", BLOCKSIZE).unwrap();
        let same = a.pruned.iter().zip(&b.pruned).filter(|(x, y)| x == y).count();
        assert!(same as f64 >= MIN_LAZY_MASK_AGREEMENT * (m * k) as f64, "{same}/{}", m * k);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (m, k) = (4, 8);
        let w = rand_w(m, k, 81);
        let c = calib(50, k, 82);
        let x = &c.xnorm2;
        let u = Pattern::Unstructured;
        for s in [-0.1, 1.0, 1.5, f64::NAN] {
            let e = magnitude(&w, m, k, s, u, "t").unwrap_err();
            assert!(matches!(e, Error::BadSparsity(_)), "{e}");
            assert!(matches!(wanda(&w, m, k, x, s, u, "t"), Err(Error::BadSparsity(_))));
            assert!(matches!(sparsegpt(&w, m, k, &c.h, s, u, 0.01, None, "t"), Err(Error::BadSparsity(_))));
            assert!(matches!(global_threshold(&[&w], s), Err(Error::BadSparsity(_))));
        }
        assert_eq!(magnitude(&w, m, k, 1.0, u, "t").unwrap_err().to_string(), "option `sparsity` 1: must be in [0, 1)");

        // M does not divide k.
        let (w6, x6) = (rand_w(2, 6, 1), vec![1.0; 6]);
        let h6: Vec<f64> = (0..36).map(|i| if i % 7 == 0 { 1.0 } else { 0.0 }).collect();
        let e = magnitude(&w6, 2, 6, 0.5, TWO_FOUR, "model.layers.0.mlp.up_proj").unwrap_err();
        assert_eq!(
            e.to_string(),
            "layer `model.layers.0.mlp.up_proj`: 2:4 sparsity needs the input features k = 6 to be a multiple of M = 4"
        );
        assert!(matches!(wanda(&w6, 2, 6, &x6, 0.5, TWO_FOUR, "t"), Err(Error::PatternMismatch { k: 6, m: 4, .. })));
        assert!(matches!(
            sparsegpt(&w6, 2, 6, &h6, 0.5, TWO_FOUR, 0.01, None, "t"),
            Err(Error::PatternMismatch { k: 6, m: 4, .. })
        ));

        // Invalid patterns.
        for p in [
            Pattern::NM { n: 4, m: 4 },
            Pattern::NM { n: 0, m: 4 },
            Pattern::NM { n: 5, m: 4 },
            Pattern::NM { n: 0, m: 0 },
        ] {
            assert!(matches!(magnitude(&w, m, k, 0.5, p, "t"), Err(Error::BadPattern(_))), "{p}");
            assert!(matches!(wanda(&w, m, k, x, 0.5, p, "t"), Err(Error::BadPattern(_))), "{p}");
            assert!(matches!(sparsegpt(&w, m, k, &c.h, 0.5, p, 0.01, None, "t"), Err(Error::BadPattern(_))), "{p}");
        }
        assert_eq!(parse_pattern("2:4").unwrap(), TWO_FOUR);
        assert_eq!(parse_pattern(" 4:8 ").unwrap(), FOUR_EIGHT);
        assert_eq!(parse_pattern("Unstructured").unwrap(), Pattern::Unstructured);
        for s in ["4:2", "0:4", "4:4", "2:", ":4", "abc", "2:4:8", "-1:4", ""] {
            assert!(matches!(parse_pattern(s), Err(Error::BadPattern(_))), "`{s}`");
        }

        // Shapes and statistics.
        assert!(matches!(magnitude(&w[1..], m, k, 0.5, u, "t"), Err(Error::Shape { what: "weights", .. })));
        assert!(matches!(wanda(&w, m, k, &x[1..], 0.5, u, "t"), Err(Error::Shape { what: "input norms", .. })));
        let mut xneg = x.clone();
        xneg[3] = -1.0;
        assert!(matches!(wanda(&w, m, k, &xneg, 0.5, u, "t"), Err(Error::BadStats { .. })));
        xneg[3] = f64::NAN;
        assert!(matches!(wanda(&w, m, k, &xneg, 0.5, u, "t"), Err(Error::BadStats { .. })));
        assert!(matches!(
            sparsegpt(&w, m, k, &c.h[1..], 0.5, u, 0.01, None, "t"),
            Err(Error::Shape { what: "Hessian", .. })
        ));
        for d in [-0.01, f64::NAN, f64::INFINITY] {
            assert!(matches!(sparsegpt(&w, m, k, &c.h, 0.5, u, d, None, "t"), Err(Error::BadDamp(_))));
        }

        // Quantization formats that do not fit.
        for rtn in [
            Rtn { bits: 4, group: 48, zero_point: false },
            Rtn { bits: 4, group: 0, zero_point: false },
            Rtn { bits: 1, group: 8, zero_point: false },
            Rtn { bits: 9, group: 8, zero_point: true },
        ] {
            let e = sparsegpt(&w, m, k, &c.h, 0.5, u, 0.01, Some(rtn), "t").unwrap_err();
            assert!(matches!(e, Error::BadQuant { k: 8, .. }), "{e}");
        }

        // Not positive definite even with the most dampening hinv_upper tries: its error, naming the layer.
        let h2 = [1.0, 100.0, 100.0, 1.0];
        let e = sparsegpt(&[1.0, 2.0], 1, 2, &h2, 0.5, u, 0.01, None, "blk.3.attn_q").unwrap_err();
        assert!(matches!(e, Error::Quant(_)) && e.to_string().contains("blk.3.attn_q"), "{e}");
        let hnan = [f64::NAN, 0.0, 0.0, 1.0];
        assert!(matches!(sparsegpt(&[1.0, 2.0], 1, 2, &hnan, 0.5, u, 0.01, None, "t"), Err(Error::Quant(_))));

        // Empty layers are fine.
        assert!(magnitude(&[], 0, 8, 0.5, TWO_FOUR, "t").unwrap().is_empty());
        assert!(sparsegpt(&[], 0, 0, &[], 0.5, u, 0.01, None, "t").unwrap().is_empty());
    }

    /// `cargo test --release -p whittle-compress -- --ignored --nocapture sparsegpt_timing`: median of 3 solves
    /// of each shape and pattern, and the share of hinv_upper.
    #[test]
    #[ignore]
    fn sparsegpt_timing() {
        use std::time::Instant;
        fn median(mut t: Vec<f64>) -> f64 {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        }
        for (m, k) in [(576, 1536), (1536, 576)] {
            let w = rand_w(m, k, 91);
            // A correlated Hessian without the O(n·k²) product: a shared component plus independent noise.
            let mut s = 92u64;
            let a: Vec<f64> = (0..k).map(|_| 1.0 + lcg(&mut s) as f64).collect();
            let h: Vec<f64> =
                (0..k * k).map(|i| a[i / k] * a[i % k] + if i / k == i % k { 0.1 + a[i / k] } else { 0.0 }).collect();
            let hinv = median(
                (0..3)
                    .map(|_| {
                        let t = Instant::now();
                        hinv_upper(&h, k, 0.01, "t").unwrap();
                        t.elapsed().as_secs_f64()
                    })
                    .collect(),
            );
            for p in [Pattern::Unstructured, TWO_FOUR] {
                let t = median(
                    (0..3)
                        .map(|_| {
                            let t = Instant::now();
                            sparsegpt(&w, m, k, &h, 0.5, p, 0.01, None, "t").unwrap();
                            t.elapsed().as_secs_f64()
                        })
                        .collect(),
                );
                eprintln!("sparsegpt {m}x{k} {p}: {:.3} s (hinv_upper {:.3} s)", t, hinv);
            }
        }
    }
}
