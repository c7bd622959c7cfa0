//! Fused attention for encoders with right-padded batches: for each (batch, head), scores
//! `q_i·k_j / √d` over the `len_b` real keys, softmax, weighted sum of values — read from and written to
//! the (B, T, H·D) layouts the projections produce, so no transposes, no (B, H, T, T) tensor, no mask tensor.
//! Rows of padded queries (i ≥ len_b) are zeroed: padded positions never reach a real token (they are masked
//! as keys) and pooling ignores them. [`varlen_attention`] runs the same per-sequence kernel on packed
//! sequences (no padding rows at all, offsets given as cumulative lengths).

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
    assert!(q.len() == b * t * h * dq && k.len() == q.len() && v.len() == b * t * h * d && out.len() == v.len());
    assert_eq!(lens.len(), b);
    run(q, k, v, b, h, dq, d, &|bi| Segment { row0: bi * t, rows: t, len: lens[bi].min(t) }, out, par)
}

/// Variable-length attention over packed sequences, as variable-length attention kernels take them
/// (FlashAttention's `cu_seqlens`): sequence s is rows `cu_seqlens[s]..cu_seqlens[s + 1]` of the (N, H·D)
/// layouts, and its queries attend to its own keys only. No row is padding, so none is zeroed; per
/// sequence the arithmetic is [`encoder_attention`]'s on a batch padded to the longest, bit for bit.
///
/// # Shapes
/// - `q`, `k`: (N, H·Dq); `v`, `out`: (N, H·D), N = `cu_seqlens[last]`; `cu_seqlens`: S + 1 offsets,
///   non-decreasing from 0
#[allow(clippy::too_many_arguments)]
pub fn varlen_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    h: usize,
    dq: usize,
    d: usize,
    out: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    assert!(!cu_seqlens.is_empty() && cu_seqlens[0] == 0, "cu_seqlens must start at 0");
    assert!(cu_seqlens.windows(2).all(|w| w[0] <= w[1]), "cu_seqlens must not decrease");
    let n = *cu_seqlens.last().expect("checked non-empty");
    assert!(q.len() == n * h * dq && k.len() == q.len() && v.len() == n * h * d && out.len() == v.len());
    let seg = |s: usize| {
        let len = cu_seqlens[s + 1] - cu_seqlens[s];
        Segment { row0: cu_seqlens[s], rows: len, len }
    };
    run(q, k, v, cu_seqlens.len() - 1, h, dq, d, &seg, out, par)
}

/// Where one sequence's rows are: `rows` rows from `row0`, the first `len` real (the rest are zeroed).
struct Segment {
    row0: usize,
    rows: usize,
    len: usize,
}

/// Every (sequence, head) of `n_seq` sequences placed by `seg`, on the thread pool.
#[allow(clippy::too_many_arguments)]
fn run(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_seq: usize,
    h: usize,
    dq: usize,
    d: usize,
    seg: &(dyn Fn(usize) -> Segment + Sync),
    out: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    let (w, wq) = (h * d, h * dq);
    let scale = 1.0 / (dq as f32).sqrt();
    let longest = (0..n_seq).map(|s| seg(s).len).max().unwrap_or(0);
    let op = SendPtr(out.as_mut_ptr() as *mut f32);
    #[cfg(target_arch = "x86_64")]
    let simd = d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    par.for_each(n_seq * h, &|range| {
        #[allow(clippy::redundant_locals)]
        let op = op;
        // Scores of one query (and, for AVX-512, the keys transposed), padded to whole vectors.
        let lp = longest.div_ceil(16) * 16;
        let mut p = vec![0f32; lp];
        let mut acc = vec![0f32; if simd { dq * lp } else { d }];
        for task in range {
            let (si, hi) = (task / h, task % h);
            let Segment { row0, rows, len } = seg(si);
            let g = Geometry { row0, rows, hi, w, d, wq, dq, len, scale };
            // SAFETY: rows row0..row0 + rows, head hi's columns are this task's own part of `out` (sequences
            // do not overlap); AVX-512 checked for `simd`.
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
    /// The sequence's first row and its rows in the layout (`len` real ones, then padding).
    row0: usize,
    rows: usize,
    hi: usize,
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

/// One (sequence, head): every query row of it. The scalar reference; [`head_avx512`] is its fast twin.
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
        let s = (g.row0 + j) * g.w + g.hi * g.d;
        s..s + g.d
    };
    let qk_row = |j: usize| -> std::ops::Range<usize> {
        let s = (g.row0 + j) * g.wq + g.hi * g.dq;
        s..s + g.dq
    };
    for i in 0..g.rows {
        // Raw stores: `out` may be uninitialised memory.
        let o = out.add((g.row0 + i) * g.w + g.hi * g.d);
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

/// [`head`] for AVX-512 (the value size a multiple of 16): the head's keys are transposed once, scaled,
/// into `kt` (Dq, L16), so a query's scores against 16 keys are Dq broadcast FMAs with no horizontal sums;
/// the softmax runs 16 scores at a time ([`crate::act::exp512`]), and the weighted sum of values stays in
/// registers, 16 value columns at a time.
///
/// # Safety
/// As [`head`]; AVX-512F available; `p` holds `len` rounded up to 16 and `kt` Dq times that.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_avx512(q: &[f32], k: &[f32], v: &[f32], g: &Geometry, p: &mut [f32], kt: &mut [f32], out: *mut f32) {
    use std::arch::x86_64::*;
    let (len, dq, d) = (g.len, g.dq, g.d);
    let lp = len.div_ceil(16) * 16;
    debug_assert!(p.len() >= lp && kt.len() >= dq * lp && d.is_multiple_of(16));
    // Kᵀ · scale, columns past `len` zero (their scores are masked below).
    for j in 0..lp {
        if j < len {
            let kr = &k[(g.row0 + j) * g.wq + g.hi * g.dq..][..dq];
            for (c, &x) in kr.iter().enumerate() {
                *kt.get_unchecked_mut(c * lp + j) = x * g.scale;
            }
        } else {
            for c in 0..dq {
                *kt.get_unchecked_mut(c * lp + j) = 0.0;
            }
        }
    }
    let (kp, pp) = (kt.as_ptr(), p.as_mut_ptr());
    let tail: __mmask16 = if len % 16 == 0 { 0xffff } else { ((1u32 << (len % 16)) - 1) as __mmask16 };
    for i in 0..g.rows {
        let o = out.add((g.row0 + i) * g.w + g.hi * g.d);
        if i >= len {
            for c in (0..d).step_by(16) {
                _mm512_storeu_ps(o.add(c), _mm512_setzero_ps());
            }
            continue;
        }
        let qi = q.as_ptr().add((g.row0 + i) * g.wq + g.hi * g.dq);
        // Scores, 16 keys at a time, over four partial sums (the FMA latency).
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for jb in (0..lp).step_by(16) {
            let mut s = [_mm512_setzero_ps(); 4];
            let mut c = 0;
            while c + 4 <= dq {
                for (u, su) in s.iter_mut().enumerate() {
                    let kv = _mm512_loadu_ps(kp.add((c + u) * lp + jb));
                    *su = _mm512_fmadd_ps(_mm512_set1_ps(*qi.add(c + u)), kv, *su);
                }
                c += 4;
            }
            while c < dq {
                s[0] = _mm512_fmadd_ps(_mm512_set1_ps(*qi.add(c)), _mm512_loadu_ps(kp.add(c * lp + jb)), s[0]);
                c += 1;
            }
            let sv = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
            _mm512_storeu_ps(pp.add(jb), sv);
            let m = if jb + 16 >= lp { tail } else { 0xffff };
            mx = _mm512_mask_max_ps(mx, m, mx, sv);
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut zv = _mm512_setzero_ps();
        for jb in (0..lp).step_by(16) {
            let m = if jb + 16 >= lp { tail } else { 0xffff };
            let e = _mm512_maskz_mov_ps(m, crate::act::exp512(_mm512_sub_ps(_mm512_loadu_ps(pp.add(jb)), mx)));
            _mm512_storeu_ps(pp.add(jb), e);
            zv = _mm512_add_ps(zv, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(zv));
        // Σ_j p_j v_j, 16 columns at a time, two partial sums.
        for c in (0..d).step_by(16) {
            let vb = v.as_ptr().add(g.row0 * g.w + g.hi * g.d + c);
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut j = 0;
            while j + 2 <= len {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(j)), _mm512_loadu_ps(vb.add(j * g.w)), a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(j + 1)), _mm512_loadu_ps(vb.add((j + 1) * g.w)), a1);
                j += 2;
            }
            if j < len {
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(j)), _mm512_loadu_ps(vb.add(j * g.w)), a0);
            }
            _mm512_storeu_ps(o.add(c), _mm512_mul_ps(_mm512_add_ps(a0, a1), inv));
        }
    }
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

    /// One sequence's attention in f64, `rows` rows from `row0` of the (·, H·Dq) / (·, H·D) layouts: the spec.
    #[allow(clippy::too_many_arguments)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], row0: usize, len: usize, h: usize, dq: usize, d: usize) -> Vec<f64> {
        let (w, wq) = (h * d, h * dq);
        let mut out = vec![0f64; len * w];
        for hi in 0..h {
            for i in 0..len {
                let qi = |c: usize| q[(row0 + i) * wq + hi * dq + c] as f64;
                let s: Vec<f64> = (0..len)
                    .map(|j| (0..dq).map(|c| qi(c) * k[(row0 + j) * wq + hi * dq + c] as f64).sum::<f64>())
                    .map(|x| x / (dq as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[i * w + hi * d + c] =
                        (0..len).map(|j| e[j] / z * v[(row0 + j) * w + hi * d + c] as f64).sum::<f64>();
                }
            }
        }
        out
    }

    /// Packed sequences of ragged lengths (1, multiples of 16 and odd tails, an empty one) against the f64
    /// spec, and bit for bit against the padded kernel on the same sequences padded to the longest.
    #[test]
    fn varlen_matches_spec_and_padded_kernel() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(20);
        for &(h, dq, d) in &[(3, 4, 4), (2, 32, 32), (2, 16, 32), (3, 5, 8), (2, 5, 16), (1, 12, 48)] {
            for case in 0..6 {
                let n_seq = 1 + case % 5;
                let lens: Vec<usize> = (0..n_seq)
                    .map(|s| match (case + s) % 4 {
                        0 => 1,
                        1 => rng.random_range(2..40),
                        2 => 16 + rng.random_range(0..2) * 17,
                        _ => {
                            if s == 0 {
                                0
                            } else {
                                rng.random_range(1..9)
                            }
                        }
                    })
                    .collect();
                let mut cu = vec![0usize];
                lens.iter().for_each(|l| cu.push(cu.last().unwrap() + l));
                let n = *cu.last().unwrap();
                let mut gen = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect() };
                let (q, k, v) = (gen(n * h * dq), gen(n * h * dq), gen(n * h * d));
                let w = h * d;
                let mut out = vec![f32::NAN; n * w];
                varlen_attention(&q, &k, &v, &cu, h, dq, d, crate::as_uninit(&mut out), &Serial);
                // The same sequences right-padded to the longest (padding garbage that must not leak).
                let t = lens.iter().copied().max().unwrap_or(0).max(1);
                let pad = |x: &[f32], wd: usize| -> Vec<f32> {
                    let mut p = vec![7.5f32; n_seq * t * wd];
                    for s in 0..n_seq {
                        p[s * t * wd..][..lens[s] * wd].copy_from_slice(&x[cu[s] * wd..cu[s + 1] * wd]);
                    }
                    p
                };
                let (qp, kp, vp) = (pad(&q, h * dq), pad(&k, h * dq), pad(&v, w));
                let mut outp = vec![f32::NAN; n_seq * t * w];
                encoder_attention(&qp, &kp, &vp, n_seq, t, h, dq, d, &lens, crate::as_uninit(&mut outp), &Serial);
                for s in 0..n_seq {
                    let got = &out[cu[s] * w..cu[s + 1] * w];
                    assert_eq!(got, &outp[s * t * w..][..lens[s] * w], "h{h} dq{dq} d{d} lens {lens:?} seq {s}");
                    for (c, (g, want)) in got.iter().zip(naive(&q, &k, &v, cu[s], lens[s], h, dq, d)).enumerate() {
                        assert!(
                            (*g as f64 - want).abs() < MAX_ATTN_ABS_ERR as f64,
                            "h{h} dq{dq} d{d} lens {lens:?} seq {s} [{c}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "cu_seqlens must not decrease")]
    fn varlen_rejects_decreasing_offsets() {
        let x = vec![0f32; 4];
        let mut out = vec![0f32; 4];
        varlen_attention(&x, &x, &x, &[0, 3, 2], 1, 2, 2, crate::as_uninit(&mut out), &Serial);
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
