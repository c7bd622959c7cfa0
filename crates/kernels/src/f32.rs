//! f32 GEMM for dense Linears, `y = x · Wᵀ + b`, with weights packed once in blocks of 16 output channels
//! (`[block][k][16]`), so the AVX-512 micro-tile (6 rows × 2 blocks = 12 accumulators) streams one 64-byte
//! weight vector per block per k and broadcasts each activation once for 32 FMAs' worth of channels.
//! Small batches (batch-1 latency, decoding) are where this beats a general GEMM; the result equals the
//! reference up to f32 summation order.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::int8::Parallel;

pub(crate) const MB: usize = 16;
pub(crate) const MR: usize = 6;
const ROWS_PER_TASK: usize = 48;

/// Dense f32 weights packed for [`gemm`].
#[derive(Debug, Clone)]
pub struct PackedF32 {
    pub m: usize,
    pub k: usize,
    /// Channel blocks, rounded up to an even number (the padding is zeros and never stored to y).
    nblocks: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    /// Packs `w` (m × k, row-major).
    pub fn new(w: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(w.len(), m * k);
        let nblocks = m.div_ceil(MB).div_ceil(2) * 2;
        let mut data = vec![0f32; nblocks * k * MB];
        for ch in 0..m {
            let (b, c) = (ch / MB, ch % MB);
            for kk in 0..k {
                data[(b * k + kk) * MB + c] = w[ch * k + kk];
            }
        }
        Self { m, k, nblocks, data }
    }

    fn block(&self, b: usize) -> &[f32] {
        &self.data[b * self.k * MB..(b + 1) * self.k * MB]
    }

    /// Whether this CPU runs the packed kernel (AVX-512); otherwise callers use a general GEMM.
    pub fn available() -> bool {
        crate::Isa::detect() == crate::Isa::Avx512Vnni
    }
}

/// The specification: `y[n,m] = Σ_k x[n,k]·w[m,k] + b[m]`, from the packed layout.
pub fn gemm_ref(w: &PackedF32, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    for r in 0..n {
        for ch in 0..w.m {
            let (b, c) = (ch / MB, ch % MB);
            let mut acc = 0f32;
            for kk in 0..w.k {
                acc += x[r * w.k + kk] * w.data[(b * w.k + kk) * MB + c];
            }
            y[r * w.m + ch].write(acc + bias.map_or(0.0, |bb| bb[ch]));
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks of `gemm` write disjoint (row range × block pair) rectangles of `y`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y (n × m) = x (n × k) · Wᵀ + b` on the packed weights (AVX-512; the reference elsewhere). Writes every
/// element of `y`.
pub fn gemm(w: &PackedF32, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>], par: &dyn Parallel) {
    assert_eq!(x.len(), n * w.k);
    assert_eq!(y.len(), n * w.m);
    if !PackedF32::available() || n == 0 {
        return gemm_ref(w, x, n, bias, y);
    }
    drive(w.m, w.nblocks, n, bias, y, par, &|r0, r1, b, bias, valid, yp| {
        // SAFETY: AVX-512 checked by `available`; x holds n × k floats, each block k × 16; the tiles write
        // rows r0..r1 and the valid channels of blocks b, b+1, which no other task writes.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tiles(&x[r0 * w.k..r1 * w.k], r1 - r0, w.k, (w.block(b), w.block(b + 1)), bias, valid, w.m, yp)
        }
    });
}

/// Rows `0..rows` of `x` against two packed blocks, 6 rows at a time; `y` points at row 0, block 0.
///
/// # Safety
/// AVX-512F must be available; `w` holds k × 16 floats per block, `bias` 32, and `y` must be valid for
/// the rows × valid channels written (row stride `m`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tiles(
    x: &[f32],
    rows: usize,
    k: usize,
    w: (&[f32], &[f32]),
    bias: &[f32],
    valid: (usize, usize),
    m: usize,
    y: *mut f32,
) {
    let mut r = 0;
    while r < rows {
        let t = (rows - r).min(MR);
        tile_avx512(&x[r * k..(r + t) * k], t, k, w.0, w.1, bias, valid, m, y.add(r * m));
        r += t;
    }
}

/// One task: rows `r0..r1` of x against channel blocks `b, b+1`; `bias` starts at block `b`, `valid` counts
/// the real channels of each block, `y` points at `y[r0, b·16]`.
pub(crate) type Task<'a> = dyn Fn(usize, usize, usize, &[f32], (usize, usize), *mut f32) + Sync + 'a;

/// The task split every packed-by-16-channels kernel shares: (48-row slab × block pair) tasks.
pub(crate) fn drive(
    m: usize,
    nblocks: usize,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
    task: &Task,
) {
    let mp = nblocks * MB;
    let mut bvec = bias.map_or_else(|| vec![0.0; m], |b| b.to_vec());
    bvec.resize(mp, 0.0);
    let pairs = nblocks / 2;
    let row_tasks = n.div_ceil(ROWS_PER_TASK);
    let yp = SendPtr(y.as_mut_ptr() as *mut f32);
    let run = |t: usize| {
        #[allow(clippy::redundant_locals)]
        let yp = yp;
        let (rt, pair) = (t / pairs, t % pairs);
        let b = 2 * pair;
        let valid0 = m.saturating_sub(b * MB).min(MB);
        let valid1 = m.saturating_sub((b + 1) * MB).min(MB);
        let (r0, r1) = (rt * ROWS_PER_TASK, ((rt + 1) * ROWS_PER_TASK).min(n));
        // SAFETY (pointer): r0 < n and b·16 < m, so the offset stays inside y's n × m elements.
        task(r0, r1, b, &bvec[b * MB..], (valid0, valid1), unsafe { yp.0.add(r0 * m + b * MB) });
    };
    par.for_each(row_tasks * pairs, &|range: Range<usize>| range.for_each(run));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512(
    x: &[f32],
    rows: usize,
    k: usize,
    w0: &[f32],
    w1: &[f32],
    bias: &[f32],
    valid: (usize, usize),
    m: usize,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm512_setzero_ps(); MR];
    let mut a1 = [_mm512_setzero_ps(); MR];
    let (xp, p0, p1) = (x.as_ptr(), w0.as_ptr(), w1.as_ptr());
    for kk in 0..k {
        let v0 = _mm512_loadu_ps(p0.add(kk * MB));
        let v1 = _mm512_loadu_ps(p1.add(kk * MB));
        for i in 0..rows {
            let xb = _mm512_set1_ps(*xp.add(i * k + kk));
            a0[i] = _mm512_fmadd_ps(xb, v0, a0[i]);
            a1[i] = _mm512_fmadd_ps(xb, v1, a1[i]);
        }
    }
    store_tile(&a0, &a1, rows, bias, valid, m, y);
}

/// Adds the bias to the tile's accumulators and stores the valid channels of rows `0..rows`.
///
/// # Safety
/// AVX-512F must be available; `bias` holds 32 floats; `y` must be valid for rows × valid channels
/// (row stride `m`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_tile(
    a0: &[std::arch::x86_64::__m512; MR],
    a1: &[std::arch::x86_64::__m512; MR],
    rows: usize,
    bias: &[f32],
    valid: (usize, usize),
    m: usize,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let mask = |v: usize| -> __mmask16 {
        if v >= MB {
            0xffff
        } else {
            ((1u32 << v) - 1) as u16
        }
    };
    let (m0, m1) = (mask(valid.0), mask(valid.1));
    let (b0, b1) = (_mm512_loadu_ps(bias.as_ptr()), _mm512_loadu_ps(bias.as_ptr().add(MB)));
    for i in 0..rows {
        _mm512_mask_storeu_ps(y.add(i * m), m0, _mm512_add_ps(a0[i], b0));
        if m1 != 0 {
            _mm512_mask_storeu_ps(y.add(i * m + MB), m1, _mm512_add_ps(a1[i], b1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::{Rayon, Serial};
    use rand::{Rng, SeedableRng};

    /// Same products, different summation order.
    const MAX_F32_GEMM_REL_ERR: f32 = 1e-5;

    #[test]
    fn matches_naive_on_ragged_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for &(n, m, k) in &[(1, 1, 1), (2, 16, 3), (7, 17, 5), (13, 33, 64), (50, 48, 130), (97, 100, 384)] {
            let w: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let x: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
            let p = PackedF32::new(&w, m, k);
            let mut naive = vec![0f32; n * m];
            for r in 0..n {
                for c in 0..m {
                    naive[r * m + c] = (0..k).map(|kk| x[r * k + kk] * w[c * k + kk]).sum::<f32>() + b[c];
                }
            }
            for par in [&Serial as &dyn Parallel, &Rayon] {
                let mut got = vec![f32::NAN; n * m];
                gemm(&p, &x, n, Some(&b), crate::as_uninit(&mut got), par);
                for (g, e) in got.iter().zip(&naive) {
                    assert!(
                        (g - e).abs() <= MAX_F32_GEMM_REL_ERR * (k as f32).sqrt().max(1.0),
                        "n{n} m{m} k{k}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
