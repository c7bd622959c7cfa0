//! GPTQ (Frantar et al. 2022): quantize a Linear's weight column by column, each time spreading the
//! rounding error over the columns not yet quantized so that the layer's output on the calibration inputs
//! (through the Hessian H = 2·XᵀX / n) changes least.
//!
//! With `U` the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), column i's error `e = (w_i − q_i) / U_ii` updates
//! `W[:, j] −= e · U_ij` for j > i. `U` comes without an explicit inverse: with J the reversal permutation,
//! chol(J·H·J) = L gives H = R·Rᵀ with R = J·L·J upper, so U = R⁻¹ = J·L⁻¹·J.

use whittle_core::Rtn;
use whittle_kernels::block::BlockWeights;

use crate::{Error, Result};

/// Options of one GPTQ solve.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    /// Dampening added to H's diagonal, as a fraction of its mean diagonal (0.01).
    pub damp: f64,
    /// Quantize columns in order of decreasing H diagonal (act-order), with groups fixed beforehand (static
    /// groups) so the stored format stays the plain grouped one.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self { damp: 0.01, act_order: false }
    }
}

/// In-place lower Cholesky factor of the symmetric `a` (n × n, row-major); `Err(j)` if pivot j is not positive.
fn cholesky(a: &mut [f64], n: usize) -> std::result::Result<(), usize> {
    for j in 0..n {
        let (before, rest) = a.split_at_mut(j * n);
        let rowj = &mut rest[..n];
        let s = rowj[j] - rowj[..j].iter().map(|v| v * v).sum::<f64>();
        if s.is_nan() || s <= 0.0 || !s.is_finite() {
            return Err(j);
        }
        let d = s.sqrt();
        rowj[j] = d;
        let rowj: Vec<f64> = rowj[..j].to_vec();
        // Rows below j: a[i][j] = (a[i][j] − Σ_p a[i][p]·a[j][p]) / d. (`before` holds rows < j: unused.)
        let _ = before;
        for i in j + 1..n {
            let ri = &mut a[i * n..(i + 1) * n];
            let dot: f64 = ri[..j].iter().zip(&rowj).map(|(x, y)| x * y).sum();
            ri[j] = (ri[j] - dot) / d;
        }
    }
    for i in 0..n {
        for j in i + 1..n {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// The upper Cholesky factor U of H⁻¹ (row-major), from a dampened H. Retries with 10× the dampening (up to
/// three times) when H is not positive definite.
pub fn hinv_upper(h: &[f64], n: usize, damp: f64, layer: &str) -> Result<Vec<f64>> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut damp = damp;
    for _ in 0..4 {
        // J·H·J with the dampening on the diagonal.
        let mut b = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                b[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
            }
            b[i * n + i] += damp * mean_diag.max(1e-12);
        }
        if cholesky(&mut b, n).is_err() {
            damp *= 10.0;
            continue;
        }
        // M = L⁻¹ (lower), column by column by forward substitution; stored transposed (row j = column j).
        let mut mt = vec![0f64; n * n];
        for j in 0..n {
            let col = &mut mt[j * n..(j + 1) * n];
            col[j] = 1.0 / b[j * n + j];
            for i in j + 1..n {
                let li = &b[i * n..(i + 1) * n];
                let dot: f64 = li[j..i].iter().zip(&col[j..i]).map(|(x, y)| x * y).sum();
                col[i] = -dot / li[i];
            }
        }
        // U = J·M·J: U[i][j] = M[n−1−i][n−1−j] = mt[n−1−j][n−1−i].
        let mut u = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                u[i * n + j] = mt[(n - 1 - j) * n + (n - 1 - i)];
            }
        }
        return Ok(u);
    }
    Err(Error::Unsupported(format!(
        "GPTQ: the Hessian of `{layer}` is not positive definite even with dampening {damp:.0e} (raise --damp or use more calibration text)"
    )))
}

/// GPTQ-quantizes `w` (m × k, row-major) to the grouped integer format `rtn` with the Hessian `h` (k × k,
/// accumulated XᵀX). Returns the quantized weights.
pub fn gptq(w: &[f32], m: usize, k: usize, h: &[f64], rtn: Rtn, o: GptqOptions, layer: &str) -> Result<BlockWeights> {
    let g = rtn.group;
    assert!(k.is_multiple_of(g) && w.len() == m * k && h.len() == k * k);
    // Dead inputs (never active): H_ii = 1 and the column zeroed, as the reference does.
    let mut h = h.to_vec();
    let mut wt = vec![0f32; k * m]; // Wᵀ: row i = column i of W
    for r in 0..m {
        for c in 0..k {
            wt[c * m + r] = w[r * k + c];
        }
    }
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            wt[i * m..(i + 1) * m].fill(0.0);
        }
    }
    // Act-order: process columns by decreasing H_ii; groups (and their scales) are fixed from the original
    // weights first, so each column keeps the group of its original position.
    let perm: Vec<usize> = if o.act_order {
        let mut p: Vec<usize> = (0..k).collect();
        p.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        p
    } else {
        (0..k).collect()
    };
    let ngroups = k / g;
    let mut scale = vec![0f32; m * ngroups];
    let mut zero = vec![0f32; m * ngroups];
    // Parameters of group `gi` from its g columns (`cols`: g rows of m, as Wᵀ).
    let group_params = |cols: &[f32], gi: usize, scale: &mut [f32], zero: &mut [f32]| {
        for r in 0..m {
            let (mut lo, mut hi, mut amax) = (0f32, 0f32, 0f32);
            for c in 0..g {
                let v = cols[c * m + r];
                lo = lo.min(v);
                hi = hi.max(v);
                amax = amax.max(v.abs());
            }
            let (s, z) = rtn_params(rtn, lo, hi, amax);
            scale[r * ngroups + gi] = s;
            zero[r * ngroups + gi] = z;
        }
    };
    if o.act_order {
        for gi in 0..ngroups {
            group_params(&wt[gi * g * m..(gi + 1) * g * m], gi, &mut scale, &mut zero);
        }
    }
    let h = &h;
    let hp: Vec<f64> = perm.iter().flat_map(|&i| perm.iter().map(move |&j| h[i * k + j])).collect();
    let u = hinv_upper(&hp, k, o.damp, layer)?;
    let mut wp: Vec<f32> = perm.iter().flat_map(|&c| wt[c * m..(c + 1) * m].iter().copied()).collect();
    let mut codes = vec![0u8; m * k];
    let mut err = vec![0f32; m];
    let half = 1i32 << (rtn.bits - 1);
    let top = ((1u32 << rtn.bits) - 1) as f32;
    for i in 0..k {
        let c = perm[i];
        let gi = c / g;
        if !o.act_order && c.is_multiple_of(g) {
            // Group parameters from the current (error-updated) weights of the group's columns.
            group_params(&wp[i * m..(i + g) * m], gi, &mut scale, &mut zero);
        }
        let d = u[i * k + i] as f32;
        let col = &wp[i * m..(i + 1) * m];
        for r in 0..m {
            let (s, z) = (scale[r * ngroups + gi], zero[r * ngroups + gi]);
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let v = col[r];
            let (code, deq) = if rtn.zero_point {
                let q = ((v * inv).round() + z).clamp(0.0, top);
                (q as u8, s * (q - z))
            } else {
                let lim = (half - 1) as f32;
                let q = (v * inv).round().clamp(-lim, lim);
                ((q as i32 + half) as u8, s * q)
            };
            codes[r * k + c] = code;
            err[r] = (v - deq) / d;
        }
        // W[:, j] −= e · U[i, j] for the columns after i.
        let urow = &u[i * k..(i + 1) * k];
        for j in i + 1..k {
            let f = urow[j] as f32;
            if f != 0.0 {
                let cj = &mut wp[j * m..(j + 1) * m];
                for (x, e) in cj.iter_mut().zip(&err) {
                    *x -= e * f;
                }
            }
        }
    }
    // Into the block layout: one scale (and min) per 32-sub-block, replicated over the group.
    let per = g / 32;
    let nsb = k / 32;
    let mut sc = vec![0f32; m * nsb];
    let mut mn = rtn.zero_point.then(|| vec![0f32; m * nsb]);
    for r in 0..m {
        for gi in 0..ngroups {
            for j in 0..per {
                sc[r * nsb + gi * per + j] = scale[r * ngroups + gi];
                if let Some(mn) = mn.as_mut() {
                    mn[r * nsb + gi * per + j] = -(scale[r * ngroups + gi] * zero[r * ngroups + gi]);
                }
            }
        }
    }
    Ok(BlockWeights {
        m,
        k,
        sb: 32,
        q: codes,
        scale: sc,
        min: mn,
        off: if rtn.zero_point { 0 } else { -half },
        act_block: 32,
    })
}

/// Scale and zero point (as a float code) of a group with extremes `lo` ≤ 0 ≤ `hi` and max |w| `amax`, with
/// the same formulas as [`Rtn::quantize`].
fn rtn_params(rtn: Rtn, lo: f32, hi: f32, amax: f32) -> (f32, f32) {
    if rtn.zero_point {
        let top = ((1u32 << rtn.bits) - 1) as f32;
        let s = (hi - lo) / top;
        let z = if s > 0.0 { (-lo / s).round().clamp(0.0, top) } else { 0.0 };
        (s, z)
    } else {
        (amax / ((1i32 << (rtn.bits - 1)) - 1) as f32, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    #[test]
    fn hinv_upper_is_the_cholesky_factor_of_the_inverse() {
        let n = 7;
        let mut s = 3u64;
        let x: Vec<f64> = (0..n * 20).map(|_| lcg(&mut s) as f64).collect();
        let mut h = vec![0f64; n * n];
        for r in 0..20 {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += x[r * n + i] * x[r * n + j];
                }
            }
        }
        let u = hinv_upper(&h, n, 0.0, "t").unwrap();
        // Uᵀ U H = I (H⁻¹ = UᵀU), U upper.
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        for i in 0..n {
            for j in 0..n {
                let mut v = 0.0;
                for a in 0..n {
                    let uu: f64 = (0..n).map(|p| u[p * n + i] * u[p * n + a]).sum();
                    v += uu * h[a * n + j];
                }
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8, "[{i},{j}] {v}");
            }
        }
        assert!(hinv_upper(&[0.0; 4], 2, 0.0, "zeros").is_err());
    }

    /// On correlated inputs GPTQ's output error is well below round-to-nearest's, for both group formats.
    #[test]
    fn gptq_beats_rtn_on_output_error() {
        let (m, k, n) = (16, 64, 256);
        let mut s = 11u64;
        let w: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        // Inputs with a shared component: strongly correlated channels.
        let x: Vec<f32> = (0..n)
            .flat_map(|_| {
                let c = lcg(&mut s) * 3.0;
                (0..k).map(|j| c * (1.0 + (j % 5) as f32 * 0.2) + lcg(&mut s) * 0.3).collect::<Vec<_>>()
            })
            .collect();
        let mut h = vec![0f64; k * k];
        for r in 0..n {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += 2.0 * (x[r * k + i] * x[r * k + j]) as f64 / n as f64;
                }
            }
        }
        let out_err = |wq: &[f32]| -> f64 {
            let mut e = 0f64;
            for r in 0..n {
                for c in 0..m {
                    let d: f32 = (0..k).map(|j| x[r * k + j] * (w[c * k + j] - wq[c * k + j])).sum();
                    e += (d as f64).powi(2);
                }
            }
            e
        };
        for rtn in [Rtn { bits: 4, group: 32, zero_point: false }, Rtn { bits: 3, group: 64, zero_point: true }] {
            let plain = out_err(&rtn.quantize(&w, m, k).dequantize());
            for act_order in [false, true] {
                let g = gptq(&w, m, k, &h, rtn, GptqOptions { damp: 0.01, act_order }, "t").unwrap();
                let e = out_err(&g.dequantize());
                assert!(e < 0.6 * plain, "{} act_order {act_order}: gptq {e} vs rtn {plain}", rtn.name());
            }
        }
    }
}
