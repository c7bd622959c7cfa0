//! Half-precision weights kept 16-bit: `y = x · Wᵀ + b` with `W` (m × k, row-major) stored as IEEE f16 or
//! bfloat16 and `x`, `y`, `b` in f32. Each weight is widened to f32 exactly (f16 → f32 and bf16 → f32 are
//! both exact), so the only difference from the f32 kernel on the widened weights is summation order.
//!
//! Two shapes, two strategies:
//! - **GEMV** (decoding, ≤ [`GEMV_MAX_ROWS`] activation rows) is memory-bound: it streams the 2-byte
//!   weights straight from the row-major tensor, widening 16 at a time in registers (`vcvtph2ps` for f16,
//!   a 16-bit shift for bf16) into FMAs against the activations, four output channels per pass, channel
//!   groups split over the pool. Half the bytes of f32 per token.
//! - **GEMM** (prefill) is compute-bound: each task widens one pair of 16-channel panels into the f32
//!   kernel's packed layout `[block][k][16]` (a k × 32 buffer that stays in L2) and runs
//!   [`crate::f32`]'s AVX-512 micro-tiles over every activation row, so the widening costs one pass over
//!   the panel per GEMM against `n` FMAs per weight.
//!
//! Nothing is packed ahead of time: the weights stay in the tensor they were loaded into (2 bytes each).

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::f32::MB;
use crate::int8::Parallel;

/// Activation rows up to which [`gemm`] streams the weights (GEMV) instead of widening panels.
pub const GEMV_MAX_ROWS: usize = 4;
/// Output channels per GEMV task (a multiple of 4, the channels one pass computes).
const GEMV_CHANNELS_PER_TASK: usize = 32;

/// A 16-bit float format weights are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Half {
    /// IEEE 754 binary16: 1 sign, 5 exponent, 10 mantissa bits.
    F16,
    /// bfloat16: f32's upper 16 bits (1 sign, 8 exponent, 7 mantissa bits).
    Bf16,
}

impl Half {
    /// The exact f32 value of `bits`.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Half::F16 => half::f16::from_bits(bits).to_f32(),
            Half::Bf16 => half::bf16::from_bits(bits).to_f32(),
        }
    }

    /// `v` rounded to nearest even in this format.
    pub fn from_f32(self, v: f32) -> u16 {
        match self {
            Half::F16 => half::f16::from_f32(v).to_bits(),
            Half::Bf16 => half::bf16::from_f32(v).to_bits(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "f16",
            Half::Bf16 => "bf16",
        }
    }
}

/// Row-major half weights (m × k), borrowed from the tensor that holds them.
#[derive(Debug, Clone, Copy)]
pub struct HalfWeights<'a> {
    pub kind: Half,
    pub m: usize,
    pub k: usize,
    /// m × k bit patterns, row `c` at `c·k..(c+1)·k`.
    pub data: &'a [u16],
}

/// Whether this CPU runs the SIMD kernels (AVX-512 F/BW/VL; F16C's conversion is part of AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 prefill runs AVX512-BF16's `vdpbf16ps` (activations rounded to bf16, as llama.cpp does on
/// such CPUs) instead of widening the weights to f32.
pub fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The path [`gemm`] takes for `kind` on this CPU, as `bench` reports it.
pub fn path(kind: Half) -> String {
    let widen = match kind {
        Half::F16 => "vcvtph2ps",
        Half::Bf16 => "shift",
    };
    if kind == Half::Bf16 && bf16_dot_available() {
        "whittle bf16 kept 16-bit (decode: shift → f32 avx512; prefill: vdpbf16ps, bf16 activations)".to_string()
    } else if available() {
        format!("whittle {} kept 16-bit ({widen} → f32 avx512)", kind.name())
    } else {
        format!("whittle {} kept 16-bit (scalar reference)", kind.name())
    }
}

/// The specification: `y[r,c] = Σ_k x[r,k]·W[c,k] + b[c]`, each weight widened exactly to f32.
pub fn gemm_ref(w: &HalfWeights, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    let (m, k) = (w.m, w.k);
    for r in 0..n {
        for c in 0..m {
            let mut acc = 0f32;
            for kk in 0..k {
                acc += x[r * k + kk] * w.kind.to_f32(w.data[c * k + kk]);
            }
            y[r * m + c].write(acc + bias.map_or(0.0, |b| b[c]));
        }
    }
}

/// The specification of the `vdpbf16ps` prefill: [`gemm_ref`] with every activation first rounded to bf16
/// (nearest even).
pub fn gemm_bf16_acts_ref(w: &HalfWeights, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    let xr: Vec<f32> = x.iter().map(|&v| Half::Bf16.to_f32(Half::Bf16.from_f32(v))).collect();
    gemm_ref(w, &xr, n, bias, y)
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks of `gemm` write disjoint column ranges (channel groups) of `y`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y (n × m) = x (n × k) · Wᵀ + b` (AVX-512 where [`available`], else the reference). Writes every
/// element of `y`.
pub fn gemm(
    w: &HalfWeights,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    assert_eq!(w.data.len(), w.m * w.k, "half weights: data does not match m × k");
    assert_eq!(x.len(), n * w.k, "half gemm: x");
    assert_eq!(y.len(), n * w.m, "half gemm: y");
    if let Some(b) = bias {
        assert_eq!(b.len(), w.m, "half gemm: bias");
    }
    if !available() || n == 0 || w.m == 0 || w.k == 0 {
        return gemm_ref(w, x, n, bias, y);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if n <= GEMV_MAX_ROWS {
            gemv(w, x, n, bias, y, par)
        } else {
            if w.kind == Half::Bf16 && bf16_dot_available() {
                gemm_bf16_dot(w, x, n, bias, y, par)
            } else {
                gemm_panels(w, x, n, bias, y, par)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = par;
        gemm_ref(w, x, n, bias, y)
    }
}

#[cfg(target_arch = "x86_64")]
fn gemv(w: &HalfWeights, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>], par: &dyn Parallel) {
    let yp = SendPtr(y.as_mut_ptr() as *mut f32);
    let tasks = w.m.div_ceil(GEMV_CHANNELS_PER_TASK);
    par.for_each(tasks, &|range: Range<usize>| {
        #[allow(clippy::redundant_locals)]
        let yp = yp;
        for t in range {
            let c0 = t * GEMV_CHANNELS_PER_TASK;
            let c1 = (c0 + GEMV_CHANNELS_PER_TASK).min(w.m);
            // SAFETY: `available` checked AVX-512 F/BW/VL; the task writes columns c0..c1 of every row,
            // which no other task writes; the slices' lengths were checked by `gemm`.
            unsafe {
                match w.kind {
                    Half::F16 => gemv_channels::<false>(w, x, n, bias, c0, c1, yp.0),
                    Half::Bf16 => gemv_channels::<true>(w, x, n, bias, c0, c1, yp.0),
                }
            }
        }
    });
}

/// 16 half values at `p` (the first `mask`'s lanes; the rest 0) widened to f32.
///
/// # Safety
/// AVX-512 F/BW/VL; `p` valid for the lanes `mask` selects.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn widen<const BF: bool>(p: *const u16, mask: u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let v = if mask == u16::MAX {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_maskz_loadu_epi16(mask, p as *const i16)
    };
    if BF {
        // bf16 is f32's upper half: zero-extend and shift into place (exact).
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    } else {
        _mm512_cvtph_ps(v)
    }
}

/// Channels `c0..c1` of every row of `y`: four channels per pass against up to four activation rows.
///
/// # Safety
/// AVX-512 F/BW/VL; `w.data` holds m × k values, `x` n × k, `y` points at n × m floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_channels<const BF: bool>(
    w: &HalfWeights,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    c0: usize,
    c1: usize,
    y: *mut f32,
) {
    // Four channels per pass: eight measured slower when decoding (tg128 80 → 78 tok/s f16, 79 → 71 bf16).
    channels::<BF, 4>(w, x, n, bias, c0, c1, y)
}

/// [`gemv_channels`] with `R` channels per pass.
///
/// # Safety
/// As [`gemv_channels`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn channels<const BF: bool, const R: usize>(
    w: &HalfWeights,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    c0: usize,
    c1: usize,
    y: *mut f32,
) {
    let (m, k) = (w.m, w.k);
    let mut c = c0;
    while c < c1 {
        let ch = (c1 - c).min(R);
        // Fewer than R channels left: the missing ones repeat the last (computed, not stored).
        let mut wp = [w.data.as_ptr(); R];
        for (i, p) in wp.iter_mut().enumerate() {
            *p = w.data.as_ptr().add((c + i.min(ch - 1)) * k);
        }
        let mut r = 0;
        while r < n {
            let xr = (n - r).min(4);
            let mut out = [[0f32; R]; 4];
            match xr {
                1 => dot::<BF, R, 1>(wp, x.as_ptr().add(r * k), k, &mut out),
                2 => dot::<BF, R, 2>(wp, x.as_ptr().add(r * k), k, &mut out),
                3 => dot::<BF, R, 3>(wp, x.as_ptr().add(r * k), k, &mut out),
                _ => dot::<BF, R, 4>(wp, x.as_ptr().add(r * k), k, &mut out),
            }
            for (j, row) in out.iter().enumerate().take(xr) {
                for (i, v) in row.iter().enumerate().take(ch) {
                    *y.add((r + j) * m + c + i) = v + bias.map_or(0.0, |b| b[c + i]);
                }
            }
            r += xr;
        }
        c += ch;
    }
}

/// `out[j][i] = Σ_k x[j,k]·W_i[k]` for `R` consecutive weight rows and `X` consecutive activation rows
/// (stride k).
///
/// # Safety
/// AVX-512 F/BW/VL; each `wp[i]` valid for k values, `xp` for X × k floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot<const BF: bool, const R: usize, const X: usize>(
    wp: [*const u16; R],
    xp: *const f32,
    k: usize,
    out: &mut [[f32; R]; 4],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; X];
    // The rows are short (k values each) and the hardware prefetchers lose track of R short streams:
    // prefetch the next R rows (the next R·k values, contiguous) as fast as this pass consumes its own, so
    // they are in cache when it ends. Measured: decoding's 49152 × 576 head from memory went from 13 to
    // ~25 GB/s.
    let next = wp[0].wrapping_add(R * k) as *const i8;
    let lines = R / 2; // 64-byte lines consumed per step: R rows × 16 values × 2 bytes
    let mut kk = 0;
    while kk + 16 <= k {
        for l in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(2 * R * kk + 64 * l));
        }
        // A loop, not `array::from_fn`: a closure would not inherit this function's target features.
        let mut wv = [_mm512_setzero_ps(); R];
        for i in 0..R {
            wv[i] = widen::<BF>(wp[i].add(kk), u16::MAX);
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(xp.add(j * k + kk));
            for i in 0..R {
                a[i] = _mm512_fmadd_ps(xv, wv[i], a[i]);
            }
        }
        kk += 16;
    }
    if kk < k {
        let mask = ((1u32 << (k - kk)) - 1) as u16;
        let mut wv = [_mm512_setzero_ps(); R];
        for i in 0..R {
            wv[i] = widen::<BF>(wp[i].add(kk), mask);
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_maskz_loadu_ps(mask, xp.add(j * k + kk));
            for i in 0..R {
                a[i] = _mm512_fmadd_ps(xv, wv[i], a[i]);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        for i in 0..R {
            o[i] = _mm512_reduce_add_ps(a[i]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn gemm_panels(
    w: &HalfWeights,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    let (m, k) = (w.m, w.k);
    let pairs = m.div_ceil(2 * MB);
    let mut bvec = bias.map_or_else(|| vec![0.0; m], |b| b.to_vec());
    bvec.resize(pairs * 2 * MB, 0.0);
    let yp = SendPtr(y.as_mut_ptr() as *mut f32);
    par.for_each(pairs, &|range: Range<usize>| {
        #[allow(clippy::redundant_locals)]
        let yp = yp;
        let mut buf = vec![0f32; 2 * k * MB]; // two packed blocks, [block][k][16]
        for p in range {
            let c0 = p * 2 * MB;
            // SAFETY: `available` checked AVX-512 F/BW/VL; `buf` holds 2 × k × 16 floats.
            unsafe {
                match w.kind {
                    Half::F16 => widen_pair::<false>(w, c0, &mut buf),
                    Half::Bf16 => widen_pair::<true>(w, c0, &mut buf),
                }
            }
            let valid = (m.saturating_sub(c0).min(MB), m.saturating_sub(c0 + MB).min(MB));
            let (b0, b1) = buf.split_at(k * MB);
            // SAFETY: AVX-512F available; x holds n × k floats, each block k × 16; the tiles write the
            // valid channels of c0..c0+32 in every row, which no other task writes (c0 < m keeps the
            // offset inside y's n × m).
            unsafe { crate::f32::tiles(x, n, k, (b0, b1), &bvec[c0..], valid, m, yp.0.add(c0)) };
        }
    });
}

/// Widens channels `c0..c0+32` of `w` into the f32 kernel's packed layout: `buf[(blk·k + kk)·16 + c]` =
/// `W[c0 + 16·blk + c, kk]`, zero past `m`.
///
/// # Safety
/// AVX-512 F/BW/VL; `buf` holds 2 × k × 16 floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_pair<const BF: bool>(w: &HalfWeights, c0: usize, buf: &mut [f32]) {
    use std::arch::x86_64::*;
    let (m, k) = (w.m, w.k);
    debug_assert_eq!(buf.len(), 2 * k * MB);
    let mut tmp = [0f32; 16];
    for cc in 0..2 * MB {
        let (blk, c) = (cc / MB, cc % MB);
        let dst = &mut buf[blk * k * MB..(blk + 1) * k * MB];
        let ch = c0 + cc;
        if ch >= m {
            for kk in 0..k {
                dst[kk * MB + c] = 0.0;
            }
            continue;
        }
        let row = w.data.as_ptr().add(ch * k);
        let mut kk = 0;
        while kk < k {
            let t = (k - kk).min(16);
            let mask = if t == 16 { u16::MAX } else { ((1u32 << t) - 1) as u16 };
            _mm512_storeu_ps(tmp.as_mut_ptr(), widen::<BF>(row.add(kk), mask));
            for (j, v) in tmp.iter().enumerate().take(t) {
                dst[(kk + j) * MB + c] = *v;
            }
            kk += t;
        }
    }
}

/// bf16 prefill on AVX512-BF16: activations rounded to bf16 once (`vcvtne2ps2bf16`) as k-pairs, each pair
/// of 16-channel weight panels interleaved into k-pairs `[block][k/2][16]` (u32 = W[c,2j] | W[c,2j+1] << 16)
/// and run by a 6 × 32 `vdpbf16ps` micro-tile (two products per lane per instruction: twice the f32 FMA's
/// work).
#[cfg(target_arch = "x86_64")]
fn gemm_bf16_dot(
    w: &HalfWeights,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    par: &dyn Parallel,
) {
    let (m, k) = (w.m, w.k);
    let kp = k.div_ceil(2);
    // SAFETY: AVX512-BF16 checked by the caller (`bf16_dot_available`); sizes as allocated here.
    let xb = unsafe { bf16_pairs(x, n, k) };
    let pairs = m.div_ceil(2 * MB);
    let mut bvec = bias.map_or_else(|| vec![0.0; m], |b| b.to_vec());
    bvec.resize(pairs * 2 * MB, 0.0);
    let yp = SendPtr(y.as_mut_ptr() as *mut f32);
    par.for_each(pairs, &|range: Range<usize>| {
        #[allow(clippy::redundant_locals)]
        let yp = yp;
        let mut buf = vec![0u32; 2 * kp * MB]; // [block][k/2][16]
        for p in range {
            let c0 = p * 2 * MB;
            interleave_pair(w, c0, &mut buf);
            let valid = (m.saturating_sub(c0).min(MB), m.saturating_sub(c0 + MB).min(MB));
            let (b0, b1) = buf.split_at(kp * MB);
            let mut r = 0;
            while r < n {
                let t = (n - r).min(crate::f32::MR);
                // SAFETY: AVX512-BF16 checked; xb holds n × kp pairs, b0/b1 kp × 16 each; the tile writes the
                // valid channels of c0..c0+32 in rows r..r+t, which no other task writes.
                unsafe {
                    tile_bf16(&xb[r * kp..(r + t) * kp], t, kp, b0, b1, &bvec[c0..], valid, m, yp.0.add(r * m + c0))
                };
                r += t;
            }
        }
    });
}

/// `x` (n × k) rounded to bf16, as k-pairs per row (u32 = x[r,2j] | x[r,2j+1] << 16; an odd k's last pair
/// padded with 0).
///
/// # Safety
/// AVX-512 F/BW/VL and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn bf16_pairs(x: &[f32], n: usize, k: usize) -> Vec<u32> {
    use std::arch::x86_64::*;
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; n * kp];
    for r in 0..n {
        let (src, dst) = (&x[r * k..(r + 1) * k], &mut out[r * kp..(r + 1) * kp]);
        let mut j = 0;
        while j + 32 <= k {
            let lo = _mm512_loadu_ps(src.as_ptr().add(j));
            let hi = _mm512_loadu_ps(src.as_ptr().add(j + 16));
            // Lower 16 bf16 from `lo`, upper from `hi`: x[j..j+32] in order, i.e. 16 k-pairs.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(j / 2) as *mut __m512i, v);
            j += 32;
        }
        for jj in (j..k).step_by(2) {
            let a = Half::Bf16.from_f32(src[jj]) as u32;
            let b = if jj + 1 < k { Half::Bf16.from_f32(src[jj + 1]) as u32 } else { 0 };
            dst[jj / 2] = a | (b << 16);
        }
    }
    out
}

/// Channels `c0..c0+32` of `w` (bf16) as k-pairs in `[block][k/2][16]`, zero past `m` and past an odd k.
#[cfg(target_arch = "x86_64")]
fn interleave_pair(w: &HalfWeights, c0: usize, buf: &mut [u32]) {
    let (m, k) = (w.m, w.k);
    let kp = k.div_ceil(2);
    for cc in 0..2 * MB {
        let (blk, c) = (cc / MB, cc % MB);
        let dst = &mut buf[blk * kp * MB..(blk + 1) * kp * MB];
        let ch = c0 + cc;
        if ch >= m {
            for j in 0..kp {
                dst[j * MB + c] = 0;
            }
            continue;
        }
        let row = &w.data[ch * k..(ch + 1) * k];
        for j in 0..kp {
            let a = row[2 * j] as u32;
            let b = if 2 * j + 1 < k { row[2 * j + 1] as u32 } else { 0 };
            dst[j * MB + c] = a | (b << 16);
        }
    }
}

/// Up to six rows of bf16 k-pairs against two interleaved panels; `y` points at row 0, channel c0.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `x` holds rows × kp pairs, `w0`/`w1` kp × 16, `bias` 32 floats; `y` valid for
/// rows × the valid channels (row stride `m`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16(
    x: &[u32],
    rows: usize,
    kp: usize,
    w0: &[u32],
    w1: &[u32],
    bias: &[f32],
    valid: (usize, usize),
    m: usize,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm512_setzero_ps(); crate::f32::MR];
    let mut a1 = [_mm512_setzero_ps(); crate::f32::MR];
    let (xp, p0, p1) = (x.as_ptr(), w0.as_ptr(), w1.as_ptr());
    for j in 0..kp {
        let v0: __m512bh = std::mem::transmute(_mm512_loadu_si512(p0.add(j * MB) as *const __m512i));
        let v1: __m512bh = std::mem::transmute(_mm512_loadu_si512(p1.add(j * MB) as *const __m512i));
        for i in 0..rows {
            let xb: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xp.add(i * kp + j) as i32));
            a0[i] = _mm512_dpbf16_ps(a0[i], xb, v0);
            a1[i] = _mm512_dpbf16_ps(a1[i], xb, v1);
        }
    }
    crate::f32::store_tile(&a0, &a1, rows, bias, valid, m, y);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::{Rayon, Serial};
    use rand::{Rng, SeedableRng};

    /// The same exact products as the reference, summed in another order.
    const MAX_HALF_GEMM_REL_ERR: f32 = 1e-5;

    fn check(kind: Half, n: usize, m: usize, k: usize, rng: &mut rand::rngs::StdRng) {
        let w: Vec<u16> = (0..m * k).map(|_| kind.from_f32(rng.random::<f32>() * 2.0 - 1.0)).collect();
        let x: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>() - 0.5).collect();
        let b: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
        let hw = HalfWeights { kind, m, k, data: &w };
        for bias in [Some(b.as_slice()), None] {
            let mut want = vec![f32::NAN; n * m];
            gemm_ref(&hw, &x, n, bias, crate::as_uninit(&mut want));
            // The reference against a plain f64 dot product of the widened weights.
            for r in 0..n {
                for c in 0..m {
                    let d: f64 = (0..k).map(|kk| x[r * k + kk] as f64 * kind.to_f32(w[c * k + kk]) as f64).sum::<f64>()
                        + bias.map_or(0.0, |b| b[c] as f64);
                    let tol = MAX_HALF_GEMM_REL_ERR as f64 * (k as f64).sqrt().max(1.0);
                    assert!((want[r * m + c] as f64 - d).abs() <= tol, "{kind:?} ref n{n} m{m} k{k}");
                }
            }
            // bf16 prefill on AVX512-BF16 rounds the activations to bf16: its own specification.
            if kind == Half::Bf16 && n > GEMV_MAX_ROWS && bf16_dot_available() {
                gemm_bf16_acts_ref(&hw, &x, n, bias, crate::as_uninit(&mut want));
            }
            for par in [&Serial as &dyn Parallel, &Rayon] {
                let mut got = vec![f32::NAN; n * m];
                gemm(&hw, &x, n, bias, crate::as_uninit(&mut got), par);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= MAX_HALF_GEMM_REL_ERR * (k as f32).sqrt().max(1.0),
                        "{kind:?} n{n} m{m} k{k} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// Both paths (GEMV up to four rows, widened panels above) on ragged shapes: k not a multiple of 16,
    /// m not a multiple of 4 or 32, row counts around the switch.
    #[test]
    fn matches_reference_on_ragged_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for kind in [Half::F16, Half::Bf16] {
            for &(n, m, k) in &[
                (1, 1, 1),
                (1, 5, 17),
                (2, 16, 3),
                (3, 33, 64),
                (4, 37, 130),
                (5, 17, 5),
                (7, 48, 31),
                (13, 65, 64),
                (50, 100, 384),
                (97, 33, 577),
            ] {
                check(kind, n, m, k, &mut rng);
            }
        }
    }

    /// Widening is exact: every f16 / bf16 bit pattern that is a finite number comes out as the half
    /// crate's f32 (one weight, x = 1).
    #[test]
    fn widening_is_exact_for_every_finite_pattern() {
        for kind in [Half::F16, Half::Bf16] {
            let w: Vec<u16> = (0..=u16::MAX).filter(|&b| kind.to_f32(b).is_finite()).collect();
            let hw = HalfWeights { kind, m: w.len(), k: 1, data: &w };
            let mut got = vec![f32::NAN; w.len()];
            gemm(&hw, &[1.0], 1, None, crate::as_uninit(&mut got), &Serial);
            for (b, g) in w.iter().zip(&got) {
                // `==`: a stored -0 sums to +0, the same number.
                assert!(*g == kind.to_f32(*b), "{kind:?} pattern {b:#06x}: {g} vs {}", kind.to_f32(*b));
            }
        }
    }
}
