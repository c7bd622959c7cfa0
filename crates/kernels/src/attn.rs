//! Fused attention for encoders with right-padded batches: for each (batch, head), scores
//! `q_i·k_j / √d` over the `len_b` real keys, softmax, weighted sum of values — read from and written to
//! the (B, T, H·D) layouts the projections produce, so no transposes, no (B, H, T, T) tensor, no mask tensor.
//! Rows of padded queries (i ≥ len_b) are zeroed: padded positions never reach a real token (they are masked
//! as keys) and pooling ignores them.

use std::mem::MaybeUninit;

use crate::act::exp_fast;
use crate::int8::Parallel;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each (b, h) task writes only its own head's columns of its own batch rows.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out (B, T, H·D) = softmax(q kᵀ / √dq, keys < len_b) v`, per batch row b and head h, with queries and
/// keys of `dq` values per head and values of `d` (dq < d: low-rank attention scores in a smaller space).
#[allow(clippy::too_many_arguments)]
pub fn encoder_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    t: usize,
    h: usize,
    dq: usize,
    d: usize,
    lens: &[usize],
    out: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    let (w, wq) = (h * d, h * dq);
    assert!(q.len() == b * t * wq && k.len() == q.len() && v.len() == b * t * w && out.len() == v.len());
    assert_eq!(lens.len(), b);
    let scale = 1.0 / (dq as f32).sqrt();
    let op = SendPtr(out.as_mut_ptr() as *mut f32);
    #[cfg(target_arch = "x86_64")]
    let simd = dq.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    par.for_each(b * h, &|range| {
        #[allow(clippy::redundant_locals)]
        let op = op;
        let mut p = vec![0f32; t];
        let mut acc = vec![0f32; d];
        for task in range {
            let (bi, hi) = (task / h, task % h);
            let g = Geometry { bi, hi, t, w, d, wq, dq, len: lens[bi].min(t), scale };
            // SAFETY: (bi, ·, head hi) is this task's own part of `out`; AVX-512 checked for `simd`.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if simd {
                    head_avx512(q, k, v, &g, &mut p, &mut acc, op.0);
                    continue;
                }
                head(q, k, v, &g, &mut p, &mut acc, op.0, dot_scalar);
            }
        }
    });
}

struct Geometry {
    bi: usize,
    hi: usize,
    t: usize,
    w: usize,
    d: usize,
    /// Width and per-head size of the queries and keys.
    wq: usize,
    dq: usize,
    len: usize,
    scale: f32,
}

#[inline(always)]
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One (batch row, head): every query row of it.
///
/// # Safety
/// `out` must be valid for the (B, T, H·D) layout and this head's part written by no one else.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &Geometry,
    p: &mut [f32],
    acc: &mut [f32],
    out: *mut f32,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let row = |j: usize| -> std::ops::Range<usize> {
        let s = (g.bi * g.t + j) * g.w + g.hi * g.d;
        s..s + g.d
    };
    let qk_row = |j: usize| -> std::ops::Range<usize> {
        let s = (g.bi * g.t + j) * g.wq + g.hi * g.dq;
        s..s + g.dq
    };
    for i in 0..g.t {
        // Raw stores: `out` may be uninitialised memory.
        let o = out.add((g.bi * g.t + i) * g.w + g.hi * g.d);
        if i >= g.len {
            for c in 0..g.d {
                o.add(c).write(0.0);
            }
            continue;
        }
        let qi = &q[qk_row(i)];
        let mut mx = f32::NEG_INFINITY;
        for j in 0..g.len {
            let s = dot(qi, &k[qk_row(j)]) * g.scale;
            p[j] = s;
            mx = mx.max(s);
        }
        let mut z = 0.0;
        for pj in p[..g.len].iter_mut() {
            *pj = exp_fast(*pj - mx);
            z += *pj;
        }
        acc.fill(0.0);
        for (j, &pj) in p[..g.len].iter().enumerate() {
            for (a, &vv) in acc.iter_mut().zip(&v[row(j)]) {
                *a += pj * vv;
            }
        }
        let inv = 1.0 / z;
        for (c, a) in acc.iter().enumerate() {
            o.add(c).write(a * inv);
        }
    }
}

/// [`head`] compiled for AVX-512 with an explicit vector dot product (the query/key size a multiple of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_avx512(q: &[f32], k: &[f32], v: &[f32], g: &Geometry, p: &mut [f32], acc: &mut [f32], out: *mut f32) {
    head(q, k, v, g, p, acc, out, |a: &[f32], b: &[f32]| {
        use std::arch::x86_64::*;
        let mut s = _mm512_setzero_ps();
        for c in (0..a.len()).step_by(16) {
            s = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(c)), _mm512_loadu_ps(b.as_ptr().add(c)), s);
        }
        _mm512_reduce_add_ps(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::Serial;

    const MAX_ATTN_ABS_ERR: f32 = 1e-5;

    #[test]
    fn matches_naive_softmax_attention() {
        check(2, 5, 3, 4, 4); // scalar path
        check(3, 7, 2, 32, 32); // AVX-512 path where available
        check(2, 6, 3, 5, 8); // low-rank scores, scalar
        check(2, 6, 2, 16, 32); // low-rank scores, AVX-512
    }

    #[allow(clippy::needless_range_loop)]
    fn check(b: usize, t: usize, h: usize, dq: usize, d: usize) {
        let n = b * t * h * d;
        let gen = |s: usize, n: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * 31 + s * 17) % 97) as f32 / 97.0 - 0.5) * 2.0).collect()
        };
        let (q, k, v) = (gen(1, b * t * h * dq), gen(2, b * t * h * dq), gen(3, n));
        let lens: Vec<usize> = (0..b).map(|i| t - (i * 2) % t).collect();
        let mut out = vec![f32::NAN; n];
        encoder_attention(&q, &k, &v, b, t, h, dq, d, &lens, crate::as_uninit(&mut out), &Serial);
        let (w, wq) = (h * d, h * dq);
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let at = |x: &[f32], j: usize, c: usize| x[(bi * t + j) * w + hi * d + c];
                    let atq = |x: &[f32], j: usize, c: usize| x[(bi * t + j) * wq + hi * dq + c];
                    let got: Vec<f32> = (0..d).map(|c| out[(bi * t + i) * w + hi * d + c]).collect();
                    if i >= lens[bi] {
                        assert!(got.iter().all(|&x| x == 0.0));
                        continue;
                    }
                    let s: Vec<f64> = (0..lens[bi])
                        .map(|j| {
                            (0..dq).map(|c| (atq(&q, i, c) * atq(&k, j, c)) as f64).sum::<f64>() / (dq as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..lens[bi]).map(|j| e[j] / z * at(&v, j, c) as f64).sum();
                        assert!(
                            (got[c] as f64 - want).abs() < MAX_ATTN_ABS_ERR as f64,
                            "b{bi} h{hi} i{i} c{c}: {} vs {want}",
                            got[c]
                        );
                    }
                }
            }
        }
    }
}
