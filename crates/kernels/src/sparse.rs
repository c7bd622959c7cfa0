//! Sparse f32 GEMM for pruned Linears, `y = x · Wᵀ + b`, with the zeros of `W` not stored.
//!
//! The weights are packed as [`crate::f32`]'s dense kernel packs them — blocks of 16 output channels,
//! `[block][k][16]` — but each 16-channel vector keeps only its non-zeros, with a 16-bit mask saying which
//! lanes they belong to. The AVX-512 tile loads a vector's non-zeros and `vexpandps` puts them back in their
//! lanes (zeros elsewhere) before the same 6-row × 2-block FMA tile as the dense kernel. Any sparsity
//! pattern packs this way (unstructured, 2:4, 4:8); at 50% sparsity it reads 17 bits per weight instead of
//! 32, which is what pays when the product is bound by memory (decoding); the arithmetic is the dense
//! kernel's, so it does not skip work when the product is bound by compute (prefill).

use std::mem::MaybeUninit;

use crate::f32::{drive, MB, MR};
use crate::int8::Parallel;

/// Sparse f32 weights packed for [`gemm`].
#[derive(Debug, Clone)]
pub struct PackedSparse {
    pub m: usize,
    pub k: usize,
    /// Channel blocks, rounded up to an even number (padding blocks have empty masks).
    nblocks: usize,
    /// One lane mask per (block, k).
    masks: Vec<u16>,
    /// Where each block's values start in `values` (`nblocks + 1` entries).
    start: Vec<usize>,
    /// Non-zeros in (block, k, lane) order, with 16 floats of padding at the end for full-width loads.
    values: Vec<f32>,
}

impl PackedSparse {
    /// Packs `w` (m × k, row-major), dropping its zeros.
    pub fn new(w: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(w.len(), m * k);
        let nblocks = m.div_ceil(MB).div_ceil(2) * 2;
        let mut masks = vec![0u16; nblocks * k];
        let mut start = Vec::with_capacity(nblocks + 1);
        let mut values = Vec::with_capacity(w.iter().filter(|v| **v != 0.0).count() + MB);
        for b in 0..nblocks {
            start.push(values.len());
            for kk in 0..k {
                let mut mask = 0u16;
                for c in 0..MB {
                    let ch = b * MB + c;
                    if ch < m && w[ch * k + kk] != 0.0 {
                        mask |= 1 << c;
                        values.push(w[ch * k + kk]);
                    }
                }
                masks[b * k + kk] = mask;
            }
        }
        start.push(values.len());
        values.extend([0.0; MB]);
        Self { m, k, nblocks, masks, start, values }
    }

    /// Non-zero weights.
    pub fn nnz(&self) -> usize {
        self.start[self.nblocks]
    }

    /// Bytes the packed weights occupy in memory.
    pub fn bytes(&self) -> usize {
        self.masks.len() * 2 + self.values.len() * 4
    }

    /// The dense (m × k) weights back.
    pub fn dense(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.m * self.k];
        let mut at = 0;
        for b in 0..self.nblocks {
            for kk in 0..self.k {
                let mask = self.masks[b * self.k + kk];
                for c in 0..MB {
                    if mask & (1 << c) != 0 {
                        w[(b * MB + c) * self.k + kk] = self.values[at];
                        at += 1;
                    }
                }
            }
        }
        w
    }

    /// Whether this CPU runs the packed kernel (AVX-512); otherwise [`gemm`] runs the reference.
    pub fn available() -> bool {
        crate::f32::PackedF32::available()
    }
}

/// The specification: `y[n,m] = Σ_k x[n,k]·w[m,k] + b[m]` over the stored non-zeros.
pub fn gemm_ref(w: &PackedSparse, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    let mut acc = vec![0f32; n * w.m];
    let mut at = 0;
    for b in 0..w.nblocks {
        for kk in 0..w.k {
            let mask = w.masks[b * w.k + kk];
            for c in 0..MB {
                if mask & (1 << c) != 0 {
                    let v = w.values[at];
                    at += 1;
                    for r in 0..n {
                        acc[r * w.m + b * MB + c] += x[r * w.k + kk] * v;
                    }
                }
            }
        }
    }
    for (i, a) in acc.into_iter().enumerate() {
        y[i].write(a + bias.map_or(0.0, |bb| bb[i % w.m]));
    }
}

/// `y (n × m) = x (n × k) · Wᵀ + b` on the sparse packed weights (AVX-512; the reference elsewhere).
/// Writes every element of `y`.
pub fn gemm(
    w: &PackedSparse,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    assert_eq!(x.len(), n * w.k);
    assert_eq!(y.len(), n * w.m);
    if !PackedSparse::available() || n == 0 {
        return gemm_ref(w, x, n, bias, y);
    }
    drive(w.m, w.nblocks, n, bias, y, par, &|r0, r1, b, bias, valid, yp| {
        let (k, m, rows) = (w.k, w.m, r1 - r0);
        let masks = (&w.masks[b * k..(b + 1) * k], &w.masks[(b + 1) * k..(b + 2) * k]);
        let vals = (&w.values[w.start[b]..], &w.values[w.start[b + 1]..]);
        let x = &x[r0 * k..r1 * k];
        // SAFETY: AVX-512 checked by `available`; each block's values are followed by at least 16 floats
        // (the next block's or the padding), so every full-width load stays in `values`; the tiles write
        // rows r0..r1 and the valid channels of blocks b, b+1, which no other task writes.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if rows <= MR {
                tile_avx512(x, rows, k, masks, vals, bias, valid, m, yp)
            } else {
                // Many rows: expand the two blocks once into a dense panel (one per thread, reused: a fresh
                // allocation per task costs page faults) and run the dense tiles on it.
                PANEL.with(|p| {
                    let mut panel = p.borrow_mut();
                    panel.resize(2 * k * MB, 0.0);
                    expand_avx512(k, masks, vals, &mut panel);
                    crate::f32::tiles(x, rows, k, panel.split_at(k * MB), bias, valid, m, yp)
                })
            }
        }
    });
}

thread_local! {
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Expands blocks `(masks.0, vals.0)` and `(masks.1, vals.1)` into `panel` (2 × k × 16, dense layout).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn expand_avx512(k: usize, masks: (&[u16], &[u16]), vals: (&[f32], &[f32]), panel: &mut [f32]) {
    use std::arch::x86_64::*;
    let (mut p0, mut p1) = (vals.0.as_ptr(), vals.1.as_ptr());
    let out = panel.as_mut_ptr();
    for kk in 0..k {
        let (k0, k1) = (masks.0[kk], masks.1[kk]);
        _mm512_storeu_ps(out.add(kk * MB), _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(p0)));
        _mm512_storeu_ps(out.add((k + kk) * MB), _mm512_maskz_expand_ps(k1, _mm512_loadu_ps(p1)));
        p0 = p0.add(k0.count_ones() as usize);
        p1 = p1.add(k1.count_ones() as usize);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512(
    x: &[f32],
    rows: usize,
    k: usize,
    masks: (&[u16], &[u16]),
    vals: (&[f32], &[f32]),
    bias: &[f32],
    valid: (usize, usize),
    m: usize,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm512_setzero_ps(); MR];
    let mut a1 = [_mm512_setzero_ps(); MR];
    let (xp, mut p0, mut p1) = (x.as_ptr(), vals.0.as_ptr(), vals.1.as_ptr());
    for kk in 0..k {
        let (k0, k1) = (masks.0[kk], masks.1[kk]);
        let v0 = _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(p0));
        let v1 = _mm512_maskz_expand_ps(k1, _mm512_loadu_ps(p1));
        p0 = p0.add(k0.count_ones() as usize);
        p1 = p1.add(k1.count_ones() as usize);
        for i in 0..rows {
            let xb = _mm512_set1_ps(*xp.add(i * k + kk));
            a0[i] = _mm512_fmadd_ps(xb, v0, a0[i]);
            a1[i] = _mm512_fmadd_ps(xb, v1, a1[i]);
        }
    }
    crate::f32::store_tile(&a0, &a1, rows, bias, valid, m, y);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::{Rayon, Serial};
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_naive_and_round_trips_on_ragged_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for &(n, m, k, density) in &[
            (1, 1, 1, 1.0),
            (2, 16, 3, 0.5),
            (7, 17, 5, 0.3),
            (13, 33, 64, 0.5),
            (50, 48, 130, 0.1),
            (97, 100, 384, 0.0),
        ] {
            let w: Vec<f32> = (0..m * k)
                .map(|_| if rng.random::<f64>() < density { rng.random::<f32>() - 0.5 } else { 0.0 })
                .collect();
            let x: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
            let p = PackedSparse::new(&w, m, k);
            assert_eq!(p.dense(), w);
            assert_eq!(p.nnz(), w.iter().filter(|v| **v != 0.0).count());
            let mut naive = vec![0f32; n * m];
            for r in 0..n {
                for c in 0..m {
                    naive[r * m + c] = (0..k).map(|kk| x[r * k + kk] * w[c * k + kk]).sum::<f32>() + b[c];
                }
            }
            let mut reference = vec![f32::NAN; n * m];
            gemm_ref(&p, &x, n, Some(&b), crate::as_uninit(&mut reference));
            for par in [&Serial as &dyn Parallel, &Rayon] {
                let mut got = vec![f32::NAN; n * m];
                gemm(&p, &x, n, Some(&b), crate::as_uninit(&mut got), par);
                for ((g, e), r) in got.iter().zip(&naive).zip(&reference) {
                    let tol = 1e-5 * (k as f32).sqrt().max(1.0);
                    assert!((g - e).abs() <= tol && (r - e).abs() <= tol, "n{n} m{m} k{k}: {g} / {r} vs {e}");
                }
            }
        }
    }
}
