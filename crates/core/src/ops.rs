//! Elementwise ops whittle runs itself rather than through candle (see `whittle_kernels::act`).

use candle_core::Tensor;
use whittle_kernels::int8::Parallel;

use crate::backend::cpu::{with_f32_slice, KernelPool};
use crate::Result;

/// Exact-form GELU, `x · ½(1 + erf(x/√2))`, with a vectorizable erf, split over the thread pool.
///
/// # Shapes
/// - any shape, f32; returns the same shape
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let mut v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    par_chunks(&mut v, &|_, s| whittle_kernels::act::gelu_erf(s));
    Ok(Tensor::from_vec(v, x.shape(), x.device())?)
}

/// Runs `f(offset, chunk)` over 4096-element chunks of `v` on the thread pool.
fn par_chunks(v: &mut [f32], f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    const CHUNK: usize = 4096;
    let n = v.len();
    let p = SendPtr(v.as_mut_ptr());
    KernelPool.for_each(n.div_ceil(CHUNK), &|range| {
        #[allow(clippy::redundant_locals)]
        let p = p;
        for c in range {
            let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            // SAFETY: chunk [a, b) of `v` is touched by this task only.
            f(a, unsafe { std::slice::from_raw_parts_mut(p.0.add(a), b - a) });
        }
    });
}

/// Post-LN residual step, fused: `LayerNorm(x + r) · w + b` over the last dimension, rows split over the
/// thread pool (one pass to add, two over the row in cache to normalise; see
/// `whittle_kernels::act::add_layer_norm`).
///
/// # Shapes
/// - `x`, `r`: the same shape (..., C) f32; `w`, `b`: (C,); returns `x`'s shape
pub fn add_layer_norm(x: &Tensor, r: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let c = w.dims1()?;
    if x.dims() != r.dims() || x.dims().last() != Some(&c) || b.dims1()? != c {
        let msg = format!(
            "input {:?}, residual {:?}, weight {:?} and bias {:?} disagree",
            x.dims(),
            r.dims(),
            w.dims(),
            b.dims()
        );
        return Err(crate::Error::Linear { name: "layer norm".into(), msg });
    }
    let n = x.elem_count();
    let rows = n / c.max(1);
    // Rows per task: about 16k values, so each task amortises its start.
    let per = (16384 / c.max(1)).max(1);
    let out = crate::backend::cpu::with_f32_slices(&[x.clone(), r.clone(), w.clone(), b.clone()], |s| {
        let (xs, rs, ws, bs) = (s[0], s[1], s[2], s[3]);
        whittle_kernels::filled(n, |out| {
            let op = SendPtr(out.as_mut_ptr() as *mut f32);
            KernelPool.for_each(rows.div_ceil(per), &|range| {
                #[allow(clippy::redundant_locals)]
                let op = op;
                for t in range {
                    let (a, e) = (t * per * c, ((t + 1) * per).min(rows) * c);
                    // SAFETY: rows [a, e) of `out` are this task's only; the kernel writes every element.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(op.0.add(a) as *mut std::mem::MaybeUninit<f32>, e - a)
                    };
                    whittle_kernels::act::add_layer_norm(&xs[a..e], &rs[a..e], ws, bs, eps as f32, o);
                }
            });
        })
    })?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// Fused encoder attention over right-padded batches (see `whittle_kernels::attn`).
///
/// # Shapes
/// - `q`, `k`: (B, T, H·Dq); `v`: (B, T, H·D) f32 (Dq < D for low-rank attention); `lens`: B real
///   lengths; returns (B, T, H·D), padded rows zero
pub fn encoder_attention(q: &Tensor, k: &Tensor, v: &Tensor, n_head: usize, lens: &[usize]) -> Result<Tensor> {
    let (b, t, wq) = q.dims3()?;
    let w = v.dim(2)?;
    let (dq, d) = (wq / n_head, w / n_head);
    let out = with_f32_slice(q, |qs| {
        with_f32_slice(k, |ks| {
            with_f32_slice(v, |vs| {
                whittle_kernels::filled(b * t * w, |out| {
                    whittle_kernels::attn::encoder_attention(qs, ks, vs, b, t, n_head, dq, d, lens, out, &KernelPool)
                })
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (b, t, w), q.device())?)
}

/// Attention over packed sequences (see `whittle_kernels::attn::varlen_attention`): sequence s is rows
/// `cu_seqlens[s]..cu_seqlens[s + 1]` and attends to itself only.
///
/// # Shapes
/// - `q`, `k`: (..., N, H·Dq); `v`: (..., N, H·D) f32 whose leading dimensions are 1; `cu_seqlens`: S + 1
///   offsets from 0 to N; returns `v`'s shape
pub fn varlen_attention(q: &Tensor, k: &Tensor, v: &Tensor, n_head: usize, cu_seqlens: &[usize]) -> Result<Tensor> {
    let wq = *q.dims().last().unwrap_or(&0);
    let w = *v.dims().last().unwrap_or(&0);
    let n = v.elem_count() / w.max(1);
    let bad = |msg: String| crate::Error::Linear { name: "varlen attention".into(), msg };
    if n_head == 0 || !wq.is_multiple_of(n_head) || !w.is_multiple_of(n_head) {
        return Err(bad(format!("{n_head} heads do not divide widths {wq} and {w}")));
    }
    if q.dims() != k.dims() || q.elem_count() != n * wq {
        return Err(bad(format!("q {:?}, k {:?} and v {:?} disagree", q.dims(), k.dims(), v.dims())));
    }
    if cu_seqlens.first() != Some(&0) || cu_seqlens.last() != Some(&n) || cu_seqlens.windows(2).any(|p| p[0] > p[1]) {
        return Err(bad(format!("offsets {cu_seqlens:?} do not run from 0 to {n} rows without decreasing")));
    }
    let (dq, d) = (wq / n_head, w / n_head);
    let out = with_f32_slice(q, |qs| {
        with_f32_slice(k, |ks| {
            with_f32_slice(v, |vs| {
                whittle_kernels::filled(n * w, |out| {
                    whittle_kernels::attn::varlen_attention(qs, ks, vs, cu_seqlens, n_head, dq, d, out, &KernelPool)
                })
            })
        })
    })???;
    Ok(Tensor::from_vec(out, v.shape(), v.device())?)
}

/// SwiGLU's `silu(g) · u` (LLaMA's MLP), fused, split over the thread pool.
///
/// # Shapes
/// - `g`, `u`: the same shape, f32; returns that shape
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let mut v: Vec<f32> = g.flatten_all()?.to_vec1()?;
    with_f32_slice(u, |us| {
        assert_eq!(us.len(), v.len(), "silu_mul: gate and up differ in size");
        par_chunks(&mut v, &|a, s| whittle_kernels::act::silu_mul(s, &us[a..a + s.len()]));
    })?;
    Ok(Tensor::from_vec(v, g.shape(), g.device())?)
}

/// Query rows per task of [`causal_attention`]: a block of queries needs the keys up to its last row only.
const QUERY_BLOCK: usize = 128;

/// Causal self-attention with grouped-query heads (head h reads kv head h / (H / KV)): per (batch row,
/// head, block of 128 queries), scores against the keys up to the block's last query by faer's GEMM, causal
/// softmax in place, times the values, written straight into the (B, T, H·D) layout the output projection
/// reads. Query i sits at position `S − T + i` (after S − T cached keys) and sees keys 0..=S − T + i.
///
/// # Shapes
/// - `q`: (B, H, T, D); `k`, `v`: (B, KV, S, D) f32; returns (B, T, H·D)
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kvh, s, _) = k.dims4()?;
    let (rep, off, w) = (h / kvh, s - t, h * d);
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = t.div_ceil(QUERY_BLOCK);
    let mut out = vec![0f32; b * t * w];
    let op = SendPtr(out.as_mut_ptr());
    with_f32_slice(q, |qs| {
        with_f32_slice(k, |ks| {
            with_f32_slice(v, |vs| {
                KernelPool.for_each(b * h * blocks, &|range| {
                    #[allow(clippy::redundant_locals)]
                    let op = op;
                    let mut p = Vec::new();
                    for task in range {
                        let (bh, qb) = (task / blocks, task % blocks);
                        let (bi, hi) = (bh / h, bh % h);
                        let kv = bi * kvh + hi / rep;
                        let (r0, rows) = (qb * QUERY_BLOCK, QUERY_BLOCK.min(t - qb * QUERY_BLOCK));
                        let keys = (off + r0 + rows).min(s);
                        let qm = faer::MatRef::from_row_major_slice(&qs[(bh * t + r0) * d..][..rows * d], rows, d);
                        let km = faer::MatRef::from_row_major_slice(&ks[kv * s * d..][..keys * d], keys, d);
                        let vm = faer::MatRef::from_row_major_slice(&vs[kv * s * d..][..keys * d], keys, d);
                        p.resize(rows * keys, 0.0);
                        let mut pm = faer::MatMut::from_row_major_slice_mut(&mut p, rows, keys);
                        faer::linalg::matmul::matmul(
                            pm.as_mut(),
                            faer::Accum::Replace,
                            qm,
                            km.transpose(),
                            1.0f32,
                            faer::Par::Seq,
                        );
                        for (r, row) in p.chunks_exact_mut(keys).enumerate() {
                            whittle_kernels::act::causal_softmax_row(row, off + r0 + r, scale);
                        }
                        let pm = faer::MatRef::from_row_major_slice(&p, rows, keys);
                        // SAFETY: rows r0..r0 + rows of batch row bi, head hi's D columns: this task's alone;
                        // the view stays inside `out` (row stride H·D).
                        let om = unsafe {
                            faer::MatMut::from_raw_parts_mut(
                                op.0.add((bi * t + r0) * w + hi * d),
                                rows,
                                d,
                                w as isize,
                                1,
                            )
                        };
                        faer::linalg::matmul::matmul(om, faer::Accum::Replace, pm, vm, 1.0f32, faer::Par::Seq);
                    }
                });
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (b, t, w), q.device())?)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint chunks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_attention_matches_masked_softmax() {
        use candle_core::Device;
        let dev = &Device::Cpu;
        // 2 batch rows, 4 heads over 2 kv heads, 130 queries after 3 cached keys (two query blocks).
        let (b, h, kvh, t, s, d) = (2, 4, 2, 130, 133, 16);
        let r = |n: &[usize], seed: u32| {
            let len: usize = n.iter().product();
            let v: Vec<f32> =
                (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect();
            Tensor::from_vec(v, n, dev).unwrap()
        };
        let (q, k, v) = (r(&[b, h, t, d], 1), r(&[b, kvh, s, d], 2), r(&[b, kvh, s, d], 3));
        let got = causal_attention(&q, &k, &v).unwrap();
        let rep =
            |x: &Tensor| x.unsqueeze(2).unwrap().expand((b, kvh, 2, s, d)).unwrap().reshape((b, h, s, d)).unwrap();
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..s).map(move |j| if j <= s - t + i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, s), dev).unwrap();
        let sc = (q.matmul(&rep(&k).t().unwrap()).unwrap() * 0.25).unwrap().broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&sc).unwrap();
        let want = p.matmul(&rep(&v)).unwrap().transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn add_layer_norm_matches_candle() {
        let dev = &candle_core::Device::Cpu;
        for (rows, c) in [(37, 384), (3, 20)] {
            let x = (Tensor::arange(0f32, (rows * c) as f32, dev).unwrap().reshape((rows, c)).unwrap() * 0.37)
                .unwrap()
                .sin()
                .unwrap();
            let r = (x.clone() * 1.7).unwrap().cos().unwrap();
            let w = (Tensor::arange(0f32, c as f32, dev).unwrap() * 0.01).unwrap();
            let b = (Tensor::arange(0f32, c as f32, dev).unwrap() * -0.02).unwrap();
            let got = add_layer_norm(&x, &r, &w, &b, 1e-12).unwrap();
            let want = candle_nn::ops::layer_norm(&(&x + &r).unwrap(), &w, &b, 1e-12).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{rows}x{c}: {diff}");
        }
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, dev).unwrap();
        let w = Tensor::ones(3, candle_core::DType::F32, dev).unwrap();
        assert!(add_layer_norm(&x, &x, &w, &w, 1e-12).is_err());
    }

    #[test]
    fn gelu_matches_candle() {
        let x = (Tensor::arange(-5000f32, 5000., &candle_core::Device::Cpu).unwrap() * 0.001).unwrap();
        let a: Vec<f32> = gelu_erf(&x).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = x.gelu_erf().unwrap().to_vec1().unwrap();
        let d = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d < 1e-6, "{d}");
    }
}
