//! 8-bit GEMM for the w8a8 Linear: `y = x · Wᵀ + b` with per-row (per-token) asymmetric activation
//! quantization and symmetric per-output-channel weight quantization, as ONNX Runtime's dynamic quantization.
//!
//! ```text
//! x:  s_x[n] = (max(x,0) − min(x,0)) / 255   z[n] = round(−min(x,0) / s_x[n])   x_u = round(x / s_x) + z ∈ [0, 255]
//! W:  s_w[m] = max_k |W[m,k]| / 127          w_q[m,k] = round(W[m,k] / s_w[m]) ∈ [-127, 127]
//! y[n,m] = s_x[n] · s_w[m] · (Σ_k x_u[n,k] · w_q[m,k] − z[n] · Σ_k w_q[m,k])  +  b[m]      (Σ in i32: exact)
//! ```
//!
//! Asymmetric activations matter: after GELU most values sit in [−0.17, max], and 255 levels over that
//! range are twice as fine as symmetric ones over [−max, max].
//!
//! Packed weight layout (shared by both SIMD paths): output channels in blocks of 16, K padded to a
//! multiple of 4; block `b`, k-group `g` holds 64 bytes: channel `c` (0..16) at `4c..4c+4` = `w_q[16b+c, 4g..4g+4]`.
//! A 32-bit lane thus holds 4 consecutive k of one channel, the unit `vpdpbusd` and `pmaddubsw+pmaddwd` reduce.
//! Padding (k ≥ K) holds x_u = z and w = 0, so it adds nothing.
//!
//! - AVX-512 VNNI: `vpdpbusd` multiplies unsigned × signed bytes: `x_u` as it is.
//! - AVX2: `pmaddubsw` on `|x_u − 128|` and `w_q · sign(x_u − 128)` (llama.cpp's trick): each i16 pair sum is
//!   at most 2·128·127 < 2¹⁵, so it never saturates; `pmaddwd` with ones widens to i32; `128 · Σw` is added back.

use std::mem::MaybeUninit;
use std::ops::Range;

use crate::{as_uninit, Isa};

/// Runs `f` over `0..n_items`, split into ranges, possibly on several threads. The caller chooses the pool
/// (whittle passes candle's, so its threads and the tensor engine's are the same two).
pub trait Parallel: Sync {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(Range<usize>) + Sync));
}

/// rayon's global pool.
pub struct Rayon;

impl Parallel for Rayon {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        use rayon::prelude::*;
        (0..n_items).into_par_iter().for_each(|i| f(i..i + 1));
    }
}

/// One thread.
pub struct Serial;

impl Parallel for Serial {
    fn for_each(&self, n_items: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        f(0..n_items)
    }
}

/// Channels per packed block.
pub const MB: usize = 16;
/// k values per 32-bit lane.
pub const KG: usize = 4;
/// Rows per micro-tile (one channel block).
const MR: usize = 4;
/// Rows per micro-tile of two channel blocks: 12 accumulators, 2 weight and 1 broadcast registers.
const MR2: usize = 6;
/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Rounds half away from zero, as `f32::round`, without a libm call (`as` truncates inline), so the loop
/// vectorizes.
#[inline(always)]
fn round_i8(v: f32) -> i8 {
    (v + 0.5f32.copysign(v)) as i32 as i8
}

/// Symmetric per-row int8 quantization of `w` (rows × cols): returns (q, scales).
pub fn quantize_rows_sym(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; rows * cols];
    let mut s = vec![0f32; rows];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let amax = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let scale = amax / 127.0;
        s[r] = scale;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (d, &v) in q[r * cols..(r + 1) * cols].iter_mut().zip(row) {
            *d = round_i8((v * inv).clamp(-127.0, 127.0));
        }
    }
    (q, s)
}

/// Weights ready for the int8 GEMM.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    /// Output channels.
    pub m: usize,
    /// Input features.
    pub k: usize,
    /// K rounded up to a multiple of 4.
    pub kp: usize,
    /// Channel blocks of 16 (the last one zero-padded).
    pub nblocks: usize,
    data: Vec<i8>,
    /// Σ_k w_q[m,k], per padded channel.
    wsum: Vec<i32>,
    /// Per-channel weight scales `s_w` (m).
    pub scale: Vec<f32>,
    /// The quantized weights, row-major (m, k): the stored form and the reference's input.
    pub q: Vec<i8>,
}

impl PackedI8 {
    /// Packs quantized weights `q` (m × k, row-major) with per-channel `scale`.
    pub fn new(q: Vec<i8>, scale: Vec<f32>, m: usize, k: usize) -> Self {
        assert_eq!(q.len(), m * k, "weights are not m × k");
        assert_eq!(scale.len(), m, "one scale per output channel");
        let kp = k.div_ceil(KG) * KG;
        let nblocks = m.div_ceil(MB);
        let mut data = vec![0i8; nblocks * kp * MB];
        let mut wsum = vec![0i32; nblocks * MB];
        for ch in 0..m {
            let (b, c) = (ch / MB, ch % MB);
            let row = &q[ch * k..(ch + 1) * k];
            wsum[ch] = row.iter().map(|&v| v as i32).sum();
            for (kk, &v) in row.iter().enumerate() {
                let g = kk / KG;
                data[(b * (kp / KG) + g) * (MB * KG) + c * KG + kk % KG] = v;
            }
        }
        Self { m, k, kp, nblocks, data, wsum, scale, q }
    }

    /// Quantizes f32 weights (m × k) symmetrically per channel and packs them.
    pub fn from_f32(w: &[f32], m: usize, k: usize) -> Self {
        let (q, s) = quantize_rows_sym(w, m, k);
        Self::new(q, s, m, k)
    }

    /// Bytes of the stored form (int8 weights + f32 scales).
    pub fn stored_bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }

    fn block(&self, b: usize) -> &[i8] {
        let len = self.kp * MB;
        &self.data[b * len..(b + 1) * len]
    }
}

/// Quantizes one row asymmetrically to `dst` (u8); returns its scale and zero point.
pub fn quantize_row(row: &[f32], dst: &mut [u8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512Vnni {
        // SAFETY: AVX-512 presence checked; dst.len() == row.len().
        return unsafe { quantize_row_avx512(row, dst) };
    }
    quantize_row_ref(row, dst)
}

/// Scale and zero point of a row with the given extremes (0 always exactly representable).
#[inline]
fn scale_zero(lo: f32, hi: f32) -> (f32, i32, f32) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = (hi - lo) / 255.0;
    if scale > 0.0 {
        let z = (-lo / scale).round().clamp(0.0, 255.0);
        (scale, z as i32, 1.0 / scale)
    } else {
        (0.0, 0, 0.0)
    }
}

/// The specification of [`quantize_row`]: `x_u = clamp(round(x / s) + z, 0, 255)`, round half away from zero.
pub fn quantize_row_ref(row: &[f32], dst: &mut [u8]) -> (f32, i32) {
    let (lo, hi) = row.iter().fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    let (scale, z, inv) = scale_zero(lo, hi);
    for (d, &v) in dst.iter_mut().zip(row) {
        *d = (round_i8_wide(v * inv) + z).clamp(0, 255) as u8;
    }
    (scale, z)
}

/// Round half away from zero to i32 without a libm call.
#[inline(always)]
fn round_i8_wide(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(row: &[f32], dst: &mut [u8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let k = row.len();
    let full = k / 16 * 16;
    let (mut vlo, mut vhi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < full {
        let v = _mm512_loadu_ps(row.as_ptr().add(i));
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
        i += 16;
    }
    let (mut lo, mut hi) = (_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi));
    for &v in &row[full..] {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let (scale, z, inv) = scale_zero(lo, hi);
    let vinv = _mm512_set1_ps(inv);
    let half = _mm512_set1_ps(0.5);
    let sign = _mm512_set1_ps(-0.0);
    let vz = _mm512_set1_epi32(z);
    let (zero, top) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    let mut i = 0;
    while i < full {
        let v = _mm512_mul_ps(_mm512_loadu_ps(row.as_ptr().add(i)), vinv);
        // round half away from zero: truncate(v + copysign(0.5, v)), as `round_i8_wide`
        let h = crate::act::bits::or(half, crate::act::bits::and(v, sign));
        let q = _mm512_add_epi32(_mm512_cvttps_epi32(_mm512_add_ps(v, h)), vz);
        let q = _mm512_min_epi32(_mm512_max_epi32(q, zero), top);
        _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut _, _mm512_cvtepi32_epi8(q));
        i += 16;
    }
    for (d, &v) in dst[full..].iter_mut().zip(&row[full..]) {
        *d = (round_i8_wide(v * inv) + z).clamp(0, 255) as u8;
    }
    (scale, z)
}

/// Quantized activations: `x_u` (n × kp, padding = z), scales and zero points per row.
pub struct QuantizedActs {
    pub xu: Vec<u8>,
    pub scale: Vec<f32>,
    pub zero: Vec<i32>,
}

/// Per-row quantization of activations `x` (n × k), rows split over `par`.
pub fn quantize_activations(x: &[f32], n: usize, k: usize, kp: usize, par: &dyn Parallel) -> QuantizedActs {
    let mut xu = vec![0u8; n * kp];
    let mut scale = vec![0f32; n];
    let mut zero = vec![0i32; n];
    let (qp, sp, zp) =
        (SendPtr(xu.as_mut_ptr() as *mut f32), SendPtr(scale.as_mut_ptr()), SendPtr(zero.as_mut_ptr() as *mut f32));
    let chunk = 16;
    par.for_each(n.div_ceil(chunk), &|range: Range<usize>| {
        #[allow(clippy::redundant_locals)]
        let (qp, sp, zp) = (qp, sp, zp);
        for c in range {
            for r in c * chunk..((c + 1) * chunk).min(n) {
                let row = &x[r * k..(r + 1) * k];
                // SAFETY: row r of xu (kp bytes), scale[r] and zero[r] are written by this task only.
                unsafe {
                    let dst = std::slice::from_raw_parts_mut((qp.0 as *mut u8).add(r * kp), kp);
                    let (s, z) = quantize_row(row, &mut dst[..k]);
                    dst[k..].fill(z as u8);
                    *sp.0.add(r) = s;
                    *(zp.0 as *mut i32).add(r) = z;
                }
            }
        }
    });
    QuantizedActs { xu, scale, zero }
}

/// Static activation quantization: every row with the same calibrated `scale` and `zero` (values outside the
/// calibrated range clip to 0 or 255).
pub fn quantize_activations_static(x: &[f32], n: usize, k: usize, kp: usize, scale: f32, zero: i32) -> QuantizedActs {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut xu = vec![zero.clamp(0, 255) as u8; n * kp];
    for r in 0..n {
        for (d, &v) in xu[r * kp..r * kp + k].iter_mut().zip(&x[r * k..(r + 1) * k]) {
            *d = (round_i8_wide(v * inv) + zero).clamp(0, 255) as u8;
        }
    }
    QuantizedActs { xu, scale: vec![scale; n], zero: vec![zero; n] }
}

/// The specification: `y[n,m] = s_x[n]·s_w[m]·Σ_k (x_u[n,k] − z[n])·w_q[m,k] + b[m]` on unpacked data.
pub fn gemm_ref(w: &PackedI8, xa: &QuantizedActs, n: usize, bias: Option<&[f32]>, y: &mut [MaybeUninit<f32>]) {
    let (m, k, kp) = (w.m, w.k, w.kp);
    for r in 0..n {
        for c in 0..m {
            let acc: i32 = (0..k).map(|kk| (xa.xu[r * kp + kk] as i32 - xa.zero[r]) * w.q[c * k + kk] as i32).sum();
            y[r * m + c].write(xa.scale[r] * w.scale[c] * acc as f32 + bias.map_or(0.0, |b| b[c]));
        }
    }
}

/// `y (n × m) = x (n × k) · Wᵀ + b`, quantizing `x` per row on the fly.
pub fn linear_w8a8(
    w: &PackedI8,
    x: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    isa: Isa,
    par: &dyn Parallel,
) {
    assert_eq!(x.len(), n * w.k);
    assert_eq!(y.len(), n * w.m);
    let xa = quantize_activations(x, n, w.k, w.kp, par);
    gemm(w, &xa, n, bias, as_uninit(y), isa, par);
}

/// A raw pointer that may cross threads: each task writes a disjoint set of `y` elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks of `gemm` write disjoint (row range × channel block) rectangles of `y`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// 8-bit GEMM on pre-quantized activations. Writes every element of `y` (n × m).
pub fn gemm(
    w: &PackedI8,
    xa: &QuantizedActs,
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    isa: Isa,
    par: &dyn Parallel,
) {
    assert!(isa.supported(), "kernel {} is not supported on this CPU", isa.name());
    assert_eq!(xa.xu.len(), n * w.kp);
    if isa == Isa::Ref || n == 0 {
        return gemm_ref(w, xa, n, bias, y);
    }
    // AVX2 takes signed activations x_u − 128 and its sums are short by 128·Σw: fold that into the zero point.
    let xs: Vec<u8> = if isa == Isa::Avx2 { xa.xu.iter().map(|&v| v ^ 0x80).collect() } else { Vec::new() };
    let zoff: Vec<i32> = if isa == Isa::Avx2 { xa.zero.iter().map(|z| z - 128).collect() } else { xa.zero.clone() };
    let (sx, xu) = (&xa.scale, if isa == Isa::Avx2 { &xs } else { &xa.xu });
    // Per-channel epilogue constants, padded to whole blocks: s_w, bias, Σw.
    let mp = w.nblocks * MB;
    let mut scale = w.scale.clone();
    scale.resize(mp, 0.0);
    let mut bvec = bias.map_or_else(|| vec![0.0; w.m], |b| b.to_vec());
    bvec.resize(mp, 0.0);
    let row_tasks = n.div_ceil(ROWS_PER_TASK);
    let pairs = w.nblocks.div_ceil(2);
    assert_eq!(y.len(), n * w.m);
    let yp = SendPtr(y.as_mut_ptr() as *mut f32);
    let m = w.m;
    let task = |t: usize| {
        // Capture the whole wrapper: edition-2021 closures would otherwise capture the raw pointer field alone.
        #[allow(clippy::redundant_locals)]
        let yp = yp;
        let (rt, pair) = (t / pairs, t % pairs);
        let r1 = ((rt + 1) * ROWS_PER_TASK).min(n);
        let b = 2 * pair;
        let two = b + 1 < w.nblocks;
        let ep = |b: usize| Epilogue {
            scale: &scale[b * MB..],
            bias: &bvec[b * MB..],
            wsum: &w.wsum[b * MB..],
            valid: (m - b * MB).min(MB),
            m,
        };
        let (ep0, ep1) = (ep(b), ep(if two { b + 1 } else { b }));
        let mut r = rt * ROWS_PER_TASK;
        while r < r1 {
            // SAFETY: the ISA was checked above; xu holds n × kp bytes and each block kp × 16; the tile
            // writes rows r..r+rows, channels of blocks b (and b+1) of y, which no other task writes.
            unsafe {
                let yrow = yp.0.add(r * m + b * MB);
                #[cfg(target_arch = "x86_64")]
                match isa {
                    Isa::Avx512Vnni if two => {
                        let rows = (r1 - r).min(MR2);
                        tile_vnni2(
                            &xu[r * w.kp..(r + rows) * w.kp],
                            rows,
                            w.kp,
                            w.block(b),
                            w.block(b + 1),
                            &sx[r..r + rows],
                            &zoff[r..r + rows],
                            &ep0,
                            &ep1,
                            yrow,
                        );
                        r += rows;
                    }
                    Isa::Avx512Vnni | Isa::Avx2 => {
                        // One block at a time (AVX2 always; VNNI for an odd last block): same signature.
                        let tile: OneBlockTile = if isa == Isa::Avx2 { tile_avx2 } else { tile_vnni };
                        let rows = (r1 - r).min(MR);
                        let (xr, sr, zr) = (&xu[r * w.kp..(r + rows) * w.kp], &sx[r..r + rows], &zoff[r..r + rows]);
                        tile(xr, rows, w.kp, w.block(b), sr, zr, &ep0, yrow);
                        if two {
                            tile(xr, rows, w.kp, w.block(b + 1), sr, zr, &ep1, yrow.add(MB));
                        }
                        r += rows;
                    }
                    Isa::Ref => unreachable!(),
                }
            }
        }
    };
    par.for_each(row_tasks * pairs, &|range: Range<usize>| range.for_each(task));
}

/// A one-block micro-tile: (activations, rows, kp, block, s_x, zero points, epilogue, y).
#[cfg(target_arch = "x86_64")]
type OneBlockTile = unsafe fn(&[u8], usize, usize, &[i8], &[f32], &[i32], &Epilogue, *mut f32);

/// Turns one block's i32 sums into outputs: `y = (acc − z·Σw) · s_x · s_w + b` for the `valid` channels.
struct Epilogue<'a> {
    scale: &'a [f32],
    bias: &'a [f32],
    wsum: &'a [i32],
    valid: usize,
    /// Row stride of y.
    m: usize,
}

impl Epilogue<'_> {
    /// Scalar epilogue of one row.
    ///
    /// # Safety
    /// `y` must be valid for `self.valid` writes.
    unsafe fn row(&self, acc: &[i32; MB], sx: f32, z: i32, y: *mut f32) {
        for (c, &a) in acc.iter().enumerate().take(self.valid) {
            *y.add(c) = (a - z * self.wsum[c]) as f32 * sx * self.scale[c] + self.bias[c];
        }
    }

    /// Vector epilogue of one row (AVX-512).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn row512(&self, acc: std::arch::x86_64::__m512i, sx: f32, z: i32, y: *mut f32) {
        use std::arch::x86_64::*;
        let scale = _mm512_loadu_ps(self.scale.as_ptr());
        let bias = _mm512_loadu_ps(self.bias.as_ptr());
        let wsum = _mm512_loadu_si512(self.wsum.as_ptr() as *const _);
        let mask: __mmask16 = if self.valid >= MB { 0xffff } else { ((1u32 << self.valid) - 1) as u16 };
        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(z), wsum)));
        let v = _mm512_fmadd_ps(v, _mm512_mul_ps(_mm512_set1_ps(sx), scale), bias);
        _mm512_mask_storeu_ps(y, mask, v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_vnni(xu: &[u8], rows: usize, kp: usize, wb: &[i8], sx: &[f32], z: &[i32], ep: &Epilogue, y: *mut f32) {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_si512(); MR];
    let groups = kp / KG;
    let xp = xu.as_ptr();
    let wp = wb.as_ptr();
    for g in 0..groups {
        // SAFETY (caller): wb holds `groups` × 64 bytes; xu holds rows × kp bytes.
        let w0 = _mm512_loadu_si512(wp.add(g * 64) as *const _);
        for (i, ai) in a.iter_mut().enumerate().take(rows) {
            let x0 = _mm512_set1_epi32((xp.add(i * kp + g * KG) as *const i32).read_unaligned());
            *ai = _mm512_dpbusd_epi32(*ai, x0, w0);
        }
    }
    for (i, ai) in a.iter().enumerate().take(rows) {
        ep.row512(*ai, sx[i], z[i], y.add(i * ep.m));
    }
}

/// Two channel blocks at once: every activation broadcast feeds two `vpdpbusd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_vnni2(
    xu: &[u8],
    rows: usize,
    kp: usize,
    wb0: &[i8],
    wb1: &[i8],
    sx: &[f32],
    z: &[i32],
    ep0: &Epilogue,
    ep1: &Epilogue,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut a0 = [_mm512_setzero_si512(); MR2];
    let mut a1 = [_mm512_setzero_si512(); MR2];
    let groups = kp / KG;
    let xp = xu.as_ptr();
    for g in 0..groups {
        // SAFETY (caller): each block holds `groups` × 64 bytes; xu holds rows × kp bytes.
        let w0 = _mm512_loadu_si512(wb0.as_ptr().add(g * 64) as *const _);
        let w1 = _mm512_loadu_si512(wb1.as_ptr().add(g * 64) as *const _);
        for i in 0..rows {
            let x = _mm512_set1_epi32((xp.add(i * kp + g * KG) as *const i32).read_unaligned());
            a0[i] = _mm512_dpbusd_epi32(a0[i], x, w0);
            a1[i] = _mm512_dpbusd_epi32(a1[i], x, w1);
        }
    }
    for i in 0..rows {
        ep0.row512(a0[i], sx[i], z[i], y.add(i * ep0.m));
        ep1.row512(a1[i], sx[i], z[i], y.add(i * ep1.m + MB));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2(xs: &[u8], rows: usize, kp: usize, wb: &[i8], sx: &[f32], z: &[i32], ep: &Epilogue, y: *mut f32) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut lo = [_mm256_setzero_si256(); MR];
    let mut hi = [_mm256_setzero_si256(); MR];
    let groups = kp / KG;
    for g in 0..groups {
        // SAFETY (caller): wb holds `groups` × 64 bytes; xs holds rows × kp bytes (x_u − 128 as i8).
        let w0 = _mm256_loadu_si256(wb.as_ptr().add(g * 64) as *const _);
        let w1 = _mm256_loadu_si256(wb.as_ptr().add(g * 64 + 32) as *const _);
        for i in 0..rows {
            let xv = _mm256_set1_epi32((xs.as_ptr().add(i * kp + g * KG) as *const i32).read_unaligned());
            let ax = _mm256_sign_epi8(xv, xv);
            let p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv));
            let p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv));
            lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(p0, ones));
            hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(p1, ones));
        }
    }
    let mut acc = [0i32; MB];
    for i in 0..rows {
        _mm256_storeu_si256(acc.as_mut_ptr() as *mut _, lo[i]);
        _mm256_storeu_si256(acc.as_mut_ptr().add(8) as *mut _, hi[i]);
        ep.row(&acc, sx[i], z[i], y.add(i * ep.m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The SIMD paths compute the same i32 sums; only the f32 epilogue may round differently.
    const MAX_INT8_GEMM_REL_ERR: f32 = 1e-6;

    fn check(n: usize, m: usize, k: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
        let x: Vec<f32> = (0..n * k).map(|_| (rng.random::<f32>() - 0.5) * 4.0).collect();
        let b: Vec<f32> = (0..m).map(|_| rng.random::<f32>()).collect();
        let p = PackedI8::from_f32(&w, m, k);
        let mut want = vec![0f32; n * m];
        linear_w8a8(&p, &x, n, Some(&b), &mut want, Isa::Ref, &Serial);
        for isa in [Isa::Avx2, Isa::Avx512Vnni] {
            if !isa.supported() {
                continue;
            }
            let mut got = vec![0f32; n * m];
            linear_w8a8(&p, &x, n, Some(&b), &mut got, isa, &Rayon);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= MAX_INT8_GEMM_REL_ERR * w.abs().max(1.0),
                    "{isa:?} n{n} m{m} k{k} [{i}]: {g} vs {w}"
                );
            }
        }
        // And the quantized product is close to the float one (int8 error budget).
        let mut exact = vec![0f32; n * m];
        for r in 0..n {
            for c in 0..m {
                exact[r * m + c] = (0..k).map(|kk| x[r * k + kk] * w[c * k + kk]).sum::<f32>() + b[c];
            }
        }
        let scale = (k as f32).sqrt();
        for (e, w) in exact.iter().zip(&want) {
            assert!((e - w).abs() < 0.05 * scale, "{e} vs {w}");
        }
    }

    #[test]
    fn simd_matches_ref_on_ragged_shapes() {
        let shapes = [(1, 1, 1), (1, 16, 4), (3, 17, 5), (5, 33, 63), (7, 40, 130), (70, 50, 384), (129, 20, 7)];
        for (seed, &(n, m, k)) in (1..).zip(shapes.iter()) {
            check(n, m, k, seed);
        }
    }

    #[test]
    fn quantize_row_simd_matches_ref() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for k in [1, 15, 16, 17, 100, 384] {
            let row: Vec<f32> = (0..k).map(|_| (rng.random::<f32>() - 0.5) * 10.0).collect();
            let (mut a, mut b) = (vec![0u8; k], vec![0u8; k]);
            assert_eq!(quantize_row(&row, &mut a), quantize_row_ref(&row, &mut b));
            assert_eq!(a, b, "k = {k}");
        }
    }

    #[test]
    fn zero_rows_give_bias() {
        let p = PackedI8::from_f32(&[1.0, -2.0, 3.0, 0.5], 2, 2);
        let mut y = vec![9f32; 2];
        linear_w8a8(&p, &[0.0, 0.0], 1, Some(&[0.25, -1.0]), &mut y, Isa::detect(), &Serial);
        assert_eq!(y, vec![0.25, -1.0]);
    }
}
