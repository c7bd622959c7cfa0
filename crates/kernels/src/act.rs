//! Elementwise activations (and the post-LN residual step) with vectorizable approximations of the transcendental functions (libm's
//! scalar `erff`/`expf` calls were a fifth of BERT's run time).

use std::mem::MaybeUninit;

/// Bitwise ops on f32 lanes through the integer unit: `_mm512_{and,or,andnot}_ps` need AVX512DQ, and
/// calling them from an `avx512f`-only function stops them being inlined.
#[cfg(target_arch = "x86_64")]
pub(crate) mod bits {
    use std::arch::x86_64::*;
    #[inline(always)]
    pub unsafe fn and(a: __m512, b: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)))
    }
    #[inline(always)]
    pub unsafe fn or(a: __m512, b: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)))
    }
    #[inline(always)]
    pub unsafe fn andnot(a: __m512, b: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)))
    }
}

/// `exp(x)` for f32: `x = n·ln2 + r`, `|r| ≤ ln2/2`, `exp(r)` by its degree-6 Taylor polynomial
/// (relative error ≤ 2e-7), times `2ⁿ` built in the exponent bits. Inputs below -87 flush to 0.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer in the low mantissa bits
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let nf = t - MAGIC;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7) with [`exp_fast`].
#[inline(always)]
pub fn erf_fast(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_fast(-ax * ax);
    y.copysign(x)
}

/// GELU with the exact (erf) form, in place: `x · ½(1 + erf(x/√2))`.
pub fn gelu_erf(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked.
        return unsafe { gelu_erf_avx512(xs) };
    }
    gelu_erf_scalar(xs)
}

/// [`gelu_erf`] one element at a time (the formulas of [`erf_fast`] and [`exp_fast`]).
pub fn gelu_erf_scalar(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf_fast(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// [`gelu_erf_scalar`] sixteen lanes at a time, the same operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_erf_avx512(xs: &mut [f32]) {
    use crate::act::bits;
    use std::arch::x86_64::*;
    let n = xs.len() / 16 * 16;
    let c = |v: f32| _mm512_set1_ps(v);
    let sign = c(-0.0);
    for i in (0..n).step_by(16) {
        let p = xs.as_mut_ptr().add(i);
        let x = _mm512_loadu_ps(p);
        let u = _mm512_mul_ps(x, c(std::f32::consts::FRAC_1_SQRT_2));
        let ax = bits::andnot(sign, u);
        let t = _mm512_div_ps(c(1.0), _mm512_fmadd_ps(c(0.327_591_1), ax, c(1.0)));
        let mut poly = c(1.061_405_4);
        for a in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
            poly = _mm512_fmadd_ps(poly, t, c(a));
        }
        poly = _mm512_mul_ps(poly, t);
        let ex = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax)); // exp(-ax²)
        let erf_abs = _mm512_fnmadd_ps(poly, ex, c(1.0));
        let erf = bits::or(erf_abs, bits::and(u, sign));
        let y = _mm512_mul_ps(_mm512_mul_ps(c(0.5), x), _mm512_add_ps(c(1.0), erf));
        _mm512_storeu_ps(p, y);
    }
    gelu_erf_scalar(&mut xs[n..]);
}

/// [`exp_fast`] on sixteen lanes: the same operations in the same order.
///
/// # Safety
/// AVX-512F must be available (call from an `avx512f` function).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let e = _mm512_min_ps(_mm512_max_ps(x, c(-87.0)), c(88.0));
    let magic = c(12_582_912.0);
    let tt = _mm512_fmadd_ps(e, c(std::f32::consts::LOG2_E), magic);
    let nn = _mm512_sub_epi32(_mm512_castps_si512(tt), _mm512_castps_si512(magic));
    let nf = _mm512_sub_ps(tt, magic);
    let r = _mm512_fnmadd_ps(nf, c(1.428_606_8e-6), _mm512_fnmadd_ps(nf, c(0.693_145_75), e));
    let mut q = c(1.0 / 720.0);
    for a in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        q = _mm512_fmadd_ps(q, r, c(a));
    }
    let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(nn, _mm512_set1_epi32(127)), 23));
    _mm512_mul_ps(q, pow2)
}

/// SwiGLU's product in place: `g ← silu(g) · u = g · u / (1 + exp(−g))` (LLaMA's MLP).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked.
        return unsafe { silu_mul_avx512(g, u) };
    }
    silu_mul_scalar(g, u)
}

/// [`silu_mul`] one element at a time.
pub fn silu_mul_scalar(g: &mut [f32], u: &[f32]) {
    for (x, &y) in g.iter_mut().zip(u) {
        *x = *x * y / (1.0 + exp_fast(-*x));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = g.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let p = g.as_mut_ptr().add(i);
        let x = _mm512_loadu_ps(p);
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let y =
            _mm512_div_ps(_mm512_mul_ps(x, _mm512_loadu_ps(u.as_ptr().add(i))), _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_storeu_ps(p, y);
    }
    silu_mul_scalar(&mut g[n..], &u[n..]);
}

/// Causal softmax of one row of attention scores in place: `row[j] ← softmax(scale · row[..=last])[j]` for
/// `j ≤ last`, 0 after (keys after the query).
pub fn causal_softmax_row(row: &mut [f32], last: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked.
        return unsafe { causal_softmax_row_avx512(row, last, scale) };
    }
    causal_softmax_row_scalar(row, last, scale)
}

/// [`causal_softmax_row`] one element at a time.
pub fn causal_softmax_row_scalar(row: &mut [f32], last: usize, scale: f32) {
    let n = (last + 1).min(row.len());
    let mx = row[..n].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) * scale;
    let mut z = 0.0;
    for v in row[..n].iter_mut() {
        *v = exp_fast(*v * scale - mx);
        z += *v;
    }
    let inv = 1.0 / z;
    row[..n].iter_mut().for_each(|v| *v *= inv);
    row[n..].fill(0.0);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn causal_softmax_row_avx512(row: &mut [f32], last: usize, scale: f32) {
    use std::arch::x86_64::*;
    let n = (last + 1).min(row.len());
    let p = row.as_mut_ptr();
    let full = n / 16 * 16;
    // Lanes past `n` in the last vector are masked out.
    let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
    let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        mv = _mm512_max_ps(mv, _mm512_loadu_ps(p.add(i)));
    }
    mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_maskz_loadu_ps(tail, p.add(full)));
    let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv) * scale);
    let sc = _mm512_set1_ps(scale);
    let mut zv = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(p.add(i)), sc, mx));
        _mm512_storeu_ps(p.add(i), e);
        zv = _mm512_add_ps(zv, e);
    }
    if tail != 0 {
        let e = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), sc, mx));
        let e = _mm512_maskz_mov_ps(tail, e);
        _mm512_mask_storeu_ps(p.add(full), tail, e);
        zv = _mm512_add_ps(zv, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(zv));
    for i in (0..full).step_by(16) {
        _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
    }
    if tail != 0 {
        _mm512_mask_storeu_ps(p.add(full), tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), inv));
    }
    row[n..].fill(0.0);
}

/// Post-LN residual step, row by row: `out = LayerNorm(x + r) · w + b` over rows of `w.len()` values, the
/// mean and variance of each row in two passes (`var = mean((s − mean)²)`, as PyTorch computes it).
/// Every element of `out` is written (it may start uninitialised).
pub fn add_layer_norm(x: &[f32], r: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let c = w.len();
    assert!(c > 0 && b.len() == c && x.len() == r.len() && x.len() == out.len() && x.len().is_multiple_of(c));
    #[cfg(target_arch = "x86_64")]
    if c.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked; rows of `c`, a multiple of 16, checked above.
        return unsafe { add_layer_norm_avx512(x, r, w, b, eps, out) };
    }
    add_layer_norm_ref(x, r, w, b, eps, out)
}

/// [`add_layer_norm`] one element at a time: the spec.
pub fn add_layer_norm_ref(x: &[f32], r: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let c = w.len();
    let mut s = vec![0f32; c];
    for ((xr, rr), o) in x.chunks_exact(c).zip(r.chunks_exact(c)).zip(out.chunks_exact_mut(c)) {
        for ((s, a), b) in s.iter_mut().zip(xr).zip(rr) {
            *s = a + b;
        }
        let mean = s.iter().sum::<f32>() / c as f32;
        let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, s), w), b) in o.iter_mut().zip(&s).zip(w).zip(b) {
            o.write((s - mean) * rstd * w + b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_layer_norm_avx512(x: &[f32], r: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let c = w.len();
    let inv_c = 1.0 / c as f32;
    for row in 0..x.len() / c {
        // Raw stores first, then loads of what was stored: `out` may start uninitialised.
        let (xp, rp) = (x.as_ptr().add(row * c), r.as_ptr().add(row * c));
        let op = (out.as_mut_ptr() as *mut f32).add(row * c);
        let mut sv = _mm512_setzero_ps();
        for i in (0..c).step_by(16) {
            let s = _mm512_add_ps(_mm512_loadu_ps(xp.add(i)), _mm512_loadu_ps(rp.add(i)));
            _mm512_storeu_ps(op.add(i), s);
            sv = _mm512_add_ps(sv, s);
        }
        let mean = _mm512_set1_ps(_mm512_reduce_add_ps(sv) * inv_c);
        let mut vv = _mm512_setzero_ps();
        for i in (0..c).step_by(16) {
            let d = _mm512_sub_ps(_mm512_loadu_ps(op.add(i)), mean);
            vv = _mm512_fmadd_ps(d, d, vv);
        }
        let rstd = _mm512_set1_ps(1.0 / (_mm512_reduce_add_ps(vv) * inv_c + eps).sqrt());
        for i in (0..c).step_by(16) {
            let d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(op.add(i)), mean), rstd);
            let y = _mm512_fmadd_ps(d, _mm512_loadu_ps(w.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)));
            _mm512_storeu_ps(op.add(i), y);
        }
    }
}

/// The reference: libm's `erf`, in f64.
pub fn gelu_erf_ref(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        let v = *x as f64;
        *x = (0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2))) as f32;
    }
}

/// erf in f64 to ~1e-15 (W. J. Cody's rational approximations are overkill here: a series for small |x|
/// and a continued fraction for large |x| suffice for a reference).
fn libm_erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series: erf(x) = 2/√π Σ (-1)ⁿ x^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, mut n) = (ax, ax, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -ax * ax / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), converges fast for x ≥ 2.5.
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    r.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_EXP_REL_ERR: f32 = 3e-7;
    const MAX_GELU_ABS_ERR: f32 = 5e-7;

    #[test]
    fn exp_matches_std() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, b) = (exp_fast(x), x.exp());
            assert!((a - b).abs() <= MAX_EXP_REL_ERR * b, "exp({x}) = {a} vs {b}");
            x += 0.0173;
        }
        assert_eq!(exp_fast(-200.0), 0.0f32.max(exp_fast(-200.0)));
    }

    #[test]
    fn gelu_simd_matches_scalar() {
        let xs: Vec<f32> = (-4000..4011).map(|i| i as f32 * 0.0031).collect();
        let (mut a, mut b) = (xs.clone(), xs.clone());
        gelu_erf(&mut a);
        gelu_erf_scalar(&mut b);
        for ((x, a), b) in xs.iter().zip(&a).zip(&b) {
            assert!((a - b).abs() <= 1e-6 * x.abs().max(1.0), "gelu({x}) = {a} vs {b}");
        }
    }

    #[test]
    fn silu_mul_and_causal_softmax_match_scalar_and_std() {
        let g: Vec<f32> = (-1500..1511).map(|i| i as f32 * 0.011).collect();
        let u: Vec<f32> = g.iter().map(|x| 0.5 - x * 0.3).collect();
        let (mut a, mut b) = (g.clone(), g.clone());
        silu_mul(&mut a, &u);
        silu_mul_scalar(&mut b, &u);
        for (((x, y), a), b) in g.iter().zip(&u).zip(&a).zip(&b) {
            let want = (*x as f64) * (*y as f64) / (1.0 + (-*x as f64).exp());
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "silu_mul({x}) = {a} vs {b}");
            assert!((*a as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "silu_mul({x}) = {a} vs {want}");
        }
        for (len, last) in [(37, 0), (37, 15), (37, 16), (37, 36), (64, 47), (5, 4)] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 97) as f32 * 0.3 - 12.0).collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            causal_softmax_row(&mut a, last, 0.125);
            causal_softmax_row_scalar(&mut b, last, 0.125);
            let mx = row[..=last].iter().fold(f64::MIN, |m, &v| m.max(v as f64 * 0.125));
            let z: f64 = row[..=last].iter().map(|&v| (v as f64 * 0.125 - mx).exp()).sum();
            for j in 0..len {
                let want = if j <= last { (row[j] as f64 * 0.125 - mx).exp() / z } else { 0.0 };
                assert!((a[j] as f64 - want).abs() < 1e-6 && (b[j] as f64 - want).abs() < 1e-6, "{len} {last} {j}");
            }
        }
    }

    /// LayerNorm of a residual sum against f64, for row widths with and without a SIMD path.
    #[test]
    fn add_layer_norm_matches_f64() {
        const MAX_LN_ABS_ERR: f64 = 2e-5;
        for (rows, c) in [(3, 16), (5, 384), (4, 7), (2, 40), (1, 1)] {
            let gen = |s: usize| -> Vec<f32> {
                (0..rows * c).map(|i| ((i * 7919 + s * 104729) % 1009) as f32 / 100.0 - 5.0).collect()
            };
            let (x, r) = (gen(1), gen(2));
            let w: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..c).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
            let (mut fast, mut spec) = (vec![f32::NAN; rows * c], vec![f32::NAN; rows * c]);
            add_layer_norm(&x, &r, &w, &b, 1e-12, crate::as_uninit(&mut fast));
            add_layer_norm_ref(&x, &r, &w, &b, 1e-12, crate::as_uninit(&mut spec));
            for row in 0..rows {
                let s: Vec<f64> = (0..c).map(|i| x[row * c + i] as f64 + r[row * c + i] as f64).collect();
                let mean = s.iter().sum::<f64>() / c as f64;
                let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
                for i in 0..c {
                    let want = (s[i] - mean) / (var + 1e-12).sqrt() * w[i] as f64 + b[i] as f64;
                    for (what, got) in [("simd", fast[row * c + i]), ("ref", spec[row * c + i])] {
                        assert!(
                            (got as f64 - want).abs() <= MAX_LN_ABS_ERR * want.abs().max(1.0),
                            "{what} {rows}x{c} [{row}, {i}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gelu_matches_reference() {
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.005).collect();
        let (mut a, mut b) = (xs.clone(), xs.clone());
        gelu_erf(&mut a);
        gelu_erf_ref(&mut b);
        for ((x, a), b) in xs.iter().zip(&a).zip(&b) {
            assert!((a - b).abs() <= MAX_GELU_ABS_ERR * x.abs().max(1.0), "gelu({x}) = {a} vs {b}");
        }
        assert!((libm_erf(1.0) - 0.842_700_792_949_714_9).abs() < 1e-14);
        assert!((libm_erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-14);
    }
}
