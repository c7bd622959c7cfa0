//! Elementwise activations with vectorizable approximations of the transcendental functions (libm's
//! scalar `erff`/`expf` calls were a fifth of BERT's run time).

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
    for x in xs.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf_fast(*x * std::f32::consts::FRAC_1_SQRT_2));
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
