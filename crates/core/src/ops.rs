//! Elementwise ops whittle runs itself rather than through candle (see `whittle_kernels::act`).

use candle_core::Tensor;
use whittle_kernels::int8::Parallel;

use crate::linear::CandlePool;
use crate::Result;

/// Exact-form GELU, `x · ½(1 + erf(x/√2))`, with a vectorizable erf, split over the thread pool.
///
/// # Shapes
/// - any shape, f32; returns the same shape
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let mut v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    const CHUNK: usize = 4096;
    let n = v.len();
    let p = SendPtr(v.as_mut_ptr());
    CandlePool.for_each(n.div_ceil(CHUNK), &|range| {
        #[allow(clippy::redundant_locals)]
        let p = p;
        for c in range {
            let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            // SAFETY: chunk [a, b) of `v` is touched by this task only.
            let s = unsafe { std::slice::from_raw_parts_mut(p.0.add(a), b - a) };
            whittle_kernels::act::gelu_erf(s);
        }
    });
    Ok(Tensor::from_vec(v, x.shape(), x.device())?)
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
    let out = crate::linear::with_f32_slice(q, |qs| {
        crate::linear::with_f32_slice(k, |ks| {
            crate::linear::with_f32_slice(v, |vs| {
                whittle_kernels::filled(b * t * w, |out| {
                    whittle_kernels::attn::encoder_attention(qs, ks, vs, b, t, n_head, dq, d, lens, out, &CandlePool)
                })
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
    fn gelu_matches_candle() {
        let x = (Tensor::arange(-5000f32, 5000., &candle_core::Device::Cpu).unwrap() * 0.001).unwrap();
        let a: Vec<f32> = gelu_erf(&x).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = x.gelu_erf().unwrap().to_vec1().unwrap();
        let d = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d < 1e-6, "{d}");
    }
}
